"""Linear layers that own their packed weight, and the methods that pack and apply them.

A `LinearMethod` is chosen once at load (`pyengine.model.backends.resolve_ops`) and packs every linear layer's
(N, K) weight into its own typed record: float (PyTorch's GEMM, or oneDNN's prepacked layout on the CPU),
int8 (pyengine's AMX/VNNI GEMM, or PyTorch's FBGEMM/oneDNN dynamic int8), bf16 (bf16 weights, float32
activations) or Triton (cuBLAS GEMMs, the FFN's activation fused by a Triton kernel). One interface:
`apply` (with an optional activation), and where the method fuses it, `apply_topk` (the output layer fused
with log-softmax + top-k: the logits are never written).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _C  # (at module level: an import in a step's call cost ~20 us there, its caches cold)
from ..errors import OptionError
from ..quant import quantize_rows

ONEDNN_ACTIVATIONS = {"relu": ("relu", ""), "gelu": ("gelu", "none"), "swish": ("swish", "")}  # (attr, algorithm)
FUSED_ACTIVATIONS = ("relu", "swish")  # pyengine's own GEMMs apply these in their epilogue (gelu runs after)
# Rows above which oneDNN's dynamic int8 GEMM beats FBGEMM's (measured on this project's Zen 4 machine:
# FBGEMM 2x faster at 1-4 rows on the 58101-wide output layer, oneDNN 1.9x faster at 128 rows).
INT8_ONEDNN_ROWS = 64
OWN_INT8_KERNELS = ("amx", "vnni")  # pyengine's own GEMM (csrc/int8_gemm.cpp), the C++ decoder step's too


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """relu, gelu (HF's exact erf form) or swish."""
    if kind == "relu":
        return F.relu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "swish":
        return F.silu(x)
    raise ValueError(f"unknown activation {kind!r}")


@dataclass(frozen=True)
class FloatWeight:
    """A float weight (N, K) and bias, with oneDNN's prepacked copy when the method uses it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    onednn: Any = None

    @property
    def n(self) -> int:
        return self.weight.shape[0]


@dataclass(frozen=True)
class Bf16Weight:
    """bfloat16 weight packed for csrc/bf16_gemm.cpp (the library path holds FloatLinear's record instead)."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    n: int
    k: int


@dataclass(frozen=True)
class LibraryInt8Weight:
    """PyTorch's dynamic-quantized packs of one int8 weight, one per quantized engine (FBGEMM, oneDNN)."""

    packs: dict
    n: int


@functools.lru_cache(maxsize=64)
def _banned_ids(banned: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(banned, dtype=torch.long)


def float_rows(x: torch.Tensor) -> torch.Tensor:
    """x (…, K) as contiguous float32 rows (M, K), what the C++ GEMMs take; x itself when it is that already (a
    decoder step's: three ATen calls fewer, each ~5-10 us there with its code cold)."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def banned_ids(banned: Sequence[int]) -> torch.Tensor:
    """Banned token ids as the C++ output layers read them (int64, CPU; never written): one tensor per distinct
    list, since every step of a search asks for the same few."""
    return _banned_ids(tuple(banned))


class LinearMethod:
    """How linear layers are packed and run. `name` is what engine.backends reports for them."""

    name = "linear"
    fuses_topk = False  # apply_topk exists: the output layer fused with log-softmax + top-k

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, w: Any, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        """act(x·Wᵀ + b) for x (..., K); into `out` when given (float32, (rows, N))."""
        raise NotImplementedError

    def apply_topk(self, x: torch.Tensor, w: Any, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k best (log-prob, column) of x·Wᵀ + b for x (N, K), banned columns excluded (but counted in
        the normalizer), best first; ties go to the lower column."""
        raise NotImplementedError(f"{self.name} does not fuse the output layer with log-softmax + top-k")

    @property
    def activation_name(self) -> str:
        """What engine.backends reports for a linear layer with a fused activation."""
        return self.name

    def packed_tensor(self, w: Any) -> torch.Tensor | None:
        """The record's packed weight, where a copy placed elsewhere can stand in for it (pages.place_weights:
        pyengine's own GEMMs read it by pointer); None for records a library owns."""
        return None

    def with_packed(self, w: Any, packed: torch.Tensor) -> Any:
        """The record with `packed` (an equal copy of its packed_tensor) in its place."""
        raise NotImplementedError


def onednn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Prepacked oneDNN linears: CPU, float32, or bfloat16 where oneDNN has a native bf16 path."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class FloatLinear(LinearMethod):
    """PyTorch's GEMM in the model's dtype. With `onednn`, each weight is also reordered once into oneDNN's
    blocked layout and run by `mkldnn._linear_pointwise` (activation fused), the path Inductor uses on CPU:
    measured here 1.3-2.5x the default GEMM (MKL) for the decoder's shapes, bf16 and fp32, batch 1 to 128."""

    def __init__(self, onednn: bool = False) -> None:
        self.onednn = onednn
        self.name = "torch-onednn-prepacked" if onednn else "torch"

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> FloatWeight:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.onednn else None
        return FloatWeight(weight, bias, packed)

    def apply(self, x: torch.Tensor, w: FloatWeight, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        if w.onednn is not None:
            attr, algorithm = ONEDNN_ACTIVATIONS.get(act, ("none", ""))
            y = torch.ops.mkldnn._linear_pointwise(x, w.onednn, w.bias, attr, [], algorithm)
        else:
            if x.dtype == torch.float16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
                # one row: oneDNN's float16 product of one row (a GEMV, on AVX512-FP16 CPUs) rounds unlike its GEMM
                # of 2+ rows, so a sentence's tokens would depend on how many rows its step had; run it as two rows
                y = F.linear(x.reshape(1, -1).repeat(2, 1), w.weight, w.bias)[:1].reshape(*x.shape[:-1], -1)
            else:
                y = F.linear(x, w.weight, w.bias)
            if act != "none":
                y = activation(y, act)
        return y if out is None else out.copy_(y.view(out.shape))


class TritonLinear(FloatLinear):
    """cuBLAS GEMMs (plain linears stay with the library); a linear with an activation (the FFN's first layer)
    is the fused Triton kernel of pyengine.kernels.ffn."""

    def __init__(self) -> None:
        super().__init__(onednn=False)
        from ..kernels import ffn  # imported here: no compilation at import time
        self._ffn = ffn

    @property
    def activation_name(self) -> str:
        return "triton"

    def apply(self, x: torch.Tensor, w: FloatWeight, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        if act == "none":
            return super().apply(x, w, out)
        y = self._ffn.linear_act(x, w.weight, w.bias, act)
        return y if out is None else out.copy_(y.view(out.shape))


@contextlib.contextmanager
def _quantized_engine(name: str):
    """Weights are packed for the global quantized engine; switch it for one packing only."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def int8_engines() -> tuple[str, ...]:
    """The dynamic int8 GEMM libraries this PyTorch build has (FBGEMM needs AVX2; oneDNN runs anywhere)."""
    return tuple(e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines)


def vnni_available() -> bool:
    """The CPU has AVX512-VNNI, which pyengine's own int8 GEMM (csrc/int8_gemm.cpp) runs on."""
    return bool(_C.build_info()["avx512_vnni"])


def amx_available() -> bool:
    """The CPU has AMX-INT8 and the OS grants its tile state: pyengine's int8 GEMM runs its AMX tile."""
    return bool(_C.build_info()["amx_int8"])


class Int8Linear(LinearMethod):
    """int8 linear layers (CTranslate2's `int8` compute type): weights quantized once per output row (symmetric),
    int32 accumulation, float32 in and out.

    kernel="amx" (the default where the CPU has AMX-INT8) or "vnni" (the default where it has AVX512-VNNI):
    pyengine's own GEMM, activations quantized per row (asymmetric uint8), so a row's result does not depend on
    its batch. "amx" runs AMX tiles where the shape suits them (over 6 rows, K a multiple of 64) and the VNNI
    tile elsewhere, equal to it to the bit. kernel="library": PyTorch's dynamic quantized linear, activations
    quantized per tensor to 7 bits (reduce_range: without VNNI, 8 bits overflow the libraries' int16 pair sums);
    each weight packed for FBGEMM and oneDNN, and a call picks by its row count (INT8_ONEDNN_ROWS).
    """

    def __init__(self, kernel: str | None = None) -> None:
        self.kernel = kernel or ("amx" if amx_available() else "vnni" if vnni_available() else "library")
        if self.kernel not in (*OWN_INT8_KERNELS, "library"):
            raise OptionError(f"unknown int8 kernel {self.kernel!r}; expected 'amx', 'vnni' or 'library'")
        self.engines = int8_engines()
        if self.kernel == "amx" and not amx_available():
            raise OptionError("the int8 'amx' kernel needs a CPU (and OS) with AMX-INT8")
        if self.kernel == "vnni" and not vnni_available():
            raise OptionError("the int8 'vnni' kernel needs a CPU with AVX512-VNNI")
        if self.kernel == "library" and not self.engines:
            raise OptionError("dtype='int8' needs AVX512-VNNI or PyTorch's FBGEMM or oneDNN quantized engine; this "
                              f"build has {torch.backends.quantized.supported_engines}")
        self.own_kernel = self.kernel in OWN_INT8_KERNELS
        self.fuses_topk = self.own_kernel
        self.name = f"torch-int8-{self.kernel}" if self.own_kernel else "torch-int8-" + "+".join(self.engines)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        q, scale = quantize_rows(weight)
        bias = None if bias is None else bias.float().contiguous()
        if self.own_kernel:
            packed, colsum = _C.int8_pack(q)  # int8 column tiles; int32 column sums (for the zero points)
            return _C.Int8Weight(packed, colsum, scale.contiguous(), bias, q.shape[0])
        packs = {}
        with warnings.catch_warnings():  # quantized tensors are the packing functions' input type
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(),
                                                               torch.zeros_like(scale, dtype=torch.long), 0)
            for engine in self.engines:
                with _quantized_engine(engine):
                    packs[engine] = torch.ops.quantized.linear_prepack(qweight, bias)
        return LibraryInt8Weight(packs, q.shape[0])

    def packed_tensor(self, w: Any) -> torch.Tensor | None:
        return w.packed if self.own_kernel else None

    def with_packed(self, w: Any, packed: torch.Tensor) -> Any:
        return _C.Int8Weight(packed, w.colsum, w.scale, w.bias, w.n)

    def apply(self, x: torch.Tensor, w: Any, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        flat = float_rows(x)
        if self.own_kernel and (act == "none" or act in FUSED_ACTIVATIONS):
            y = _C.int8_linear(flat, w.packed, w.colsum, w.scale, w.bias, w.n, out, kernel=self.kernel, activation=act)
            return y.view(*x.shape[:-1], w.n) if out is None else out
        if self.own_kernel:  # gelu: after the GEMM
            y = activation(self.apply(x, w), act)
        else:
            engine = "onednn" if flat.shape[0] > INT8_ONEDNN_ROWS and "onednn" in w.packs else self.engines[0]
            # reduce_range: 7-bit activations, as PyTorch's default on x86. Without VNNI (the CPUs this path is for)
            # FBGEMM and oneDNN add uint8 × int8 products in pairs into int16, which 8-bit activations overflow:
            # oneDNN's AVX2 GEMM then ran 2.8x over the quantization error bound (tests/test_cpu_isa.py runs it)
            y = torch.ops.quantized.linear_dynamic(flat, w.packs[engine], True).view(*x.shape[:-1], w.n)
            if act != "none":
                y = activation(y, act)
        return y if out is None else out.copy_(y.view(out.shape))

    def apply_topk(self, x: torch.Tensor, w: Any, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.own_kernel:
            return super().apply_topk(x, w, k, banned)
        return _C.int8_linear_log_softmax_topk(float_rows(x), w.packed, w.colsum, w.scale, w.bias, w.n, k,
                                               banned_ids(banned), kernel=self.kernel)


def bf16_kernels() -> tuple[str, ...]:
    """pyengine's own bf16 GEMM kernels this CPU runs (csrc/bf16_gemm.cpp), fastest first."""
    info = _C.build_info()
    return tuple(k for k, key in (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512"))
                 if info[key])


class Bf16Linear(LinearMethod):
    """bfloat16 linear weights with float32 activations (the CPU's `dtype=bfloat16`).

    A plain bf16 GEMM rounds the activations to bf16 too (8 significant bits), which changed 4-5% of the default
    model's UI strings and ~22% of its verses against float32. Here every activation stays float32; a GEMM takes
    it as two bf16 terms (hi = bf16(x), lo = bf16(x − hi)) whose products with the bf16 weight are exact, summed
    in float32 (csrc/bf16_gemm.cpp). kernel: "amx" (AMX-BF16), "avx512bf16" (a VDPBF16PS register tile),
    "avx512" (an FMA register tile, any AVX-512 CPU; equal to avx512bf16 to the bit),
    or "library" (CPUs without AVX-512: float32, FloatLinear's GEMM and C++ step, on the bf16-rounded weight — no
    memory saved, and on a model stored in bf16 exactly float32's arithmetic; its own two-term split through
    PyTorch's GEMM ran at half float32's speed).
    """

    def __init__(self, kernel: str | None = None) -> None:
        own = bf16_kernels()
        self.kernel = kernel or (own[0] if own else "library")
        needs = {"amx": "AMX-BF16", "avx512bf16": "AVX512-BF16", "avx512": "AVX-512"}
        if self.kernel not in (*needs, "library"):
            raise OptionError(f"unknown bf16 kernel {self.kernel!r}; expected 'amx', 'avx512bf16', 'avx512' or "
                              "'library'")
        if self.kernel != "library" and self.kernel not in own:
            raise OptionError(f"the bf16 {self.kernel!r} kernel needs a CPU with {needs[self.kernel]}")
        self.fuses_topk = self.kernel != "library"
        self.name = f"torch-bf16-{self.kernel}"
        # (no own kernel: float32 on the rounded weight, FloatLinear as float32 models run it on the CPU)
        self.library = FloatLinear(onednn_usable(torch.device("cpu"), torch.float32)) if self.kernel == "library" \
            else None

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Bf16Weight | FloatWeight:
        bias = None if bias is None else bias.float().contiguous()
        if self.library is not None:
            return self.library.pack(weight.detach().bfloat16().float().contiguous(), bias)
        return Bf16Weight(_C.bf16_pack(weight.detach()), bias, weight.shape[0], weight.shape[1])

    def packed_tensor(self, w: Bf16Weight) -> torch.Tensor | None:
        return w.packed if self.kernel != "library" else None

    def with_packed(self, w: Bf16Weight, packed: torch.Tensor) -> Bf16Weight:
        return dataclasses.replace(w, packed=packed)

    def apply(self, x: torch.Tensor, w: Bf16Weight | FloatWeight, out: torch.Tensor | None = None,
              act: str = "none") -> torch.Tensor:
        k = w.weight.shape[1] if self.library is not None else w.k  # (packed, the weight knows K only to its padding)
        if x.shape[-1] != k:
            raise ValueError(f"linear: input width {x.shape[-1]}, the layer takes {k}")
        if self.library is not None:
            return self.library.apply(x, w, out, act)
        flat = float_rows(x)
        if act != "none" and act not in FUSED_ACTIVATIONS:  # gelu: after the GEMM
            y = activation(self.apply(x, w), act)
            return y if out is None else out.copy_(y.view(out.shape))
        y = _C.bf16_linear(flat, w.packed, w.bias, w.n, out, kernel=self.kernel, activation=act)
        return y.view(*x.shape[:-1], w.n) if out is None else out

    def apply_topk(self, x: torch.Tensor, w: Bf16Weight, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.fuses_topk:
            return super().apply_topk(x, w, k, banned)
        if x.shape[-1] != w.k:
            raise ValueError(f"linear_candidates: input width {x.shape[-1]}, the layer takes {w.k}")
        return _C.bf16_linear_log_softmax_topk(float_rows(x), w.packed, w.bias, w.n, k, banned_ids(banned),
                                               kernel=self.kernel)


class Linear(nn.Module):
    """y = x·Wᵀ + b. The checkpoint's weight and bias are loaded as parameters; `pack` hands them to a
    LinearMethod, and from then on the layer holds only the method's typed record (`packed`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method: LinearMethod | None = None
        self.packed: Any = None

    def pack(self, method: LinearMethod) -> None:
        """Pack the loaded weight for `method`; the float parameters are released (the record keeps what it reads)."""
        self.method, self.packed = method, method.pack(self.weight.detach(), None if self.bias is None else self.bias.detach())
        del self.weight, self.bias

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        return self.method.apply(x, self.packed, out, act)


class OutputLayer:
    """The final linear (often the tied target embedding) and its bias, packed by the model's LinearMethod.
    It keeps the float weight it was built from, so a shortlist can restrict it to some rows (`restrict`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: LinearMethod):
        self.weight, self.bias, self.method = weight, bias, method
        self.packed = method.pack(weight, bias)

    @property
    def fuses_topk(self) -> bool:
        return self.method.fuses_topk

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.method.apply(x, self.packed, out)

    def topk(self, x: torch.Tensor, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's k best (log-prob, token), the logits never written (LinearMethod.apply_topk)."""
        return self.method.apply_topk(x, self.packed, k, banned)

    def restrict(self, ids: torch.Tensor) -> "OutputLayer":
        """The rows of `ids` only (a shortlisted output layer)."""
        return OutputLayer(self.weight.index_select(0, ids),
                           None if self.bias is None else self.bias.index_select(0, ids), self.method)
