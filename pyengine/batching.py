"""Length-sorted, token-budgeted batches, and restoring the caller's order."""
from __future__ import annotations

from typing import Sequence

import torch


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


def decode_memory_bytes(cfg, sentences: int, src_len: int, beam: int, max_len: int,
                        dtype: torch.dtype, cache_dtype: torch.dtype) -> int:
    """Bytes a batch reserves for decoding: the self-attention cache, the encoder K/V, the step's logits buffers
    and the encoder's activations (the weights are not counted)."""
    rows, cache_elem = sentences * beam, torch.finfo(cache_dtype).bits // 8
    cache = 2 * cfg.decoder_layers * 2 * rows * max_len * cfg.d_model * cache_elem
    memory = sentences * cfg.decoder_layers * 2 * src_len * cfg.d_model * cache_elem
    logits = 2 * rows * cfg.tgt_vocab_size * 4
    encoder = 2 * sentences * src_len * (4 * cfg.d_model + cfg.encoder_ffn_dim) * (torch.finfo(dtype).bits // 8)
    return cache + memory + logits + encoder


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: over the engine's cap, or the allocator's own (CPU or CUDA)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))
