"""pyengine._C.beam_step (C++) against its Python specification (tests/reference_search.hf_beam_step): identical
state and outputs, step after step, on random candidates; and whole searches of the engine against a reference
search that recomputes every beam's prefix from scratch each step (tests/reference_search.beam_search). And
pyengine._C.greedy_step, a greedy step's bookkeeping, against the same in ATen calls."""
from __future__ import annotations

import copy

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources
from pyengine.config import DecodeOptions
from pyengine import _C
from pyengine.decoding.hf_beam import EARLY_STOPPING_CODES, HFBeamState
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
                               cpp.fin_len, cpp.fin_flag, cpp.open, cpp.steps, float(length_penalty),
                               EARLY_STOPPING_CODES[early_stopping], list(ends), impl=impl)
        out_ref = hf_beam_step(ref, cand_logp, cand_ids, step, opts, eos)
        assert torch.equal(out_cpp[0], out_ref[0]) and torch.equal(out_cpp[1], out_ref[1]), f"step {step}"
        assert torch.equal(out_cpp[2], ref.last_parent) and torch.equal(out_cpp[3], ref.last_pick), f"step {step}"
        for name in FIELDS:
            assert torch.equal(getattr(cpp, name), getattr(ref, name)), f"{name} at step {step}"
        assert cpp.steps.tolist() == [step + 1] * b  # each sentence's count, advanced in place
        assert not all(torch.equal(before[n], getattr(ref, n)) for n in FIELDS)  # the state did move


def test_beam_step_refuses_bad_arguments():
    state = HFBeamState(2, 3, 8, torch.device("cpu"), "loop")
    logp, ids = torch.zeros(6, 6), torch.zeros(6, 6, dtype=torch.long)
    with pytest.raises(RuntimeError, match="impl is auto, loop or aten"):
        _C.beam_step(logp, ids, state.run_scores, state.run_hist, state.fin_scores, state.fin_hist, state.fin_len,
                     state.fin_flag, state.open, state.steps, 1.0, 0, [0], impl="fast")
    with pytest.raises(RuntimeError, match="outside the history"):
        _C.beam_step(logp, ids, state.run_scores, state.run_hist, state.fin_scores, state.fin_hist, state.fin_len,
                     state.fin_flag, state.open, torch.tensor([0, 8]), 1.0, 0, [0])
    assert state.steps.tolist() == [0, 0] and torch.equal(state.open, torch.ones(2, dtype=torch.bool))  # untouched
    with pytest.raises(RuntimeError, match="one per sentence"):
        _C.beam_step(logp, ids, state.run_scores, state.run_hist, state.fin_scores, state.fin_hist, state.fin_len,
                     state.fin_flag, state.open, torch.zeros(3, dtype=torch.long), 1.0, 0, [0])
    with pytest.raises(RuntimeError, match="fewer than the 9 per sentence"):  # two end ids: 3 × beam candidates
        _C.beam_step(logp[:, :2], ids[:, :2], state.run_scores, state.run_hist, state.fin_scores, state.fin_hist,
                     state.fin_len, state.fin_flag, state.open, state.steps, 1.0, 0, [0, 1])


@pytest.mark.parametrize("impl", ["loop", "aten"])
@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 0.6), ("never", 2.0), (True, 1.0)])
def test_sentences_at_different_steps_share_a_state(impl, early_stopping, length_penalty):
    """Cohorts that started at different steps, absorbed into one state (a running batch's merged cohorts): one C++
    step over all, each sentence at its own step, equals the specification stepping each cohort apart at its own
    step (every field, parent rows and next tokens); the sentences at the length limit end there."""
    k, vocab, max_len, eos = 3, 40, 10, 0
    opts = DecodeOptions(beam_size=k, length_penalty=length_penalty, early_stopping=early_stopping,
                         max_decoding_length=max_len)
    gen = torch.Generator().manual_seed(7)

    def candidates(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(3 * torch.randn(rows, vocab, generator=gen), -1)
        logp[:, eos] += 1.0
        return torch.topk(logp, 2 * k, dim=-1)

    groups = []  # (sentences, step): a cohort's reference state run to its step
    for b, steps in ((2, 0), (3, 4), (1, max_len - 1), (2, 6)):
        state = HFBeamState(b, k, max_len, torch.device("cpu"), impl)
        for step in range(steps):
            hf_beam_step(state, *candidates(b * k), step, opts, eos)
        state.steps.fill_(steps)
        groups.append((state, steps))
    merged = copy.deepcopy(groups[0][0])
    offset = groups[0][0].sentence.shape[0]
    for state, _ in groups[1:]:
        merged.absorb(copy.deepcopy(state), offset)
        offset += state.sentence.shape[0]
    cands = [candidates(state.sentence.shape[0] * k) for state, _ in groups]
    rows, nxt = merged.step(torch.cat([c[0] for c in cands]), torch.cat([c[1] for c in cands]), -1, opts, eos)
    at = 0
    for (state, steps), (logp, ids) in zip(groups, cands):
        b = state.sentence.shape[0]
        ref_rows, ref_next = hf_beam_step(state, logp, ids, steps, opts, eos)
        part = slice(at * k, (at + b) * k)
        assert torch.equal(rows[part], ref_rows + at * k) and torch.equal(nxt[part], ref_next), f"step {steps}"
        for name in FIELDS:
            assert torch.equal(getattr(merged, name)[at: at + b], getattr(state, name)), f"{name} at step {steps}"
        assert merged.steps[at: at + b].tolist() == [steps + 1] * b
        if steps == max_len - 1:  # every candidate ends at the limit: the finished set is full
            assert bool(merged.fin_flag[at: at + b].all())
        at += b


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


@pytest.mark.parametrize("ends, last", [((2,), False), ((2, 5, 7), False), ((2,), True)])
def test_greedy_step_equals_the_aten_calls(ends, last):
    """pyengine._C.greedy_step (a greedy step's bookkeeping in one pass) against the same bookkeeping in ATen calls
    (record_choice's other path, what a GPU runs): the tokens, the rows that end, the scores and history it updates
    in place, equal to the bit; the candidates (N, 3) read in their column 0."""
    from pyengine.decoding.processors import record_choice

    g = torch.Generator().manual_seed(len(ends) + 2 * last)
    n, width, step = 9, 6, 4
    logp, ids = -torch.rand(n, 3, generator=g) * 5, torch.randint(0, 10, (n, 3), generator=g)
    ids[0, 0], ids[1, 0] = ends[-1], 3  # a row that ends, and one that does not (3 ends none)
    scores, history = torch.randn(n, generator=g), torch.randint(0, 10, (n, width), generator=g)
    opts = DecodeOptions(max_decoding_length=step + 1 if last else width, end_token=ends if len(ends) > 1 else None)
    got_scores, got_history = scores.clone(), history.clone()
    got = record_choice(logp, ids, got_scores, got_history, step, opts, 2, loop=True)
    want = record_choice(logp, ids, scores, history, step, opts, 2, loop=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] is True and want[2] is True
    assert torch.equal(got_scores, scores) and torch.equal(got_history, history)
    assert bool(got[1][1]) == last and torch.equal(got_history[:, step], ids[:, 0])


def test_greedy_step_refuses_bad_arguments():
    logp, ids = torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long)
    scores, history = torch.zeros(2), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="step 4 outside the history of 4"):
        _C.greedy_step(logp, ids, scores, history, 4, [2], False)
    with pytest.raises(RuntimeError, match="int64 ids"):
        _C.greedy_step(logp, ids.int(), scores, history, 0, [2], False)
    with pytest.raises(RuntimeError, match="scores \\(N,\\) float32"):
        _C.greedy_step(logp, ids, scores.double(), history, 0, [2], False)
