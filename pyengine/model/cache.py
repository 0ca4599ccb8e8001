"""The decoder's state between steps: the self-attention KV cache (or the SSRU's recurrent state).

Rows of a running batch sit at different positions (cohorts admitted at different steps) and are reordered
(beam search) and dropped (finished sentences) every step. Keys and values are written once, into physical rows
that never move: each sentence holds `beam` physical rows from its admission to its end, its beam j writes each
new position into its j-th row, and `origin[r, s]` says which physical row holds position s of batch row r
(FasterTransformer's cache indirection). Reordering and dropping rows gather only this (rows, T) table. Sound
because the beams of a sentence share a position and read only their own sentence's rows: position s is written
before any of them reads it. A finished sentence's rows are free at once.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from .. import _C


class SlotAllocator:
    """Slots (physical rows, or encoder-memory slots) from a pool that grows only when too few are free: the
    lowest free ones are taken; freed slots merge back into blocks."""

    def __init__(self) -> None:
        self.capacity = 0
        self._free: list[tuple[int, int]] = []  # (first, count), sorted, merged

    def take(self, n: int) -> list[int]:
        """n free slots, lowest first; the pool grows (capacity may be read after) by what is missing."""
        short = n - sum(count for _, count in self._free)
        if short > 0:
            self.release(range(self.capacity, self.capacity + short))
            self.capacity += short
        slots: list[int] = []
        while len(slots) < n:
            first, count = self._free.pop(0)
            used = min(count, n - len(slots))
            slots += range(first, first + used)
            if used < count:
                self._free.insert(0, (first + used, count - used))
        return slots

    def release(self, slots) -> None:
        """Slots no longer used (any iterable of ints)."""
        blocks = sorted(self._free + [(s, 1) for s in slots])
        merged: list[tuple[int, int]] = []
        for first, count in blocks:
            if merged and sum(merged[-1]) == first:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((first, count))
        self._free = merged

    @property
    def in_use(self) -> int:
        return self.capacity - sum(count for _, count in self._free)


class Span(NamedTuple):
    """The rows of one cohort in a step: batch rows start..start+rows-1, all at `position`."""

    start: int
    rows: int
    position: int


def step_positions(spans: list[Span], tokens: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(N,) the first position each batch row decodes at this step, and the end of the widest (last position + 1)."""
    end = max(s.position for s in spans) + tokens
    if len(spans) == 1:
        return torch.full((spans[0].rows,), spans[0].position, device=device), end
    # one tensor from one list (a server's batch has a span per cohort: a full + cat each cost more)
    return torch.tensor([s.position for s in spans for _ in range(s.rows)], device=device), end


def grown(tensor: torch.Tensor, sizes: dict[int, int], zero: bool = False,
          keep: dict[int, int] | None = None) -> torch.Tensor:
    """A tensor at least `sizes` along those dims (doubling), the old content copied (only its first keep[d]
    entries along the dims `keep` names: the part ever read); the rest zero with `zero`, else uninitialized
    (buffers whose unwritten parts are never read: pages are touched only where written)."""
    shape = list(tensor.shape)
    if all(shape[d] >= n for d, n in sizes.items()):
        return tensor
    for d, n in sizes.items():
        shape[d] = max(n, 2 * shape[d]) if n > shape[d] else shape[d]
    out = (torch.zeros if zero else torch.empty)(shape, dtype=tensor.dtype, device=tensor.device)
    part = tuple(slice(0, min(s, (keep or {}).get(d, s))) for d, s in enumerate(tensor.shape))
    out[part] = tensor[part]
    return out


class BufferPool:
    """The large buffers a finished batch gives back for the next (KV cache, encoder memory, the step's (rows, V)
    buffers): one per kind, the largest kept, up to `limit_bytes` each. A fresh tensor of tens of MB is mapped anew by
    malloc at every call and faults in page by page as it is first written (beam 4, batch 32, a 58k vocabulary:
    ~29k page faults, 60-90 ms of system time a call); a reused one is already mapped. A buffer is lent to one
    batch at a time (take removes it), so concurrent batches never share one; what it holds is never read before
    it is written."""

    def __init__(self, limit_bytes: int = 1 << 30):
        self.limit_bytes = limit_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, kind: str) -> torch.Tensor | None:
        with self._lock:
            return self._held.pop(kind, None)

    def give(self, kind: str, tensor: torch.Tensor) -> None:
        if tensor.numel() * tensor.element_size() > self.limit_bytes:
            return
        with self._lock:
            held = self._held.get(kind)
            if held is None or held.numel() < tensor.numel():
                self._held[kind] = tensor


class KVCache:
    """Self-attention keys and values of every decoder layer, (L, 2, P, H, T, Dh) physical rows (see the module
    docstring). `reserve` gives a sentence its rows; `begin_step` records where this step's rows write; `write`
    stores one layer's new K/V and returns what its attention reads; `select` keeps batch rows in a new order
    (beam reorder and dropping in one gather of the origin table).

    After begin_step: rows_index (N, end) — key j of batch row r is physical row rows_index[r, j]; lengths (N,) —
    the keys row r sees; write_rows / positions (N,) — where each row writes (the C++ step writes them itself).

    `native`: the row table's bookkeeping of a step (a lone span's column, a reorder) by `_C.kv_step_table` and
    `_C.kv_select`, one call each where ATen takes 4-6 (the Ops' `beam_step == "loop"`: CPU tensors).
    """

    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 buffer: torch.Tensor | None = None, native: bool = False):
        # `buffer`: a physical buffer of this shape but for P and T (a BufferPool's), grown from as from an empty one
        self.physical = buffer if buffer is not None else \
            torch.zeros(layers, 2, 0, heads, 0, head_dim, dtype=dtype, device=device)
        self.origin = torch.zeros(0, 0, dtype=torch.long, device=device)
        self.slots = SlotAllocator()
        self.rows = 0  # batch rows
        self.length = 0  # positions the live rows have filled (the widest, as of the last step)
        self.rows_index = self.write_rows = self.positions = None
        self.end, self._tokens, self._lengths = 0, 1, None
        self.native = native
        self._block: tuple[int, int] | None = None  # (first physical row, position) when one slice takes the write
        self._arange = torch.arange(0, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.physical.device

    def reserve(self, rows: int, length: int) -> list[int]:
        """`rows` physical rows holding `length` positions (a sentence's beams)."""
        slots = self.slots.take(rows)
        self.fit(self.slots.capacity, length)
        return slots

    def fit(self, rows: int, length: int) -> None:
        """Room for `rows` physical rows of `length` positions (a running batch sizes it for its budget once:
        growing copies what the rows hold)."""
        self.physical = grown(self.physical, {2: rows, 4: length}, keep={4: self.length})
        self.origin = grown(self.origin, {1: length}, zero=True)  # every entry a valid row, read or not

    def release(self, slots: list[int]) -> None:
        """A finished sentence's rows are free again."""
        self.slots.release(slots)

    def append(self, rows: int) -> None:
        """`rows` batch rows join after the current ones (their positions are recorded as they write)."""
        self.rows += rows
        self.origin = grown(self.origin, {0: self.rows}, zero=True)

    def begin_step(self, spans: list[Span], write_rows: torch.Tensor, tokens: int = 1,
                   first_row: int | None = None) -> None:
        """This step's rows: batch row r writes `tokens` positions from its span's into physical row write_rows[r].
        first_row: given when the rows are first_row.. in one run at one position (then written by slices)."""
        end = max(s.position for s in spans) + tokens
        if end > self.physical.shape[4]:
            raise RuntimeError(f"KV cache overflow: position {end} > capacity {self.physical.shape[4]}")
        self.end, self._tokens, self._lengths = end, tokens, None
        if self.native and tokens == 1 and spans == [Span(0, write_rows.numel(), end - 1)]:  # every row's one column
            self.positions, self.rows_index = _C.kv_step_table(self.origin, write_rows, end - 1, end)
        else:
            self.positions = step_positions(spans, tokens, self.device)[0]
            self._write_table(spans, write_rows, tokens)
            self.rows_index = self.origin[: write_rows.numel(), : end].contiguous()
        self.write_rows = write_rows
        self.length = self.end  # no live row has written past this step's widest (a finished long one may have)
        self._block = None if first_row is None or len(spans) != 1 else (first_row, spans[0].position)
        if self._block is None and tokens > 1:
            raise ValueError("a block of several tokens per row is written by rows in one run at one position")

    def _write_table(self, spans: list[Span], write_rows: torch.Tensor, tokens: int) -> None:
        """Where each row's positions of this step are: into the row table."""
        if tokens == 1 and len(spans) == 1:  # one position: a column of the table (a strided copy, no scatter)
            self.point(spans[0].position, write_rows[spans[0].start: spans[0].start + spans[0].rows], spans[0].start)
        elif tokens == 1:  # every row's one position in one scatter (not a write per cohort)
            self.origin.index_put_((self._batch_rows(write_rows.numel()), self.positions), write_rows)
        else:
            for s in spans:
                self.origin[s.start: s.start + s.rows, s.position: s.position + tokens] = \
                    write_rows[s.start: s.start + s.rows, None]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) the keys each row sees at this step (made when first asked: the C++ step does not)."""
        if self._lengths is None:
            self._lengths = self.positions + self._tokens
        return self._lengths

    def point(self, position: int, physical: torch.Tensor, start: int = 0) -> None:
        """Batch rows start..start+n-1 read `position` from these n physical rows (where this step writes them, or
        rows that hold the same keys and values there, as a beam's first step leaves its beams: written once, by the
        first)."""
        self.origin[start: start + physical.numel(), position] = physical

    def _batch_rows(self, n: int) -> torch.Tensor:
        """0..n-1 (kept: every step needs it)."""
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()), device=self.device)
        return self._arange[:n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (N, H, T, Dh) of this step into the physical rows → the layer's (P, H, T_max, Dh) key and value
        buffers, to be read through rows_index (with lengths)."""
        keys, values = self.physical[layer, 0], self.physical[layer, 1]
        if self._block is not None:  # rows in one run at one position (offline, teacher forcing): slice copies
            first, position = self._block
            n, t = k.shape[0], k.shape[2]
            keys[first: first + n, :, position: position + t] = k
            values[first: first + n, :, position: position + t] = v
        else:
            keys[self.write_rows, :, self.positions] = k[:, :, 0].to(keys.dtype)
            values[self.write_rows, :, self.positions] = v[:, :, 0].to(values.dtype)
        return keys, values

    def select(self, rows: torch.Tensor) -> None:
        """Keep batch rows in the given order (beam reorder and finished-row dropping in one gather)."""
        n = rows.numel()
        if self.native:
            _C.kv_select(self.origin, rows, self.length)
        else:
            self.origin[:n, : self.length] = self.origin[:, : self.length].index_select(0, rows)  # gathered first
        self.rows = n


class RecurrentCache:
    """The decoder state of SSRU layers, (L, N, D) cell states in float32, in place of the KV cache
    (same interface: rows are appended, reordered and dropped alike; nothing is reserved)."""

    def __init__(self, layers: int, dim: int, device: torch.device):
        self.state = torch.zeros(layers, 0, dim, device=device)
        self.rows = 0
        self.positions, self.end = None, 0

    def reserve(self, rows: int, length: int) -> list[int]:
        return list(range(rows))

    def fit(self, rows: int, length: int) -> None:
        """Nothing to size: the state grows with the rows."""

    def release(self, slots: list[int]) -> None:
        """Nothing reserved."""

    def append(self, rows: int) -> None:
        self.state = torch.cat([self.state, self.state.new_zeros(self.state.shape[0], rows, self.state.shape[2])], 1)
        self.rows += rows

    def begin_step(self, spans: list[Span], write_rows: torch.Tensor, tokens: int = 1,
                   first_row: int | None = None) -> None:
        """Only the positions (for the embeddings): the state itself does not depend on them."""
        self.positions, self.end = step_positions(spans, tokens, self.state.device)

    def select(self, rows: torch.Tensor) -> None:
        self.state = self.state.index_select(1, rows)
        self.rows = rows.numel()
