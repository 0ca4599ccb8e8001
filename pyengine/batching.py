"""Length-sorted, token-budgeted batches, and restoring the caller's order."""
from __future__ import annotations

from typing import Sequence


def plan_batches(lengths: Sequence[int], max_tokens: int, max_size: int, beam: int = 1) -> list[list[int]]:
    """Indices grouped longest first so that padded tokens × beam stay within `max_tokens` per batch.

    A single sentence over the budget still gets a batch of its own (the budget bounds padding, not input).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]  # sorted: the first is the longest
        if current and (len(current) >= max_size or longest * (len(current) + 1) * beam > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def restore_order(batches: list[list[int]], outputs: list[list], n: int) -> list:
    """Scatter per-batch outputs back to the caller's positions."""
    result: list = [None] * n
    for idx, out in zip(batches, outputs):
        for i, o in zip(idx, out):
            result[i] = o
    return result
