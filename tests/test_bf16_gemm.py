"""pyengine's bf16-weight GEMM (csrc/bf16_gemm.cpp, dtype=bfloat16 on the CPU) against references built apart.

The AVX512-BF16, AVX-512 and portable kernels promise one summation order (per 32-wide chunk of k, the hi term's
products, then the lo term's, a k pair at a time with the odd k first, as VDPBF16PS adds a pair; each added in
float32), so they are held to the bit to that order written out in PyTorch float32 operations; the AMX unit sums more precisely, so it is held to float64 math of the same terms
within float32's summation bound (Higham's γ_K), a bound the tests show a one-term (plain bf16) GEMM breaks.
"""
from __future__ import annotations

import pytest
import torch

from kernel_tolerance import GEMM_SHAPES, check_linear_layer, check_summation_bound, gemm_inputs
from pyengine import _C
from pyengine.errors import OptionError
from pyengine.model.linear import Bf16Linear, Bf16Weight, Linear, bf16_kernels

OWN = list(bf16_kernels())  # "amx" (AMX-BF16), "avx512bf16", "avx512": each tested where this CPU has it
ORDERED = ["portable"] + [k for k in OWN if k != "amx"]  # the kernels with the written-out order
U = 2.0 ** -24  # float32 unit roundoff


def _terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's two bf16 terms, as float32 values: hi = bf16(x), lo = bf16(x − hi)."""
    hi = x.bfloat16().float()
    return hi, (x - hi).bfloat16().float()


def _ordered_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The promised order, one float32 op at a time (a bf16·bf16 product is exact in float32)."""
    hi, lo = _terms(x)
    wb = w.bfloat16().float()
    acc = torch.zeros(x.shape[0], w.shape[0])
    for c in range(0, x.shape[1], 32):
        for term in (hi, lo):
            for pair in range(c, min(c + 32, x.shape[1]), 2):
                for k in (pair + 1, pair):  # the odd k first (VDPBF16PS's order); past K: zero padding
                    if k < x.shape[1]:
                        acc = acc + term[:, k:k + 1] * wb[:, k][None, :]
    return acc


def _float64(x: torch.Tensor, w: torch.Tensor, terms: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ (hi + lo)·w in float64 (terms=1: hi only, what a plain bf16 GEMM computes) and γ_K·Σ|products|."""
    hi, lo = _terms(x)
    a = (hi + lo if terms == 2 else hi).double()
    wb = w.bfloat16().double()
    k = 2 * x.shape[1]
    bound = k * U / (1 - k * U) * ((hi.double().abs() + lo.double().abs()) @ wb.abs().T)
    return a @ wb.T, bound




@pytest.mark.parametrize("kernel", ORDERED)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_ordered_kernels_equal_the_written_out_order(kernel, m, k, n):
    x, w, _ = gemm_inputs(m, k, n, seed=m + k)
    y = _C.bf16_linear(x, _C.bf16_pack(w), None, n, kernel=kernel)
    assert torch.equal(y, _ordered_reference(x, w))


@pytest.mark.parametrize("kernel", ORDERED + [k for k in OWN if k == "amx"])
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
def test_each_kernel_within_float32_summation_of_float64(kernel, m, k, n, activation):
    x, w, b = gemm_inputs(m, k, n, seed=3 * m + n)
    y = _C.bf16_linear(x, _C.bf16_pack(w), b, n, kernel=kernel, activation=activation)
    check_summation_bound(y, *_float64(x, w), b, activation)


@pytest.mark.parametrize("kernel", ORDERED)
def test_calls_of_other_sizes_in_turn_leave_nothing_stale(kernel):
    """A call's split terms live in a buffer its thread reuses (gemm::thread_scratch), given back past 4 MB: calls
    that grow and shrink it in turn (600 × 1024 rows as float32 terms: 4.9 MB), each to the bit of the order."""
    for m, k, n in [(5, 100, 70), (600, 1024, 64), (1, 64, 64), (7, 33, 65), (600, 1024, 64), (3, 2048, 64)]:
        x, w, _ = gemm_inputs(m, k, n, seed=m + k + n)
        assert torch.equal(_C.bf16_linear(x, _C.bf16_pack(w), None, n, kernel=kernel), _ordered_reference(x, w))


def test_the_bound_rejects_a_one_term_gemm():
    """The check above can fail: plain bf16 activations (hi only) fall outside it on these inputs."""
    for m, k, n in GEMM_SHAPES[1:5]:  # (the first has only a zero row)
        x, w, _ = gemm_inputs(m, k, n, seed=m + k)
        one, _ = _float64(x, w, terms=1)
        ref, bound = _float64(x, w)
        assert ((one - ref).abs() > bound).any(), (m, k, n)


@pytest.mark.parametrize("kernel", ORDERED + [k for k in OWN if k == "amx"])
def test_rows_are_independent_of_the_batch(kernel):
    """A row's result is the same alone or among others (so a sentence's translation does not depend on its
    batch): AMX runs at every row count."""
    x, w, b = gemm_inputs(40, 512, 192, seed=5)
    packed = _C.bf16_pack(w)
    full = _C.bf16_linear(x, packed, b, 192, kernel=kernel)
    for rows in (slice(0, 1), slice(3, 4), slice(7, 13), slice(17, 40)):
        assert torch.equal(_C.bf16_linear(x[rows].contiguous(), packed, b, 192, kernel=kernel), full[rows])


def _flushed_bf16(v: torch.Tensor) -> torch.Tensor:
    """PyTorch's bf16 rounding (to nearest even), magnitudes below float32's smallest normal to +0."""
    return torch.where(v.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(v), v).bfloat16()


@pytest.mark.parametrize("kernel", ORDERED + [k for k in OWN if k == "amx"])
def test_every_kernel_splits_x_as_pytorch_rounds(kernel):
    """The activations' terms, compared bit by bit with PyTorch's rounding: random values over many magnitudes, ties
    to even both ways, values that round up to the next binade or to infinity, float32 subnormals and the values
    just below the smallest normal (flushed), signed zeros, infinities and NaN — in a row long enough for the
    16-lane loop and a tail."""
    gen = torch.Generator().manual_seed(11)
    rand = torch.randn(3, 100, generator=gen) * torch.logspace(-30, 30, 100)
    tiny = torch.finfo(torch.float32).tiny
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7FFFFF, 0xBF808000], dtype=torch.int64)
    special = torch.tensor([0.0, -0.0, tiny, -tiny, tiny * (1 - 2 ** -23), 1e-39, -1e-39, 1e-45, float("inf"),
                            float("-inf"), float("nan"), 3.0, -1.0 - 2 ** -9, 1.0 + 2 ** -30])
    row = torch.cat([ties.to(torch.int32).view(torch.float32), special])
    x = torch.cat([rand, torch.cat([row, row.flip(0), rand[0, :72]])[None, :100]]).contiguous()
    hi, lo = _C.bf16_split(x, kernel)
    ref_hi = _flushed_bf16(x)
    ref_lo = _flushed_bf16(x - ref_hi.float())
    for got, ref in ((hi, ref_hi), (lo, ref_lo)):
        nan = ref.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
    assert (hi.view(torch.int16) != 0).sum() > 300 and (lo.view(torch.int16) != 0).sum() > 250  # not vacuous


def test_packing_rounds_to_nearest_even_and_takes_bf16_weights():
    w = torch.randn(70, 40)
    assert torch.equal(_C.bf16_pack(w), _C.bf16_pack(w.bfloat16()))
    x = torch.eye(40)  # y = W: the packed weights read back
    assert torch.equal(_C.bf16_linear(x, _C.bf16_pack(w), None, 70, kernel="portable"), w.bfloat16().float().T)


def test_out_buffer_and_empty_input():
    x, w, b = gemm_inputs(4, 64, 96, seed=1)
    packed = _C.bf16_pack(w)
    out = torch.full((4, 96), float("nan"))
    assert _C.bf16_linear(x, packed, b, 96, out=out) is not None
    assert torch.equal(out, _C.bf16_linear(x, packed, b, 96))
    assert _C.bf16_linear(torch.zeros(0, 64), packed, b, 96).shape == (0, 96)


def test_bad_operands_are_named():
    x, w, _ = gemm_inputs(4, 64, 96, seed=1)
    packed = _C.bf16_pack(w)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        _C.bf16_linear(x.double(), packed, None, 96)
    with pytest.raises(RuntimeError, match="does not match K=65"):
        _C.bf16_linear(torch.zeros(4, 65), packed, None, 96)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        _C.bf16_linear(x, packed, torch.zeros(95), 96)
    with pytest.raises(RuntimeError, match="activation must be"):
        _C.bf16_linear(x, packed, None, 96, activation="gelu")
    with pytest.raises(RuntimeError, match="kernel must be"):
        _C.bf16_linear(x, packed, None, 96, kernel="fast")
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        _C.bf16_pack(torch.zeros(3, 4, dtype=torch.float16))
    if "amx" not in OWN:
        with pytest.raises(RuntimeError, match="needs a CPU .* AMX-BF16"):
            _C.bf16_linear(x, packed, None, 96, kernel="amx")


def test_kernel_choice_and_its_errors():
    assert _C.bf16_kernel_name("auto") == (OWN[0] if OWN else "portable")
    assert _C.bf16_kernel_name("portable") == "portable"
    assert Bf16Linear().kernel == (OWN[0] if OWN else "library")
    with pytest.raises(OptionError, match="unknown bf16 kernel"):
        Bf16Linear(kernel="vnni")


@pytest.mark.parametrize("kernel", OWN + ["library"])
def test_ops_layers_against_float64(kernel):
    """A Linear packed by Bf16Linear, and its fused activations, every kernel, within the float32 bound of float64
    math: of the two-term scheme on pyengine's GEMM; of float32 activations on the library path (CPUs without
    AVX-512: float32's GEMM on the bf16-rounded weight)."""
    x, w, b = gemm_inputs(9, 96, 130, seed=4)
    layer = Linear(96, 130)
    layer.weight.data, layer.bias.data = w, b
    layer.pack(Bf16Linear(kernel=kernel))
    assert not hasattr(layer, "weight")  # the float parameters released
    if kernel == "library":
        assert torch.equal(layer.packed.weight, w.bfloat16().float())  # the rounded weight, float32 in memory
        wb = w.bfloat16().double()
        ref, bound = x.double() @ wb.T, 96 * U / (1 - 96 * U) * (x.double().abs() @ wb.abs().T)
    else:
        assert isinstance(layer.packed, Bf16Weight)  # only the bf16 copy is kept
        ref, bound = _float64(x, w)
    check_linear_layer(layer, x, ref + b.double(), bound + U * ref.abs() + 1e-30)  # + the bias add
    with pytest.raises(ValueError, match="input width 95, the layer takes 96"):
        layer(x[:, :95])


def _candidates_reference(logits: torch.Tensor, k: int, banned: list[int]):
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp[:, banned] = float("-inf")
    return logp.topk(k, dim=-1)


@pytest.mark.parametrize("kernel", ORDERED + [k for k in OWN if k == "amx"])
@pytest.mark.parametrize("rows, k, n, top", [(1, 8, 70, 1), (7, 36, 200, 3), (13, 96, 1000, 8), (37, 128, 1000, 4)])
def test_fused_output_candidates_against_float64(kernel, rows, k, n, top):
    """The bf16 output layer with log-softmax + top-k fused (the logits never written): the k best of float64 math
    of the two-term scheme, banned ids out of the candidates but in the normalizer (one of them the best logit),
    ragged row blocks and last tile, several column parts (threads) merged; and the unfused path's candidates."""
    x, w, b = gemm_inputs(rows, k, n, seed=rows * 100 + n)
    x = x * 0.5
    packed = _C.bf16_pack(w)
    logits, _ = _float64(x, w)
    logits = logits + b.double()
    banned = sorted({0, n - 1, int(logits[-1].argmax())})
    values, ids = _C.bf16_linear_log_softmax_topk(x, packed, b, n, top, torch.tensor(banned), kernel=kernel)
    ref_values, ref_ids = _candidates_reference(logits, top, banned)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-6, atol=1e-5)
    unfused = _C.log_softmax_topk(_C.bf16_linear(x, packed, b, n, kernel=kernel), top, torch.tensor(banned))
    assert torch.equal(ids, unfused[1])
    torch.testing.assert_close(values, unfused[0], rtol=0, atol=1e-5)


def test_fused_output_candidates_refuses_bad_arguments():
    x, w, _ = gemm_inputs(3, 36, 70, seed=2)
    packed = _C.bf16_pack(w)
    with pytest.raises(RuntimeError, match="k=70 outside \\[1, 69\\]"):
        _C.bf16_linear_log_softmax_topk(x, packed, None, 70, 70, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="banned token id outside"):
        _C.bf16_linear_log_softmax_topk(x, packed, None, 70, 1, torch.tensor([70]))
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        _C.bf16_linear_log_softmax_topk(torch.randn(3, 100), packed, None, 70, 1, torch.empty(0, dtype=torch.long))
    x[2] = float("nan")  # a hidden state gone NaN: named, not a crash on a row without candidates
    with pytest.raises(RuntimeError, match="row 2 has NaN logits"):
        _C.bf16_linear_log_softmax_topk(x, packed, None, 70, 2, torch.empty(0, dtype=torch.long))
