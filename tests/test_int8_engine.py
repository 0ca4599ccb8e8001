"""dtype="int8" at the engine level: teacher-forced log-probabilities nearer float64 than CTranslate2's int8 on the
default model, translations independent of their batch, the fused output layer taken by the search, and the engine's option errors. (The int8
GEMMs themselves: tests/test_int8.py; the C++ decoder step: tests/test_decoder_step.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import AMX_ARCH, ARCHS, build_marian, check_search_takes_fused_candidates, random_sources
from pyengine.errors import OptionError
from pyengine.model import ForcedDecoder
from pyengine.model.linear import Int8Linear, Linear, amx_available, int8_engines, vnni_available
from pyengine.quant import quantize_rows

ROOT = Path(__file__).resolve().parent.parent
OWN = (["amx"] if amx_available() else []) + (["vnni"] if vnni_available() else [])
pytestmark = pytest.mark.skipif(not (OWN or int8_engines()),
                                reason="no int8 GEMM on this machine (no AVX512-VNNI, FBGEMM, oneDNN)")


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
