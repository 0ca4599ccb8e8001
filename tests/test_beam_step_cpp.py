"""pyengine._C.beam_step (C++) against its Python specification (tests/reference_search.hf_beam_step): identical
state and outputs, step after step, on random candidates; and whole searches of the engine against a reference
search that recomputes every beam's prefix from scratch each step (tests/reference_search.beam_search)."""
from __future__ import annotations

import copy

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources
from pyengine.config import DecodeOptions
from pyengine import _C
from pyengine.decoding.rules import EARLY_STOPPING_CODES, HFBeamState
from reference_search import beam_search, hf_beam_step

FIELDS = ("run_scores", "run_hist", "fin_scores", "fin_hist", "fin_len", "fin_flag", "open")


@pytest.mark.parametrize("impl", ["loop", "aten"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty,ends", [(0.6, (0,)), (1.0, (0,)), (2.0, (0,)), (1.0, (0, 3, 5))])
def test_cpp_step_equals_reference(early_stopping, length_penalty, ends, ties, impl):
    """Both C++ versions (the CPU loop and the ATen composition other devices run) equal the specification field by
    field at every step; with `ties`, log-probs on a coarse grid and some -inf make many scores equal, where the
    rule (lower index first) decides; with three end ids, 4 × beam candidates per sentence."""
    b, k, vocab, max_len, eos = 5, 4, 50, 12, 0
    opts = DecodeOptions(beam_size=k, length_penalty=length_penalty, early_stopping=early_stopping,
                         max_decoding_length=max_len, end_token=ends if len(ends) > 1 else None)
    width = max(2, 1 + len(ends)) * k
    cpp = HFBeamState(b, k, max_len, torch.device("cpu"), impl)
    ref = HFBeamState(b, k, max_len, torch.device("cpu"), impl)
    gen = torch.Generator().manual_seed(int(length_penalty * 10) + ties)
    for step in range(max_len):
        logp = torch.log_softmax(3 * torch.randn(b * k, vocab, generator=gen), -1)
        logp[:, list(ends)] += 1.5 * (step > 2)  # the end ids become likely after a few steps
        if ties:
            logp = (logp * 2).round() / 2
            logp[torch.rand(logp.shape, generator=gen) < 0.3] = float("-inf")
        cand_logp, cand_ids = torch.topk(logp, width, dim=-1)
        before = copy.deepcopy(ref.__dict__)
        out_cpp = _C.beam_step(cand_logp, cand_ids, cpp.run_scores, cpp.run_hist, cpp.fin_scores, cpp.fin_hist,
                               cpp.fin_len, cpp.fin_flag, cpp.open, step, float(length_penalty),
                               EARLY_STOPPING_CODES[early_stopping], list(ends), impl=impl)
        out_ref = hf_beam_step(ref, cand_logp, cand_ids, step, opts, eos)
        assert torch.equal(out_cpp[0], out_ref[0]) and torch.equal(out_cpp[1], out_ref[1]), f"step {step}"
        assert torch.equal(out_cpp[2], ref.last_parent) and torch.equal(out_cpp[3], ref.last_pick), f"step {step}"
        for name in FIELDS:
            assert torch.equal(getattr(cpp, name), getattr(ref, name)), f"{name} at step {step}"
        assert not all(torch.equal(before[n], getattr(ref, n)) for n in FIELDS)  # the state did move


def test_beam_step_refuses_bad_arguments():
    state = HFBeamState(2, 3, 8, torch.device("cpu"), "loop")
    logp, ids = torch.zeros(6, 6), torch.zeros(6, 6, dtype=torch.long)
    with pytest.raises(RuntimeError, match="impl is auto, loop or aten"):
        _C.beam_step(logp, ids, state.run_scores, state.run_hist, state.fin_scores, state.fin_hist, state.fin_len,
                     state.fin_flag, state.open, 0, 1.0, 0, [0], impl="fast")
    with pytest.raises(RuntimeError, match="outside the history"):
        _C.beam_step(logp, ids, state.run_scores, state.run_hist, state.fin_scores, state.fin_hist, state.fin_len,
                     state.fin_flag, state.open, 8, 1.0, 0, [0])
    with pytest.raises(RuntimeError, match="fewer than the 9 per sentence"):  # two end ids: 3 × beam candidates
        _C.beam_step(logp[:, :2], ids[:, :2], state.run_scores, state.run_hist, state.fin_scores, state.fin_hist,
                     state.fin_len, state.fin_flag, state.open, 0, 1.0, 0, [0, 1])


def test_whole_search_equals_the_reference_search(tmp_path):
    """The engine (C++ beam step, fused log-softmax/top-k, indirect cache, rows dropped as sentences finish) against
    the reference search: same tokens; scores equal to float32 rounding (the reference normalizes in float64 and
    recomputes every prefix)."""
    engine = pyengine.Engine.load(build_marian(tmp_path, **ARCHS["swish-shared"]))
    src = random_sources(9, engine.config.src_vocab_size, seed=4)
    opts = engine.options(beam_size=4, num_hypotheses=4, max_decoding_length=16)
    cfg = engine.config
    ours = engine.generate(src, beam_size=4, num_hypotheses=4, max_decoding_length=16)
    for s_ids, got in zip(src, ours):
        ref = beam_search(engine.model, s_ids, opts, cfg.decoder_start_id, cfg.eos_id)
        assert got.tokens == [t for t, _ in ref]
        torch.testing.assert_close(torch.tensor(got.scores), torch.tensor([sc for _, sc in ref]), rtol=0, atol=1e-5)
