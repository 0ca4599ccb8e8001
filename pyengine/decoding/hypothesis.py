"""A finished hypothesis and how a sentence's n-best list is finalized."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import DecodeOptions

StepCallback = Callable[[int, list[int], bool], None]  # (sentence, best tokens so far, finished)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids without the start token and without EOS
    score: float
    attention: torch.Tensor | None = None  # (len(tokens), S): last layer's cross-attention (DecodeOptions.alignment_heads)
    end_attention: torch.Tensor | None = None  # (S,): the same when the end token (not returned) was predicted


def finalize(hyps: list[Hypothesis], opts: DecodeOptions) -> list[Hypothesis]:
    """A finished sentence's n-best list. CTranslate2's coverage penalty is applied when it is ranked:
    score += β·Σ_j log(min(Σ_t a_tj, 1)) over the source positions j that received attention; then the
    attention is dropped unless it was asked for."""
    if opts.coverage_penalty:
        for h in hyps:
            coverage = h.attention.double().sum(dim=0)
            received = coverage[coverage > 0]
            h.score += float(opts.coverage_penalty * torch.log(received.clamp(max=1.0)).sum())
        hyps.sort(key=lambda h: -h.score)
    if not (opts.return_attention or opts.replace_unknowns):  # replace_unknowns reads it when the text is made
        for h in hyps:
            h.attention = None
    return hyps
