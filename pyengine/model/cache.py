"""The decoder's state between steps: the self-attention KV cache (or the SSRU's recurrent state).

Rows of a running batch sit at different positions (cohorts admitted at different steps) and are reordered
(beam search) and dropped (finished sentences) every step. Keys and values are written once, into physical rows
that never move: a cohort reserves a block of physical rows for its lifetime, its i-th row writes its new
position into the block's i-th row, and `origin[r, s]` says which physical row holds position s of batch row r
(FasterTransformer's cache indirection). Reordering and dropping rows gather only this (rows, T) table. Sound
because a cohort's rows share a position: each writes position s when no row of the cohort has read it yet,
into a block no other cohort touches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class SlotAllocator:
    """Contiguous blocks of slots (physical rows) from a pool that grows: first fit, freed blocks merge."""

    def __init__(self) -> None:
        self.capacity = 0
        self._free: list[tuple[int, int]] = []  # (start, length), sorted, merged

    def reserve(self, n: int) -> int:
        """The first slot of a free block of n; the pool grows (capacity may be read after) when none fits."""
        for i, (start, length) in enumerate(self._free):
            if length >= n:
                self._free[i] = (start + n, length - n)
                if length == n:
                    del self._free[i]
                return start
        # grow: extend a free block that ends at the capacity, else append
        start = self.capacity
        if self._free and sum(self._free[-1]) == self.capacity:
            start = self._free.pop()[0]
        self.capacity = start + n
        return start

    def release(self, start: int, n: int) -> None:
        if n <= 0:
            return
        blocks = sorted(self._free + [(start, n)])
        merged: list[tuple[int, int]] = []
        for s, length in blocks:
            if merged and sum(merged[-1]) == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((s, length))
        self._free = merged

    @property
    def in_use(self) -> int:
        return self.capacity - sum(length for _, length in self._free)


@dataclass(frozen=True)
class Segment:
    """The rows of one cohort in a step: batch rows start..start+rows-1, writing physical rows base..base+rows-1
    at `position` (all rows of a cohort sit at one position)."""

    start: int
    rows: int
    base: int
    position: int


def step_positions(segments: list[Segment], tokens: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(N,) the first position each batch row decodes at this step, and the end of the widest (last position + 1)."""
    end = max(s.position for s in segments) + tokens
    if len(segments) == 1:
        return torch.full((segments[0].rows,), segments[0].position, device=device), end
    return torch.cat([torch.full((s.rows,), s.position, device=device) for s in segments]), end


def grown(tensor: torch.Tensor, sizes: dict[int, int], zero: bool = False) -> torch.Tensor:
    """A tensor at least `sizes` along those dims (doubling), the old content copied; the rest zero with `zero`,
    else uninitialized (buffers whose unwritten parts are never read: pages are touched only where written)."""
    shape = list(tensor.shape)
    if all(shape[d] >= n for d, n in sizes.items()):
        return tensor
    for d, n in sizes.items():
        shape[d] = max(n, 2 * shape[d]) if n > shape[d] else shape[d]
    out = (torch.zeros if zero else torch.empty)(shape, dtype=tensor.dtype, device=tensor.device)
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


class KVCache:
    """Self-attention keys and values of every decoder layer, (L, 2, P, H, T, Dh) physical rows (see the module
    docstring). `begin_step` records where this step's rows write; `write` stores one layer's new K/V and returns
    what its attention reads; `select` keeps batch rows in a new order (beam reorder and dropping in one gather).

    After begin_step: rows_index (N, end) — key j of batch row r is physical row rows_index[r, j]; lengths (N,) —
    the keys row r sees; write_rows / positions (N,) — where each row writes (the C++ step writes them itself).
    """

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.physical = torch.zeros(layers, 2, 0, heads, 0, head_dim, dtype=dtype, device=device)
        self.origin = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.slots = SlotAllocator()
        self.rows = 0  # batch rows
        self.length = 0  # positions filled (the widest row)
        self.segments: list[Segment] = []
        self.rows_index = self.lengths = self.write_rows = self.positions = None
        self.end = 0

    @property
    def device(self) -> torch.device:
        return self.physical.device

    def reserve(self, rows: int, length: int) -> int:
        """A block of `rows` physical rows holding `length` positions, for a cohort; returns its first row."""
        base = self.slots.reserve(rows)
        self.physical = grown(self.physical, {2: self.slots.capacity, 4: length})
        self.origin = grown(self.origin, {1: length}, zero=True)  # every entry a valid row, read or not
        return base

    def release(self, base: int, rows: int) -> None:
        """A finished cohort's block is free again."""
        self.slots.release(base, rows)

    def append(self, rows: int) -> None:
        """`rows` batch rows join after the current ones (their positions are recorded as they write)."""
        self.rows += rows
        self.origin = grown(self.origin, {0: self.rows}, zero=True)

    def begin_step(self, segments: list[Segment], tokens: int = 1) -> None:
        """This step's rows: each cohort's rows write `tokens` positions from theirs into their block."""
        self.segments = segments
        self.positions, self.end = step_positions(segments, tokens, self.device)
        if self.end > self.physical.shape[4]:
            raise RuntimeError(f"KV cache overflow: position {self.end} > capacity {self.physical.shape[4]}")
        arange = torch.arange(max(s.rows for s in segments), device=self.device)
        for s in segments:
            self.origin[s.start: s.start + s.rows, s.position: s.position + tokens] = (s.base + arange[: s.rows])[:, None]
        self.rows_index = self.origin[: self.positions.numel(), : self.end].contiguous()
        self.write_rows = torch.cat([s.base + arange[: s.rows] for s in segments]) if len(segments) > 1 else \
            segments[0].base + arange
        self.lengths = self.positions + tokens
        self.length = max(self.length, self.end)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (N, H, T, Dh) of this step into the physical rows → the layer's (P, H, T_max, Dh) key and value
        buffers, to be read through rows_index (with lengths)."""
        t = k.shape[2]
        keys, values = self.physical[layer, 0], self.physical[layer, 1]
        for s in self.segments:  # a block per cohort: plain slice copies
            rows = slice(s.start, s.start + s.rows)
            keys[s.base: s.base + s.rows, :, s.position: s.position + t] = k[rows]
            values[s.base: s.base + s.rows, :, s.position: s.position + t] = v[rows]
        return keys, values

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows in the given order (beam reorder and finished-row dropping in one gather)."""
        n = rows.numel()
        self.origin[:n, : self.length] = self.origin[rows, : self.length]  # a copy is gathered first
        self.rows = n


class RecurrentCache:
    """The decoder state of SSRU layers, (L, N, D) cell states in float32, in place of the KV cache
    (same interface: rows are appended, reordered and dropped alike; nothing is reserved)."""

    def __init__(self, layers: int, dim: int, device: torch.device):
        self.state = torch.zeros(layers, 0, dim, device=device)
        self.rows = 0
        self.positions, self.end = None, 0

    def reserve(self, rows: int, length: int) -> int:
        return 0

    def release(self, base: int, rows: int) -> None:
        """Nothing reserved."""

    def append(self, rows: int) -> None:
        self.state = torch.cat([self.state, self.state.new_zeros(self.state.shape[0], rows, self.state.shape[2])], 1)
        self.rows += rows

    def begin_step(self, segments: list[Segment], tokens: int = 1) -> None:
        """Only the positions (for the embeddings): the state itself does not depend on them."""
        self.positions, self.end = step_positions(segments, tokens, self.state.device)

    def select(self, rows: torch.Tensor) -> None:
        self.state = self.state.index_select(1, rows)
        self.rows = rows.numel()
