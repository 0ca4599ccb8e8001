"""The one decode loop: a running batch of cohorts, every row fed one token per step.

A cohort is the sentences admitted together (encoded together, decoded in lockstep by one strategy). Offline
decoding (`translate`, `generate`, streaming) is one cohort run to the end; the server's scheduler admits
cohorts between steps and takes sentences out as they finish. Either way a step is: the decoder step the engine
chose at load over every row (each at its own position, through the indirect KV cache), the output layer —
fused with log-softmax + top-k where the cohorts' rules allow it — and each cohort's search rules on its rows;
then the cache's row table and the memory keep the surviving rows. So a sentence takes the same path, with the
same numbers, whichever entry point it came from and whatever else shares its batch.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DecodeOptions
from ..errors import InputError
from ..model.cache import Span
from ..model.transformer import Transformer
from .cohort import Cohort
from .hypothesis import Hypothesis, StepCallback, alignment, trimmed
from .processors import StepBuffers, forced_eos_candidates
from .rules import BeamRules, rules_for
from .runs import can_join, moved
from .strategies import Beam, Greedy, Need, new_strategy


@dataclass
class RuntimeStats:
    """What the steps ran: the decoder step implementation and the output path, counted per step and cohort; and
    the seconds spent admitting (encoding) and in each part of a step (decoder, output layer, search rules)."""

    steps: int = 0  # decoder steps (a step whose cohorts all end on a forced EOS runs none: not counted)
    cohorts: int = 0
    joined: int = 0  # cohorts admitted into a running cohort's search state (runs.join)
    lead_steps: int = 0  # first beam steps run on beam 0's rows alone (Runtime._step_beam_leads)
    decoder_steps: collections.Counter = field(default_factory=collections.Counter)  # by DecoderStep name
    outputs: collections.Counter = field(default_factory=collections.Counter)  # "fused-topk" / "logits" / "none"
    seconds: collections.Counter = field(default_factory=collections.Counter)  # admit / decoder / output / search


class Runtime:
    """One running decoder batch for one set of decoding options (see the module docstring). `capacity`: the
    sentences it will hold at most (a server's budget), to size its buffers once."""

    def __init__(self, model: Transformer, rules: BeamRules, opts: DecodeOptions, device: torch.device,
                 start_id: int, eos_id: int, shortlist=None, stats: RuntimeStats | None = None,
                 capacity: int = 0):
        self.model, self.rules, self.opts, self.device = model, rules, opts, device
        self.start_id, self.eos_id = start_id, eos_id
        self.model_shortlist = shortlist  # the model's lexical shortlist, if it has one
        self.shortlist = shortlist if opts.use_shortlist else None  # the one this batch's output layer applies
        self.stats = stats if stats is not None else RuntimeStats()
        self.cohorts: list[Cohort] = []
        # on the buffers a finished batch left in the model's pool, given back by `release`
        self.cache = model.new_cache(device, pooled=True)
        self.memory = model.new_memory(device, pooled=True)
        self.buffers: StepBuffers | None = None
        self._write_rows: tuple[torch.Tensor, int | None] | None = None  # the rows' cache rows, until they change
        if capacity:  # sentences the batch will hold at most: the cache and memory sized once, not grown
            self.cache.fit(capacity * opts.beam_size, opts.max_decoding_length + 1)
            self.memory.fit(capacity, 128)  # sources grow it past 128 tokens

    def shares(self, opts: DecodeOptions) -> bool:
        """Whether cohorts with these options can run in this batch (see `shares_batch`)."""
        return opts == self.opts or (shares_batch(opts, self.model_shortlist)
                                     and shares_batch(self.opts, self.model_shortlist))

    @property
    def rows(self) -> int:
        """Decoder rows in the batch (sentences × beam while they run)."""
        return sum(c.rows for c in self.cohorts)

    @property
    def sentences(self) -> int:
        return sum(c.sentences for c in self.cohorts)

    def admit(self, ids: list[list[int]], tags: list[Any], prefix: torch.Tensor | None = None,
              generator: torch.Generator | None = None, on_step: StepCallback | None = None,
              opts: DecodeOptions | None = None) -> None:
        """Encode `ids` (source token ids, EOS included) and add them as a cohort before the next step.
        prefix (B, P): forced target tokens, one length for the cohort. on_step gets the cohort's indices.
        opts: the cohort's decoding options, when not the batch's (see `shares`)."""
        start = time.perf_counter()
        opts = self.opts if opts is None else opts
        if not self.shares(opts):
            raise ValueError("these options need a batch of their own (return_attention, or a shortlist)")
        lengths = [len(x) for x in ids]
        end = opts.end_ids(self.eos_id)[0]  # what ends a hypothesis (the first, where end_token lists several)
        rules = self.rules if opts.search_rules is None else rules_for(opts.search_rules)  # the caller's, by name
        strategy = new_strategy(len(ids), opts.for_source(max(lengths)), rules, self.start_id, end,
                                self.device, max(lengths), self.model.ops, on_step, generator, prefix)
        if strategy.cache_len > self.model.cfg.max_positions:
            raise InputError(f"target prefix of {strategy.forced} tokens + max_decoding_length "
                             f"{strategy.cache_len - strategy.forced} exceed the model's {self.model.cfg.max_positions} "
                             "positions")
        allowed = None if self.shortlist is None else self.shortlist.allowed(ids, self.device)
        self.model.remember(ids, self.memory, allowed)
        if allowed is not None:  # the union grows with the newcomers' words
            self.memory.restrict_output(self.model.output)
        beam = strategy.rows // len(ids)
        slots = self.cache.reserve(strategy.rows, strategy.cache_len)
        self.cache.append(strategy.rows)
        cohort = Cohort(strategy, list(tags), lengths, [slots[i: i + beam] for i in range(0, len(slots), beam)])
        host = self._host_for(strategy)
        if host is None:
            self.cohorts.append(cohort)
        else:
            self._place_after(host, cohort)
            host.absorb(cohort)
            self.stats.joined += 1
        (cohort if host is None else host).snapshot()  # (the others' rows and sentences are as they were)
        self._write_rows = None
        capacity = 0 if self.buffers is None else self.buffers.capacity
        if capacity < self.rows:
            self.buffers = StepBuffers(max(self.rows, 2 * capacity), self.model.cfg.tgt_vocab_size, self.device,
                                       self.model.buffer_pool)
        self.stats.seconds["admit"] += time.perf_counter() - start
        self.stats.cohorts += 1

    def _host_for(self, strategy: Greedy | Beam) -> Cohort | None:
        """The running cohort whose search state the newcomers can join (the oldest), if any: beam cohorts whose
        rules do not depend on the step (runs.py), with the fused output layer (no per-batch shortlist)."""
        if not isinstance(strategy, Beam) or not self.model.output.fuses_topk or self.memory.vocab is not None:
            return None
        return next((c for c in self.cohorts if isinstance(c.strategy, Beam) and can_join(c.strategy, strategy)), None)

    def _place_after(self, host: Cohort, cohort: Cohort) -> None:
        """Move the newcomers' rows and sentences (appended last) to right after the host's, in the cache's row table
        and the memory: a cohort's rows stay one run of batch rows."""
        at = self.cohorts.index(host) + 1
        if at == len(self.cohorts):
            return
        rows_at, sentences_at = sum(c.rows for c in self.cohorts[:at]), sum(c.sentences for c in self.cohorts[:at])
        rows, sentences = self.rows, self.sentences
        self.cache.select(moved(rows_at, rows, cohort.rows, self.device))
        self.memory.select(moved(sentences_at, sentences, cohort.sentences, self.device))

    def release(self) -> None:
        """The batch is done (no cohort left, none to come): its cache, memory and step buffers go to the model's pool
        for the next batch. The runtime takes nothing after this."""
        self.model.recycle(self.cache, self.memory)
        if self.buffers is not None:
            self.buffers.give(self.model.buffer_pool)
        self.cohorts, self.buffers = [], None
        self.cache = self.memory = None

    def evict_newest(self) -> list[Any]:
        """Take the most recently admitted cohort out (its sentences restart later); returns the tags of its
        unfinished sentences. Used when a step runs out of memory: the others' step is then retried."""
        cohort = self.cohorts.pop()
        tags = [cohort.tags[i] for i in cohort.strategy.live]
        self.memory.select(torch.arange(self.sentences, device=self.device))
        self.cache.select(torch.arange(self.rows, device=self.device))
        self.cache.release([slot for rows in cohort.slots for slot in rows])
        self._write_rows = None
        return tags

    def step(self) -> list[tuple[Any, list[Hypothesis]]]:
        """One decoder step over every row; returns (tag, n-best) of each sentence that finished."""
        if not self.cohorts:
            return []
        needs = [c.strategy.need() for c in self.cohorts]
        if self._first_beam_step(needs):
            return self._step_beam_leads(needs[0])
        segments, spans, start = [], [], 0  # each cohort's rows; the rows at each position
        for c in self.cohorts:
            segments.append(Span(start, c.rows, c.strategy.position))
            spans += c.strategy.spans(start)
            start += c.rows
        tokens = (self.cohorts[0].strategy.tokens if len(self.cohorts) == 1 else
                  torch.cat([c.strategy.tokens for c in self.cohorts]))[:, None]
        att_out = [] if self.cohorts[0].strategy.att is not None else None  # one option set: all or none
        t0 = time.perf_counter()
        # every cohort's last step forced (it ends with it) and no attention asked: no decoder step (its K/V would
        # never be read)
        skip = att_out is None and all(n.kind == "forced" for n in needs)
        if not skip:
            write_rows, first_row = self._rows_written(len(spans))
            self.cache.begin_step(spans, write_rows, first_row=first_row)
        x = None if skip else self.model.decoder_hidden(tokens, self.cache, self.memory, att_out)[:, -1]
        t1 = time.perf_counter()
        outputs = self._outputs(x, needs, segments)
        t2 = time.perf_counter()
        finished = self._advance(outputs, segments, None if att_out is None else alignment(att_out[0], self.opts))
        self._count(t0, t1, t2, None if skip else self.model.step.name if att_out is None else "python-layers")
        return finished

    def _count(self, t0: float, t1: float, t2: float, decoder_step: str | None) -> None:
        """A step's seconds (decoder from t0, output from t1, search from t2 to now) and the decoder step it ran
        (None: none ran)."""
        seconds, stats = self.stats.seconds, self.stats
        seconds["decoder"] += t1 - t0
        seconds["output"] += t2 - t1
        seconds["search"] += time.perf_counter() - t2
        if decoder_step is not None:
            stats.steps += 1
            stats.decoder_steps[decoder_step] += 1

    def _first_beam_step(self, needs: list[Need]) -> bool:
        """Whether this step is a lone beam cohort's first, from the fused output layer: its sentences' beams are
        the same row (one token, one position, one memory; only beam 0 is live), so one row each does."""
        if len(self.cohorts) != 1 or needs[0].kind != "topk":
            return False
        s = self.cohorts[0].strategy
        return isinstance(s, Beam) and s.runs is None and s.step == 0 and s.forced == 0 and s.att is None \
            and s.opts.beam_size > 1 and self.model.output.fuses_topk and self.memory.vocab is None

    def _step_beam_leads(self, need: Need) -> list[tuple[Any, list[Hypothesis]]]:
        """A lone beam cohort's first step on beam 0's rows: their K/V at position 0, which every beam's row table
        then points at (the beams' own rows take positions 1.. as the rows are reordered), and their candidates
        repeated for each beam (the others' scores are -inf: they choose nothing)."""
        cohort, t0 = self.cohorts[0], time.perf_counter()
        k, sentences = cohort.strategy.opts.beam_size, cohort.sentences
        write_rows, _ = self._rows_written(1)
        leads = write_rows[::k]
        self.cache.begin_step([Span(0, sentences, 0)], leads)
        x = self.model.decoder_hidden(cohort.strategy.tokens[::k, None], self.cache, self.memory)[:, -1]
        self.cache.point(0, leads.repeat_interleave(k))
        t1 = time.perf_counter()
        logp, ids = self.model.output.topk(x, need.k, list(need.banned))
        chosen = (logp.repeat_interleave(k, dim=0), ids.repeat_interleave(k, dim=0))
        t2 = time.perf_counter()
        finished = self._advance([chosen], [Span(0, sentences * k, 0)], None)
        self._count(t0, t1, t2, self.model.step.name)
        self.stats.outputs["fused-topk"] += 1
        self.stats.lead_steps += 1
        return finished

    def _rows_written(self, spans: int) -> tuple[torch.Tensor, int | None]:
        """The cache row each batch row writes, and the first when they are one run at one position (one slice
        per write); rebuilt when sentences join or leave."""
        if self._write_rows is None:
            rows = [slot for c in self.cohorts for beams in c.slots for slot in beams]
            run = spans == 1 and all(b - a == 1 for a, b in zip(rows, rows[1:]))
            self._write_rows = (torch.tensor(rows, device=self.device), rows[0] if run else None)
            # cohorts of different beam widths: the cross-attention reads a row per decoder row (Memory.spread)
            beams = [c.rows // c.sentences for c in self.cohorts]
            self.memory.spread(None if len(set(beams)) == 1 else
                               [b for c, b in zip(self.cohorts, beams) for _ in range(c.sentences)])
        return self._write_rows

    def _outputs(self, x: torch.Tensor, needs: list[Need], segments: list[Span]) -> list:
        """Per cohort: its rows' candidates (from the fused output layer, or made at a forced-EOS step), logits, or
        None (nothing needed).
        Cohorts asking the same of the output layer share one call over their rows: candidates with the same banned
        ids come from one call at the largest k (each cohort takes its first k: best first, ties to the lower id,
        so the k best of a larger k are the k best) — one read of the output weights per step, not one per beam
        width."""
        fused = self.model.output.fuses_topk and self.memory.vocab is None
        groups: dict[Any, list[int]] = {}
        for i, need in enumerate(needs):
            key = None if need.kind in ("nothing", "forced") else \
                ("topk", need.banned) if need.kind == "topk" and fused else "logits"
            groups.setdefault(key, []).append(i)
        out: list = [None] * len(needs)
        for key, members in groups.items():
            if key is None:
                self.stats.outputs["none"] += len(members)
                for i in members:
                    if needs[i].kind == "forced":
                        out[i] = forced_eos_candidates(segments[i].rows, needs[i].k, self.buffers.vocab, self.eos_id,
                                                       self.device)
                continue
            rows = self._rows_of(members, segments, x.shape[0])
            xs = x if rows is None else x.index_select(0, rows)
            if key == "logits":
                self.stats.outputs["logits"] += len(members)
                if rows is not None and self.memory.vocab is not None:  # shortlist masks go by sentence: all rows
                    xs, rows = x, None
                result = self.model.logits(xs[:, None], self.memory, out=self.buffers.logits(xs.shape[0]))[:, -1]
            else:
                self.stats.outputs["fused-topk"] += len(members)
                result = self.model.output.topk(xs, max(needs[i].k for i in members), list(key[1]))
            at = 0
            for i in members:
                seg = segments[i]
                span = slice(seg.start, seg.start + seg.rows) if rows is None else slice(at, at + seg.rows)
                k = needs[i].k
                if key == "logits":
                    out[i] = result[span]
                elif span == slice(0, result[0].shape[0]) and k == result[0].shape[1]:  # (a lone cohort's)
                    out[i] = result
                else:
                    out[i] = (result[0][span, :k].contiguous(), result[1][span, :k].contiguous())
                at += seg.rows
        return out

    @staticmethod
    def _rows_of(members: list[int], segments: list[Span], total: int) -> torch.Tensor | None:
        """The batch rows of these cohorts (None: all of them, in order)."""
        if sum(segments[i].rows for i in members) == total:
            return None
        return torch.cat([torch.arange(segments[i].start, segments[i].start + segments[i].rows) for i in members])

    def _advance(self, outputs: list, segments: list[Span], att: torch.Tensor | None) -> list:
        selections = []
        for cohort, output, seg in zip(self.cohorts, outputs, segments):
            logits, chosen = (output, None) if isinstance(output, torch.Tensor) else (None, output)
            span = slice(seg.start, seg.start + seg.rows)
            selections.append(cohort.strategy.advance(logits, self.buffers, None if att is None else att[span],
                                                      chosen=chosen))
        return self._apply(selections)

    def drop(self, tags: set) -> int:
        """Take the sentences with these tags out of the batch (their callers gave up), cache rows and memory slots
        freed; returns how many left."""
        selections, dropped = [], 0
        for cohort in self.cohorts:
            gone = [i for i in cohort.strategy.live if cohort.tags[i] in tags]
            selections.append(cohort.strategy.drop(gone) if gone else None)
            dropped += len(gone)
        if dropped:
            self._apply(selections)
        return dropped

    def _apply(self, selections: list) -> list[tuple[Any, list[Hypothesis]]]:
        """Each cohort's selection (None: all kept in place) to the batch: the rows and sentences kept, in order, by
        the cache and the memory; finished and dropped sentences' cache rows freed; (tag, n-best) of the finished."""
        rows, sentences, finished, kept = [], [], [], []
        changed_rows = changed_sentences = False
        row_at = sentence_at = 0
        for cohort, selection in zip(self.cohorts, selections):
            strategy, n_rows, n_sentences = cohort.strategy, cohort.rows_before, cohort.sentences_before
            keep_rows = None if selection is None else selection.rows
            keep_sentences = None if selection is None else selection.sentences
            # a cohort's kept rows and sentences, in batch terms (a range when it kept them all in place)
            rows.append(range(row_at, row_at + n_rows) if keep_rows is None else keep_rows + row_at)
            sentences.append(range(sentence_at, sentence_at + n_sentences) if keep_sentences is None
                             else keep_sentences + sentence_at)
            changed_rows |= keep_rows is not None
            changed_sentences |= keep_sentences is not None
            for i in () if selection is None else selection.finished:
                finished.append((cohort.tags[i], trimmed(strategy.results[i], cohort.lengths[i])))
            if keep_sentences is not None:  # finished and dropped sentences give their cache rows back
                self.cache.release(cohort.keep(keep_sentences.tolist()))
                self._write_rows = None
            if not strategy.done:
                kept.append(cohort)
            row_at += n_rows
            sentence_at += n_sentences
        self.cohorts = kept
        if changed_sentences:
            self.memory.select(as_index(sentences, self.device))
        if changed_rows:
            self.cache.select(as_index(rows, self.device))
        for cohort in kept:
            cohort.snapshot()
        return finished


def shares_batch(opts: DecodeOptions, shortlist) -> bool:
    """Whether cohorts with these options can decode in a batch with other option sets: any beam width, length limits,
    penalties and processors can (each cohort has its own strategy); attention weights and a model's lexical
    shortlist (`shortlist`, None without one) are per batch."""
    return not opts.needs_attention and (shortlist is None or not opts.use_shortlist)


def as_index(parts: list, device: torch.device) -> torch.Tensor:
    """One index tensor from ranges and tensors, in order."""
    return torch.cat([torch.arange(p.start, p.stop, device=device) if isinstance(p, range) else p for p in parts])


def decode(model: Transformer, rules: BeamRules, ids: list[list[int]], opts: DecodeOptions, device: torch.device,
           start_id: int, eos_id: int, shortlist=None, on_step: StepCallback | None = None,
           generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
           stats: RuntimeStats | None = None) -> list[list[Hypothesis]]:
    """Offline decoding: one cohort run to the end; each sentence's n-best in the order of `ids`."""
    runtime = Runtime(model, rules, opts, device, start_id, eos_id, shortlist, stats)
    try:
        runtime.admit(ids, list(range(len(ids))), prefix, generator, on_step)
        results: list = [None] * len(ids)
        while runtime.cohorts:
            for tag, hyps in runtime.step():
                results[tag] = hyps
        return results
    finally:  # (after an error too: what the buffers hold is never read before it is written)
        runtime.release()
