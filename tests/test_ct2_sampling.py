"""CTranslate2's beam sampling (`search_rules="ctranslate2"` with beam_size > 1 and sampling options) against
CTranslate2 4.8.5 itself, on the shipped model converted by its own converter: over many runs of one sentence, how
often each hypothesis is among the n-best returned (5 sigma of two samples, as tests/test_sampling.py checks HF's beam
sampling), and each hypothesis's score where both return it. CTranslate2 draws 2 × beam candidates with exponential
noise on its sampler's log-probs (see processors.ct2_drawn_candidates); Gumbel noise, HF's rule or sorting the draws
would change these frequencies by many sigma."""
from __future__ import annotations

import pytest

from test_ct2_options import converted

ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test requirement) is the reference")
TEXT = "Open the file."
RUNS = 1500


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return converted(tmp_path_factory, "ct2-sampling")


def ct2_runs(model, beam: int, steps: int, **sampling) -> list[dict[tuple[str, ...], float]]:
    _, translator, tok = model
    source = tok.convert_ids_to_tokens(tok(TEXT).input_ids)
    ctranslate2.set_random_seed(11)
    results = translator.translate_batch([source] * RUNS, beam_size=beam, num_hypotheses=beam, return_scores=True,
                                         max_decoding_length=steps, return_end_token=True, **sampling)
    return [{tuple(h): s for h, s in zip(r.hypotheses, r.scores)} for r in results]


def our_runs(model, beam: int, steps: int, **sampling) -> list[dict[tuple[str, ...], float]]:
    engine, _, tok = model
    results = engine.translate_batch([TEXT] * RUNS, beam_size=beam, num_hypotheses=beam, return_scores=True,
                                     max_decoding_length=steps, return_end_token=True, forced_eos=False,
                                     search_rules="ctranslate2", seed=11, **sampling)
    return [{tuple(tok.convert_ids_to_tokens(t)): s for t, s in zip(r.tokens, r.scores)} for r in results]


@pytest.mark.parametrize("beam,steps,temperature,topk,topp", [(2, 1, 1.0, 0, 1.0), (4, 1, 1.5, 20, 1.0),
                                                              (2, 2, 1.5, 0, 0.9), (4, 2, 1.0, 10, 1.0)])
def test_beam_sampling_as_ctranslate2(model, beam, steps, temperature, topk, topp):
    sampling = dict(sampling_topk=topk, sampling_topp=topp, sampling_temperature=temperature)
    ours, theirs = our_runs(model, beam, steps, **sampling), ct2_runs(model, beam, steps, **sampling)
    assert len({frozenset(o) for o in ours}) > 10 and len({frozenset(t) for t in theirs}) > 10  # both sample
    scores: dict[tuple[str, ...], tuple[float, float]] = {}
    for hypothesis in set().union(*ours, *theirs):
        a = sum(hypothesis in o for o in ours) / RUNS
        b = sum(hypothesis in t for t in theirs) / RUNS
        p = (a + b) / 2
        assert abs(a - b) <= 5 * (2 * p * (1 - p) / RUNS) ** 0.5 + 2 / RUNS, (hypothesis, a, b)
        if a and b:
            scores[hypothesis] = (next(o[hypothesis] for o in ours if hypothesis in o),
                                  next(t[hypothesis] for t in theirs if hypothesis in t))
    # a hypothesis's score does not depend on the draw: its log-probability, untempered, over its length ** 1
    assert len(scores) > 3
    for hypothesis, (a, b) in scores.items():
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3), hypothesis
