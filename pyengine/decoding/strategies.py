"""Greedy (or sampling) and beam search as step objects over one cohort of sentences.

Each step the runtime feeds every row of the cohort one token (`tokens`, at `position`), asks what the strategy
needs from the step's output (`need`: nothing while a target prefix is fed, else the best candidates from an
output layer fused with log-softmax + top-k, or the logits), hands it to `advance`, and applies the returned
Selection to the cache and the memory. A target prefix (HF's decoder prompt) is fed one token per step: part of
the output, not of the score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..config import DecodeOptions
from ..model.cache import Span
from .hypothesis import Hypothesis, StepCallback, finalize, split_end
from .prompt import decoder_prompt
from .processors import (PrefixBias, StepBuffers, apply_processors, candidates, forced_final_eos, fused_bans,
                         log_probs, needs_history, record_choice, sample_tokens, topk_rows)
from .rules import BeamRules, RecordedBeamState
from .runs import Runs, forced_last

if TYPE_CHECKING:
    from ..model.backends import Ops


class Selection(NamedTuple):
    """What a step keeps: decoder rows in their new order (cache rows; beam reorder and finished rows
    dropped) and sentences (encoder memory rows), None for all of them in place; and the cohort's indices
    of the sentences that finished at this step (their n-best is in `results`)."""

    rows: torch.Tensor | None
    sentences: torch.Tensor | None
    finished: tuple[int, ...] = ()


@dataclass(frozen=True)
class Need:
    """What a step's output must give a cohort: nothing (a prefix token was fed), its rows' k best candidates
    with `banned` ids excluded (kind "topk": an output layer fused with log-softmax + top-k can give them), the
    logits (kind "logits": a processor needs them), or its rows' k candidates of HF's forced-EOS step (kind
    "forced": made without the output layer, forced_eos_candidates; the cohort ends with the step, so not even its
    hidden state is needed: Strategy.forced_eos_step)."""

    kind: str
    k: int = 0
    banned: tuple[int, ...] = ()


NOTHING, LOGITS = Need("nothing"), Need("logits")


class Strategy:
    """Shared bookkeeping: the prompt, the position, the tokens fed next and the attention rows."""

    def __init__(self, batch: int, beam: int, opts: DecodeOptions, rules: BeamRules, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, on_step: StepCallback | None, prefix: torch.Tensor | None,
                 ops: "Ops"):
        self.opts, self.rules, self.eos, self.on_step = opts, rules, eos_id, on_step
        self.topk = ops.log_softmax_topk  # ranks candidates from logits: C++ on the CPU, Triton on a GPU
        # with prefix_bias_beta the prefix biases the first steps instead of being forced
        self.bias = PrefixBias(prefix, opts.prefix_bias_beta, beam) \
            if prefix is not None and prefix.shape[1] and opts.prefix_bias_beta > 0 else None
        prefix = None if self.bias is not None else prefix
        self.prompt = decoder_prompt(start_id, prefix, batch, device)  # (B, P + 1), one per sentence
        self.forced = self.prompt.shape[1] - 1  # prefix tokens fed before the first one is generated
        self.cache_len = self.forced + opts.max_decoding_length  # positions the cohort's rows use
        self.tokens = self.prompt[:, 0].repeat_interleave(beam)  # (rows,) the tokens fed at this step
        self.position, self.step = 0, 0  # cache position; generated tokens so far
        self.results: list[list[Hypothesis]] = [[] for _ in range(batch)]
        # attention rows by decoder position: the query at position i predicts output token i
        self.att = torch.zeros(batch * beam, self.cache_len, src_width, device=device) if opts.needs_attention else None
        self.done = False
        self.width = 1  # candidates per row a step needs (a beam's: its rules')

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def feed(self, att_rows: torch.Tensor | None) -> bool:
        """Record this step's attention and move on; True while the prefix is still being fed (the step's
        output is not used: the next token is the prefix's)."""
        if self.att is not None:  # the batch's memory may be narrower or wider than the cohort's sources
            width = min(self.att.shape[2], att_rows.shape[2])
            self.att[:, self.position, :width] = att_rows[:, 0, :width]
        self.position += 1
        if self.position <= self.forced:
            self.tokens = self.prompt[:, self.position].repeat_interleave(self.rows // self.prompt.shape[0])
            return True
        return False

    def spans(self, start: int) -> list[Span]:
        """The batch rows of this cohort (from `start`) by the position they decode at."""
        return [Span(start, self.rows, self.position)]

    def biasing(self, step: int) -> bool:
        return self.bias is not None and self.bias.active(step)

    def need(self) -> Need:
        """What this step's output must give the cohort (its rows' `width` best candidates, where they will do)."""
        if self.position < self.forced:
            return NOTHING
        if self.forced_eos_step():
            return Need("forced", self.width)
        bans = self.bans()
        return LOGITS if bans is None else Need("topk", self.width, tuple(bans))

    def forced_eos_step(self) -> bool:
        """HF's forced EOS at this (the last) step, which decides every score (forced_eos_candidates); not with
        sampling (a draw), a prefix bias (it moves scores) or fairseq's rule (EOS's real log-prob: forced_final_eos)."""
        opts = self.opts
        return opts.forced_eos and self.step == opts.max_decoding_length - 1 and not opts.sampling and \
            not self.rules.forces_final_eos and not self.biasing(self.step)

    def bans(self) -> list[int] | None:
        """The ids this step's choice excludes, when excluding is all the processors do (fused_bans)."""
        opts = self.opts
        # (asking for attention changes nothing here: its steps take the same fused candidates, the same bits)
        if opts.sampling or (self.rules.forces_final_eos and self.step + 1 >= opts.max_decoding_length) or \
                self.biasing(self.step):
            return None
        bans = fused_bans(self.step, opts, self.eos)
        return None if bans and self.rules.processors_on_logits else bans  # (the fused layer keeps them in the softmax)


class Greedy(Strategy):
    """Greedy (or sampling, with a generator) decoding of one cohort; finished rows leave at once. on_step sees
    each row's tokens after each step. A sampled token's score is its log-prob before temperature and filtering.

    prefix (B, P): target tokens forced after the start token (HF's decoder prompt): part of the output,
    not of the score; max/min_decoding_length count the tokens generated after it."""

    def __init__(self, batch: int, opts: DecodeOptions, rules: BeamRules, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, ops: "Ops", on_step: StepCallback | None = None,
                 generator: torch.Generator | None = None, prefix: torch.Tensor | None = None):
        if opts.sampling and generator is None:
            raise ValueError("sampling needs a torch.Generator")
        super().__init__(batch, 1, opts, rules, start_id, eos_id, device, src_width, on_step, prefix, ops)
        self.generator = generator
        self.loop = ops.beam_step == "loop"  # the search's bookkeeping in C++ over CPU tensors (record_choice)
        self.sentence = torch.arange(batch, device=device)  # cohort index of each row
        self.history = torch.zeros(batch, opts.max_decoding_length, dtype=torch.long, device=device)
        self.scores = torch.zeros(batch, dtype=torch.float32, device=device)
        # each step's chosen log-prob, for on_step (CTranslate2's generate_tokens(return_log_prob=True))
        self.step_logp = None if on_step is None else \
            torch.zeros(batch, opts.max_decoding_length, dtype=torch.float32, device=device)

    def advance(self, logits: torch.Tensor | None, buffers: StepBuffers, att_rows: torch.Tensor | None = None,
                chosen: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
        """Choose each row's next token from its (N, V) logits, or take `chosen`, the candidates `need` asked
        for; finished rows leave."""
        if self.feed(att_rows):
            return Selection(None, None)
        opts, eos, step = self.opts, self.eos, self.step
        self.step += 1
        seqs = torch.cat([self.prompt, self.history[:, :step]], dim=1) if needs_history(opts) else None
        biased = self.biasing(step)
        if chosen is not None:
            cand_logp, cand_ids = chosen  # (N, k): each row's best first
        elif self.rules.forces_final_eos and step + 1 >= opts.max_decoding_length:
            cand_logp, cand_ids = forced_final_eos(logits, eos)
        elif opts.sampling or fused_bans(step, opts, eos) is None or biased or self.rules.processors_on_logits:
            if self.rules.processors_on_logits:  # CTranslate2: the processors shape the logits, the softmax follows
                processed = apply_processors(logits, step, opts, eos, seqs)
                logp = torch.log_softmax(processed, dim=-1)
            else:  # HF: the scores are the processed log-probs, the choice the argmax of the processed logits
                logp = log_probs(logits, step, opts, eos, out=buffers.logp(self.rows), seqs=seqs)
                processed = None if biased else apply_processors(logits, step, opts, eos, seqs)
            if biased:  # CTranslate2 chooses from the biased log-probs
                self.bias.apply(logp, step)
                processed = logp
            nxt = sample_tokens(processed, opts, self.generator) if opts.sampling else topk_rows(processed, 1)[1][:, 0]
            cand_logp, cand_ids = logp.gather(1, nxt[:, None]), nxt[:, None]
        else:  # the best logit among the allowed tokens is the argmax of the processed scores
            cand_logp, cand_ids = candidates(logits, 1, step, opts, eos, buffers, seqs, self.topk)
        nxt, done, any_done = record_choice(cand_logp, cand_ids, self.scores, self.history, step, opts, eos,
                                            self.loop)
        if self.bias is not None:
            self.bias.follow(None, nxt, step)
        ends = opts.end_ids(eos)
        if self.on_step is not None:
            self.step_logp[:, step] = cand_logp[:, 0]
            for row, (sentence, finished) in enumerate(zip(self.sentence.tolist(), done.tolist())):
                toks = self.history[row, : step + 1].tolist()
                self.on_step(sentence, self.prompt[row, 1:].tolist() + (toks[:-1] if toks[-1] in ends else toks),
                             finished, self.step_logp[row, : step + 1].tolist())
        self.tokens = nxt
        if not any_done:
            return Selection(None, None)
        finished = []
        done_rows = done.nonzero()[:, 0]
        # the finished rows' tokens, prompts, sentences and scores in four reads from the device, however many
        for row, hist, prompt, sentence, score in zip(
                done_rows.tolist(), self.history[done_rows, : step + 1].tolist(), self.prompt[done_rows, 1:].tolist(),
                self.sentence[done_rows].tolist(), self.scores[done_rows].tolist()):
            ended = bool(hist) and hist[-1] in ends and not opts.return_end_token
            toks = hist[:-1] if ended else hist
            out_tokens = prompt + toks
            finished.append(sentence)
            att = None if self.att is None else self.att[row, : len(out_tokens) + ended].clone()
            self.results[sentence] = finalize(
                [Hypothesis(out_tokens, self.rules.greedy_score(score, step + 1, opts), *split_end(att, len(out_tokens)))],
                opts)
        keep = (~done).nonzero()[:, 0]
        self._keep(keep)
        return Selection(keep, keep, tuple(finished))

    def drop(self, gone: list[int]) -> Selection:
        """Take these sentences (the cohort's indices) out: their callers gave up; they get no result."""
        out = set(gone)
        keep = torch.tensor([r for r, s in enumerate(self.sentence.tolist()) if s not in out], dtype=torch.long,
                            device=self.tokens.device)
        self._keep(keep)
        return Selection(keep, keep)

    def _keep(self, keep: torch.Tensor) -> None:
        """Only these rows (= sentences) go on."""
        self.done = keep.numel() == 0
        for name in ("sentence", "history", "scores", "tokens", "prompt") + (("att",) if self.att is not None else ()) \
                + (("step_logp",) if self.step_logp is not None else ()):
            setattr(self, name, getattr(self, name)[keep])
        if self.bias is not None:
            self.bias.keep(keep)

    @property
    def live(self) -> list[int]:
        """The cohort's indices of the sentences still decoding, in row order."""
        return self.sentence.tolist()

    @property
    def sentences(self) -> int:
        """How many sentences are still decoding (a shape: no read from the device)."""
        return self.sentence.shape[0]


class Beam(Strategy):
    """Beam search of one cohort with its family's rules (BeamRules); done sentences leave the batch.

    on_step sees, after each step, each live sentence's best running hypothesis (it may still be revised:
    a later step can prefer another beam), and each sentence's final best when it finishes."""

    def __init__(self, batch: int, opts: DecodeOptions, rules: BeamRules, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, ops: "Ops", on_step: StepCallback | None = None,
                 prefix: torch.Tensor | None = None, generator: torch.Generator | None = None):
        if opts.sampling and generator is None:
            raise ValueError("sampling needs a torch.Generator")
        super().__init__(batch, opts.beam_size, opts, rules, start_id, eos_id, device, src_width, on_step, prefix,
                         ops)
        self.generator = generator
        self.state = rules.beam_state(batch, opts.beam_size, opts.max_decoding_length, device, ops.beam_step)
        self.width = rules.candidates(opts.beam_size, len(opts.end_ids(eos_id)))  # candidates per row
        self.prompts = self.prompt[:, 1:].tolist()  # the forced prefix of each sentence, in the cohort's order
        # per finished hypothesis, by decoder position
        self.fin_att = None if self.att is None else \
            torch.zeros(batch, opts.beam_size, self.cache_len, self.att.shape[2], device=device)
        self.runs: Runs | None = None  # sentences at different steps (cohorts absorbed), else one step for all

    def set_runs(self, runs: list[list[int]]) -> None:
        """[sentences, step] of its runs, in row order (runs.join)."""
        self.runs = Runs.of(runs)
        if self.runs is None:  # one step for all again
            self.step = self.position = next(step for n, step in runs if n)

    def spans(self, start: int) -> list[Span]:
        return super().spans(start) if self.runs is None else self.runs.spans(start, self.opts.beam_size)

    def need(self) -> Need:
        """With runs, every step's need but the forced EOS of a run's last step (made in advance) is the top-k
        without the suppressed ids (shares_state: no step-dependent ban)."""
        if self.runs is None:
            return super().need()
        return Need("topk", self.width, tuple(self.opts.suppress_tokens))

    def advance(self, logits: torch.Tensor | None, buffers: StepBuffers, att_rows: torch.Tensor | None = None,
                chosen: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
        """One beam step from the rows' (N, V) logits, or from `chosen`, the candidates `need` asked for."""
        if self.feed(att_rows):
            return Selection(None, None)
        opts, k, eos, step, state = self.opts, self.opts.beam_size, self.eos, self.step, self.state
        n = self.rows
        self.step += 1
        # a sentence's best 2K over beam × vocab are among its rows' own best 2K: per-row top-k
        # avoids HF's top-k over a (B, K·V) tensor
        seqs = torch.cat([self.prompt.repeat_interleave(k, dim=0), state.run_hist.view(n, -1)[:, :step]], dim=1) \
            if needs_history(opts) else None
        drawn = None  # (rows, next tokens) where the rules' beam sampling took the step
        if chosen is not None:
            cand_logp, cand_ids = chosen if self.runs is None else forced_last(self, *chosen, buffers.vocab)
        elif self.rules.forces_final_eos and step + 1 >= opts.max_decoding_length:
            cand_logp, cand_ids = forced_final_eos(logits, eos)
        elif opts.sampling:  # the rules' own beam sampling
            logp = log_probs(logits, step, opts, eos, out=buffers.logp(n), seqs=seqs,
                             on_logits=self.rules.processors_on_logits)
            drawn = self.rules.sampled_step(state, logp, step, opts, eos, self.generator)
        elif self.biasing(step):
            logp = log_probs(logits, step, opts, eos, out=buffers.logp(n), seqs=seqs,
                             on_logits=self.rules.processors_on_logits)
            self.bias.apply(logp, step)
            cand_logp, cand_ids = topk_rows(logp, self.width)
        else:
            cand_logp, cand_ids = candidates(logits, self.width, step, opts, eos, buffers, seqs, self.topk,
                                             self.rules.processors_on_logits)
        rows, nxt = state.step(cand_logp, cand_ids, step, opts, eos) if drawn is None else drawn
        if isinstance(state, RecordedBeamState):  # the hypotheses it recorded keep their parent row's attention
            state.attach(None if self.att is None else self.att[:, :self.position])
        elif self.att is not None:  # candidates extend their beam's attention; finished ones keep theirs
            b, position = state.run_scores.shape[0], self.position
            beams = torch.arange(b, device=self.att.device)[:, None]
            cand = self.att[:, :position].view(b, k, position, -1)[beams, state.last_parent]
            self.fin_att[:, :, :position] = torch.cat([self.fin_att[:, :, :position], cand], dim=1)[beams, state.last_pick]
        done = state.done(opts)
        if self.runs is not None:  # (a run at the length limit is done: every candidate ended, none runs on)
            self.runs.advance()
        elif step + 1 >= opts.max_decoding_length:
            done = torch.ones_like(done)
        if self.on_step is not None:
            for row, sentence in enumerate(state.sentence.tolist()):
                if not bool(done[row]):
                    self.on_step(sentence, self.prompts[sentence] + state.run_hist[row, 0, : step + 1].tolist(), False,
                                 None)
        sentences, finished = None, []
        if bool(done.any()):
            done_rows = done.nonzero()[:, 0]
            for r, (sentence, hyps) in zip(done_rows.tolist(), state.results(done_rows, opts, eos)):
                finished.append(sentence)
                prompt = self.prompts[sentence]
                self.results[sentence] = finalize([
                    Hypothesis(prompt + h.tokens, h.score, *self.attention_of(h, r, j, len(prompt) + len(h.tokens)))
                    for j, h in enumerate(hyps)], opts, rescore=not self.rules.ranks_coverage)
                if self.on_step is not None:
                    self.on_step(sentence, self.results[sentence][0].tokens, True, None)
            sentences = (~done).nonzero()[:, 0]
            if sentences.numel() == 0:
                self.done = True
                return Selection(rows[:0], sentences, tuple(finished))
            state.keep(sentences)
            if self.runs is not None:
                self.set_runs(self.runs.kept(sentences.tolist()))
            self.prompt = self.prompt[sentences]
            if self.fin_att is not None:
                self.fin_att = self.fin_att[sentences]
            # parent rows still index the pre-drop rows, so one selection both drops and reorders
            rows, nxt = rows.view(-1, k)[sentences].view(-1), nxt.view(-1, k)[sentences].view(-1)
        if self.att is not None:
            self.att = self.att.index_select(0, rows)
        if self.bias is not None:
            self.bias.follow(rows, nxt, step)
        self.tokens = nxt
        return Selection(rows, sentences, tuple(finished))

    def attention_of(self, h: Hypothesis, row: int, j: int, length: int) -> tuple[torch.Tensor | None, ...]:
        """Finished hypothesis j of batch row `row`: its attention, a row per output token, and the end token's row
        when it was predicted and not returned (the recorded states keep the rows with the hypothesis, HF's in
        fin_att; a row past a hypothesis's last prediction is never written: zero)."""
        rows = h.attention if h.attention is not None else \
            None if self.fin_att is None else self.fin_att[row, j, :length + 1].clone()
        return split_end(rows, length)

    def drop(self, gone: list[int]) -> Selection:
        """Take these sentences (the cohort's indices) out: their callers gave up; they get no result."""
        out, k = set(gone), self.opts.beam_size
        keep = torch.tensor([i for i, s in enumerate(self.state.sentence.tolist()) if s not in out], dtype=torch.long,
                            device=self.tokens.device)
        rows = (keep[:, None] * k + torch.arange(k, device=keep.device)).view(-1)
        self.state.keep(keep)
        if self.runs is not None and keep.numel():
            self.set_runs(self.runs.kept(keep.tolist()))
        self.prompt = self.prompt[keep]
        if self.fin_att is not None:
            self.fin_att, self.att = self.fin_att[keep], self.att[rows]
        self.tokens = self.tokens[rows]
        if self.bias is not None:
            self.bias.keep(rows)
        self.done = keep.numel() == 0
        return Selection(rows, keep)

    @property
    def live(self) -> list[int]:
        """The cohort's indices of the sentences still decoding, in row order."""
        return self.state.sentence.tolist()

    @property
    def sentences(self) -> int:
        """How many sentences are still decoding (a shape: no read from the device)."""
        return self.state.sentence.shape[0]


def new_strategy(batch: int, opts: DecodeOptions, rules: BeamRules, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, ops: "Ops", on_step: StepCallback | None = None,
                 generator: torch.Generator | None = None, prefix: torch.Tensor | None = None) -> Greedy | Beam:
    """Greedy (or sampling, with `generator`) for beam 1, beam search otherwise, with the engine's search ops
    (its log-softmax + top-k and beam-step implementation)."""
    if opts.beam_size == 1:
        return Greedy(batch, opts, rules, start_id, eos_id, device, src_width, ops, on_step, generator, prefix)
    return Beam(batch, opts, rules, start_id, eos_id, device, src_width, ops, on_step, prefix, generator)
