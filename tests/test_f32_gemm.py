"""pyengine's float32 GEMM (csrc/f32_gemm.cpp, the CPU's float32 on AVX-512) against references built apart.

Each output is promised as one float32 FMA chain over k in order (then + bias, then the activation), so the AVX-512
tile and the portable loop are held to the bit to that chain written out in float64 (each product and sum rounded
once to float32, as an FMA rounds), and every kernel to float64 math within float32's summation bound; the fused
output layer's candidates to float64 log-softmax + top-k."""
from __future__ import annotations

import pytest
import torch

from kernel_tolerance import GEMM_SHAPES, check_linear_layer, check_summation_bound, gemm_inputs
from pyengine import _C
from pyengine.errors import OptionError
from pyengine.model.f32_linear import F32Linear, F32Weight, f32_available
from pyengine.model.linear import Linear

KERNELS = (["avx512"] if f32_available() else []) + ["portable"]
U = 2.0 ** -24  # float32 unit roundoff


def _fma_chain(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc = fma(x[k], w[k], acc) for k = 0, 1, ...: the product and the sum exact in float64 (a float32 product has
    48 bits, and the sum of it and a float32 acc is exact in float64 but where their exponents are far apart, which
    double rounding leaves to the same float32 on these magnitudes), rounded once to float32."""
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32)
    xd, wd = x.double(), w.double()
    for k in range(x.shape[1]):
        acc = (acc.double() + xd[:, k:k + 1] * wd[:, k][None, :]).float()
    return acc


def _float64(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x·wᵀ in float64 and γ_K·Σ|products| (float32 summation's bound)."""
    k = x.shape[1]
    return x.double() @ w.double().T, k * U / (1 - k * U) * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_kernels_equal_the_written_out_fma_chain(kernel, m, k, n):
    x, w, _ = gemm_inputs(m, k, n, seed=m + k)
    assert torch.equal(_C.f32_linear(x, _C.f32_pack(w), None, n, kernel=kernel), _fma_chain(x, w))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
def test_each_kernel_within_float32_summation_of_float64(kernel, m, k, n, activation):
    x, w, b = gemm_inputs(m, k, n, seed=3 * m + n)
    y = _C.f32_linear(x, _C.f32_pack(w), b, n, kernel=kernel, activation=activation)
    check_summation_bound(y, *_float64(x, w), b, activation)


def test_the_bound_rejects_a_rounded_weight():
    """The check above can fail: the same GEMM on bf16-rounded weights falls outside it on these inputs."""
    x, w, _ = gemm_inputs(7, 512, 130, seed=5)
    ref, bound = _float64(x, w)
    y = _C.f32_linear(x, _C.f32_pack(w.bfloat16().float()), None, 130).double()
    assert ((y - ref).abs() > bound).any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_are_independent_of_the_batch(kernel):
    """A row's result is the same bits alone, in any block of a larger batch, at any position."""
    x, w, b = gemm_inputs(23, 96, 130, seed=9)
    packed = _C.f32_pack(w)
    whole = _C.f32_linear(x, packed, b, 130, kernel=kernel)
    for i in (0, 5, 6, 22):
        assert torch.equal(_C.f32_linear(x[i:i + 1].contiguous(), packed, b, 130, kernel=kernel), whole[i:i + 1])


def test_out_buffer_empty_input_and_bad_operands():
    x, w, b = gemm_inputs(4, 36, 70, seed=1)
    packed = _C.f32_pack(w)
    out = torch.empty(4, 70)
    assert _C.f32_linear(x, packed, b, 70, out) is not None and torch.equal(out, _C.f32_linear(x, packed, b, 70))
    assert _C.f32_linear(torch.empty(0, 36), packed, b, 70).shape == (0, 70)
    with pytest.raises(RuntimeError, match="packed weight does not match K=35"):
        _C.f32_linear(x[:, :35].contiguous(), packed, b, 70)
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        _C.f32_linear(x, packed, b, 129)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        _C.f32_linear(x, packed, b[:69], 70)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        _C.f32_linear(x.double(), packed, b, 70)
    with pytest.raises(RuntimeError, match="activation must be none, relu or swish"):
        _C.f32_linear(x, packed, b, 70, activation="gelu")
    with pytest.raises(RuntimeError, match="kernel must be auto, avx512 or portable"):
        _C.f32_linear(x, packed, b, 70, kernel="amx")
    with pytest.raises(RuntimeError, match="f32_pack: a float32"):
        _C.f32_pack(w.double())


def test_kernel_choice_and_its_errors():
    assert _C.f32_kernel_name("auto") == KERNELS[0] and _C.f32_kernel_name("portable") == "portable"
    if f32_available():
        assert F32Linear().name == "f32-avx512"
    else:  # (engines without AVX-512 run PyTorch's float32 instead: backends.float_linear_for)
        with pytest.raises(OptionError, match="'avx512' kernel needs a CPU with AVX-512"):
            F32Linear()
    with pytest.raises(OptionError, match="unknown float32 kernel"):
        F32Linear(kernel="vnni")


@pytest.mark.parametrize("kernel", KERNELS)
def test_ops_layers_against_float64(kernel):
    """A Linear packed by F32Linear, and its activations (relu fused, gelu after), within the float32 bound."""
    x, w, b = gemm_inputs(9, 96, 130, seed=4)
    layer = Linear(96, 130)
    layer.weight.data, layer.bias.data = w, b
    layer.pack(F32Linear(kernel=kernel))
    assert not hasattr(layer, "weight") and isinstance(layer.packed, F32Weight)  # only the packed copy is kept
    ref, bound = _float64(x, w)
    check_linear_layer(layer, x, ref + b.double(), bound + U * ref.abs() + 1e-30)  # + the bias add


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows, k, n, top", [(1, 8, 70, 1), (7, 36, 200, 3), (13, 96, 1000, 8), (37, 128, 1000, 4)])
def test_fused_output_candidates_against_float64(kernel, rows, k, n, top):
    """The output layer with log-softmax + top-k fused (the logits never written): the k best of float64 math, banned
    ids out of the candidates but in the normalizer (one of them the best logit), ragged row blocks and last tile,
    several column parts (threads) merged; and the unfused path's candidates."""
    x, w, b = gemm_inputs(rows, k, n, seed=rows * 100 + n)
    x = x * 0.5
    packed = _C.f32_pack(w)
    logits = _float64(x, w)[0] + b.double()
    banned = sorted({0, n - 1, int(logits[-1].argmax())})
    values, ids = _C.f32_linear_log_softmax_topk(x, packed, b, n, top, torch.tensor(banned), kernel=kernel)
    logp = torch.log_softmax(logits, dim=-1)
    logp[:, banned] = float("-inf")
    ref_values, ref_ids = logp.topk(top, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-6, atol=1e-5)
    unfused = _C.log_softmax_topk(_C.f32_linear(x, packed, b, n, kernel=kernel), top, torch.tensor(banned))
    assert torch.equal(ids, unfused[1])
    torch.testing.assert_close(values, unfused[0], rtol=0, atol=1e-5)
    x[-1] = float("nan")  # a hidden state gone NaN: named, not a crash on a row without candidates
    with pytest.raises(RuntimeError, match=f"row {rows - 1} has NaN logits"):
        _C.f32_linear_log_softmax_topk(x, packed, b, n, top, torch.tensor(banned), kernel=kernel)
