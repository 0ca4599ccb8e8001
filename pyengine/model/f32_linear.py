"""float32 linear layers on pyengine's own GEMM (csrc/f32_gemm.cpp): the CPU's float32 path where it has AVX-512.

oneDNN's prepacked float32 GEMM (FloatLinear) streamed a batch-1 step's 4-byte weights at ~20-30 GB/s on the 2-core
Zen 4, and its output layer wrote every logit before the log-softmax + top-k read them back. Here one register tile
(each output a float32 FMA chain over k, in order) runs at every row count — a sentence's result does not depend on
its batch — the output layer is fused with log-softmax + top-k as the int8 and bf16 GEMMs fuse it, and the C++ decoder
step runs the same kernel (F32Weight). CPUs without AVX-512 keep FloatLinear.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import _C
from ..errors import OptionError
from .linear import FUSED_ACTIVATIONS, LinearMethod, activation, banned_ids, float_rows

F32_KERNELS = ("avx512", "portable")  # the portable loop: the same FMAs on any CPU (the tests; engines pick avx512)


def f32_available() -> bool:
    """The CPU has AVX-512, which the float32 GEMM's register tile needs."""
    return bool(_C.build_info()["avx512"])


@dataclass(frozen=True)
class F32Weight:
    """float32 weight packed for csrc/f32_gemm.cpp (64-column tiles), its bias and width."""

    packed: torch.Tensor
    bias: torch.Tensor | None
    n: int


class F32Linear(LinearMethod):
    """float32 weights and activations on pyengine's own GEMM (see the module docstring). kernel: "avx512" (the
    register tile) or "portable" (the same FMAs in a scalar loop, equal to the bit but for swish's exp)."""

    fuses_topk = True

    def __init__(self, kernel: str = "avx512") -> None:
        if kernel not in F32_KERNELS:
            raise OptionError(f"unknown float32 kernel {kernel!r}; expected 'avx512' or 'portable'")
        if kernel == "avx512" and not f32_available():
            raise OptionError("the float32 'avx512' kernel needs a CPU with AVX-512")
        self.kernel = kernel
        self.name = f"f32-{kernel}"

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> F32Weight:
        bias = None if bias is None else bias.detach().float().contiguous()
        return F32Weight(_C.f32_pack(weight.detach().float()), bias, weight.shape[0])

    def packed_tensor(self, w: F32Weight) -> torch.Tensor:
        return w.packed

    def with_packed(self, w: F32Weight, packed: torch.Tensor) -> F32Weight:
        return dataclasses.replace(w, packed=packed)

    def apply(self, x: torch.Tensor, w: F32Weight, out: torch.Tensor | None = None, act: str = "none") -> torch.Tensor:
        if act != "none" and act not in FUSED_ACTIVATIONS:  # gelu: after the GEMM
            y = activation(self.apply(x, w), act)
            return y if out is None else out.copy_(y.view(out.shape))
        y = _C.f32_linear(float_rows(x), w.packed, w.bias, w.n, out, kernel=self.kernel, activation=act)
        return y.view(*x.shape[:-1], w.n) if out is None else out

    def apply_topk(self, x: torch.Tensor, w: F32Weight, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _C.f32_linear_log_softmax_topk(float_rows(x), w.packed, w.bias, w.n, k, banned_ids(banned),
                                              kernel=self.kernel)
