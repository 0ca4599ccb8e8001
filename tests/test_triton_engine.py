"""The whole model through the Triton kernels (interpreter, CPU) gives the PyTorch path's tokens."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import build_marian, random_sources, sample_lines


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_marian(tmp_path_factory.mktemp("tiny-triton"), vocab=61, d_model=32, heads=2, ffn=40,
                        layers=(2, 2), activation="gelu", seed=5)


@pytest.mark.parametrize("beam", [1, 4])
def test_translate_identical_with_triton_and_torch(text_model_dir, beam):
    """translate() on real text of mixed lengths: the same tokens through the kernels (interpreter) and PyTorch."""
    texts = [t for t in sample_lines()[:40] if len(t) < 60][:5]
    triton_engine = pyengine.Engine.load(text_model_dir, backend="triton")
    torch_engine = pyengine.Engine.load(text_model_dir, backend="torch")
    got = triton_engine.translate_batch(texts, beam_size=beam, max_decoding_length=10)
    ref = torch_engine.translate_batch(texts, beam_size=beam, max_decoding_length=10)
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    assert [g.hypotheses for g in got] == [r.hypotheses for r in ref]


@pytest.mark.parametrize("beam", [1, 4])
def test_triton_backend_matches_torch_backend(tiny_dir, beam):
    triton_engine = pyengine.Engine.load(tiny_dir, backend="triton")
    torch_engine = pyengine.Engine.load(tiny_dir, backend="torch")
    fused = ("attention", "add_layer_norm", "linear_act")
    assert all(triton_engine.backends[op] == "triton" for op in fused), triton_engine.backends
    src = random_sources(5, 61, seed=beam, lo=1, hi=20)  # mixed lengths, padding
    got = triton_engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=8)
    ref = torch_engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=8)
    assert [g.tokens for g in got] == [r.tokens for r in ref]
    for g, r in zip(got, ref):
        assert torch.allclose(torch.tensor(g.scores), torch.tensor(r.scores), atol=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_continuous_batch_through_the_kernels(tiny_dir, beam):
    """Rows at different positions (per-row cache lengths in the decode attention kernel, keys read through the
    cache's row index), cohorts admitted at staggered steps: the tokens of decoding each sentence alone with the
    PyTorch path."""
    from pyengine.decoding import Runtime

    triton_engine = pyengine.Engine.load(tiny_dir, backend="triton")
    torch_engine = pyengine.Engine.load(tiny_dir, backend="torch")
    src = random_sources(6, 61, seed=10 + beam, lo=2, hi=16)
    opts = triton_engine.options(beam_size=beam, max_decoding_length=8)
    cfg = triton_engine.config
    batch = Runtime(triton_engine.model, triton_engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id,
                    cfg.eos_id)
    got, step, overlap = {}, 0, 0
    with torch.inference_mode():
        while len(got) < len(src):
            if step < 3:
                batch.admit(src[2 * step: 2 * step + 2], [2 * step, 2 * step + 1])
            overlap = max(overlap, sum(len(c.strategy.spans(0)) for c in batch.cohorts))
            got.update(batch.step())
            step += 1
    assert overlap >= 2
    for i, s in enumerate(src):
        assert [h.tokens for h in got[i]] == torch_engine.generate([s], beam_size=beam, max_decoding_length=8)[0].tokens
