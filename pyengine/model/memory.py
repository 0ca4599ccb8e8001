"""Encoder memory: each sentence's cross-attention keys and values, computed once when it enters a batch.

Sentences of a running batch come and go: a cohort's K/V are written into free slots of a pool that grows
(no re-padding of the others), a finished sentence frees its slot (no copy of the others), and the attention
reads each sentence's slot through a (B, S) row table, as the self-attention reads the KV cache.
With a lexical shortlist (Marian students) the memory also holds the words each sentence may produce and the
output layer restricted to their union.

A decoder step's cross-attention folds a sentence's beams into its query rows (one K/V read serves them) when every
sentence has the same number of rows; cohorts of different beam widths in one step (the server's batch of
several option sets) read through a table of one row per decoder row instead (`spread`, `step_view`).
"""
from __future__ import annotations

import torch

from .cache import SlotAllocator, grown
from .linear import OutputLayer


class Memory:
    """kv (L, 2, P, H, S, Dh): P sentence slots of S source positions; batch sentence b lives in slot slots[b]
    and has lengths[b] source tokens (keys past it are never read).

    Shortlist state (None without one): allowed (B, V), the words each sentence may produce; vocab (K,), their
    union (a superset once sentences leave), the ids the output layer computes; vocab_mask (B, K) =
    allowed[:, vocab]; output, the output layer restricted to vocab.
    """

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 buffer: torch.Tensor | None = None):
        # `buffer`: a kv buffer of this shape but for P and S (a BufferPool's), grown from as from an empty one
        self.kv = buffer if buffer is not None else torch.empty(layers, 2, 0, heads, 0, head_dim, dtype=dtype, device=device)
        self.pool = SlotAllocator()
        self.slots: list[int] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)
        self._length_list: list[int] = []
        self._rows: torch.Tensor | None = None  # the row table, until the sentences change
        self._beams: list[int] | None = None  # decoder rows per sentence when they differ (spread)
        self._step_view: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.allowed = self.vocab = self.vocab_mask = self.output = None

    @property
    def sentences(self) -> int:
        return len(self.slots)

    @property
    def width(self) -> int:
        """The longest source among the batch's sentences: the keys the attention reads."""
        return max(self._length_list, default=0)

    def reserve(self, sentences: int, width: int) -> list[int]:
        """Free slots for `sentences` sources of up to `width` tokens."""
        slots = self.pool.take(sentences)
        self.fit(self.pool.capacity, width)
        return slots

    def fit(self, sentences: int, width: int) -> None:
        """Room for `sentences` slots of `width` source positions (growing copies the slots in use)."""
        self.kv = grown(self.kv, {2: sentences, 4: width}, keep={2: self.pool.capacity})

    def append(self, slots: list[int], lengths: list[int], allowed: torch.Tensor | None = None) -> None:
        """The sentences written at these slots join the batch after the current ones."""
        self.slots += slots
        self._length_list += lengths
        self.lengths = torch.cat([self.lengths, torch.tensor(lengths, device=self.lengths.device)])
        if allowed is not None:
            self.allowed = allowed if self.allowed is None else torch.cat([self.allowed, allowed])
        self._rows = self._step_view = self._beams = None  # the runtime spreads the new sentences again

    def select(self, sentences: torch.Tensor) -> None:
        """Keep these batch sentences, in this order; the others' slots are freed."""
        keep = sentences.tolist()
        self.pool.release(set(self.slots) - {self.slots[i] for i in keep})
        self.slots = [self.slots[i] for i in keep]
        self._length_list = [self._length_list[i] for i in keep]
        self.lengths = self.lengths.index_select(0, sentences)
        if self.allowed is not None:
            self.allowed = self.allowed.index_select(0, sentences)
            self.vocab_mask = self.vocab_mask.index_select(0, sentences)
        self._rows = self._step_view = self._beams = None  # the runtime spreads the new sentences again

    def rows(self) -> torch.Tensor:
        """(B, width) int64: key j of sentence b is read from slot rows[b, j]."""
        if self._rows is None:
            slots = torch.tensor(self.slots, dtype=torch.long, device=self.kv.device)
            self._rows = slots[:, None].expand(len(self.slots), self.width).contiguous()
        return self._rows

    def spread(self, beams: list[int] | None) -> None:
        """The decoder rows of each batch sentence, in batch order, when they differ between sentences (cohorts of
        different beam widths); None when every sentence has the same number."""
        if beams != self._beams:
            self._beams, self._step_view = beams, None

    def step_view(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(query groups G, row table (G, width), lengths (G,)) for a decoder step's cross-attention: the
        sentences, whose beams are query rows of their group; or, spread, one group per decoder row."""
        if self._step_view is None:
            if self._beams is None:
                self._step_view = (self.sentences, self.rows(), self.lengths)
            else:
                counts = torch.tensor(self._beams, device=self.lengths.device)
                self._step_view = (sum(self._beams), self.rows().repeat_interleave(counts, dim=0),
                                   self.lengths.repeat_interleave(counts))
        return self._step_view

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder layer i's (P, H, width, Dh) keys and values, read through rows()."""
        w = self.width
        return self.kv[i, 0, :, :, :w], self.kv[i, 1, :, :, :w]

    def dense_keys(self, i: int) -> torch.Tensor:
        """Decoder layer i's keys as (B, H, width, Dh), in batch order (for the attention weights)."""
        return self.layer(i)[0].index_select(0, torch.tensor(self.slots, device=self.kv.device))

    def restrict_output(self, output: OutputLayer) -> None:
        """The output layer restricted to the union of the sentences' words, each row masked to its own."""
        self.vocab = self.allowed.any(dim=0).nonzero()[:, 0]
        self.vocab_mask = self.allowed[:, self.vocab]
        self.output = output.restrict(self.vocab)
