"""dtype="int8" at the engine level: teacher-forced log-probabilities nearer float64 than CTranslate2's int8 on the
default model, the C++ int8 decoder step equal to the Python layers to the bit over a running batch, translations
independent of their batch, the fused output layer taken by the search, and the engine's option errors. (The int8
GEMMs themselves: tests/test_int8.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, check_search_takes_fused_candidates, random_sources
from pyengine import _C
from pyengine.config import DecodeOptions
from pyengine.decoding import Runtime, rules_for
from pyengine.errors import OptionError
from pyengine.model import ForcedDecoder
from pyengine.model.linear import Int8Linear, Linear, amx_available, int8_engines, vnni_available
from pyengine.model.step import Int8CppStep, LayerStep
from pyengine.quant import quantize_rows

ROOT = Path(__file__).resolve().parent.parent
OWN = (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else [])
pytestmark = pytest.mark.skipif(not (OWN or int8_engines()),
                                reason="no int8 GEMM on this machine (no AVX512-VNNI, FBGEMM, oneDNN)")


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
