"""Word alignment from the decoder's attention: which source words each target word was translated from.

Tokens are mapped to words through the tokenizer alone (encode / decode), so every model family works the same:
a source token's word is found by encoding growing prefixes of the sentence's words, a target token's by decoding
growing prefixes of the output. Alignments come from the cross-attention the engine returns (last decoder layer,
mean of heads, special tokens excluded): each target token's most attended source token, as CTranslate2's
`return_alignment` takes it, united with each source token's most attending target token.
"""
from __future__ import annotations

from typing import Callable, Sequence

WordSets = list[set[int]]  # per target word: the source words aligned to it


def source_token_words(encode: Callable[[str], list[int]], words: Sequence[str]) -> list[int] | None:
    """Per token of encode(" ".join(words)): the index of its word, -1 for special tokens (language codes, EOS).
    None when the tokenizer does not cut at the spaces (prefixes tokenize differently from the whole)."""
    empty, full = encode(""), encode(" ".join(words))
    lead = 0
    while lead < len(empty) and lead < len(full) and empty[lead] == full[lead]:
        lead += 1
    content = len(full) - len(empty)
    counts = [len(encode(" ".join(words[: j + 1]))) - len(empty) for j in range(len(words))]
    if not words or counts[-1] != content or any(b < a for a, b in zip(counts, counts[1:])):
        return None
    out = [-1] * len(full)
    j = 0
    for c in range(content):
        while counts[j] <= c:
            j += 1
        out[lead + c] = j
    return out


def target_token_words(decode: Callable[[list[int]], str], tokens: Sequence[int]) -> list[int]:
    """Per target token: the index of the output word it belongs to (a token that adds no word joins the one
    before it)."""
    return [max(len(decode(list(tokens[: k + 1])).split()) - 1, 0) for k in range(len(tokens))]


def attention_alignment(attention: Sequence[Sequence[float]], source_words: list[int], target_words: list[int],
                        n_target_words: int) -> WordSets:
    """Per target word, the source words aligned to it: each target token's most attended source token, and (so that
    every source word has a place in the translation) each source token's most attending target token — the union
    of both directions of the one attention matrix."""
    out: WordSets = [set() for _ in range(n_target_words)]
    content = [i for i, w in enumerate(source_words) if w >= 0]
    rows = [(list(row), word) for row, word in zip(attention, target_words) if word < n_target_words]
    if not content or not rows:
        return out
    for row, word in rows:
        best = max(content, key=lambda i: row[i] if i < len(row) else float("-inf"))
        out[word].add(source_words[best])
    for i in content:
        row, word = max(rows, key=lambda r: r[0][i] if i < len(r[0]) else float("-inf"))
        out[word].add(source_words[i])
    return out


def proportional_alignment(n_source_words: int, n_target_words: int) -> WordSets:
    """Target word k aligned to the source word at the same relative position: for decoders without attention."""
    if n_source_words == 0:
        return [set() for _ in range(n_target_words)]
    return [{min(int((k + 0.5) * n_source_words / n_target_words), n_source_words - 1)} for k in range(n_target_words)]


def word_alignment(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], source_words: list[str],
                   tokens: Sequence[int], attention: Sequence[Sequence[float]] | None,
                   n_target_words: int) -> tuple[WordSets, str]:
    """Per target word, its aligned source words, and how they were found ("attention" or "proportional")."""
    if attention is not None and source_words:
        src = source_token_words(encode, source_words)
        if src is not None:
            return attention_alignment(attention, src, target_token_words(decode, tokens), n_target_words), "attention"
    return proportional_alignment(len(source_words), n_target_words), "proportional"


def hard_alignment(attention: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Marian's `--alignment hard` over tokens: each target token's most attended source token (ties to the lower
    index), as (source, target) pairs sorted by source, then target. attention: one row per target token over the
    source tokens (Translation.attention, and the end token's row: last decoder layer, source EOS included)."""
    return sorted((max(range(len(row)), key=lambda s: (row[s], -s)), t) for t, row in enumerate(attention))


def alignment_text(pairs: Sequence[tuple[int, int]]) -> str:
    """Marian's textual alignment: "s-t s-t ..."."""
    return " ".join(f"{s}-{t}" for s, t in pairs)
