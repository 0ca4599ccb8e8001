"""Residual add + layer norm in one pass over each row, statistics in float32.

Forms: post-norm `y = LN(x + residual)`; pre-norm `(y, s) = (LN(x + residual), x + residual)`, which
hands the new residual stream to the next sub-layer without a second pass; plain `LN(x)` when
residual is None. Layouts: x, residual (..., D) with unit stride on D (rows may be strided);
weight, bias (D,). Limits: D ≤ 16384 (one block per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm_kernel(
    x_ptr,  # (R, D) input rows
    res_ptr,  # (R, D) residual rows (unused unless HAS_RESIDUAL)
    w_ptr,  # (D,) gain
    b_ptr,  # (D,) bias
    y_ptr,  # (R, D) normalized output
    sum_ptr,  # (R, D) x + residual output (unused unless STORE_SUM)
    stride_x, stride_res, stride_y, stride_sum,  # row strides
    D, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(res_ptr + row * stride_res + cols, mask=inside, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(sum_ptr + row * stride_sum + cols, x.to(sum_ptr.dtype.element_ty), mask=inside)
    mean = tl.sum(x, axis=0) / D
    centered = tl.where(inside, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (centered * rstd * w + b).to(y_ptr.dtype.element_ty), mask=inside)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride on its last dimension")
    return t.reshape(-1, t.shape[-1])


def launch_config(d: int) -> dict:
    """Block and warp count for a row of length d (shared with the ahead-of-time compile test)."""
    block = triton.next_power_of_2(d)
    return {"BLOCK_D": block, "num_warps": 4 if block <= 2048 else 8}


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, return_sum: bool = False, out: torch.Tensor | None = None,
                   out_sum: torch.Tensor | None = None):
    """LN(x + residual) (and x + residual when return_sum): the fused post-norm / pre-norm step."""
    d = x.shape[-1]
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"weight/bias must be ({d},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if d > 16384:
        raise ValueError(f"row length {d} exceeds the kernel's limit of 16384")
    x2 = _rows(x.contiguous() if x.stride(-1) != 1 else x, "x")
    r2 = _rows(residual, "residual") if residual is not None else x2
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    s = (torch.empty_like(y) if out_sum is None else out_sum) if return_sum else y
    for t in (y, s):
        if t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous():
            raise ValueError(f"outputs must be contiguous {tuple(x.shape)} {x.dtype}")
    y2, s2 = y.view(-1, d), s.view(-1, d)
    cfg = launch_config(d)
    if x2.shape[0]:
        _add_layer_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, bias, y2, s2, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0), d, eps,
            HAS_RESIDUAL=residual is not None, STORE_SUM=return_sum, **cfg)
    return (y, s) if return_sum else y


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float, return_sum: bool = False):
    """Plain PyTorch reference."""
    s = x if residual is None else x + residual
    y = torch.nn.functional.layer_norm(s, s.shape[-1:], weight, bias, eps)
    return (y, s) if return_sum else y
