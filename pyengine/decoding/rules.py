"""Beam-search rules of each checkpoint family, behind one interface chosen at load: Hugging Face `generate`
(Marian/OPUS-MT, M2M100/NLLB, BART), OpenNMT-py's Translator, fairseq's SequenceGenerator and Marian's own
BeamSearch (models trained by Marian: .npz/.bin); and CTranslate2's
BeamSearch, which a caller may ask for by name (`search_rules="ctranslate2"`, with its `patience`).

A rules object makes the per-batch beam state (`beam_state`) and says the two things greedy decoding also takes
from the family (`length_offset`, `forces_final_eos`). A beam state's interface: `step` (each row's candidates →
parent rows and next tokens), `done`, `results`, `keep` (sentences that stay), `sentence`, `run_hist`.
"""
from __future__ import annotations

import math

import torch

from ..config import DecodeOptions
from .processors import accumulated, ct2_drawn_candidates, ending, sampled_candidates, warped
from .hf_beam import HFBeamState
from .hypothesis import Hypothesis, coverage_penalty

class RecordedBeamState:
    """Shared part of the beam states whose finished hypotheses are recorded in a list per sentence
    (OpenNMT-py's and fairseq's rules), same interface as BeamState. Only the first beam is live at the
    start; `step` is the library's rule, in PyTorch (any device; `impl` is not used)."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device, impl: str):
        self.beam, self.max_len = beam, max_len
        self.sentence = torch.arange(batch, device=device)
        self.run_scores = torch.full((batch, beam), float("-inf"), device=device)
        self.run_scores[:, 0] = 0.0
        self.run_hist = torch.zeros(batch, beam, max_len, dtype=torch.long, device=device)
        # per caller sentence: (score, tokens, attention or None)
        self.finished: list[list[tuple[float, list[int], torch.Tensor | None]]] = [[] for _ in range(batch)]
        self.recorded: list[tuple[int, int, int]] = []  # this step's records: (sentence, index, parent batch row)
        self._done = torch.zeros(batch, dtype=torch.bool, device=device)

    def record(self, i: int, score: float, tokens: list[int], parent_row: int) -> list:
        """Record a finished hypothesis of batch row-sentence i, continued from batch row `parent_row` (whose
        attention `attach` gives it); returns the sentence's records."""
        sentence = int(self.sentence[i])
        self.finished[sentence].append((score, tokens, None))
        self.recorded.append((sentence, len(self.finished[sentence]) - 1, parent_row))
        return self.finished[sentence]

    def attach(self, attention: torch.Tensor | None) -> None:
        """The hypotheses recorded this step get their parent row's attention (rows, positions, source) if given."""
        if attention is not None:
            for sentence, index, row in self.recorded:
                score, tokens, _ = self.finished[sentence][index]
                self.finished[sentence][index] = (score, tokens, attention[row].clone())
        self.recorded = []

    def top_candidates(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor,
                       n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The n best (running score + log-prob) over each sentence's beam × candidates:
        (scores (B, n), parent beam (B, n), token (B, n))."""
        b, k = self.run_scores.shape
        per_row = cand_logp.shape[-1]
        acc = accumulated(cand_logp, self.run_scores)
        top_scores, top_pos = torch.topk(acc, min(n, k * per_row))
        parent = torch.div(top_pos, per_row, rounding_mode="floor")
        return top_scores, parent, cand_ids.view(b, k * per_row).gather(1, top_pos)

    def advance(self, parent: torch.Tensor, token: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue beam j of each sentence from beam parent[:, j] with token[:, j]: (rows (B·K,), tokens (B·K,))."""
        b, k = parent.shape
        self.run_hist = self.run_hist.gather(1, parent[:, :, None].expand(b, k, self.max_len)).clone()
        self.run_hist[:, :, step] = token
        rows = (parent + torch.arange(b, device=parent.device)[:, None] * k).view(-1)
        return rows, token.view(-1)

    def done(self, opts: DecodeOptions) -> torch.Tensor:
        return self._done.clone()

    def results(self, rows: torch.Tensor, opts: DecodeOptions, eos: int) -> list[tuple[int, list[Hypothesis]]]:
        out = []
        for sentence in self.sentence[rows].tolist():
            best = sorted(self.finished[sentence], key=lambda st: -st[0])[: opts.num_hypotheses]
            out.append((sentence, [Hypothesis(toks, score, att) for score, toks, att in best]))
        return out

    def keep(self, rows: torch.Tensor) -> None:
        for name in ("sentence", "run_scores", "run_hist", "_done"):
            setattr(self, name, getattr(self, name).index_select(0, rows))


class OnmtBeamState(RecordedBeamState):
    """OpenNMT-py 3's beam rules (onmt.translate.BeamSearch with its translate defaults). Each step keeps
    the `beam` best candidates over beam × vocab; those ending in EOS (or at the length limit) are
    recorded with score / (generated + 1) ** alpha — OpenNMT counts the start token — and stay in the
    beam with a score of -65504, so they do not extend. A sentence is done when the best candidate of a
    step has finished and at least n-best hypotheses are recorded; its n-best are the recorded ones
    sorted by score."""

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = self.run_scores.shape
        top_scores, parent, token = self.top_candidates(cand_logp, cand_ids, k)
        rows, nxt = self.advance(parent, token, step)
        normalized = top_scores / float((step + 2) ** opts.length_penalty)
        hits = (token == eos) | (step + 1 >= self.max_len)
        self._done = torch.zeros(b, dtype=torch.bool, device=token.device)
        if bool(hits.any()):
            hits_list, scores_list = hits.tolist(), normalized.tolist()
            for i in range(b):
                if not any(hits_list[i]):
                    continue
                record = self.finished[int(self.sentence[i])]
                for j in range(k):
                    if hits_list[i][j]:
                        toks = self.run_hist[i, j, : step + 1].tolist()
                        record = self.record(i, scores_list[i][j], toks[:-1] if toks[-1] == eos else toks,
                                             i * k + int(parent[i, j]))
                self._done[i] = hits_list[i][0] and len(record) >= opts.num_hypotheses
        self.run_scores = top_scores.masked_fill(hits, -65504.0)
        return rows, nxt


class FairseqBeamState(RecordedBeamState):
    """fairseq's SequenceGenerator beam rules (BeamSearch). Each step takes the 2 × beam best candidates
    over beam × vocab; EOS candidates among the first `beam` (with a finite score) are finalized in score
    order while the sentence has fewer than `beam` finalized, with score / generated_length **
    length_penalty; the first `beam` non-EOS candidates continue. A sentence is done once it has `beam`
    finalized hypotheses (no early-stopping heuristic). At the last step the caller offers only EOS,
    with its real log-probability, as fairseq forces it."""

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = self.run_scores.shape
        top_scores, parent, token = self.top_candidates(cand_logp, cand_ids, 2 * k)
        is_eos = (token == eos) & torch.isfinite(top_scores)
        self._done = torch.zeros(b, dtype=torch.bool, device=token.device)
        if bool(is_eos[:, :k].any()):
            eos_list, scores_list, parents = is_eos[:, :k].tolist(), top_scores.tolist(), parent.tolist()
            norm = float((step + 1) ** opts.length_penalty)
            for i in range(b):
                record = self.finished[int(self.sentence[i])]
                for j in range(k):
                    if eos_list[i][j] and len(record) < k:
                        record = self.record(i, scores_list[i][j] / norm, self.run_hist[i, parents[i][j], :step].tolist(),
                                             i * k + parents[i][j])
                self._done[i] = len(record) >= k
        # the first `beam` candidates that are not EOS continue (positions of EOS ones pushed past the end)
        width = top_scores.shape[1]
        order = torch.arange(width, device=token.device) + is_eos.long() * width
        active = torch.topk(order, k, largest=False).indices.sort(dim=1).values
        active = torch.where(active < width, active, active % width)
        self.run_scores = top_scores.gather(1, active)
        return self.advance(parent.gather(1, active), token.gather(1, active), step)


class Ct2BeamState(RecordedBeamState):
    """CTranslate2's BeamSearch rules (src/decoding.cc, 4.x). Each step takes the 2 × beam best candidates over
    beam × vocab (with sampling, 2 × beam drawn: `choose`); each of the first `beam` that is the end token (or any,
    at the length limit) is recorded with its running score, and its place goes to the next candidate that is not the
    end token. A sentence is done at the length limit; without penalties (length_penalty and coverage_penalty 0) once
    the best candidate of some step has finished and num_hypotheses are recorded; otherwise once round(beam ×
    patience) are recorded. Its n-best are the recorded ones, score / length ** length_penalty with length the
    generated tokens (the end token among them, returned or not), best first."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device, impl: str):
        super().__init__(batch, beam, max_len, device, impl)
        self.top_finished = torch.zeros(batch, dtype=torch.bool, device=device)  # beam 0 has finished once

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.choose(*self.top_candidates(cand_logp, cand_ids, 2 * self.beam), step, opts, eos)

    def choose(self, top_scores: torch.Tensor, parent: torch.Tensor, token: torch.Tensor, step: int,
               opts: DecodeOptions, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rule over each sentence's 2 × beam candidates (B, 2K) — running scores, parent beams, tokens — in the
        order it takes them: best first, or as drawn (processors.ct2_drawn_candidates, its beam sampling)."""
        b, k = self.run_scores.shape
        width, last = top_scores.shape[1], step + 1 >= self.max_len
        is_end = ending(token, opts, eos)
        ends, scores, parents, tokens = is_end.tolist(), top_scores.tolist(), parent.tolist(), token.tolist()
        picks = []
        max_candidates = math.floor(k * opts.patience + 0.5)  # C++'s std::round
        early_exit = opts.length_penalty == 0 and opts.coverage_penalty == 0
        for i in range(b):
            record, secondary, row = self.finished[int(self.sentence[i])], k, []
            for j in range(k):
                pick = j
                if ends[i][j] or last:
                    if j == 0:
                        self.top_finished[i] = True
                    record = self.record(i, scores[i][j], self.run_hist[i, parents[i][j], :step].tolist() + [tokens[i][j]],
                                         i * k + parents[i][j])
                    for jj in range(secondary, width):  # the next candidate that is not the end token takes its place
                        if not ends[i][jj]:
                            pick, secondary = jj, jj + 1
                            break
                row.append(pick)
            picks.append(row)
            self._done[i] = last or (bool(self.top_finished[i]) and len(record) >= opts.num_hypotheses if early_exit
                                     else len(record) >= max_candidates)
        active = torch.tensor(picks, dtype=torch.long, device=token.device)
        self.run_scores = top_scores.gather(1, active)
        return self.advance(parent.gather(1, active), token.gather(1, active), step)

    def results(self, rows: torch.Tensor, opts: DecodeOptions, eos: int) -> list[tuple[int, list[Hypothesis]]]:
        """Each sentence's n-best. A coverage penalty is added to every recorded hypothesis before they are ranked,
        over its attention rows with the end token's (measured: CTranslate2 4.8.5's penalty counts that row)."""
        out, ends = [], opts.end_ids(eos)
        for sentence in self.sentence[rows].tolist():
            scored = [(final_score(score, len(toks), opts.length_penalty) + coverage_penalty(att, opts.coverage_penalty),
                       toks, att) for score, toks, att in self.finished[sentence]]
            best = sorted(scored, key=lambda st: -st[0])[: opts.num_hypotheses]
            out.append((sentence, [Hypothesis(toks[:-1] if toks[-1] in ends and not opts.return_end_token else toks,
                                              score, att) for score, toks, att in best]))
        return out

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.top_finished = self.top_finished.index_select(0, rows)


class MarianBeamState(RecordedBeamState):
    """Marian's BeamSearch (src/translator/beam_search.cpp, history.h). Each sentence keeps n live hypotheses (n = beam
    at the start): each step takes its n best candidates over those n × vocab; the ones ending in the end token (all
    of them at the length limit) finish with (score − word_penalty · length) / length ** length_penalty (Marian's
    --word-penalty and --normalize; length counts the end token), and the others are the next step's live ones, so
    the beam narrows as hypotheses finish. A sentence is done when none is live; its n-best are the finished ones,
    best first."""

    def __init__(self, batch: int, beam: int, max_len: int, device: torch.device, impl: str):
        super().__init__(batch, beam, max_len, device, impl)
        self.live = [beam] * batch  # live hypotheses of each (batch row) sentence

    def step(self, cand_logp: torch.Tensor, cand_ids: torch.Tensor, step: int, opts: DecodeOptions,
             eos: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = self.run_scores.shape
        top_scores, parent, token = self.top_candidates(cand_logp, cand_ids, k)  # dead rows score -inf: never taken
        last = step + 1 >= self.max_len
        ends, scores, parents, tokens = (token == eos).tolist(), top_scores.tolist(), parent.tolist(), token.tolist()
        picks, dead = [], torch.zeros(b, k, dtype=torch.bool)
        for i in range(b):
            survivors = []
            for j in range(self.live[i]):
                if ends[i][j] or last:
                    toks = self.run_hist[i, parents[i][j], :step].tolist() + ([] if ends[i][j] else [tokens[i][j]])
                    self.record(i, final_score(scores[i][j], step + 1, opts.length_penalty, opts.word_penalty), toks,
                                i * k + parents[i][j])
                else:
                    survivors.append(j)
            self.live[i] = len(survivors)
            self._done[i] = not survivors
            picks.append(survivors + [0] * (k - len(survivors)))  # padding slots, dead from now on
            dead[i, len(survivors):] = True
        active = torch.tensor(picks, dtype=torch.long, device=token.device)
        self.run_scores = top_scores.gather(1, active).masked_fill(dead.to(token.device), float("-inf"))
        return self.advance(parent.gather(1, active), token.gather(1, active), step)

    def keep(self, rows: torch.Tensor) -> None:
        super().keep(rows)
        self.live = [self.live[i] for i in rows.tolist()]


def final_score(score: float, length: int, length_penalty: float, word_penalty: float = 0.0) -> float:
    """(score − word_penalty · length) / length ** length_penalty in float32, as CTranslate2 (no word penalty) and
    Marian (history.h: --word-penalty, --normalize) compute a finished hypothesis's score."""
    f32 = torch.float32
    penalized = torch.tensor(score, dtype=f32) - torch.tensor(word_penalty, dtype=f32) * float(length)
    return float(penalized / torch.tensor(float(length), dtype=f32) ** length_penalty)


class BeamRules:
    """A family's rules: its beam state, and what greedy decoding takes from it."""

    name = "hf"
    ranks_coverage = False  # its beam state adds the coverage penalty itself (else the n-best is re-ranked with it)
    length_offset = 0  # added to greedy's generated length in the length penalty
    forces_final_eos = False  # at the last allowed step EOS is the only candidate, with its real log-prob
    # HF's beam search applies its processors to the log-probs (a banned token keeps its share of the softmax);
    # CTranslate2 to the logits, before the softmax
    processors_on_logits = False
    state_class: type = HFBeamState

    def beam_state(self, batch: int, beam: int, max_len: int, device: torch.device, impl: str):
        """impl: the C++ beam step's implementation, "loop" (CPU tensors) or "aten" (Ops.beam_step)."""
        return self.state_class(batch, beam, max_len, device, impl)

    def greedy_score(self, score: float, generated: int, opts: DecodeOptions) -> float:
        """A greedy hypothesis's score from its log-probability and its generated tokens (the end token among them)."""
        return score / (generated + self.length_offset) ** opts.length_penalty

    def candidates(self, beam: int, ends: int) -> int:
        """The candidates per sentence a beam step ranks (each row offers as many: a sentence's best n over beam ×
        vocab are among its rows' own best n): HF's max(2, 1 + end ids) × beam, so that `beam` still run when the
        best ones end; 2 × beam for the families that take one end id."""
        return max(2, 1 + ends) * beam

    def sampled_step(self, state, logp: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A beam-sampling step from the rows' processed log-probs (B·K, V): HF's (do_sample with num_beams), as many
        continuations as `candidates` drawn from the warped scores, then its beam step over them (other families
        refuse sampling with beam > 1: DecodeOptions.check_for)."""
        n = self.candidates(state.beam, len(opts.end_ids(eos)))
        drawn = sampled_candidates(warped(logp, opts), state.run_scores, n, generator)
        return state.step(*drawn, step, opts, eos)


class OnmtRules(BeamRules):
    name, length_offset, state_class = "onmt", 1, OnmtBeamState  # counts the start token


class FairseqRules(BeamRules):
    name, forces_final_eos, state_class = "fairseq", True, FairseqBeamState


class MarianRules(BeamRules):
    name, state_class = "marian", MarianBeamState

    def greedy_score(self, score: float, generated: int, opts: DecodeOptions) -> float:
        return final_score(score, generated, opts.length_penalty, opts.word_penalty)


class Ct2Rules(BeamRules):
    name, processors_on_logits, ranks_coverage, state_class = "ctranslate2", True, True, Ct2BeamState

    def candidates(self, beam: int, ends: int) -> int:
        return 2 * beam  # however many end ids

    def sampled_step(self, state, logp: torch.Tensor, step: int, opts: DecodeOptions, eos: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """CTranslate2's beam sampling: its rule over 2 × beam candidates in the order its sampler draws them."""
        drawn = ct2_drawn_candidates(logp, state.run_scores, opts, 2 * state.beam, generator)
        return state.choose(*drawn, step, opts, eos)


RULES = {"hf": BeamRules(), "onmt": OnmtRules(), "fairseq": FairseqRules(), "marian": MarianRules(),
         "ctranslate2": Ct2Rules()}


def rules_for(family: str) -> BeamRules:
    """The rules of a checkpoint family (ModelConfig.family), or CTranslate2's ("ctranslate2")."""
    return RULES[family]
