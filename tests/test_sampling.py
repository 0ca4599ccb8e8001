"""Sampling: the distribution of sampled tokens against a reference computed here from the model's own
logits (temperature, top-k, top-p), reproducibility by seed, and argmax for sampling_topk=1."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import build_marian

SRC = [7, 8, 9, 0]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # a flat output distribution (small embeddings) so that sampling has many tokens to choose from
    return build_marian(tmp_path_factory.mktemp("sampling"), vocab=40, d_model=24, heads=2, ffn=32, seed=8)


@pytest.fixture(scope="module")
def engine(model_path):
    return pyengine.Engine.load(model_path)


def first_step_probs(engine, temperature, topk, topp) -> torch.Tensor:
    """Reference: the first token's sampling distribution, straight from the formulas."""
    model, cfg = engine.model, engine.config
    with torch.inference_mode():
        src = torch.tensor([SRC])
        from pyengine.model import ForcedDecoder
        forced = ForcedDecoder(model, src, torch.tensor([len(SRC)]), 4)
        logits = forced.logits(torch.tensor([[cfg.decoder_start_id]]))[0, -1].double()
    logits = logits.clone()  # a normal tensor, outside inference mode
    for banned in engine.defaults.suppress_tokens:
        logits[banned] = float("-inf")
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    if topk > 1:  # HF's order: top-k first, then top-p over the renormalized survivors
        order = order[:topk]
    kept_mass = sum(probs[t].item() for t in order)
    keep, mass = [], 0.0
    for token in order:
        if mass >= topp:
            break
        keep.append(token)
        mass += probs[token].item() / kept_mass
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("temperature,topk,topp", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.5, 0, 0.6), (1.0, 8, 0.8)])
def test_first_token_distribution(engine, temperature, topk, topp):
    n = 4000
    out = engine.generate([SRC] * n, max_decoding_length=1, forced_eos=False, sampling_topk=topk,
                          sampling_topp=topp, sampling_temperature=temperature, seed=123)
    counts = torch.bincount(torch.tensor([o.tokens[0][0] if o.tokens[0] else engine.config.eos_id for o in out]),
                            minlength=engine.config.tgt_vocab_size).double()
    expected = first_step_probs(engine, temperature, topk, topp)
    assert counts[expected == 0].sum() == 0, "sampled a token the filters exclude"
    sigma = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sigma + 1).all()
    assert (expected > 0).sum() > 1  # the case really samples among several tokens


def test_seed_repeats_and_topk_one_is_argmax(engine):
    kwargs = dict(max_decoding_length=8, sampling_topk=0, sampling_temperature=1.2)
    a = engine.generate([SRC] * 20, seed=7, **kwargs)
    b = engine.generate([SRC] * 20, seed=7, **kwargs)
    c = engine.generate([SRC] * 20, seed=8, **kwargs)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]
    greedy = engine.generate([SRC], beam_size=1, max_decoding_length=8)
    assert engine.generate([SRC], sampling_topk=1, seed=3, max_decoding_length=8)[0].tokens == greedy[0].tokens


@pytest.mark.parametrize("steps,temperature,topk,topp", [(1, 1.0, 0, 1.0), (1, 1.2, 20, 0.98), (2, 1.0, 0, 1.0)])
def test_beam_sampling_as_hf_generate(engine, model_path, steps, temperature, topk, topp):
    """Beam search with sampling (HF's do_sample with num_beams: 2 × beam continuations drawn without replacement from
    softmax of the running score + the warped log-probs, over every beam): over 1500 runs, how often each hypothesis
    is among the 4 returned, against HF generate's own frequencies on the same model (5 sigma of two samples); two
    steps draw from the beams' running scores."""
    from transformers import MarianMTModel
    n, beam = 1500, 4
    got = engine.generate([SRC] * n, beam_size=beam, num_hypotheses=beam, max_decoding_length=steps, forced_eos=False,
                          sampling_topk=topk, sampling_topp=topp, sampling_temperature=temperature, seed=5)
    hf = MarianMTModel.from_pretrained(model_path).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        out = hf.generate(torch.tensor([SRC] * n), do_sample=True, num_beams=beam, num_return_sequences=beam,
                          max_new_tokens=steps, top_k=topk, top_p=topp, temperature=temperature,
                          forced_eos_token_id=None, early_stopping=False)
    special = {hf.config.eos_token_id, hf.config.pad_token_id}
    theirs = [{tuple(t for t in row[1:] if t not in special) for row in out[i * beam:(i + 1) * beam].tolist()}
              for i in range(n)]
    ours = [{tuple(h) for h in t.tokens} for t in got]
    assert all(len(t.tokens) == beam for t in got) and len({frozenset(o) for o in ours}) > 10  # it samples
    for hypothesis in set().union(*ours, *theirs):
        a = sum(hypothesis in o for o in ours) / n
        b = sum(hypothesis in t for t in theirs) / n
        p = (a + b) / 2
        assert abs(a - b) <= 5 * (2 * p * (1 - p) / n) ** 0.5 + 2 / n, (hypothesis, a, b)


def test_beam_sampling_under_other_rules_is_refused(engine):
    with pytest.raises(pyengine.OptionError, match="Hugging Face's beam sampling"):
        engine.generate([SRC], beam_size=2, sampling_topk=5, search_rules="onmt")


def test_top_p_below_float32_resolution_keeps_the_best_token(engine):
    """top-p smaller than the smallest float32 keeps the most probable token (HF's min_tokens_to_keep=1): argmax,
    not an empty set of candidates."""
    greedy = engine.generate([SRC], beam_size=1, max_decoding_length=8)[0].tokens
    assert engine.generate([SRC], sampling_topp=1e-300, seed=3, max_decoding_length=8)[0].tokens == greedy
