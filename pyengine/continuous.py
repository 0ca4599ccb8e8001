"""Continuous batching: sentences join a running decoder batch between steps and leave it when done.

A ContinuousBatch holds cohorts, each a run (search.GreedyRun / BeamRun) of the sentences admitted at
one step. Every step runs the decoder once over all cohorts' rows, each row at its own position
(model.RowPositions), and hands each cohort its slice of the logits; the search rules stay per cohort,
so a sentence gets the tokens it would get decoded alone. Between steps new cohorts are encoded and
appended (their encoder memory padded to the batch's widest source, their cache rows starting at
position 0), so a short request is not held behind a long one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import DecodeOptions
from .decoding import Hypothesis, StepBuffers
from .engine import pad_sources
from .model import Memory, RowPositions, Transformer
from .search import GreedyRun, BeamRun, new_run


@dataclass
class Cohort:
    """Sentences admitted together: their run and the caller's tag for each sentence."""

    run: GreedyRun | BeamRun
    tags: list[Any]

    @property
    def rows(self) -> int:
        return self.run.tokens.shape[0]

    @property
    def sentences(self) -> int:
        return len(self.run.live)


class ContinuousBatch:
    """One running decoder batch for one set of decoding options (see the module docstring)."""

    def __init__(self, model: Transformer, opts: DecodeOptions, dtype: torch.dtype, device: torch.device,
                 start_id: int, eos_id: int, shortlist=None):
        self.model, self.opts, self.dtype, self.device = model, opts, dtype, device
        self.shortlist = shortlist if opts.use_shortlist else None  # per sentence, as in Engine.shortlisted
        self.start_id, self.eos_id = start_id, eos_id
        self.cohorts: list[Cohort] = []
        self.buffers: StepBuffers | None = None
        self._clear()

    def _clear(self) -> None:
        """No rows left: an empty memory and cache."""
        self.memory: Memory | None = None
        self.cache = self.model.new_cache(0, self.opts.max_decoding_length, self.device, self.dtype)

    @property
    def rows(self) -> int:
        """Decoder rows in the batch (sentences × beam while they run)."""
        return sum(c.rows for c in self.cohorts)

    @property
    def sentences(self) -> int:
        return sum(c.sentences for c in self.cohorts)

    def admit(self, ids: list[list[int]], tags: list[Any], generator: torch.Generator | None = None) -> None:
        """Encode `ids` (source token ids, EOS included) and add them as a new cohort before the next step."""
        src, lengths = pad_sources(ids, self.model.cfg.pad_id, self.device)
        memory = self.model.memory(self.model.encode(src, lengths), lengths)
        run = new_run(self.model.cfg.family, len(ids), self.opts.for_source(int(lengths.max())), self.start_id,
                      self.eos_id, self.device, memory.width, generator=generator)
        if run.tokens.shape[1] != 1:
            raise ValueError("a continuous batch decodes one token per row and step (no target prefix)")
        if self.shortlist is not None:
            memory.allowed = self.shortlist.allowed(ids, self.device)
        self.memory = memory if self.memory is None else self.memory.concat(memory)
        if self.shortlist is not None:  # the union grows with the newcomers' words
            self.model.shortlist(self.memory)
        self.cache.grow(run.tokens.shape[0])
        self.cohorts.append(Cohort(run, list(tags)))
        capacity = 0 if self.buffers is None else self.buffers.capacity
        if capacity < self.rows:
            self.buffers = StepBuffers(max(self.rows, 2 * capacity), self.model.cfg.tgt_vocab_size, self.device)

    def evict_newest(self) -> list[Any]:
        """Take the most recently admitted cohort out (its sentences restart later); returns the tags of
        its unfinished sentences. Used when a step runs out of memory: the others' step is then retried."""
        cohort = self.cohorts.pop()
        tags = [cohort.tags[i] for i in cohort.run.live]
        if not self.cohorts:
            self._clear()
            return tags
        self.memory = self.memory.select(torch.arange(self.sentences, device=self.device))
        self.cache.select(torch.arange(self.rows, device=self.device))
        return tags

    def step(self) -> list[tuple[Any, list[Hypothesis]]]:
        """One decoder step over every row; returns (tag, n-best) of each sentence that finished."""
        if not self.cohorts:
            return []
        tokens = torch.cat([c.run.tokens for c in self.cohorts])
        pos = torch.cat([torch.full((c.rows,), c.run.position, dtype=torch.long, device=self.device)
                         for c in self.cohorts])
        needs_att = any(c.run.att is not None for c in self.cohorts)
        att_out = [] if needs_att else None
        n = tokens.shape[0]
        logits = self.model.decode(tokens, RowPositions(pos, max(c.run.position for c in self.cohorts) + 1),
                                   self.cache, self.memory, out=self.buffers.logits(n), attention_out=att_out)[:, -1]
        rows, sentences, finished, kept = [], [], [], []
        changed_rows = changed_sentences = False
        row_at = sentence_at = 0
        for cohort in self.cohorts:
            n_rows, n_sentences = cohort.rows, cohort.sentences
            run = cohort.run
            selection = run.advance(logits[row_at: row_at + n_rows], self.buffers,
                                    None if att_out is None else att_out[0][row_at: row_at + n_rows])
            if selection.rows is None:
                rows.append(torch.arange(row_at, row_at + n_rows, device=self.device))
            else:
                rows.append(selection.rows + row_at)
                changed_rows = True
            if selection.sentences is None:
                sentences.append(torch.arange(sentence_at, sentence_at + n_sentences, device=self.device))
            else:
                sentences.append(selection.sentences + sentence_at)
                changed_sentences = True
            finished += [(cohort.tags[i], run.results[i]) for i in selection.finished]
            if not run.done:
                kept.append(cohort)
            row_at += n_rows
            sentence_at += n_sentences
        self.cohorts = kept
        if not kept:
            self._clear()
            return finished
        if changed_sentences:
            self.memory = self.memory.select(torch.cat(sentences))
        if changed_rows:
            self.cache.select(torch.cat(rows))
        self.cache.truncate(max(c.run.position for c in kept))
        return finished

