"""Greedy and beam search as step objects, and the loop that drives one batch to the end.

A run (GreedyRun, BeamRun) holds one batch's decoding state: the caller runs the decoder on the run's
`tokens` at its `position`, hands the logits to `advance` (or, when the run's `fused_request` asks for
them and the model can, the candidates of an output layer fused with log-softmax + top-k), and applies
the returned Selection to the KV cache and the encoder memory. `search` does that for one batch; pyengine/continuous.py does it for
several runs sharing one decoder batch (continuous batching).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import DecodeOptions
from .decoding import (BeamState, FairseqBeamState, Hypothesis, OnmtBeamState, StepBuffers, StepCallback,
                       apply_processors, candidates, decoder_prompt, finalize, forced_final_eos, fused_bans,
                       log_probs, needs_history, sample_tokens, topk_rows)
from .errors import OptionError
from .model import Memory, Transformer


class Selection(NamedTuple):
    """What a step keeps: decoder rows in their new order (cache rows; beam reorder and finished rows
    dropped) and sentences (encoder memory rows), None for all of them in place; and the run's indices
    of the sentences that finished at this step (their n-best is in `results`)."""

    rows: torch.Tensor | None
    sentences: torch.Tensor | None
    finished: tuple[int, ...] = ()


class GreedyRun:
    """Greedy (or sampling) decoding of one batch as a step object: the caller runs the decoder on
    `tokens` at `position` and hands the last position's logits to `advance`; finished rows leave at once.
    on_step sees each row's tokens after each step. A sampled token's score is its log-prob before
    temperature and filtering. `reference`: the unfused PyTorch selection the C++ path is measured against.

    prefix (B, P): target tokens forced after the start token (HF's decoder prompt): part of the output,
    not of the score; max/min_decoding_length count the tokens generated after it."""

    def __init__(self, batch: int, opts: DecodeOptions, family: str, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, on_step: StepCallback | None = None,
                 generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
                 reference: bool = False):
        if opts.sampling and generator is None:
            raise ValueError("sampling needs a torch.Generator")
        self.opts, self.family, self.eos, self.on_step = opts, family, eos_id, on_step
        self.generator, self.reference = generator, reference
        self.prompt = decoder_prompt(start_id, prefix, batch, device)  # (B, P + 1)
        self.cache_len = self.prompt.shape[1] - 1 + opts.max_decoding_length
        self.sentence = torch.arange(batch, device=device)  # caller's index of each row
        self.tokens, self.position, self.step = self.prompt, 0, 0
        self.history = torch.zeros(batch, opts.max_decoding_length, dtype=torch.long, device=device)
        self.scores = torch.zeros(batch, dtype=torch.float32, device=device)
        self.results: list[list[Hypothesis]] = [[] for _ in range(batch)]
        self.length_offset = 1 if family == "onmt" else 0  # OpenNMT-py counts the start token in the length
        # attention rows by decoder position: the query at position i predicts output token i
        self.att = torch.zeros(batch, self.cache_len, src_width, device=device) if opts.needs_attention else None
        self.done = False

    def fused_request(self) -> tuple[int, list[int]] | None:
        """(k, banned ids) when this step's choice is the best log-prob with only bans applied (advance's fused
        branch): the model may then give the candidates from its output layer directly (decode_candidates);
        None when advance needs the logits."""
        opts, step = self.opts, self.step
        if self.att is not None or opts.sampling or self.reference or \
                (self.family == "fairseq" and step + 1 >= opts.max_decoding_length):
            return None
        bans = fused_bans(step, opts, self.eos)
        return None if bans is None else (1, bans)

    def advance(self, logits: torch.Tensor | None, buffers: StepBuffers, att_rows: torch.Tensor | None = None,
                chosen: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
        """Choose each row's next token from its (N, V) logits, or take `chosen`, the candidates asked for by
        fused_request; finished rows leave."""
        opts, eos, step = self.opts, self.eos, self.step
        n = self.tokens.shape[0]
        if self.att is not None:
            self.att[:, self.position: self.position + self.tokens.shape[1]] = att_rows[:, :, : self.att.shape[2]]
        self.position += self.tokens.shape[1]
        self.step += 1
        seqs = torch.cat([self.prompt, self.history[:, :step]], dim=1) if needs_history(opts) else None
        if chosen is not None:
            nxt = chosen[1][:, 0]
            self.scores += chosen[0][:, 0]
        elif self.family == "fairseq" and step + 1 >= opts.max_decoding_length:
            final_logp, final = forced_final_eos(logits, eos)
            nxt = final[:, 0]
            self.scores += final_logp[:, 0]
        elif opts.sampling or self.reference or fused_bans(step, opts, eos) is None:
            logp = log_probs(logits, step, opts, eos, out=buffers.logp(n), seqs=seqs)
            # HF takes the argmax of the processed logits (log_softmax keeps their order but may round two
            # near-equal logits to one value)
            processed = apply_processors(logits, step, opts, eos, seqs)
            nxt = sample_tokens(processed, opts, self.generator) if opts.sampling else topk_rows(processed, 1)[1][:, 0]
            self.scores += logp.gather(1, nxt[:, None])[:, 0]
        else:  # the best logit among the allowed tokens is the argmax of the processed scores
            best_logp, best = candidates(logits, 1, step, opts, eos, buffers, seqs, self.reference)
            nxt = best[:, 0]
            self.scores += best_logp[:, 0]
        self.history[:, step] = nxt
        done = (nxt == eos) | (step + 1 >= opts.max_decoding_length)
        if self.on_step is not None:
            for row, (sentence, finished) in enumerate(zip(self.sentence.tolist(), done.tolist())):
                toks = self.history[row, : step + 1].tolist()
                self.on_step(sentence, self.prompt[row, 1:].tolist() + (toks[:-1] if toks[-1] == eos else toks),
                             finished)
        self.tokens = nxt[:, None]
        if not bool(done.any()):
            return Selection(None, None)
        finished = []
        for row in done.nonzero()[:, 0].tolist():
            toks = self.history[row, : step + 1].tolist()
            if toks and toks[-1] == eos:
                toks = toks[:-1]
            out_tokens = self.prompt[row, 1:].tolist() + toks
            finished.append(int(self.sentence[row]))
            self.results[finished[-1]] = finalize(
                [Hypothesis(out_tokens, float(self.scores[row]) / ((step + 1 + self.length_offset) ** opts.length_penalty),
                            None if self.att is None else self.att[row, : len(out_tokens)].clone())], opts)
        keep = (~done).nonzero()[:, 0]
        self.done = keep.numel() == 0
        for name in ("sentence", "history", "scores", "tokens", "prompt") + (("att",) if self.att is not None else ()):
            setattr(self, name, getattr(self, name)[keep])
        return Selection(keep, keep, tuple(finished))

    @property
    def live(self) -> list[int]:
        """The run's indices of the sentences still decoding, in row order."""
        return self.sentence.tolist()


class BeamRun:
    """Beam search of one batch as a step object (see GreedyRun): HF's candidate, length-penalty and
    stopping rules, or OpenNMT-py's / fairseq's for their checkpoints; done sentences leave the batch.

    on_step sees, after each step, each live sentence's best running hypothesis (it may still be revised:
    a later step can prefer another beam), and each sentence's final best when it finishes.
    `reference`: Python beam step, unfused log-softmax/top-k (the versions the C++ replaces)."""

    def __init__(self, batch: int, opts: DecodeOptions, family: str, start_id: int, eos_id: int,
                 device: torch.device, src_width: int, on_step: StepCallback | None = None,
                 prefix: torch.Tensor | None = None, reference: bool = False):
        k = opts.beam_size
        if family in ("onmt", "fairseq") and opts.needs_attention:
            raise OptionError(f"return_attention and coverage_penalty are not supported with "
                              f"{'OpenNMT-py' if family == 'onmt' else 'fairseq'}'s beam rules yet")
        if family == "onmt":
            self.state = OnmtBeamState(batch, k, opts.max_decoding_length, device)
        elif family == "fairseq":
            self.state = FairseqBeamState(batch, k, opts.max_decoding_length, device)
        else:
            self.state = BeamState(batch, k, opts.max_decoding_length, device, reference)
        self.opts, self.family, self.eos, self.on_step, self.reference = opts, family, eos_id, on_step, reference
        self.prompt = decoder_prompt(start_id, prefix, batch, device)  # (B, P + 1), one per sentence
        self.prompts = self.prompt[:, 1:].tolist()  # the forced prefix of each sentence, in the caller's order
        self.cache_len = self.prompt.shape[1] - 1 + opts.max_decoding_length
        self.tokens, self.position, self.step = self.prompt.repeat_interleave(k, dim=0), 0, 0
        self.results: list[list[Hypothesis]] = [[] for _ in range(batch)]
        self.att = self.fin_att = None
        if opts.needs_attention:  # per running row and per finished hypothesis, by decoder position
            self.att = torch.zeros(batch * k, self.cache_len, src_width, device=device)
            self.fin_att = torch.zeros(batch, k, self.cache_len, src_width, device=device)
        self.done = False

    def fused_request(self) -> tuple[int, list[int]] | None:
        """(2·beam, banned ids) when this step's candidates are the rows' best log-probs with only bans applied
        (see GreedyRun.fused_request); None when advance needs the logits."""
        opts, step = self.opts, self.step
        if self.att is not None or self.reference or \
                (self.family == "fairseq" and step + 1 >= opts.max_decoding_length):
            return None
        bans = fused_bans(step, opts, self.eos)
        return None if bans is None else (2 * opts.beam_size, bans)

    def advance(self, logits: torch.Tensor | None, buffers: StepBuffers, att_rows: torch.Tensor | None = None,
                chosen: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
        """One beam step from the rows' (N, V) logits, or from `chosen`, the candidates asked for by
        fused_request."""
        opts, k, eos, step, state = self.opts, self.opts.beam_size, self.eos, self.step, self.state
        n = self.tokens.shape[0]
        if self.att is not None:
            self.att[:, self.position: self.position + self.tokens.shape[1]] = att_rows[:, :, : self.att.shape[2]]
        self.position += self.tokens.shape[1]
        self.step += 1
        # a sentence's best 2K over beam × vocab are among its rows' own best 2K: per-row top-k
        # avoids HF's top-k over a (B, K·V) tensor
        seqs = torch.cat([self.prompt.repeat_interleave(k, dim=0), state.run_hist.view(n, -1)[:, :step]], dim=1) \
            if needs_history(opts) else None
        if chosen is not None:
            cand_logp, cand_ids = chosen
        elif self.family == "fairseq" and step + 1 >= opts.max_decoding_length:
            cand_logp, cand_ids = forced_final_eos(logits, eos)
        else:
            cand_logp, cand_ids = candidates(logits, 2 * k, step, opts, eos, buffers, seqs, self.reference)
        rows, nxt = state.step(cand_logp, cand_ids, step, opts, eos)
        if self.att is not None:  # candidates extend their beam's attention; finished ones keep theirs
            b, position = state.run_scores.shape[0], self.position
            beams = torch.arange(b, device=self.att.device)[:, None]
            cand = self.att[:, :position].view(b, k, position, -1)[beams, state.last_parent]
            self.fin_att[:, :, :position] = torch.cat([self.fin_att[:, :, :position], cand], dim=1)[beams, state.last_pick]
        done = state.done(opts)
        if step + 1 >= opts.max_decoding_length:
            done = torch.ones_like(done)
        if self.on_step is not None:
            for row, sentence in enumerate(state.sentence.tolist()):
                if not bool(done[row]):
                    self.on_step(sentence, self.prompts[sentence] + state.run_hist[row, 0, : step + 1].tolist(), False)
        sentences, finished = None, []
        if bool(done.any()):
            done_rows = done.nonzero()[:, 0]
            for r, (sentence, hyps) in zip(done_rows.tolist(), state.results(done_rows, opts, eos)):
                finished.append(sentence)
                prompt = self.prompts[sentence]
                self.results[sentence] = finalize([
                    Hypothesis(prompt + h.tokens, h.score,
                               None if self.fin_att is None else self.fin_att[r, j, : len(prompt) + len(h.tokens)].clone())
                    for j, h in enumerate(hyps)], opts)
                if self.on_step is not None:
                    self.on_step(sentence, self.results[sentence][0].tokens, True)
            sentences = (~done).nonzero()[:, 0]
            if sentences.numel() == 0:
                self.done = True
                return Selection(rows[:0], sentences, tuple(finished))
            state.keep(sentences)
            self.prompt = self.prompt[sentences]
            if self.fin_att is not None:
                self.fin_att = self.fin_att[sentences]
            # parent rows still index the pre-drop rows, so one selection both drops and reorders
            rows, nxt = rows.view(-1, k)[sentences].view(-1), nxt.view(-1, k)[sentences].view(-1)
        if self.att is not None:
            self.att = self.att.index_select(0, rows)
        self.tokens = nxt[:, None]
        return Selection(rows, sentences, tuple(finished))

    @property
    def live(self) -> list[int]:
        """The run's indices of the sentences still decoding, in row order."""
        return self.state.sentence.tolist()


def new_run(family: str, batch: int, opts: DecodeOptions, start_id: int, eos_id: int, device: torch.device,
            src_width: int, on_step: StepCallback | None = None, generator: torch.Generator | None = None,
            prefix: torch.Tensor | None = None, reference: bool = False) -> GreedyRun | BeamRun:
    """Greedy (or sampling, with `generator`) for beam 1, beam search otherwise."""
    if opts.beam_size == 1:
        return GreedyRun(batch, opts, family, start_id, eos_id, device, src_width, on_step, generator, prefix, reference)
    return BeamRun(batch, opts, family, start_id, eos_id, device, src_width, on_step, prefix, reference)


def search(model: Transformer, memory: Memory, opts: DecodeOptions, start_id: int, eos_id: int,
           dtype: torch.dtype, on_step: StepCallback | None = None,
           generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
           reference: bool = False) -> list[list[Hypothesis]]:
    """Decode one encoded batch to the end; prefix (B, P) is forced. `reference` also makes the cache
    gather the plain index_select the C++ row selection replaces."""
    batch, device = memory.sentences, memory.kv.device
    run = new_run(model.cfg.family, batch, opts, start_id, eos_id, device, memory.width, on_step,
                  generator, prefix, reference)
    cache = model.new_cache(run.tokens.shape[0], run.cache_len, device, dtype, reference, lockstep=True)
    buffers = StepBuffers(run.tokens.shape[0], model.cfg.tgt_vocab_size, device)
    while not run.done:
        n, t = run.tokens.shape
        request = run.fused_request() if t == 1 and model.fuses_candidates(memory) else None
        if request is not None:  # the output layer hands over the candidates, the logits never written
            chosen = model.decode_candidates(run.tokens, run.position, cache, memory, *request)
            selection = run.advance(None, buffers, chosen=chosen)
        else:
            att_out = None if run.att is None else []
            logits = model.decode(run.tokens, run.position, cache, memory, out=buffers.logits(n) if t == 1 else None,
                                  attention_out=att_out)[:, -1]
            selection = run.advance(logits, buffers, None if att_out is None else att_out[0])
        if run.done:
            break
        if selection.sentences is not None:
            memory = memory.select(selection.sentences)
        if selection.rows is not None:
            cache.select(selection.rows)
    return run.results
