"""A finished hypothesis and how a sentence's n-best list is finalized."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import DecodeOptions

# (sentence, best tokens so far, finished, the log-probability of each generated token — the end token's too when it
# was predicted — or None: greedy search reports them, beam search's best so far may still be revised)
StepCallback = Callable[[int, list[int], bool, "list[float] | None"], None]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids without the start token and without EOS
    score: float
    attention: torch.Tensor | None = None  # (len(tokens), S): last layer's cross-attention (DecodeOptions.alignment_heads)
    end_attention: torch.Tensor | None = None  # (S,): the same when the end token (not returned) was predicted


def coverage_penalty(attention: torch.Tensor | None, beta: float) -> float:
    """β·Σ_j log(min(Σ_t a_tj, 1)) over the source positions j that received attention (Wu et al., 2016; GNMT's
    coverage penalty, as CTranslate2 computes it); 0 without β."""
    if not beta:
        return 0.0
    coverage = attention.double().sum(dim=0)
    return float(beta * torch.log(coverage[coverage > 0].clamp(max=1.0)).sum())


def finalize(hyps: list[Hypothesis], opts: DecodeOptions, rescore: bool = True) -> list[Hypothesis]:
    """A finished sentence's n-best list, re-ranked with the coverage penalty over each hypothesis's token rows
    (`rescore`; CTranslate2's rules add theirs before the n-best is cut: Ct2BeamState.results); then the attention is
    dropped unless it was asked for."""
    if opts.coverage_penalty and rescore:
        for h in hyps:
            h.score += coverage_penalty(h.attention, opts.coverage_penalty)
        hyps.sort(key=lambda h: -h.score)
    if not (opts.return_attention or opts.replace_unknowns):  # replace_unknowns reads it when the text is made
        for h in hyps:
            h.attention = None
    return hyps


def split_end(rows: torch.Tensor | None, length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(a hypothesis's `length` token rows, the end token's row or None): the row after them, where one was written."""
    if rows is None:
        return None, None
    end = rows[length] if rows.shape[0] > length and bool(rows[length].sum() > 0) else None
    return rows[:length], end


def alignment(probs: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """The attention a hypothesis keeps from a step's per-head weights (N, H, T, S): the mean of the first
    `alignment_heads` heads (0: all, as HF's averaged cross-attention; 1: the first head, the alignment of CTranslate2's
    converted models and of Marian)."""
    return probs[:, : opts.alignment_heads or None].mean(dim=1)


def trimmed(hyps: list[Hypothesis], length: int) -> list[Hypothesis]:
    """Attention over the sentence's own source tokens, not its cohort's padding."""
    for h in hyps:
        if h.attention is not None:
            h.attention = h.attention[:, :length]
        if h.end_attention is not None:
            h.end_attention = h.end_attention[:length]
    return hyps
