"""The KV cache and the encoder memory of a running batch against plain references kept in the test: cohorts
admitted at different steps and positions, beams reordered within their cohort, rows and sentences dropped,
blocks released and reused, shrunken cohorts compacted into fresh rows — every row reads exactly the keys and
values it wrote, in order, and every sentence its own encoder K/V."""
from __future__ import annotations

import random

import pytest
import torch

from pyengine import _C
from pyengine.model.backends import gather_rows
from pyengine.model.cache import KVCache, SlotAllocator, Span
from pyengine.model.memory import Memory

LAYERS, HEADS, DH = 2, 2, 4


def test_slot_allocator_takes_the_lowest_free_and_grows_only_when_short():
    pool = SlotAllocator()
    assert (pool.take(4), pool.take(2), pool.capacity) == ([0, 1, 2, 3], [4, 5], 6)
    pool.release([1, 2])
    assert pool.take(3) == [1, 2, 6] and pool.capacity == 7  # the free ones, then one more
    pool.release([0, 4, 5])
    assert pool.take(3) == [0, 4, 5] and pool.capacity == 7 and pool.in_use == 7  # scattered, yet no growth


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("admissions", [(0, 2, 3, 7, 8), (0,)])
def test_kv_cache_rows_read_what_they_wrote(dtype, seed, native, admissions):
    """Cohorts of sentences × beam 2: each sentence's beams write its own rows; beams take histories of their
    own sentence's beams; finished sentences free their rows, which later cohorts take. native: the row table
    kept by _C.kv_step_table / _C.kv_select (a lone cohort's steps: admissions (0,)), else by ATen."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cache = KVCache(LAYERS, HEADS, DH, dtype, torch.device("cpu"), native=native)
    cohorts = []  # [sentence rows (per sentence: its 2 physical rows), position]; batch rows in this order
    history: list[list[list[torch.Tensor]]] = []  # per batch row, per layer: its written (2, H, Dh) K/V by position
    reused = False
    for step in range(14):
        if step in admissions:  # admitted: a cohort of 1-3 sentences × beam 2 at position 0
            sentences = rng.randint(1, 3)
            slots = cache.reserve(2 * sentences, 16)
            reused |= min(slots) < cache.slots.capacity - 2 * sentences
            cohorts.append([[slots[2 * i: 2 * i + 2] for i in range(sentences)], 0])
            cache.append(2 * sentences)
            history += [[[] for _ in range(LAYERS)] for _ in range(2 * sentences)]
        if not cohorts:  # every cohort finished before the next admission
            continue
        spans, start = [], 0
        for rows, position in cohorts:
            spans.append(Span(start, 2 * len(rows), position))
            start += 2 * len(rows)
        write_rows = [slot for rows, _ in cohorts for pair in rows for slot in pair]
        cache.begin_step(spans, torch.tensor(write_rows))
        n = cache.rows
        assert cache.lengths.tolist() == [s.position + 1 for s in spans for _ in range(s.rows)]
        for layer in range(LAYERS):
            k = torch.randn(n, HEADS, 1, DH, generator=gen).to(dtype)
            v = torch.randn(n, HEADS, 1, DH, generator=gen).to(dtype)
            keys, values = cache.write(layer, k, v)
            for r in range(n):
                history[r][layer].append(torch.stack([k[r, :, 0], v[r, :, 0]]))
            got_k, got_v = gather_rows(keys, cache.rows_index), gather_rows(values, cache.rows_index)
            for r in range(n):
                length = int(cache.lengths[r])
                want = torch.stack(history[r][layer])  # (length, 2, H, Dh)
                assert torch.equal(got_k[r, :, :length].transpose(0, 1), want[:, 0]), (step, layer, r)
                assert torch.equal(got_v[r, :, :length].transpose(0, 1), want[:, 1]), (step, layer, r)
        # each sentence: its 2 beams take the histories of its own beams; some sentences finish and free their rows
        keep, start, kept_cohorts = [], 0, []
        for rows, position in cohorts:
            live = []
            for i, pair in enumerate(rows):
                if rng.random() < 0.25:
                    cache.release(pair)
                else:
                    keep += [start + 2 * i + rng.randrange(2) for _ in range(2)]
                    live.append(pair)
            start += 2 * len(rows)
            if live:
                kept_cohorts.append([live, position + 1])
        cache.select(torch.tensor(keep, dtype=torch.long))
        history = [[list(h) for h in history[r]] for r in keep]
        cohorts = kept_cohorts
    assert reused or len(admissions) == 1, "the scenario must reuse freed rows"


def test_kv_cache_block_write_for_one_run_at_one_position():
    """Rows in one run at one position (offline, teacher forcing) are written by slices, several tokens at once."""
    cache = KVCache(1, HEADS, DH, torch.float32, torch.device("cpu"))
    rows = cache.reserve(3, 8)
    cache.append(3)
    k, v = torch.randn(3, HEADS, 4, DH), torch.randn(3, HEADS, 4, DH)
    cache.begin_step([Span(0, 3, 0)], torch.tensor(rows), tokens=4, first_row=rows[0])
    keys, values = cache.write(0, k, v)
    assert torch.equal(gather_rows(keys, cache.rows_index), k) and torch.equal(gather_rows(values, cache.rows_index), v)
    with pytest.raises(ValueError, match="one run at one position"):
        cache.begin_step([Span(0, 3, 4)], torch.tensor(rows), tokens=2)


def test_kv_table_ops_refuse_rows_and_positions_outside_the_table():
    origin = torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(RuntimeError, match="7 positions outside the table's 6"):
        _C.kv_step_table(origin, torch.tensor([1, 2]), 6, 7)
    with pytest.raises(RuntimeError, match="5 rows, the table holds 4"):
        _C.kv_step_table(origin, torch.arange(5), 0, 1)
    with pytest.raises(RuntimeError, match="row 4 outside 0..3"):
        _C.kv_select(origin, torch.tensor([0, 4]), 3)
    with pytest.raises(RuntimeError, match="int64"):
        _C.kv_select(origin, torch.tensor([0, 1], dtype=torch.int32), 3)
    assert torch.equal(origin, torch.zeros(4, 6, dtype=torch.long))  # refused before anything was written


def test_memory_slots_hold_each_sentence_until_it_leaves():
    gen = torch.Generator().manual_seed(4)
    memory = Memory(LAYERS, HEADS, DH, torch.float32, torch.device("cpu"))
    own: list[torch.Tensor] = []  # per batch sentence: its (L, 2, H, S, Dh) K/V
    for width, n in ((5, 3), (9, 1), (3, 4)):
        lengths = [width - i % 2 for i in range(n)]
        kv = torch.randn(LAYERS, 2, n, HEADS, width, DH, generator=gen)
        slots = memory.reserve(n, width)
        memory.kv[:, :, slots, :, :width] = kv
        memory.append(slots, lengths)
        own += [kv[:, :, i] for i in range(n)]
        for layer in range(LAYERS):
            keys, values = memory.layer(layer)
            got = gather_rows(keys, memory.rows())
            for b, length in enumerate(memory.lengths.tolist()):
                assert torch.equal(got[b, :, :length], own[b][layer, 0, :, :length])
        keep = torch.tensor([i for i in range(memory.sentences) if i % 3 != 1])
        memory.select(keep)
        own = [own[i] for i in keep.tolist()]
    assert memory.pool.capacity == 6 < 3 + 1 + 4  # freed slots reused: slot 1 by the second admission, 2 by the third
