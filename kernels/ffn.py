"""The feed-forward sub-layer's GEMMs with their epilogues fused.

  * `linear_act(x, W, b, act)`       = act(x·Wᵀ + b), act ∈ {none, relu, gelu (erf), swish}
  * `linear_residual(x, W, b, r)`    = x·Wᵀ + b + r  (the second FFN linear with the residual add)

Tiled `tl.dot` with a float32 accumulator; bias, activation and residual applied in registers before
the single store. Layouts: x (..., K) with unit stride on K; W (N, K) as nn.Linear stores it;
b (N,); r and out (..., N). float32 (IEEE dot), float16, bfloat16.
Block configs are fixed per dtype and problem shape (`launch_config`), chosen for sm_80 / sm_90:
no autotuning at run time, so the ahead-of-time compile test checks exactly what is launched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, upcast_bf16_dot

ACTIVATION_IDS = {"none": 0, "relu": 1, "gelu": 2, "swish": 3}


@triton.jit
def _linear_kernel(
    x_ptr,  # (M, K)
    w_ptr,  # (N, K)
    b_ptr,  # (N,) (unused unless HAS_BIAS)
    r_ptr,  # (M, N) residual (unused unless HAS_RESIDUAL)
    y_ptr,  # (M, N)
    M, N, K,
    stride_xm, stride_wn, stride_rm, stride_ym,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # widen bf16 dot operands (interpreter only, see _common.upcast_bf16_dot)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_in = offs_m < M
    n_in = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = (k0 + offs_k) < K
        a = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_in[:, None] & k_in[None, :], other=0.0)
        w = tl.load(w_cols + (k0 + offs_k)[:, None], mask=k_in[:, None] & n_in[None, :], other=0.0)
        if UPCAST_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACTIVATION == 2:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == 3:
        acc = acc * tl.sigmoid(acc)
    out_mask = m_in[:, None] & n_in[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=out_mask,
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


def launch_config(m: int, dtype: torch.dtype) -> dict:
    """Tile shape per dtype and row count (decode steps have few rows); shared with the compile test."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if dtype == torch.float32:
        return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
            residual: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    if activation not in ACTIVATION_IDS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATION_IDS)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"x and weight must share float32/float16/bfloat16, got {x.dtype} and {weight.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have unit stride on its input dimension")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (*x.shape[:-1], n) or y.dtype != x.dtype or not y.is_contiguous():
        raise ValueError(f"out must be contiguous {(*x.shape[:-1], n)} {x.dtype}")
    y2 = y.view(-1, n)
    r2 = y2
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from the output {tuple(y.shape)}")
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    if m == 0:
        return y
    cfg = launch_config(m, x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, r2, y2, m, n, k,
        x2.stride(0), weight.stride(0), r2.stride(0), y2.stride(0),
        ACTIVATION=ACTIVATION_IDS[activation], HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST_DOT=upcast_bf16_dot(x.dtype), **cfg)
    return y


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x·Wᵀ + b), fused."""
    return _linear(x, weight, bias, activation, None, out)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b + residual, fused."""
    return _linear(x, weight, bias, "none", residual, out)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch reference for both forms."""
    y = torch.nn.functional.linear(x, weight, bias)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = torch.nn.functional.gelu(y)
    elif activation == "swish":
        y = torch.nn.functional.silu(y)
    return y if residual is None else y + residual
