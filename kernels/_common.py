"""Helpers shared by the kernel launchers."""
from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def upcast_bf16_dot(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bfloat16 `tl.dot` operands wrongly (fp32 and fp16 are right).

    Under the interpreter only, bf16 operands are widened to fp32 before the dot: bf16 × bf16 products
    are exact in fp32, so this is the tensor-core computation up to accumulation order. Compiled
    kernels (what a GPU runs, and what the ahead-of-time test compiles) keep the native bf16 dot.
    """
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for float32 inputs (no silent TF32 rounding); the native path otherwise."""
    return "ieee" if dtype == torch.float32 or upcast_bf16_dot(dtype) else "tf32"
