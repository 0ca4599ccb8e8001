"""Decoding options against Hugging Face `generate` with the same options, greedy and beam."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, hf_model, pad_batch, random_sources


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # a weakly peaked model repeats itself, so the options have something to act on
    path = build_marian(tmp_path_factory.mktemp("opts"), **dict(ARCHS["relu-separate"], seed=21))
    return pyengine.Engine.load(path), hf_model(path)


def _strip(seq, start, eos):
    assert seq[0] == start
    return seq[1:seq.index(eos, 1)] if eos in seq[1:] else seq[1:]


def _compare(pair, beam, hf_kwargs, our_kwargs, seed):
    engine, hf = pair
    cfg = engine.config
    src = random_sources(8, cfg.src_vocab_size, seed=seed)
    x, mask = pad_batch(src, cfg.pad_id)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, num_beams=beam, max_new_tokens=18, **hf_kwargs)
    got = engine.generate(src, beam_size=beam, max_decoding_length=18, **our_kwargs)
    expected = [[t for t in _strip(s, cfg.decoder_start_id, cfg.eos_id) if t != cfg.pad_id] for s in ref.tolist()]
    assert [g.tokens[0] for g in got] == expected
    return got


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_matches_hf(pair, beam, n):
    got = _compare(pair, beam, {"no_repeat_ngram_size": n}, {"no_repeat_ngram_size": n}, seed=n)
    for g in got:  # and the property itself holds
        toks = g.tokens[0]
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        assert len(grams) == len(set(grams))


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.5])
def test_repetition_penalty_matches_hf(pair, beam, penalty):
    _compare(pair, beam, {"repetition_penalty": penalty}, {"repetition_penalty": penalty}, seed=int(penalty * 10))


def test_options_change_the_output(pair):
    """Without the options these sources repeat themselves: the tests above exercise real bans."""
    engine, _ = pair
    src = random_sources(8, engine.config.src_vocab_size, seed=2)
    plain = [g.tokens[0] for g in engine.generate(src, beam_size=1, max_decoding_length=18)]
    assert any(len(set(zip(t, t[1:]))) < len(t) - 1 for t in plain)
    banned = [g.tokens[0] for g in engine.generate(src, beam_size=1, max_decoding_length=18, no_repeat_ngram_size=2)]
    assert banned != plain


def test_bad_option_values(pair):
    engine, _ = pair
    with pytest.raises(pyengine.OptionError, match="repetition_penalty"):
        engine.generate([[5, 0]], repetition_penalty=0)
    with pytest.raises(pyengine.OptionError, match="no_repeat_ngram_size"):
        engine.generate([[5, 0]], no_repeat_ngram_size=-1)
