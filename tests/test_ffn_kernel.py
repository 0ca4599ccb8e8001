"""kernels/ffn.py under the Triton interpreter against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch

from kernel_tolerance import check
from pyengine.kernels.ffn import linear_act, linear_ref, linear_residual

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 36, 52), (7, 30, 46), (33, 64, 130), (130, 80, 200)]  # (rows, in, out)


def _inputs(m, k, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swish", "none"])
def test_linear_act(dtype, shape, activation):
    m, k, n = shape
    x, w, b = _inputs(m, k, n, dtype, seed=m + n)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = linear_act(x, w, b, activation, out=out)
    ref = linear_ref(x.double(), w.double(), b.double(), activation)
    low = linear_ref(x, w, b, activation)
    check(got, ref, low, f"{activation} {shape}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_residual(dtype, shape):
    m, k, n = shape
    x, w, b = _inputs(m, k, n, dtype, seed=3 * m + n)
    r = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    got = linear_residual(x, w, b, r, out=out)
    check(got, linear_ref(x.double(), w.double(), b.double(), residual=r.double()), linear_ref(x, w, b, residual=r),
          f"residual {shape}")


def test_batched_input_and_no_bias():
    x, w, _ = _inputs(12, 40, 24, torch.float32, 0)
    x3 = x.view(3, 4, 40)
    got = linear_act(x3, w, None, "gelu")
    assert got.shape == (3, 4, 24)
    check(got, linear_ref(x3.double(), w.double(), None, "gelu"), what="3-d, no bias")


def test_launcher_rejects_mismatches():
    x, w, b = _inputs(4, 8, 6, torch.float32, 0)
    with pytest.raises(ValueError, match="features"):
        linear_act(x[:, :7], w, b, "relu")
    with pytest.raises(ValueError, match="unknown activation"):
        linear_act(x, w, b, "tanh")
    with pytest.raises(ValueError, match="residual shape"):
        linear_residual(x, w, b, torch.zeros(4, 5))
