"""Scoring: the log-probability the model gives a target for a source (teacher forcing through the same cache,
memory and decoder step as decoding), as CTranslate2's `score_batch` and `marian-scorer` give it — for reranking
n-best lists, filtering parallel corpora and quality estimation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .batching import plan_batches, restore_order
from .errors import InputError, OptionError
from .model import ForcedDecoder


@dataclass
class ScoringResult:
    """The scored target ids (EOS included), each one's log-probability given the source and the tokens before it,
    and the target text's tokens as strings where the tokenizer has them."""

    tokens: list[int]
    log_probs: list[float]

    @property
    def cumulated_score(self) -> float:
        """Sum of the log-probabilities (CTranslate2's cumulated_score)."""
        return float(sum(self.log_probs))

    @property
    def normalized_score(self) -> float:
        """Mean log-probability per token (CTranslate2's normalized_score)."""
        return self.cumulated_score / len(self.log_probs) if self.log_probs else 0.0


@torch.inference_mode()
def score(model, sources: list[list[int]], targets: list[list[int]], start_id: int, pad_id: int,
          device: torch.device, max_tokens: int, max_size: int, offset: int = 0) -> list[ScoringResult]:
    """Log-probabilities of each target (ids ending with EOS) after `start_id`, in token-budget batches;
    the first `offset` target tokens are not scored (a forced prefix such as a language token)."""
    lengths = [max(len(s), len(t) + 1) for s, t in zip(sources, targets)]
    batches = plan_batches(lengths, max_tokens, max_size)
    outputs = [_score_batch(model, [sources[i] for i in batch], [targets[i] for i in batch], start_id, pad_id,
                            device, offset) for batch in batches]
    return restore_order(batches, outputs, len(sources))


def _score_batch(model, sources: list[list[int]], targets: list[list[int]], start_id: int, pad_id: int,
                 device: torch.device, offset: int) -> list[ScoringResult]:
    width = max(len(s) for s in sources)
    src = torch.full((len(sources), width), pad_id, dtype=torch.long, device=device)
    for i, s in enumerate(sources):
        src[i, : len(s)] = torch.tensor(s, device=device)
    lengths = torch.tensor([len(s) for s in sources], device=device)
    steps = max(len(t) for t in targets)
    inputs = torch.full((len(targets), steps), pad_id, dtype=torch.long, device=device)
    for i, t in enumerate(targets):  # the decoder reads the start token and every target token but the last
        inputs[i, : len(t)] = torch.tensor([start_id] + t[:-1], device=device)
    log_probs = torch.log_softmax(ForcedDecoder(model, src, lengths, steps + 1).logits(inputs).float(), dim=-1)
    out = []
    for i, t in enumerate(targets):  # positions past a row's own length read padding and are not used
        picked = log_probs[i, torch.arange(len(t), device=device), torch.tensor(t, device=device)]
        out.append(ScoringResult(t[offset:], picked[offset:].tolist()))
    return out


def pair_ids(engine, sources, targets, source_lang: str | None, target_lang: str | None,
             offset: int) -> tuple[list[list[int]], list[list[int]]]:
    """score_batch's pairs as ids (the target ends with EOS; a multilingual target language's token starts it),
    each bad pair an error naming it: empty, over the model's positions, nothing left to score after `offset`."""
    engine._validate_texts(sources)
    engine._validate_texts(targets)
    if len(sources) != len(targets):
        raise InputError(f"{len(sources)} sources but {len(targets)} targets: score_batch takes pairs")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise OptionError(f"offset must be an integer >= 0, got {offset!r}")
    encode = engine._language_encoder(source_lang, target_lang, options := {})
    lead = [options["forced_bos_token"]] if "forced_bos_token" in options else []
    limit = engine.config.max_positions
    src, tgt = [], []
    for i, (s, t) in enumerate(zip(sources, targets)):
        if not s.strip() or not t.strip():
            raise InputError(f"an empty {'source' if not s.strip() else 'target'} cannot be scored", index=i)
        ids, out = encode(s), lead + engine.tokenizer.encode_target(t) + [engine.config.eos_id]
        for side, seq in (("source", ids), ("target", out)):
            if len(seq) > limit:
                raise InputError(f"{side} of {len(seq)} tokens exceeds the model's {limit} positions", index=i)
        if offset >= len(out):
            raise InputError(f"offset {offset} leaves none of the target's {len(out)} tokens to score", index=i)
        src.append(ids)
        tgt.append(out)
    return src, tgt
