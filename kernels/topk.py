"""Log-softmax + top-k over the vocabulary for beam search: the GPU's twin of pyengine's C++ op
(csrc/softmax_topk.cpp), with its contract.

Per row: the k best (log-prob, token), best first, ties to the lower token id; log-probs are
logit - logsumexp(row) over the whole row; `banned` ids count in the logsumexp (as after HF's
log_softmax + processors) but are never candidates while others remain, and their logits are overwritten
with -inf. One program per row: two passes for the max and the sum of exp, then k rounds, each a pass that
takes the best (value, id) ranked after the previous round's pick. The row (V floats) stays in L2 between
passes, and k = 2 × beam is small: O(k·V) reads, no per-thread candidate arrays, nothing spills.
Triton JIT-compiles it on the user's machine: no CUDA toolkit is needed at install.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

ID_NONE = tl.constexpr(2**31 - 1)  # "no candidate yet" in the id lanes (vocabularies are far smaller)


@triton.jit
def _log_softmax_topk_kernel(
    x_ptr,  # (R, V) float32 logits; banned ids overwritten with -inf
    banned_ptr,  # (M,) int64 banned ids
    val_ptr,  # (R, K) float32 log-probs out
    id_ptr,  # (R, K) int64 ids out
    stride_x, V, M, K,
    BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    # the normalizer over every logit, banned ones included
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf"))
        run_max = tl.maximum(run_max, x)
    row_max = tl.max(run_max, axis=0)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf"))
        run_sum += tl.exp(x - row_max)
    log_sum = row_max + tl.log(tl.sum(run_sum, axis=0))
    # banned ids leave the ranking: -inf, then ordered by id behind every finite logit
    for start in range(0, M, BLOCK_M):
        offs = start + tl.arange(0, BLOCK_M)
        ban = tl.load(banned_ptr + offs, mask=offs < M, other=0)
        tl.store(x_row + ban, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=offs < M)
    tl.debug_barrier()  # the -inf stores are seen by every thread's loads below
    # k rounds; round j takes the best (value, id) that ranks after round j-1's (prev_val, prev_id)
    prev_val = float("inf")
    prev_id = -1
    for j in range(0, K):
        best_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
        best_id = tl.full([BLOCK_V], ID_NONE, tl.int32)
        for start in range(0, V, BLOCK_V):
            ids = start + cols
            x = tl.load(x_row + ids, mask=ids < V, other=float("-inf"))
            after = (ids < V) & ((x < prev_val) | ((x == prev_val) & (ids > prev_id)))
            # a lane's earlier id is lower, so a later one wins only with a strictly higher value
            take = after & ((x > best_val) | (best_id == ID_NONE))
            best_val = tl.where(take, x, best_val)
            best_id = tl.where(take, ids, best_id)
        top_val = tl.max(tl.where(best_id != ID_NONE, best_val, float("-inf")), axis=0)
        top_id = tl.min(tl.where((best_id != ID_NONE) & (best_val == top_val), best_id, ID_NONE), axis=0)
        tl.store(val_ptr + row * K + j, top_val - log_sum)
        tl.store(id_ptr + row * K + j, top_id.to(tl.int64))
        prev_val = top_val
        prev_id = top_id


def launch_config(vocab: int) -> dict:
    """Block and warp count for a vocabulary of `vocab` (shared with the ahead-of-time compile test)."""
    block = min(triton.next_power_of_2(max(vocab, 16)), 2048)
    return {"BLOCK_V": block, "BLOCK_M": 16, "num_warps": 4 if block <= 1024 else 8}


def log_softmax_topk(logits: torch.Tensor, k: int, banned: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) float32 contiguous logits → the k best (log-prob, id) per row, best first (see the module
    docstring). Overwrites the logits at `banned` ids (host integers: checked without reading the device) with
    -inf, as the C++ op does."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError("log_softmax_topk: logits must be a contiguous (N, V) float32 tensor")
    rows, vocab = logits.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"log_softmax_topk: k={k} outside [1, {vocab}]")
    if vocab >= 2**31 - 1:
        raise ValueError(f"log_softmax_topk: a vocabulary of {vocab} ids exceeds the kernel's int32 ids")
    banned = [int(i) for i in banned]
    if any(not 0 <= i < vocab for i in banned):
        raise ValueError("log_softmax_topk: banned token id outside the vocabulary")
    banned_ids = torch.tensor(banned, dtype=torch.long).to(logits.device, non_blocking=True)
    values = torch.empty(rows, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(rows, k, dtype=torch.long, device=logits.device)
    if rows:
        _log_softmax_topk_kernel[(rows,)](logits, banned_ids, values, ids, logits.stride(0), vocab, len(banned), k,
                                          **launch_config(vocab))
    return values, ids
