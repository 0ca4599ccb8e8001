"""int8 linear layers (dtype="int8", CTranslate2's int8 compute type) against float64 math.

A quantized GEMM is not equal to the float one, so the layer is checked against the error bound of its
quantization (per-row symmetric int8 weights; uint8 activations, asymmetric, per row in pyengine's own
VNNI kernel, per tensor in the libraries'), computed in float64 from the inputs alone; the VNNI
kernel is also checked against float64 math of its quantization scheme (its AMX tile, VNNI tile and portable
twin alike). The engine with int8 layers: tests/test_int8_engine.py.
"""
from __future__ import annotations

import pytest
import torch

from pyengine import _C
from pyengine.model.linear import INT8_ONEDNN_ROWS, Int8Linear, amx_available, int8_engines, vnni_available
from pyengine.quant import quantize_rows

# the engine's int8 kernel on this CPU, and every kernel this machine can run (the library one needs the
# PyTorch build's FBGEMM/oneDNN; pyengine's own: AVX512-VNNI, AMX-INT8): each is tested where it exists
OWN = (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else [])
KERNELS = OWN + (["library"] if int8_engines() else [])
TILES = ["portable"] + OWN  # the C++ GEMM's tiles (the portable twin runs anywhere)
pytestmark = pytest.mark.skipif(not KERNELS, reason="no int8 GEMM on this machine (no AVX512-VNNI, FBGEMM, oneDNN)")


def _quantization_bound(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """|x·wᵀ − x̂·ŵᵀ| ≤ Σ_k |x_k|·Δw + |w_k|·Δx + Δx·Δw, with Δw = s_w/2 (per weight row) and Δx = s_x/2:
    per activation row over 255 levels (amx, vnni) or per tensor over 127 (library: reduce_range), asymmetric over
    a range holding 0."""
    x, w = x.double(), w.double()
    _, s_w = quantize_rows(w)
    dw = s_w.double()[None, :] / 2
    if kernel in ("amx", "vnni"):
        dx = (x.amax(1, keepdim=True).clamp(min=0) - x.amin(1, keepdim=True).clamp(max=0)) / 255 / 2
    else:
        dx = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127 / 2
    k = x.shape[1]
    return x.abs().sum(1, keepdim=True) * dw + dx * w.abs().sum(1)[None, :] + k * dx * dw


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 5, INT8_ONEDNN_ROWS + 36])  # library: FBGEMM below the threshold, oneDNN above
@pytest.mark.parametrize("seed", [0, 1])
def test_int8_linear_within_its_quantization_bound(rows, seed, kernel):
    gen = torch.Generator().manual_seed(seed)
    k, n = 128, 72  # K a multiple of 64: the AMX tile runs from 7 rows
    # rows of different magnitudes, a few outliers: the per-tensor activation scale is the hard case
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    x[0, 3] = 9.0
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 0.2
    b = torch.randn(n, generator=gen)
    method = Int8Linear(kernel)
    out = method.apply(x[None], method.pack(w, b))[0].double()  # a leading batch dim, as the model calls it
    ref = x.double() @ w.double().T + b.double()
    err = (out - ref).abs()
    bound = _quantization_bound(x, w, kernel) * 1.01 + 1e-4
    assert out.shape == (rows, n)
    assert err.max() > 1e-5, "no quantization error: the int8 GEMM did not run"
    assert bool((err <= bound).all()), f"error {err.max():.4g} over the bound at {(err - bound).argmax()}"


@pytest.mark.parametrize("activation", ["swish", "relu", "gelu"])  # fused in the VNNI GEMM, gelu after it
@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_linear_act_applies_the_activation(kernel, activation):
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(7, 32, generator=gen), torch.randn(40, 32, generator=gen) * 0.1
    method = Int8Linear(kernel)
    z = x.double() @ w.double().T
    ref = {"swish": z * torch.sigmoid(z), "relu": z.clamp(min=0), "gelu": torch.nn.functional.gelu(z)}[activation]
    out = method.apply(x, method.pack(w, torch.zeros(40)), act=activation).double()
    bound = _quantization_bound(x, w, kernel) * 1.01 + 1e-4  # each activation is at most 1.13-Lipschitz
    assert bool(((out - ref).abs() <= 1.13 * bound).all())
    assert (out - ref).abs().max() > 1e-6  # the int8 path ran (its error is not zero)


def _scheme_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                      activation: str = "none") -> torch.Tensor:
    """The VNNI kernel's arithmetic in float64: x quantized per row to uint8 over [min(x, 0), max(x, 0)] (the same
    float32 operations: inv = 255 / range, zp = round(−min · inv), xq = round(x · inv) + zp, half to even),
    integer dot products of xq − zp (exact in float64 here), scaled by s_x·s_w, plus bias."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    inv = torch.where(hi > lo, 255.0 / (hi - lo), torch.zeros_like(hi))
    zp = torch.round(-lo * inv)
    xq = (torch.round(x * inv) + zp).clamp(0, 255)
    y = ((xq - zp).double() @ q.double().T) * ((hi - lo) / 255).double() * scale.double()[None, :]
    y = y if bias is None else y + bias.double()
    return {"none": y, "relu": y.clamp(min=0), "swish": y * torch.sigmoid(y)}[activation]


@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("rows, k, n", [(1, 8, 3), (6, 37, 64), (7, 36, 70), (7, 64, 64), (13, 512, 130), (32, 96, 200),
                                        (40, 192, 130), (35, 128, 1000)])
def test_own_kernel_against_float64_math_of_its_scheme(rows, k, n, tile, activation):
    """VNNI row tiles of 1-6 and a remainder, AMX row blocks of 16 with a ragged last one (7, 13, 35, 40 rows at K
    a multiple of 64), K not a multiple of 4, N not a multiple of the 64-column tile, a zero row, with and without
    bias, into `out`, each fused activation; the AMX tile, the AVX512-VNNI loop and the portable twin."""
    gen = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    if rows > 1:
        x[rows // 2] = 0.0  # a zero row: scale 0, output = bias
    q, scale = quantize_rows(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen))
    bias = torch.randn(n, generator=gen)
    packed, colsum = _C.int8_pack(q)
    for b in (bias, None):
        ref = _scheme_reference(x, q, scale, b, activation)
        out = torch.full((rows, n), float("nan"))
        y = _C.int8_linear(x, packed, colsum, scale, b, n, out, kernel=tile, activation=activation)
        assert y.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * float(ref.abs().max()))
        assert float(_scheme_reference(x, q, scale, b).abs().max()) > 0.1  # not vacuous
    expect = tile if tile != "amx" or (k % 64 == 0 and rows > 6) else "vnni"  # AMX where the shape suits it
    assert _C.int8_kernel_name(tile, rows, k) == expect


@pytest.mark.parametrize("tile", TILES)
def test_a_call_does_not_depend_on_what_earlier_calls_left(tile):
    """A call's quantized rows live in a buffer its thread reuses (gemm::thread_scratch), given back past 4 MB
    (2100 × 2048 rows: 4.3 MB): each call, made again in reverse order after a call of the largest shape on other
    values, gives the same bits as the first time (whose correctness the float64 tests above hold)."""
    shapes = [(3, 37, 70), (2100, 2048, 64), (5, 36, 64), (40, 192, 130), (1, 8, 3), (7, 64, 64)]
    calls = {}
    for rows, k, n in shapes:
        gen = torch.Generator().manual_seed(rows + k + n)
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
        q, scale = quantize_rows(torch.randn(n, k, generator=gen))
        packed, colsum = _C.int8_pack(q)
        calls[(rows, k, n)] = lambda x=x, packed=packed, colsum=colsum, scale=scale, n=n: _C.int8_linear(
            x, packed, colsum, scale, None, n, kernel=tile)
    first = {shape: call() for shape, call in calls.items()}
    big = calls[(2100, 2048, 64)]
    other = torch.randn(2100, 2048) * 100  # other values through the largest buffer
    q, scale = quantize_rows(torch.randn(64, 2048))
    packed, colsum = _C.int8_pack(q)
    for shape in reversed(shapes):
        _C.int8_linear(other, packed, colsum, scale, None, 64, kernel=tile)
        assert torch.equal(calls[shape](), first[shape]), shape
    assert not torch.equal(big(), _C.int8_linear(other, packed, colsum, scale, None, 64, kernel=tile))


@pytest.mark.skipif(not amx_available(), reason="no AMX-INT8 on this CPU")
@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
@pytest.mark.parametrize("rows, k, n", [(7, 64, 64), (12, 512, 1000), (16, 512, 1536), (17, 2048, 100),
                                        (128, 512, 2048), (61, 576, 333)])
def test_amx_tile_equals_the_vnni_tile_to_the_bit(rows, k, n, activation):
    """The int32 sums are exact and the epilogue shared, so AMX and VNNI results are equal to the bit: a model
    gives the same tokens whichever tile a layer's row count picks (1-6 rows run VNNI, more AMX)."""
    gen = torch.Generator().manual_seed(rows + k + n)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    q, scale = quantize_rows(torch.randn(n, k, generator=gen))
    packed, colsum = _C.int8_pack(q)
    bias = torch.randn(n, generator=gen)
    assert _C.int8_kernel_name("amx", rows, k) == "amx"
    amx = _C.int8_linear(x, packed, colsum, scale, bias, n, kernel="amx", activation=activation)
    vnni = _C.int8_linear(x, packed, colsum, scale, bias, n, kernel="vnni", activation=activation)
    assert torch.equal(amx, vnni)
    assert amx.abs().max() > 0.1


def _candidates_reference(logits: torch.Tensor, k: int, banned: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best (log-prob, id) in float64, banned ids counted in the normalizer but never taken."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp[:, banned] = float("-inf")
    return logp.topk(k, dim=-1)


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("rows, k, n, top", [(1, 8, 70, 1), (7, 36, 200, 3), (13, 96, 1000, 8), (32, 64, 333, 10),
                                             (37, 128, 1000, 4), (40, 512, 700, 8)])
def test_fused_output_candidates_against_float64(rows, k, n, top, tile):
    """The output layer with log-softmax + top-k fused (the logits never written): the k best of float64 math of
    the int8 scheme, banned ids out of the candidates but in the normalizer (one of them the best logit), VNNI row
    blocks of 1-6 and a remainder, AMX blocks of 16 and a ragged one (each block finished a few rows at a time
    during the next one's multiply: 8 k-steps at K=512), a ragged last tile, several column parts (threads) merged."""
    gen = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, k, generator=gen) * 2
    q, scale = quantize_rows(torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen))
    bias = torch.randn(n, generator=gen)
    packed, colsum = _C.int8_pack(q)
    logits = _scheme_reference(x, q, scale, bias)
    banned = sorted({0, n - 1, int(logits[0].argmax())})
    values, ids = _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, bias, n, top,
                                                  torch.tensor(banned), kernel=tile)
    ref_values, ref_ids = _candidates_reference(logits, top, banned)
    assert torch.equal(ids, ref_ids)
    # float32: the logit and the normalizer each rounded (a few ulps of |log p| up to ~30 here)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-6, atol=1e-5)
    assert not set(banned) & set(ids.flatten().tolist())
    # the same candidates as the unfused path on the written logits (log_softmax_topk over int8_linear)
    unfused = _C.log_softmax_topk(_C.int8_linear(x, packed, colsum, scale, bias, n), top, torch.tensor(banned))
    assert torch.equal(ids, unfused[1])
    torch.testing.assert_close(values, unfused[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tile", TILES)
def test_fused_output_candidates_ties_go_to_the_lower_id(tile):
    """Equal logits (one weight row repeated in the first tile, a middle one and the last: different column
    parts) come out lowest id first, as log_softmax_topk orders them."""
    n, k = 1000, 64
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=gen) * 0.1
    w[[5, 500, 501, 999]] = 1.0
    q, scale = quantize_rows(w)
    packed, colsum = _C.int8_pack(q)
    x = (torch.rand(1, k, generator=gen) + 0.5).expand(9, k).contiguous()  # 9 rows: AMX blocks where it runs
    values, ids = _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, None, n, 5, torch.tensor([500]),
                                                  kernel=tile)
    assert ids[:, :3].tolist() == [[5, 501, 999]] * 9
    assert torch.equal(values[:, 0], values[:, 2])


@pytest.mark.skipif(not vnni_available(), reason="the fused output layer runs the VNNI GEMM's tiles")
def test_fused_output_candidates_refuses_bad_arguments():
    q, scale = quantize_rows(torch.randn(70, 36))
    packed, colsum = _C.int8_pack(q)
    x = torch.randn(3, 36)
    with pytest.raises(RuntimeError, match="k=71 outside \\[1, 70\\]"):
        _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, None, 70, 71, torch.empty(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match="k=70 outside \\[1, 69\\]"):
        _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, None, 70, 70, torch.tensor([3]))
    with pytest.raises(RuntimeError, match="banned token id outside"):
        _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, None, 70, 1, torch.tensor([70]))
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        _C.int8_linear_log_softmax_topk(torch.randn(3, 40), packed, colsum, scale, None, 70, 1,
                                        torch.empty(0, dtype=torch.long))
    x[1] = float("nan")  # a hidden state gone NaN: named, not a crash on a row without candidates
    with pytest.raises(RuntimeError, match="row 1 has NaN logits"):
        _C.int8_linear_log_softmax_topk(x, packed, colsum, scale, None, 70, 2, torch.empty(0, dtype=torch.long))


def test_own_kernel_refuses_mismatched_inputs():
    q, scale = quantize_rows(torch.randn(70, 36))
    packed, colsum = _C.int8_pack(q)
    with pytest.raises(RuntimeError, match="packed weight does not match"):
        _C.int8_linear(torch.randn(3, 40), packed, colsum, scale, None, 70)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        _C.int8_linear(torch.randn(3, 36, dtype=torch.float64), packed, colsum, scale, None, 70)
    with pytest.raises(RuntimeError, match="scale must be"):
        _C.int8_linear(torch.randn(3, 36), packed, colsum, scale[:5], None, 70)
    with pytest.raises(RuntimeError, match="out must be"):
        _C.int8_linear(torch.randn(3, 36), packed, colsum, scale, None, 70, torch.empty(2, 70))
    with pytest.raises(RuntimeError, match="activation must be"):
        _C.int8_linear(torch.randn(3, 36), packed, colsum, scale, None, 70, activation="gelu")
    with pytest.raises(RuntimeError, match="kernel must be auto, amx, vnni or portable"):
        _C.int8_linear(torch.randn(3, 36), packed, colsum, scale, None, 70, kernel="avx2")
    with pytest.raises(RuntimeError, match="int8 \\(N, K\\)"):
        _C.int8_pack(torch.randn(4, 4))


# widths that are multiples of 64 (the decoder's FFN input 128; the encoder's 124 is not): AMX runs on them from 7
# rows, the VNNI tile on the rest and below 7 rows
