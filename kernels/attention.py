"""Masked softmax attention without materializing the score matrix (flash-attention style).

One kernel serves every attention in the model:
  * encoder self-attention with per-sentence key lengths (padding mask);
  * decoder self-attention over the KV cache, one or several new tokens per row (causal, per-row
    lengths: query i of a row sits at position len - Tq + i);
  * encoder-decoder attention where K/V are stored once per sentence: either the beams are folded
    into the query axis (the engine's layout, so one K/V read serves all beams) or queries are per
    beam row and `kv_group` = beam maps row → row // beam.
Online softmax over key blocks with float32 statistics and accumulator; exp2 with 1/√Dh·log2(e)
folded into one scale. Rows with no visible key give 0.

Layouts: q (B, H, Tq, Dh), k/v (B // kv_group, H, Tk, Dh), out (B, H, Tq, Dh); any strides except a
unit stride on Dh. kv_lengths (B // kv_group,) int. Head dims up to 256 (32, 64, 80, 128 tested);
float32 (IEEE dot), float16, bfloat16. With `rows` ((B // kv_group, Tk) int64), k/v are physical buffers
(P, H, T ≥ Tk, Dh) and key j of K/V row b is read from row rows[b, j] (the engine's indirect KV cache, whose
rows never move, and its encoder memory in slots).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import dot_precision, upcast_bf16_dot

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    q_ptr,  # (B, H, Tq, Dh)
    k_ptr,  # (B // KV_GROUP, H, Tk, Dh)
    v_ptr,  # (B // KV_GROUP, H, Tk, Dh)
    o_ptr,  # (B, H, Tq, Dh)
    len_ptr,  # (B // KV_GROUP,) visible keys per K/V row (unused unless HAS_LENGTHS)
    rows_ptr,  # (B // KV_GROUP, Tk) int32 physical row of each key (unused unless HAS_ROWS)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, Tq, Tk, KV_GROUP, qk_scale,  # qk_scale = log2(e) / sqrt(Dh)
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_ROWS: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # widen bf16 dot operands (interpreter only, see _common.upcast_bf16_dot)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kb = b // KV_GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m < Tq)[:, None] & d_in[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    kv_len = Tk
    if HAS_LENGTHS:
        kv_len = tl.minimum(tl.load(len_ptr + kb).to(tl.int32), Tk)
    q_pos = kv_len - Tq + offs_m  # absolute position of each query (causal form)
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, kv_len - Tq + (pid_m + 1) * BLOCK_M)

    k_base = k_ptr + kb.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + kb.to(tl.int64) * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        if HAS_ROWS:  # each key's physical row; K and V share one layout (checked by the launcher)
            src = tl.load(rows_ptr + kb.to(tl.int64) * Tk + cols, mask=cols < kv_len, other=0)
            offset = src.to(tl.int64) * stride_kb + cols * stride_kt
            k_cols = k_ptr + h * stride_kh + offset
            v_cols = v_ptr + h * stride_vh + offset
        else:
            k_cols = k_base + cols * stride_kt
            v_cols = v_base + cols * stride_vt
        k = tl.load(k_cols[None, :] + offs_d[:, None],
                    mask=(cols < kv_len)[None, :] & d_in[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = (cols < kv_len)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cols[:, None] + offs_d[None, :],
                    mask=(cols < kv_len)[:, None] & d_in[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        p = p.to(v.dtype)  # probabilities enter the second dot in the input precision, as flash-attention does
        if UPCAST_DOT:
            p, v = p.to(tl.float32), v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m < Tq)[:, None] & d_in[None, :])


def launch_config(tq: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Blocks and warps for a launch (shared with the ahead-of-time compile test)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 16 if tq <= 16 else (32 if dtype == torch.float32 or block_d > 64 else 64)
    block_n = 32 if dtype == torch.float32 or block_d > 64 else 64
    # float32 tiles with wide heads need 8 warps on sm_80 to stay within 255 registers (no spills)
    warps = 8 if dtype == torch.float32 and block_d > 64 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps, "num_stages": 2}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
              causal: bool = False, kv_group: int = 1, out: torch.Tensor | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """Fused masked attention; see the module docstring for the forms and layouts."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, Tq, Dh) and k, v of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, tq, dh = q.shape
    bk, hk, tk, dk = k.shape
    if rows is not None:  # physical buffers: any number of rows, at least Tk positions
        if rows.dim() != 2 or rows.dtype != torch.long or rows.shape[0] * kv_group != b or rows.shape[1] > tk:
            raise ValueError(f"rows must be int64 (B // kv_group, Tk ≤ {tk}), got {tuple(rows.shape)} {rows.dtype}")
        if k.stride() != v.stride():
            raise ValueError("with rows, k and v must share one layout (strides)")
        bk, tk = rows.shape
        rows = rows.to(torch.int32).contiguous()  # physical rows fit in 32 bits; offsets are widened in the kernel
    if hk != h or dk != dh or b != bk * kv_group:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} with kv_group={kv_group}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if dh > 256:
        raise ValueError(f"head dim {dh} exceeds the kernel's limit of 256")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must have unit stride on the head dimension")
    if kv_lengths is not None and kv_lengths.shape != (bk,):
        raise ValueError(f"kv_lengths must be ({bk},), got {tuple(kv_lengths.shape)}")
    if out is None:
        out = torch.empty(b, h, tq, dh, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype} with unit stride on Dh")
    if out.numel() == 0:
        return out
    cfg = launch_config(tq, dh, q.dtype)
    grid = (triton.cdiv(tq, cfg["BLOCK_M"]), b * h)
    lengths = kv_lengths if kv_lengths is not None else out  # placeholder pointers, never read
    _attention_kernel[grid](
        q, k, v, out, lengths, rows if rows is not None else out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, tq, tk, kv_group, LOG2E / math.sqrt(dh),
        HEAD_DIM=dh, HAS_LENGTHS=kv_lengths is not None, HAS_ROWS=rows is not None, CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_bf16_dot(q.dtype), **cfg)
    return out


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                  causal: bool = False, kv_group: int = 1, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch reference with the same semantics (rows with no visible key give 0)."""
    if rows is not None:  # gather each K/V row's keys from their physical rows
        j = torch.arange(rows.shape[1], device=rows.device)
        k, v = k[rows, :, j[None, :]].transpose(1, 2), v[rows, :, j[None, :]].transpose(1, 2)
    tq, tk = q.shape[2], k.shape[2]
    if kv_group > 1:
        k, v = k.repeat_interleave(kv_group, 0), v.repeat_interleave(kv_group, 0)
        if kv_lengths is not None:
            kv_lengths = kv_lengths.repeat_interleave(kv_group, 0)
    lengths = kv_lengths.clamp(max=tk) if kv_lengths is not None else torch.full((q.shape[0],), tk, device=q.device)
    cols = torch.arange(tk, device=q.device)
    visible = (cols[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        q_pos = lengths[:, None] - tq + torch.arange(tq, device=q.device)[None, :]  # (B, Tq)
        visible = visible & (cols[None, None, :] <= q_pos[:, :, None])[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v
