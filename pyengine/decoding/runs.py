"""Beam cohorts that share one search state: a running batch's newcomers join a cohort already decoding.

A server's batch admits sentences a few at a time; each cohort with a search state of its own paid its search
bookkeeping every step (a C++ beam step, the done test, the row selection: ~30-60 µs a cohort, 6-7 cohorts live in
a step under closed-loop clients; benchmarks.cohorts). Sentences whose rules do not depend on the step (HF's rules,
no minimum length, no forced first token, no n-gram or repetition processor, no prefix, attention or callback)
can share one state at different steps: the HF beam state counts each sentence's own length (HFBeamState.steps),
the KV cache takes a position per row, and what remains step-dependent — the forced EOS of the last step and the
length limit — is known per run of sentences that started together. `Runs` keeps those runs, in row order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model.cache import Span
from .processors import forced_eos_candidates, needs_history
from .hf_beam import HFBeamState

if TYPE_CHECKING:
    from .strategies import Beam


def shares_state(beam: "Beam") -> bool:
    """Whether this cohort's sentences can share a search state with others at other steps (see the module
    docstring): the same rule for every step but the last, which `Runs` knows."""
    opts = beam.opts
    return (type(beam.state) is HFBeamState and beam.att is None and beam.bias is None and beam.on_step is None
            and beam.forced == 0 and not opts.sampling and not needs_history(opts) and opts.min_decoding_length == 0
            and opts.forced_bos_token is None and not beam.done)


def can_join(host: "Beam", other: "Beam") -> bool:
    """Whether `other`'s sentences (a cohort being admitted) can join `host`'s search state."""
    return shares_state(host) and shares_state(other) and host.opts == other.opts and host.rules is other.rules \
        and host.eos == other.eos and host.cache_len == other.cache_len


def join(host: "Beam", other: "Beam") -> None:
    """`other`'s sentences join `host`'s search state after its own, each run at its own step."""
    runs = host.runs.runs if host.runs is not None else [[host.sentences, host.step]]
    runs = runs + [[other.sentences, other.step]]
    host.state.absorb(other.state, len(host.results))
    host.prompt = torch.cat([host.prompt, other.prompt])
    host.prompts += other.prompts
    host.results += other.results
    host.tokens = torch.cat([host.tokens, other.tokens])
    host.set_runs(runs)


def forced_last(beam: "Beam", logp: torch.Tensor, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A joined cohort's candidates with HF's forced EOS in the rows of the runs at their last step (what
    Strategy.forced_eos_step gives a cohort of one run)."""
    last = beam.runs.at_step(beam.opts.max_decoding_length - 1) if beam.opts.forced_eos else []
    if not last:
        return logp, ids
    logp, ids, k = logp.clone(), ids.clone(), beam.opts.beam_size
    for run in last:
        rows = slice(run.start * k, run.stop * k)
        logp[rows], ids[rows] = forced_eos_candidates(len(run) * k, logp.shape[1], vocab, beam.eos, logp.device)
    return logp, ids


def moved(at: int, total: int, n: int, device: torch.device) -> torch.Tensor:
    """The order that moves the last n of total + n entries to `at`, the others keeping theirs."""
    return torch.cat([torch.arange(at, device=device), torch.arange(total, total + n, device=device),
                      torch.arange(at, total, device=device)])


class Runs:
    """[sentences, step] of each run of sentences admitted together, in row order (two or more runs)."""

    def __init__(self, runs: list[list[int]]):
        self.runs = runs

    @staticmethod
    def of(runs: list[list[int]]) -> "Runs | None":
        """Adjacent runs at the same step joined; None when one is left (the cohort steps as one again)."""
        joined: list[list[int]] = []
        for n, step in runs:
            if joined and joined[-1][1] == step:
                joined[-1][0] += n
            elif n:
                joined.append([n, step])
        return Runs(joined) if len(joined) > 1 else None

    def spans(self, start: int, beam: int) -> list[Span]:
        """The batch rows of each run (from `start`) and the position they decode at (no prefix: their step)."""
        out = []
        for n, step in self.runs:
            out.append(Span(start, n * beam, step))
            start += n * beam
        return out

    def at_step(self, step: int) -> list[range]:
        """The sentences (cohort rows order) of the runs at this step."""
        out, at = [], 0
        for n, s in self.runs:
            if s == step:
                out.append(range(at, at + n))
            at += n
        return out

    def advance(self) -> None:
        for run in self.runs:
            run[1] += 1

    def kept(self, sentences: list[int]) -> list[list[int]]:
        """The runs after keeping these sentences (indices in the current order, ascending)."""
        out, start, i = [], 0, 0
        for n, step in self.runs:
            count = 0
            while i < len(sentences) and sentences[i] < start + n:
                count, i = count + 1, i + 1
            out.append([count, step])
            start += n
        return out
