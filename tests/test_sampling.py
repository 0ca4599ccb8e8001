"""Sampling: the distribution of sampled tokens against a reference computed here from the model's own
logits (temperature, top-k, top-p), reproducibility by seed, and argmax for sampling_topk=1."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import build_marian

SRC = [7, 8, 9, 0]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # a flat output distribution (small embeddings) so that sampling has many tokens to choose from
    path = build_marian(tmp_path_factory.mktemp("sampling"), vocab=40, d_model=24, heads=2, ffn=32, seed=8)
    return pyengine.Engine.load(path)


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


def test_sampling_with_beam_is_refused(engine):
    with pytest.raises(pyengine.OptionError, match="needs beam_size 1"):
        engine.generate([SRC], beam_size=2, sampling_topk=5)


def test_top_p_below_float32_resolution_keeps_the_best_token(engine):
    """top-p smaller than the smallest float32 keeps the most probable token (HF's min_tokens_to_keep=1): argmax,
    not an empty set of candidates."""
    greedy = engine.generate([SRC], beam_size=1, max_decoding_length=8)[0].tokens
    assert engine.generate([SRC], sampling_topp=1e-300, seed=3, max_decoding_length=8)[0].tokens == greedy
