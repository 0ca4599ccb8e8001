"""pyengine._C.beam_step (C++) against its Python specification BeamState.step_reference: identical
state and outputs, step after step, on random candidates; and whole searches with either give HF's
tokens (the parity tests run the C++ one)."""
from __future__ import annotations

import copy

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources
from pyengine.config import DecodeOptions
from pyengine.decoding import BeamState
from pyengine.search import search

FIELDS = ("run_scores", "run_hist", "fin_scores", "fin_hist", "fin_len", "fin_flag", "open")


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 2.0])
def test_cpp_step_equals_reference(early_stopping, length_penalty):
    b, k, vocab, max_len, eos = 5, 4, 50, 12, 0
    opts = DecodeOptions(beam_size=k, length_penalty=length_penalty, early_stopping=early_stopping,
                         max_decoding_length=max_len)
    cpp = BeamState(b, k, max_len, torch.device("cpu"))
    ref = BeamState(b, k, max_len, torch.device("cpu"), reference=True)
    gen = torch.Generator().manual_seed(int(length_penalty * 10))
    for step in range(max_len):
        logp = torch.log_softmax(3 * torch.randn(b * k, vocab, generator=gen), -1)
        logp[:, eos] += 1.5 * (step > 2)  # EOS becomes likely after a few steps
        cand_logp, cand_ids = torch.topk(logp, 2 * k, dim=-1)
        before = copy.deepcopy(ref.__dict__)
        out_cpp = cpp.step(cand_logp, cand_ids, step, opts, eos)
        out_ref = ref.step_reference(cand_logp, cand_ids, step, opts, eos)
        assert all(torch.equal(a, c) for a, c in zip(out_cpp, out_ref)), f"step {step}"
        for name in FIELDS:
            assert torch.equal(getattr(cpp, name), getattr(ref, name)), f"{name} at step {step}"
        assert not all(torch.equal(before[n], getattr(ref, n)) for n in FIELDS)  # the state did move


def test_whole_search_same_with_c_plus_plus_or_reference_paths(tmp_path):
    """C++ beam step, fused log-softmax/top-k and cache select vs their Python/PyTorch versions: same
    tokens; scores equal to float32 rounding (the fused normalizer sums exp in another order)."""
    engine = pyengine.Engine.load(build_marian(tmp_path, **ARCHS["swish-shared"]))
    src = random_sources(9, engine.config.src_vocab_size, seed=4)
    lengths = torch.tensor([len(s) for s in src])
    ids = torch.full((len(src), int(lengths.max())), engine.config.pad_id)
    for i, s in enumerate(src):
        ids[i, :len(s)] = torch.tensor(s)
    opts = engine.options(beam_size=4, num_hypotheses=4, max_decoding_length=16)
    cfg = engine.config
    with torch.inference_mode():
        memory = engine.model.memory(engine.model.encode(ids, lengths), lengths)
        results = [search(engine.model, memory, opts, cfg.decoder_start_id, cfg.eos_id, torch.float32,
                               reference=reference) for reference in (False, True)]
    assert [[h.tokens for h in r] for r in results[0]] == [[h.tokens for h in r] for r in results[1]]
    fused = torch.tensor([[h.score for h in r] for r in results[0]])
    torch.testing.assert_close(fused, torch.tensor([[h.score for h in r] for r in results[1]]), rtol=0, atol=1e-5)
