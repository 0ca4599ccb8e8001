"""The KV cache and the encoder memory of a running batch against plain references kept in the test: cohorts
admitted at different steps and positions, beams reordered within their cohort, rows and sentences dropped,
blocks released and reused — every row reads exactly the keys and values it wrote, in order, and every
sentence its own encoder K/V, though nothing was moved."""
from __future__ import annotations

import random

import pytest
import torch

from pyengine.model.backends import gather_rows
from pyengine.model.cache import KVCache, Segment, SlotAllocator
from pyengine.model.memory import Memory

LAYERS, HEADS, DH = 2, 2, 4


def test_slot_allocator_first_fit_merges_and_grows():
    pool = SlotAllocator()
    a, b, c = pool.reserve(4), pool.reserve(2), pool.reserve(3)
    assert (a, b, c, pool.capacity) == (0, 4, 6, 9)
    pool.release(a, 4)
    assert pool.reserve(3) == 0 and pool.reserve(2) == 9  # first fit; a block of 2 does not fit in the 1 left
    pool.release(0, 3)
    pool.release(4, 2)  # merges with [3, 4) into [0, 6)
    assert pool.reserve(6) == 0 and pool.in_use == 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_cache_rows_read_what_they_wrote(dtype, seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    cache = KVCache(LAYERS, HEADS, DH, dtype, torch.device("cpu"))
    cohorts = []  # [base, capacity, position, rows]; batch rows are the cohorts' rows in this order
    history: list[list[list[torch.Tensor]]] = []  # per batch row, per layer: its written (2, H, Dh) K/V by position
    for step in range(14):
        if step in (0, 2, 3, 7, 8):  # admissions: a cohort of 1-3 sentences × beam 2 at position 0
            rows = 2 * rng.randint(1, 3)
            cohorts.append([cache.reserve(rows, 16), rows, 0, rows])
            cache.append(rows)
            history += [[[] for _ in range(LAYERS)] for _ in range(rows)]
        if not cohorts:  # every cohort finished before the next admission
            continue
        segments, start = [], 0
        for base, _, position, rows in cohorts:
            segments.append(Segment(start, rows, base, position))
            start += rows
        cache.begin_step(segments)
        n = cache.rows
        assert cache.lengths.tolist() == [s.position + 1 for s in segments for _ in range(s.rows)]
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
        # each cohort: beams take histories of their own cohort's rows, some rows leave; empty cohorts release
        keep, start, kept_cohorts = [], 0, []
        for cohort in cohorts:
            base, capacity, position, rows = cohort
            survivors = rows - 2 * int(rng.random() < 0.3)
            keep += [start + rng.randrange(rows) for _ in range(survivors)]
            start += rows
            if survivors:
                kept_cohorts.append([base, capacity, position + 1, survivors])
            else:
                cache.release(base, capacity)
        cache.select(torch.tensor(keep, dtype=torch.long))
        history = [[list(h) for h in history[r]] for r in keep]
        cohorts = kept_cohorts


def test_memory_slots_hold_each_sentence_until_it_leaves():
    gen = torch.Generator().manual_seed(4)
    memory = Memory(LAYERS, HEADS, DH, torch.float32, torch.device("cpu"))
    own: list[torch.Tensor] = []  # per batch sentence: its (L, 2, H, S, Dh) K/V
    for width, n in ((5, 3), (9, 1), (3, 4)):
        lengths = [width - i % 2 for i in range(n)]
        kv = torch.randn(LAYERS, 2, n, HEADS, width, DH, generator=gen)
        base = memory.reserve(n, width)
        memory.kv[:, :, base: base + n, :, :width] = kv
        memory.append(base, lengths)
        own += [kv[:, :, i] for i in range(n)]
        for layer in range(LAYERS):
            keys, values = memory.layer(layer)
            got = gather_rows(keys, memory.rows())
            for b, length in enumerate(memory.lengths.tolist()):
                assert torch.equal(got[b, :, :length], own[b][layer, 0, :, :length])
        keep = torch.tensor([i for i in range(memory.sentences) if i % 3 != 1])
        memory.select(keep)
        own = [own[i] for i in keep.tolist()]
    assert memory.pool.capacity == 6 < 3 + 1 + 4  # freed slots were reused (the second sentence took slot 1)
