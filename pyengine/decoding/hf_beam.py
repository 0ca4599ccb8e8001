"""Hugging Face `generate`'s beam state: the rules' bookkeeping in batched tensors, each step one C++ call."""
from __future__ import annotations

import torch

from .. import _C
from ..config import DecodeOptions
from .hypothesis import Hypothesis
from .processors import NEG

EARLY_STOPPING_CODES = {False: 0, True: 1, "never": 2}


class HFBeamState:
    """Hugging Face `generate`'s beam rules. Per-sentence beam bookkeeping in batched tensors of shape (B, K, ...);
    B shrinks as sentences finish. Each step scores max(2, 1 + end ids) × beam candidates over beam × vocab;
    candidates ending in an end id (or at the length limit) among the first `beam` enter the finished set with
    score / length ** length_penalty; the best non-finished `beam` continue. A sentence stops when no running
    hypothesis can beat its worst finished one (HF's heuristic). `step` runs in C++ (pyengine._C.beam_step: `impl`
    "loop", a loop per sentence over CPU tensors, or "aten", an ATen composition for any device — Ops.beam_step); its
    Python specification, which the C++ is tested against, is tests/reference_search.py."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device, impl: str):
        self.beam, self.max_len, self.impl = beam, max_len, impl
        self.sentence = torch.arange(batch, device=device)  # caller's index of each live sentence
        self.run_scores = torch.full((batch, beam), NEG, device=device)
        self.run_scores[:, 0] = 0.0  # only the first beam is live at the start
        self.run_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        self.fin_scores = torch.full((batch, beam), NEG, device=device)
        self.fin_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        self.fin_len = torch.zeros(batch, beam, dtype=torch.long, device=device)
        self.fin_flag = torch.zeros(batch, beam, dtype=torch.bool, device=device)
        self.open = torch.ones(batch, dtype=torch.bool, device=device)  # HF: early-stop heuristic unsatisfied
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)  # tokens each sentence has generated

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's best (log-prob, token) candidates → (parent row per new row (B·K,), next token (B·K,)).
        Each sentence's length is its own count (`steps`, advanced here), not `step`: sentences of cohorts that
        started at different steps share this state (`absorb`)."""
        rows, nxt, self.last_parent, self.last_pick = _C.beam_step(
            cand_logp, cand_ids, self.run_scores, self.run_hist, self.fin_scores, self.fin_hist, self.fin_len,
            self.fin_flag, self.open, self.steps, float(opts.length_penalty), EARLY_STOPPING_CODES[opts.early_stopping],
            list(opts.end_ids(eos)), impl=self.impl)
        return rows, nxt

    def done(self, opts: DecodeOptions) -> torch.Tensor:
        """(B,) sentences whose finished set can no longer change."""
        if opts.early_stopping is True:
            return ~self.open | self.fin_flag.all(dim=1)
        return ~self.open

    def results(self, rows: torch.Tensor, opts: DecodeOptions, eos: int) -> list[tuple[int, list[Hypothesis]]]:
        """(caller's sentence, n-best) of these batch rows: four reads from the device, however many finished."""
        n, ends = opts.num_hypotheses, opts.end_ids(eos)
        lengths, scores = self.fin_len[rows, :n].tolist(), self.fin_scores[rows, :n].tolist()
        hists, sentences = self.fin_hist[rows, :n].tolist(), self.sentence[rows].tolist()
        out = []
        for sentence, row_lengths, row_scores, row_hists in zip(sentences, lengths, scores, hists):
            hyps = []
            for length, score, hist in zip(row_lengths, row_scores, row_hists):
                toks = hist[:length]
                if toks and toks[-1] in ends and not opts.return_end_token:
                    toks = toks[:-1]
                hyps.append(Hypothesis(toks, score))
            out.append((sentence, hyps))
        return out

    FIELDS = ("sentence", "run_scores", "run_hist", "fin_scores", "fin_hist", "fin_len", "fin_flag", "open", "steps")

    def keep(self, rows: torch.Tensor) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, rows))

    def absorb(self, other: "HFBeamState", offset: int) -> None:
        """Another cohort's sentences join after these (their caller's indices shifted by `offset`)."""
        other.sentence = other.sentence + offset
        for name in self.FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
