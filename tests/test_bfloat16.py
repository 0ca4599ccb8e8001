"""bfloat16 against float64: pyengine's error is at most twice HF's own bfloat16 error (DESIGN.md's rule)."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, hf_model, pad_batch, random_sources


@pytest.fixture(scope="module", params=["swish-shared", "relu-separate"])
def model_dir(request, tmp_path_factory):
    return build_marian(tmp_path_factory.mktemp(f"bf16-{request.param}"), **ARCHS[request.param])


def _teacher_forced(model_dir):
    engine = pyengine.Engine.load(model_dir)
    src = random_sources(8, engine.config.src_vocab_size, seed=21)
    x, mask = pad_batch(src, engine.config.pad_id)
    gen = torch.Generator().manual_seed(3)
    tgt = torch.randint(1, engine.config.tgt_vocab_size - 1, (len(src), 7), generator=gen)
    tgt[:, 0] = engine.config.decoder_start_id
    return x, mask, tgt


def _ours(model_dir, dtype, x, mask, tgt):
    engine = pyengine.Engine.load(model_dir, dtype=dtype)
    with torch.no_grad():
        hidden = engine.model.encode(x, mask.sum(1))
        memory = engine.model.memory(hidden, mask.sum(1))
        cache = engine.model.new_cache(len(x), 8, torch.device("cpu"), dtype)
        logits = torch.cat([engine.model.decode(tgt[:, t:t + 1], t, cache, memory) for t in range(tgt.shape[1])], 1)
    return hidden.double(), logits.double()


def _hf(model_dir, dtype, x, mask, tgt):
    hf = hf_model(model_dir, dtype=dtype)
    with torch.no_grad():
        hidden = hf.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        logits = hf(input_ids=x, attention_mask=mask, decoder_input_ids=tgt).logits
    return hidden.double(), logits.double()


def test_bf16_error_within_twice_hf_bf16_error(model_dir):
    x, mask, tgt = _teacher_forced(model_dir)
    ref_h, ref_l = _hf(model_dir, torch.float64, x, mask, tgt)
    hf_h, hf_l = _hf(model_dir, torch.bfloat16, x, mask, tgt)
    our_h, our_l = _ours(model_dir, torch.bfloat16, x, mask, tgt)
    valid = mask.bool()
    for name, ours, hf, ref in (("encoder", our_h[valid], hf_h[valid], ref_h[valid]), ("logits", our_l, hf_l, ref_l)):
        err_ours = (ours - ref).abs().mean().item()
        err_hf = (hf - ref).abs().mean().item()
        assert err_hf > 0, "the bf16 reference did not run in bf16"
        assert err_ours <= 2 * err_hf, f"{name}: mean error {err_ours:.4g} vs HF bf16 {err_hf:.4g}"
        assert (ours - ref).abs().max().item() <= 2 * (hf - ref).abs().max().item(), name


def test_bf16_translates_end_to_end(model_dir):
    engine = pyengine.Engine.load(model_dir, dtype=torch.bfloat16)
    fp32 = pyengine.Engine.load(model_dir)
    src = random_sources(16, engine.config.src_vocab_size, seed=8)
    ours = engine.generate(src, beam_size=2, max_decoding_length=12)
    ref = fp32.generate(src, beam_size=2, max_decoding_length=12)
    assert all(len(t.tokens[0]) <= 12 for t in ours)
    # bf16 may change a near-tie; most best hypotheses stay the same on this peaky model
    same = sum(a.tokens[0] == b.tokens[0] for a, b in zip(ours, ref))
    assert same >= len(src) // 2


def test_auto_dtype_follows_the_measured_bf16_speed(monkeypatch):
    """dtype="auto" picks bfloat16 only where the CPU has the instructions *and* a measured bf16 linear beats
    float32 (some AVX512-BF16 virtual machines run bf16 slower than fp32)."""
    from pyengine import engine as eng
    speedup = eng.bf16_linear_speedup()  # the real probe, on this machine
    assert speedup >= 0.0
    monkeypatch.setattr(eng, "cpu_has_bf16_instructions", lambda: True)
    monkeypatch.setattr(eng, "bf16_linear_speedup", lambda: 2.0)
    assert eng.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(eng, "bf16_linear_speedup", lambda: 0.6)
    assert eng.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(eng, "cpu_has_bf16_instructions", lambda: False)
    monkeypatch.setattr(eng, "bf16_linear_speedup", lambda: 2.0)
    assert eng.resolve_dtype("auto") == torch.float32
