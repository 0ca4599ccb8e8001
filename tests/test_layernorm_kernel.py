"""kernels/layernorm.py under the Triton interpreter against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch

from kernel_tolerance import check
from pyengine.kernels.layernorm import add_layer_norm, add_layer_norm_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 7), (33, 36), (7, 130), (5, 512)])
@pytest.mark.parametrize("form", ["post", "pre", "plain"])
def test_add_layer_norm(dtype, rows, d, form):
    gen = torch.Generator().manual_seed(rows * 1000 + d)
    x = (3 * torch.randn(rows, d, generator=gen) + 1).to(dtype)
    r = torch.randn(rows, d, generator=gen).to(dtype) if form != "plain" else None
    w = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    b = (0.3 * torch.randn(d, generator=gen)).to(dtype)
    eps = 1e-5 if d != 36 else 1e-6
    out = torch.full_like(x, float("nan"))
    out_sum = torch.full_like(x, float("nan"))
    got = add_layer_norm(x, r, w, b, eps, return_sum=form == "pre", out=out, out_sum=out_sum)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = add_layer_norm_ref(f64(x), f64(r), f64(w), f64(b), eps, return_sum=form == "pre")
    low = add_layer_norm_ref(x, r, w, b, eps, return_sum=form == "pre")
    if form == "pre":
        check(got[0], ref[0], low[0], "normalized")
        check(got[1], ref[1], low[1], "residual sum")
    else:
        check(got, ref, low, form)


def test_strided_rows_and_3d_input():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 9, 2 * 40, generator=gen)
    x = base[..., :40]  # rows with a stride of 80
    r = torch.randn(4, 9, 40, generator=gen)
    w, b = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    got = add_layer_norm(x, r, w, b, 1e-5)
    check(got, add_layer_norm_ref(x.double(), r.double(), w.double(), b.double(), 1e-5), what="strided")


def test_launcher_rejects_bad_shapes():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight/bias"):
        add_layer_norm(x, None, torch.ones(7), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="residual shape"):
        add_layer_norm(x, torch.randn(3, 9), torch.ones(8), torch.zeros(8), 1e-5)
