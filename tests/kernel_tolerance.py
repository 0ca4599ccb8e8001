"""The tolerance rule for kernels (DESIGN.md): compare against float64; low precision may err at most
twice as much as PyTorch's own computation in that precision."""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP32_RTOL = 1e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(out: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None = None, what: str = "") -> None:
    """out: the kernel's result; ref64: the reference in float64; torch_lowp: the reference in out's dtype."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element was not written)"
    scale = max(1.0, ref64.abs().max().item())
    if out.dtype == torch.float32:
        err = max_err(out, ref64)
        assert err <= FP32_RTOL * scale, f"{what}: float32 error {err:.3g} > {FP32_RTOL} × {scale:.3g}"
    else:
        assert torch_lowp is not None
        err, base = max_err(out, ref64), max_err(torch_lowp, ref64)
        # one rounding of the output (half an ulp at the largest magnitude) is unavoidable for any kernel
        floor = torch.finfo(out.dtype).eps * ref64.abs().max().item() / 2
        assert err <= 2 * max(base, floor), f"{what}: {out.dtype} error {err:.3g} > 2 × PyTorch's {base:.3g}"


def check_summation_bound(y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, bias: torch.Tensor,
                          activation: str) -> None:
    """A float32 GEMM's act(x·Wᵀ + bias) `y` against float64 `ref` = x·Wᵀ (without the bias) within `bound`, float32
    summation's bound of it (γ_K·Σ|products|), plus the bias add's rounding and, for swish, its slope (≤ 1.1) and the
    epilogue's own exp and divide (a few ulps)."""
    ref = ref + bias.double()
    bound = bound + 2.0 ** -24 * ref.abs()  # the bias add
    if activation == "relu":
        ref = ref.clamp(min=0)
    elif activation == "swish":
        ref, bound = F.silu(ref), 1.1 * bound + 1e-6 * ref.abs() + 1e-30
    excess = (y.double() - ref).abs() - bound
    assert (excess <= 1e-30).all(), f"max excess {excess.max().item():.3g}"


# shapes (m, k, n) the float32-activation GEMM tests run: one row, ragged row blocks and tiles, a long k
GEMM_SHAPES = [(1, 64, 64), (5, 100, 70), (7, 33, 65), (16, 512, 130), (35, 96, 200), (3, 2048, 64)]


def gemm_inputs(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (m, k) with rows of different scales, a zero row (padding) and an outlier; w (n, k); bias (n,)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 3
    x[0] = 0.0  # a zero row (padding)
    if m > 1:
        x[1, 0] = 40.0  # an outlier
    return x, torch.randn(n, k, generator=gen) * 0.1, torch.randn(n, generator=gen)


def check_linear_layer(layer, x: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    """A packed Linear on x (9, K) against float64 `ref` (bias included) within `bound`: as (3, 3, K) rows, with relu
    fused and with gelu (applied after the GEMM: its slope ≤ 1.2, its own rounding a few ulps)."""
    y = layer(x.view(3, 3, x.shape[1]))
    assert y.shape == (3, 3, ref.shape[1]) and ((y.reshape(ref.shape).double() - ref).abs() <= bound).all()
    assert ((layer(x, act="relu").double() - ref.clamp(min=0)).abs() <= bound).all()
    assert ((layer(x, act="gelu").double() - F.gelu(ref)).abs() <= 1.2 * bound + 1e-6 * ref.abs()).all()
