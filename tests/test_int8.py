"""int8 linear layers (dtype="int8", CTranslate2's int8 compute type) against float64 math.

A quantized GEMM is not equal to the float one, so the layer is checked against the error bound of its
quantization (per-row symmetric int8 weights; uint8 activations, asymmetric, per row in pyengine's own
VNNI kernel, per tensor in the libraries'), computed in float64 from the inputs alone; the VNNI
kernel is also checked against float64 math of its quantization scheme (its AMX tile, VNNI tile and portable
twin alike); the engine against float64 logits and the float32 decoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, check_search_takes_fused_candidates, random_sources
from pyengine.errors import OptionError
from pyengine import _C
from pyengine.config import DecodeOptions
from pyengine.decoding import Runtime, rules_for
from pyengine.model import ForcedDecoder
from pyengine.model.linear import INT8_ONEDNN_ROWS, Int8Linear, Linear, amx_available, int8_engines, vnni_available
from pyengine.model.step import Int8CppStep, LayerStep
from pyengine.quant import quantize_rows

ROOT = Path(__file__).resolve().parent.parent
# the engine's int8 kernel on this CPU, and every kernel this machine can run (the library one needs the
# PyTorch build's FBGEMM/oneDNN; pyengine's own: AVX512-VNNI, AMX-INT8): each is tested where it exists
OWN = (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else [])
KERNELS = OWN + (["library"] if int8_engines() else [])
TILES = ["portable"] + OWN  # the C++ GEMM's tiles (the portable twin runs anywhere)
pytestmark = pytest.mark.skipif(not KERNELS, reason="no int8 GEMM on this machine (no AVX512-VNNI, FBGEMM, oneDNN)")


def _quantization_bound(x: torch.Tensor, w: torch.Tensor, kernel: str) -> torch.Tensor:
    """|x·wᵀ − x̂·ŵᵀ| ≤ Σ_k |x_k|·Δw + |w_k|·Δx + Δx·Δw, with Δw = s_w/2 (per weight row) and Δx = s_x/2:
    per activation row (vnni) or per tensor (library), asymmetric over a range holding 0."""
    x, w = x.double(), w.double()
    _, s_w = quantize_rows(w)
    dw = s_w.double()[None, :] / 2
    if kernel in ("amx", "vnni"):
        dx = (x.amax(1, keepdim=True).clamp(min=0) - x.amin(1, keepdim=True).clamp(max=0)) / 255 / 2
    else:
        dx = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255 / 2
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


@pytest.mark.skipif(not amx_available(), reason="no AMX-INT8 on this CPU")
@pytest.mark.parametrize("activation", ["none", "relu", "swish"])
@pytest.mark.parametrize("rows, k, n", [(7, 64, 64), (16, 512, 1536), (17, 2048, 100), (128, 512, 2048), (61, 576, 333)])
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
                                             (37, 128, 1000, 4)])
def test_fused_output_candidates_against_float64(rows, k, n, top, tile):
    """The output layer with log-softmax + top-k fused (the logits never written): the k best of float64 math of
    the int8 scheme, banned ids out of the candidates but in the normalizer (one of them the best logit), VNNI row
    blocks of 1-6 and a remainder, AMX blocks of 16 and a ragged one, a ragged last tile, several column parts
    (threads) merged."""
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
AMX_ARCH = dict(activation="swish", d_model=64, heads=4, ffn=124, seed=6)


@pytest.fixture(scope="module", params=["swish-shared", "amx-shaped"])
def model_dir(request, tmp_path_factory):
    arch = AMX_ARCH if request.param == "amx-shaped" else ARCHS[request.param]
    return build_marian(tmp_path_factory.mktemp("int8"), **arch)


def _teacher_forced_log_probs(engine, src: list[list[int]], tgt: list[list[int]], start_id: int) -> list[torch.Tensor]:
    """log p(target token | prefix) for each target token (EOS included), one sentence at a time."""
    out = []
    for s, t in zip(src, tgt):
        with torch.no_grad():
            x, lengths = torch.tensor([s]), torch.tensor([len(s)])
            logits = ForcedDecoder(engine.model, x, lengths, len(t)).logits(torch.tensor([[start_id] + t[:-1]]))[0]
        out.append(logits.double().log_softmax(-1).gather(1, torch.tensor(t)[:, None])[:, 0])
    return out


def test_int8_error_below_ctranslate2_int8_on_the_default_model(tmp_path):
    """On the shipped model and held-out sentences, the teacher-forced log-probabilities of dtype="int8" are
    nearer Hugging Face's float64 ones than CTranslate2's int8 compute type (converted by its own converter)."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test requirement) is the int8 anchor")
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianMTModel, MarianTokenizer

    from pyengine.engine import DEFAULT_MODEL_DIR
    rows = [json.loads(line) for line in (ROOT / "data" / "heldout" / "test.bible.jsonl").open()][:16]
    rows += [json.loads(line) for line in (ROOT / "data" / "heldout" / "test.ui.jsonl").open()][:16]
    tok = MarianTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    src = [tok(r["en"]).input_ids for r in rows]
    tgt = [tok(text_target=r["de"]).input_ids for r in rows]  # ends with EOS
    hf = MarianMTModel.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float64).eval()
    start = hf.config.decoder_start_token_id
    ref = []
    for s, t in zip(src, tgt):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([[start] + t[:-1]])).logits[0]
        ref.append(logits.log_softmax(-1).gather(1, torch.tensor(t)[:, None])[:, 0])

    TransformersConverter(str(DEFAULT_MODEL_DIR)).convert(str(tmp_path / "ct2"), quantization="int8")
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", compute_type="int8", intra_threads=2)
    scored = translator.score_batch([tok.convert_ids_to_tokens(s) for s in src],
                                    [tok.convert_ids_to_tokens(t[:-1]) for t in tgt])
    ct2 = [torch.tensor(r.log_probs, dtype=torch.float64) for r in scored]
    ours = _teacher_forced_log_probs(pyengine.Engine.load(DEFAULT_MODEL_DIR, dtype="int8"), src, tgt, start)

    def error(values):
        return torch.cat([v - r for v, r in zip(values, ref)]).abs()

    ct2_err, our_err = error(ct2), error(ours)
    assert our_err.mean() > 1e-4, "no quantization error: the int8 path did not run"
    assert our_err.mean() <= ct2_err.mean(), f"mean |Δ log p| {our_err.mean():.4f} vs CTranslate2 int8 {ct2_err.mean():.4f}"
    assert our_err.max() <= ct2_err.max()


def _running_batch_outputs(model, cohorts: list[list[list[int]]], steps: int, beam: int = 2) -> list[torch.Tensor]:
    """The decoder's output at every step of a running batch whose cohorts (source id lists) are admitted at steps
    0, 2, 4, ...: rows at different positions, beams reordered by the search, through the indirect cache."""
    cfg = model.cfg
    opts = DecodeOptions(beam_size=beam, max_decoding_length=steps, min_decoding_length=steps)
    runtime = Runtime(model, rules_for("hf"), opts, torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id)
    inner, outputs = model.decoder_hidden, []
    model.decoder_hidden = lambda *a, **kw: (outputs.append(inner(*a, **kw).clone()), outputs[-1])[1]
    try:
        with torch.inference_mode():
            step = 0
            while step == 0 or runtime.cohorts:
                if step % 2 == 0 and step // 2 < len(cohorts):
                    runtime.admit(cohorts[step // 2], list(range(len(cohorts[step // 2]))))
                runtime.step()
                step += 1
    finally:
        del model.decoder_hidden
    return outputs


def _use_int8_kernel(model, kernel: str) -> None:
    """The same packed weights run by another of pyengine's int8 kernels (they share one layout)."""
    model.ops.linear.kernel = kernel
    model.step = Int8CppStep(model, kernel)


def _prenorm_model(kernel: str):
    import math
    from pyengine.config import ModelConfig
    from pyengine.model import Transformer
    cfg = ModelConfig(d_model=24, encoder_layers=2, decoder_layers=2, encoder_heads=3, decoder_heads=3,
                      encoder_ffn_dim=40, decoder_ffn_dim=36, src_vocab_size=50, tgt_vocab_size=50, activation="relu",
                      pad_id=1, eos_id=2, decoder_start_id=2, max_positions=64, embed_scale=math.sqrt(24),
                      normalize_before=True, encoder_final_norm=True, decoder_final_norm=True, layer_norm_eps=1e-5,
                      shared_embeddings=True, tie_output=True, final_logits_bias=False)
    from pyengine.model import load_weights, resolve_ops
    model = Transformer(cfg, resolve_ops("torch", torch.device("cpu"), weights="int8"))
    gen = torch.Generator().manual_seed(4)
    state = {name: (1.0 if name.endswith("norm.weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=gen)
             for name, p in model.named_parameters()}
    load_weights(model, state, torch.float32, torch.device("cpu"))
    _use_int8_kernel(model, kernel)
    return model


@pytest.mark.skipif(not OWN, reason="the C++ int8 step runs pyengine's GEMM (no AVX512-VNNI here)")
@pytest.mark.parametrize("kernel", OWN)
@pytest.mark.parametrize("arch", [*sorted(ARCHS), "amx-shaped", "pre-norm"])
def test_cpp_int8_decoder_step_equals_the_python_layers(arch, kernel, tmp_path, monkeypatch):
    """The C++ step (all layers in one call) runs the Python layers' operations in their order: the decoder's
    output at every step of a running batch is equal to the bit, post-norm (swish, relu, gelu) and pre-norm,
    with cohorts at different positions and beams reordered; with each of pyengine's int8 kernels (the
    AMX-shaped model's rows run AMX tiles where the kernel is amx)."""
    if arch == "pre-norm":
        model = _prenorm_model(kernel)
    else:
        path = build_marian(tmp_path, **(AMX_ARCH if arch == "amx-shaped" else ARCHS[arch]))
        model = pyengine.Engine.load(path, dtype="int8").model
        _use_int8_kernel(model, kernel)
    assert isinstance(model.step, Int8CppStep)
    gen = torch.Generator().manual_seed(1)
    cohorts = [[torch.randint(3, 40, (n,), generator=gen).tolist() + [model.cfg.eos_id] for n in lengths]
               for lengths in ([7, 4], [6, 5], [3])]
    if arch == "amx-shaped":
        assert _C.int8_kernel_name(kernel, 8, model.cfg.d_model) == kernel
    calls = []
    step = _C.int8_decoder_step
    monkeypatch.setattr(_C, "int8_decoder_step", lambda *a, **kw: (calls.append(kw["kernel"]), step(*a, **kw))[1])
    fast = _running_batch_outputs(model, cohorts, steps=6)
    assert len(calls) == len(fast) and set(calls) == {kernel}  # every step ran in C++, with the kernel asked for
    cpp, model.step = model.step, LayerStep()
    try:
        python = _running_batch_outputs(model, cohorts, steps=6)
    finally:
        model.step = cpp
    assert len(calls) == len(fast) == len(python) == 10  # 6 steps from step 0, the last cohort's end at step 9
    for i, (a, b) in enumerate(zip(fast, python)):
        assert torch.equal(a, b), f"step {i}: max |Δ| {(a - b).abs().max():.3g}"
    assert not torch.equal(fast[0], fast[1])  # the steps differ: the cache and positions were used


@pytest.mark.skipif(not OWN, reason="per-row activation quantization is pyengine's own kernel's")
@pytest.mark.parametrize("beam", [1, 3])
def test_int8_translations_do_not_depend_on_the_batch(model_dir, beam):
    """Activations are quantized per row, so a sentence's int8 GEMMs see only its own rows: translated alone
    or in a batch of 16 (padded, length-sorted), the tokens and scores are the same to the bit. (The
    libraries' per-tensor rule let the other sentences of a batch change a sentence's scale.) On the AMX-shaped
    model a sentence alone runs the VNNI tile (under 7 rows) and in the batch the AMX one: equal to the bit too."""
    engine = pyengine.Engine.load(model_dir, dtype="int8")
    src = random_sources(16, engine.config.src_vocab_size, seed=5)
    batched = engine.generate(src, beam_size=beam, max_decoding_length=12)
    alone = [engine.generate([s], beam_size=beam, max_decoding_length=12)[0] for s in src]
    assert [t.tokens for t in batched] == [t.tokens for t in alone]
    assert [t.scores for t in batched] == [t.scores for t in alone]


@pytest.mark.skipif(not OWN, reason="the fused output layer runs pyengine's own GEMM tiles")
@pytest.mark.parametrize("beam", [1, 4])
def test_search_takes_candidates_from_the_fused_output_layer(model_dir, beam, monkeypatch):
    check_search_takes_fused_candidates(pyengine.Engine.load(model_dir, dtype="int8"), "int8_linear_log_softmax_topk",
                                        beam, monkeypatch)


def test_int8_engine_translates_like_float32(model_dir):
    fp32 = pyengine.Engine.load(model_dir)
    int8 = pyengine.Engine.load(model_dir, dtype="int8")
    src = random_sources(24, fp32.config.src_vocab_size, seed=12)
    ours = int8.generate(src, beam_size=3, max_decoding_length=10)
    ref = fp32.generate(src, beam_size=3, max_decoding_length=10)
    same = sum(a.tokens[0] == b.tokens[0] for a, b in zip(ours, ref))
    assert same >= len(src) // 2  # int8 may flip near-ties, as bf16 does
    # the float32 copies of the packed layers are released (the int8 engine holds int8 weights)
    linears = [m for m in int8.model.modules() if isinstance(m, Linear)]
    assert linears and all(not hasattr(m, "weight") and m.packed is not None for m in linears)


def test_int8_option_errors(model_dir):
    with pytest.raises(OptionError, match="float32 activations"):
        pyengine.Engine.load(model_dir, dtype=torch.bfloat16, weights="int8")
    with pytest.raises(OptionError, match="unknown weights"):
        pyengine.Engine.load(model_dir, weights="int4")
    with pytest.raises(OptionError, match="backend='torch'"):
        pyengine.Engine.load(model_dir, dtype="int8", backend="triton")
    with pytest.raises(OptionError, match="unknown int8 kernel"):
        Int8Linear("int4")


def test_requantizing_an_int8_checkpoint_gives_back_its_values():
    """`pyengine convert --dtype int8` stores (q, scale); loading with dtype="int8" dequantizes then quantizes
    again with the same per-row rule: the int8 values the GEMM runs are the stored ones."""
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 0.3
    q, scale = quantize_rows(w)
    q2, scale2 = quantize_rows(q.float() * scale[:, None])
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale, rtol=1e-6, atol=0)
