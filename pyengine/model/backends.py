"""Which implementation runs each operation, decided once per engine (`resolve_ops`) and reported.

`Ops` bundles the choices a model runs with: the linear method (pyengine.model.linear), the attention, the
residual + layer norm (PyTorch with pyengine's C++ kernels on the CPU, or the Triton kernels of pyengine.kernels),
the log-softmax + top-k that ranks a search's candidates from logits (C++ on the CPU, Triton on a GPU: no CUDA
toolkit is needed at install), and the dtype the attention K/V are stored in. A backend that is asked for and not available is an error, never
a silent fallback.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _C
from ..errors import BackendError, OptionError
from .f32_linear import F32Linear, f32_available
from .linear import Bf16Linear, FloatLinear, Int8Linear, LinearMethod, TritonLinear, banned_ids, onednn_usable

SMALL_QUERY = 16  # query rows at or under which attention uses explicit matmuls instead of SDPA
CPP_KV_DTYPES = (torch.float32, torch.bfloat16)  # K/V dtypes the fused C++ step attention reads
# keys up to which the C++ attention beats the CPU flash kernel (SDPA) outside decoder steps (encoder):
# measured 3.2x at 32 × 24 tokens, 1.3x at 64, 1.0x at 128, 0.9x at 256 (8 heads of 64, 2 threads)
CPP_ATTENTION_KEYS = 128


# (logits (N, V) float32, k, banned ids) -> the k best (log-prob, id) per row (the contract of csrc/softmax_topk.h)
LogSoftmaxTopk = Callable[[torch.Tensor, int, Sequence[int]], tuple[torch.Tensor, torch.Tensor]]


def gather_rows(kv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(P, H, T, Dh) keys and a (B, Tk) row index → (B, H, Tk, Dh): key j of row b from row rows[b, j]."""
    positions = torch.arange(rows.shape[1], device=kv.device)
    return kv[rows, :, positions[None, :]].transpose(1, 2)


def visible_keys(b: int, tq: int, tk: int, kv_lengths: torch.Tensor | None, causal: bool,
                 device: torch.device) -> torch.Tensor | None:
    """(B or 1, 1, Tq, Tk) mask of the keys each query sees: those before its row's length, and with `causal`
    only those up to its own position (query i of row b sits at kv_lengths[b] - Tq + i)."""
    if kv_lengths is None and not (causal and tq > 1):
        return None
    lengths = kv_lengths if kv_lengths is not None else torch.full((b,), tk, device=device)
    cols = torch.arange(tk, device=device)
    mask = (cols[None, :] < lengths[:, None])[:, None, None, :]
    if causal and tq > 1:
        q_pos = lengths[:, None] - tq + torch.arange(tq, device=device)[None, :]  # (B, Tq)
        mask = mask & (cols[None, None, :] <= q_pos[:, :, None])[:, None]
    return mask


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                    causal: bool = False, step: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√Dh)·v for q (B, H, Tq, Dh), k/v (B, H, Tk, Dh) — or, with `rows` (B, Tk), physical (P, H, T, Dh)
    buffers whose key j of row b is k[rows[b, j], :, j] (the KV cache and the encoder memory are read so).

    kv_lengths (B,): keys at or past a row's length are unseen. causal: query i of row b sits at position
    kv_lengths[b] - Tq + i (a block of new tokens after a cache) and sees keys up to it. step: a decoder step
    (few query rows over a cache or the encoder memory).
    """
    tq = q.shape[2]
    tk = rows.shape[1] if rows is not None else k.shape[2]
    # float16 keys (a float16 model's encoder) too, read as float32: SDPA's float16 kernel over a batch's padded keys
    # rounded unlike the same sentence unpadded (its tokens depended on its batch, on AVX512-FP16 CPUs)
    cpp = (q.device.type == "cpu" and (k.dtype in CPP_KV_DTYPES or k.dtype == torch.float16) and v.dtype == k.dtype
           and (tq == 1 or not causal) and (tq <= SMALL_QUERY if step else tk <= CPP_ATTENTION_KEYS))
    if cpp:
        # the fused C++ loop, one task per (sentence, head): a step's query sees every key given (one new
        # token); B·H tiny GEMMs cost more in dispatch (measured 7x slower at batch 1, 1.3x at 128 rows),
        # and the CPU flash kernel is slower for short sources (encoder, 32 × 24 tokens: 3.2x)
        k, v = k[:, :, :tk], v[:, :, :tk]  # physical buffers are longer than the keys read
        if k.dtype == torch.float16:
            k, v = k.float(), v.float()
        return _C.decode_attention(q.float(), k, v, kv_lengths, q.shape[-1] ** -0.5,
                                   None if rows is None else rows.contiguous()).to(q.dtype)
    if rows is not None:  # the other paths read plain (B, H, Tk, Dh) keys: gather them
        k, v = gather_rows(k, rows), gather_rows(v, rows)
        if kv_lengths is not None:  # positions a row never wrote may hold anything (NaN): masked weights are 0
            # but 0·NaN is not, and SDPA adds its mask to q·k, so NaN + -inf stays NaN: zero both keys and values
            unseen = torch.arange(tk, device=q.device)[None, :] >= kv_lengths[:, None]
            k = k.masked_fill(unseen[:, None, :, None], 0)
            v = v.masked_fill(unseen[:, None, :, None], 0)
    mask = visible_keys(q.shape[0], tq, tk, kv_lengths, causal, q.device)
    if not step or tq > SMALL_QUERY:
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    # a block of several new tokens with a causal mask (forced target prefixes): two batched matmuls
    # beat the CPU flash kernel several-fold; computed in float32 on CPU
    work = torch.float32 if q.device.type == "cpu" else k.dtype
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(work)
    return torch.matmul(probs, v.to(work)).to(q.dtype)


def torch_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x + residual) (post-norm form); LN(x) when residual is None."""
    if residual is not None:
        x = x + residual
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def cpp_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    """pyengine's C++ residual + layer norm (csrc/layer_norm.cpp), float32: the one the C++ decoder steps run, so the
    Python layers and those steps agree to the bit; at a step's few rows it is faster than ATen's add +
    layer_norm, whose dispatch dominates there (2.4x at 32 rows, 1.5x at 128: `pytest benchmarks/`)."""
    return _C.add_layer_norm(x.float().contiguous(), None if residual is None else residual.float().contiguous(),
                             weight.float().contiguous(), bias.float().contiguous(), eps)


def torch_write_kv(store: torch.Tensor, layer: int, kv: torch.Tensor, rows: torch.Tensor,
                   positions: torch.Tensor) -> None:
    """Token t's keys and values (kv (T, 2·H·Dh): K, then V) into layer `layer` of a (L, 2, P, H, S, Dh) cache or
    encoder memory at row rows[t], position positions[t], in its dtype (indexed assignment: any device)."""
    heads, head_dim = store.shape[3], store.shape[5]
    store[layer][:, rows, :, positions] = kv.view(-1, 2, heads, head_dim).to(store.dtype)


def cpp_write_kv(store: torch.Tensor, layer: int, kv: torch.Tensor, rows: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """torch_write_kv in one C++ pass (`_C.write_kv`) for float32 K/V into float32 or bf16 storage: indexed assignment
    cost as much as the K/V projections (int8, 32 sentences of 24 tokens: 2.9 ms against 2.7 ms for the six GEMMs)."""
    if kv.dtype != torch.float32 or store.dtype not in CPP_KV_DTYPES:  # (a float16 model's memory)
        return torch_write_kv(store, layer, kv, rows, positions)
    _C.write_kv(kv.contiguous(), store, layer, rows, positions)


def cpp_embed_rows(table: torch.Tensor, ids: torch.Tensor, scale: float, positions_table: torch.Tensor,
                   positions: torch.Tensor, offset: int, zero_start: bool) -> torch.Tensor:
    """table[ids]·scale + positions_table[positions + offset] (N, D) in one C++ pass (`_C.embed_rows`: float32 CPU
    tables; the same roundings in the same order as Transformer._embed_ops): at a decoder step ATen's embedding, mul_,
    index_select and add_ took ~0.1 ms, their code and the table's rows cold after the step's weights streamed (a
    batch-1 call 1.01-1.02x faster, batch 32 within 1%: benchmarks/results/ab-embed-rows-20261207-021215.json)."""
    ids = ids if ids.dtype == torch.long else ids.long()
    positions = positions if positions.dtype == torch.long else positions.long()
    return _C.embed_rows(table, ids, scale, positions_table, positions, offset, zero_start)


def cpp_log_softmax_topk(logits: torch.Tensor, k: int, banned: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """pyengine's C++ log-softmax + top-k (csrc/softmax_topk.cpp): CPU tensors."""
    return _C.log_softmax_topk(logits, k, banned_ids(banned))


class TritonKernels:
    """The fused Triton kernels of pyengine.kernels (CUDA; CPU only under the Triton interpreter)."""

    def __init__(self) -> None:
        from ..kernels import attention, layernorm, topk  # imported here: no compilation at import time
        self._attention, self._layernorm = attention, layernorm
        self.log_softmax_topk = topk.log_softmax_topk

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None = None,
                  causal: bool = False, step: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._attention.attention(q, k, v, kv_lengths, causal, rows=rows)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
        return self._layernorm.add_layer_norm(x, residual, weight, bias, eps)


@dataclass(frozen=True)
class Ops:
    """The implementations a model runs with, chosen once (resolve_ops); `report` says which."""

    linear: LinearMethod
    attention: Callable
    add_layer_norm: Callable
    log_softmax_topk: LogSoftmaxTopk  # a search's candidates from (N, V) float32 logits (csrc/softmax_topk.h)
    beam_step: str  # the search steps' bookkeeping (HF's beam step, greedy's record_choice, the KV cache's row
    # table): "loop", a C++ pass over CPU tensors, or "aten" (any device: what a GPU runs)
    cache_dtype: torch.dtype  # attention K/V storage (self-attention cache and encoder memory)
    write_kv: Callable  # a layer's K/V rows into that storage (torch_write_kv's signature)
    report: dict[str, str] = field(default_factory=dict)
    # tokens one a row at their own positions → embedding·scale + position (cpp_embed_rows's signature); None: the
    # model's ATen calls (Transformer._embed_ops)
    embed_rows: Callable | None = None


def cache_dtype_for(device: torch.device, dtype: torch.dtype, weights: str) -> torch.dtype:
    """Attention K/V storage. CPU: bfloat16 for int8 models (the step attention, bound by reading K/V once the
    int8 GEMMs are fast, reads half the bytes; bf16 rounding of K/V is well inside the int8 activations' error)
    and for bfloat16 models (their K/V projections are bf16 already), float32 otherwise; a GPU stores them in the
    model's dtype."""
    if device.type != "cpu":
        return dtype
    return torch.bfloat16 if weights == "int8" or dtype == torch.bfloat16 else torch.float32


def resolve_ops(backend: str, device: torch.device, dtype: torch.dtype = torch.float32,
                weights: str = "float") -> Ops:
    """The implementations for `backend` on `device`. weights="int8": int8 linear layers; weights="bf16": bfloat16
    linear weights with float32 activations (both CPU, PyTorch backend)."""
    check_device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if weights not in ("float", "int8", "bf16"):
        raise OptionError(f"unknown weights {weights!r}; expected 'float', 'int8' or 'bf16'")
    if backend not in ("torch", "triton"):
        raise BackendError(f"unknown backend {backend!r}; expected 'auto', 'torch' or 'triton'")
    cache = cache_dtype_for(device, dtype, weights)
    if weights == "bf16":
        if dtype != torch.float32 or backend != "torch" or device.type != "cpu":
            raise OptionError("bf16 weights run on the CPU with float32 activations (dtype='bfloat16' sets them)")
        return _torch_ops(Bf16Linear(), cpp_add_layer_norm, cache, device, dtype)
    if weights == "int8":
        if dtype != torch.float32:
            raise OptionError("int8 weights run with float32 activations; use dtype='int8' (or dtype=float32)")
        if backend != "torch" or device.type != "cpu":
            raise OptionError(f"dtype='int8' runs on the CPU with backend='torch' (asked: {backend} on {device.type})")
        return _torch_ops(Int8Linear(), cpp_add_layer_norm, cache, device, dtype)
    if backend == "torch":
        return _torch_ops(float_linear_for(device, dtype), torch_add_layer_norm, cache, device, dtype)
    kernels = _triton_kernels(device)
    linear = TritonLinear()
    return Ops(linear, kernels.attention, kernels.add_layer_norm, kernels.log_softmax_topk, "aten", cache,
               torch_write_kv,
               {"attention": "triton", "add_layer_norm": "triton", "linear": linear.name,
                "linear_act": linear.activation_name, "log_softmax_topk": "triton", "beam_step": "aten",
                "write_kv": "torch", "embed_rows": "torch"})


def _torch_ops(linear: LinearMethod, norm: Callable, cache: torch.dtype, device: torch.device,
               dtype: torch.dtype) -> Ops:
    """PyTorch (and pyengine's C++ on the CPU); on a GPU the candidates' top-k is the Triton kernel."""
    cpu = device.type == "cpu"
    topk, topk_name = (cpp_log_softmax_topk, "cpp") if cpu else (_triton_kernels(device).log_softmax_topk, "triton")
    beam_step = "loop" if cpu else "aten"
    write_kv, write_name = (cpp_write_kv, "cpp") if cpu else (torch_write_kv, "torch")
    embed = cpp_embed_rows if cpu and dtype == torch.float32 else None  # (float32 tables)
    return Ops(linear, torch_attention, norm, topk, beam_step, cache, write_kv,
               {"attention": "torch", "add_layer_norm": "cpp" if norm is cpp_add_layer_norm else "torch",
                "linear": linear.name,
                "linear_act": linear.activation_name, "log_softmax_topk": topk_name, "beam_step": beam_step,
                "write_kv": write_name, "embed_rows": "torch" if embed is None else "cpp",
                **({"cpu_isa": cpu_isa()} if cpu else {})}, embed)


def cpu_isa() -> str:
    """What the C++ kernels use of this CPU (csrc/cpu_features.h: portable, avx512, avx512_vnni, avx512_bf16 or amx),
    and the PYENGINE_MAX_CPU_ISA cap below what the CPU has, when one is set."""
    info = _C.build_info()
    return info["cpu_isa"] + (f" (PYENGINE_MAX_CPU_ISA={info['cpu_isa_cap']})" if info["cpu_isa_cap"] else "")


def check_device(device: torch.device) -> None:
    """A named error for a device this process cannot use (not the assertion deep inside torch)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise BackendError(f"device={str(device)!r} asked for, but {why}; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BackendError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda'")


def float_linear_for(device: torch.device, dtype: torch.dtype) -> LinearMethod:
    """float32 on a CPU with AVX-512: pyengine's own GEMM (F32Linear); other float dtypes and CPUs: PyTorch's
    (oneDNN's prepacked layout where it has one)."""
    if device.type == "cpu" and dtype == torch.float32 and f32_available():
        return F32Linear()
    return FloatLinear(onednn_usable(device, dtype))


def _triton_kernels(device: torch.device) -> TritonKernels:
    try:
        import triton
    except ImportError:
        raise BackendError("backend='triton' needs the triton package (pip install triton)") from None
    if device.type == "cpu" and not triton.knobs.runtime.interpret:
        raise BackendError("backend='triton' on CPU runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported (slow; for tests), or use backend='torch'")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"backend='triton' does not run on {device.type} devices")
    if device.type == "cuda" and triton.knobs.runtime.interpret:
        raise BackendError("TRITON_INTERPRET=1 is set: the Triton kernels would not run on the GPU")
    return TritonKernels()
