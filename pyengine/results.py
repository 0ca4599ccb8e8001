"""What translation returns: a sentence's n-best (`Translation`) and streaming events (`StreamEvent`)."""
from __future__ import annotations

from dataclasses import dataclass

from .config import DecodeOptions
from .decoding import Hypothesis
from .documents.align import hard_alignment
from .errors import OptionError


@dataclass
class StreamEvent:
    """A sentence's best hypothesis so far (`done`: final). For beam search a later event may revise it.
    log_probs (greedy search and sampling): each generated token's log-probability, the end token's included where it
    was predicted — CTranslate2's generate_tokens(return_log_prob=True); None under beam search."""

    index: int
    tokens: list[int]
    text: str
    done: bool
    log_probs: list[float] | None = None


@dataclass
class Translation:
    """n-best result for one input: target ids (no start token, no EOS), scores, and detokenized text."""

    tokens: list[list[int]]
    scores: list[float]
    hypotheses: list[str]
    # with return_attention: per hypothesis, one row per token of `tokens`: its attention over the source
    # tokens (EOS included), last decoder layer, mean of its first `alignment_heads` heads (default all)
    attention: list[list[list[float]]] | None = None
    # and the end token's row, where the hypothesis ended with it (None: it reached the length limit, or the end
    # token is among `tokens`)
    end_attention: list[list[float] | None] | None = None

    @classmethod
    def of(cls, hyps: list[Hypothesis], decode, texts: list[str] | None = None) -> "Translation":
        """From a sentence's n-best hypotheses, detokenized with `decode` (or their `texts`, made already)."""
        ends = None if not hyps or hyps[0].attention is None else \
            [None if h.end_attention is None else h.end_attention.tolist() for h in hyps]
        return cls([h.tokens for h in hyps], [h.score for h in hyps],
                   [decode(h.tokens) for h in hyps] if texts is None else texts, attention_lists(hyps), ends)

    def hard_alignment(self, k: int = 0) -> list[tuple[int, int]]:
        """Hypothesis k's (source token, target token) pairs by Marian's hard rule (documents.align.hard_alignment),
        the end token included as Marian prints it (target index len(tokens)) where the hypothesis ended with it;
        needs return_attention=True."""
        if self.attention is None:
            raise OptionError("hard_alignment needs the attention: translate with return_attention=True")
        end = None if self.end_attention is None else self.end_attention[k]
        return hard_alignment(self.attention[k] + ([] if end is None else [end]))

    @classmethod
    def blank(cls, opts: DecodeOptions) -> "Translation":
        """The answer to an empty or blank text: n empty hypotheses."""
        n = opts.num_hypotheses
        return cls([[]] * n, [0.0] * n, [""] * n, [[] for _ in range(n)] if opts.return_attention else None,
                   [None] * n if opts.return_attention else None)


def attention_lists(hyps: list[Hypothesis]) -> list[list[list[float]]] | None:
    if not hyps or hyps[0].attention is None:
        return None
    return [h.attention.tolist() for h in hyps]


def translation(hyps: list[Hypothesis], tokenizer, opts: DecodeOptions, text: str) -> Translation:
    """The Translation of `text` from its n-best hypotheses. With replace_unknowns (CTranslate2's), each unknown target
    token's text is the source piece it attends most (the first, on a tie: std::max_element), special pieces dropped
    as in decoding; the attention that took stays out of the result unless return_attention asked for it."""
    if not opts.replace_unknowns:
        return Translation.of(hyps, tokenizer.decode)
    source = tokenizer.source_pieces(text)
    unk = tokenizer.target_unk_id
    texts = []
    for h in hyps:
        pieces = tokenizer.target_pieces(h.tokens)
        for t, token in enumerate(h.tokens):
            if token == unk:
                pieces[t] = source[int(h.attention[t].argmax())]
        texts.append(tokenizer.decode_pieces(pieces))
    if not opts.return_attention:
        for h in hyps:
            h.attention = h.end_attention = None
    return Translation.of(hyps, tokenizer.decode, texts)

