"""return_attention and coverage_penalty. The attention of every returned hypothesis (greedy and beam
n-best, with dropped rows and a target prefix) is checked against Hugging Face's own forward pass
teacher-forced on that hypothesis (`output_attentions`: last layer's cross-attention, mean of heads);
coverage-penalized scores against the penalty computed from that reference attention."""
from __future__ import annotations

import math

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_marian(tmp_path_factory.mktemp("att"), **ARCHS["swish-shared"])


@pytest.fixture(scope="module")
def pair(model_path):
    from transformers import MarianMTModel
    path = model_path
    hf = MarianMTModel.from_pretrained(path, attn_implementation="eager").eval()  # sdpa returns no weights
    return pyengine.Engine.load(path), hf


def hf_attention(hf, cfg, source: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), len(source)): the last layer's cross-attention when HF predicts each of `tokens`."""
    decoder_input = torch.tensor([[cfg.decoder_start_id] + tokens[:-1]]) if tokens else None
    if decoder_input is None:
        return torch.zeros(0, len(source))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([source]), decoder_input_ids=decoder_input, output_attentions=True)
    return out.cross_attentions[-1][0].mean(dim=0).double()


def coverage(att: torch.Tensor, beta: float) -> float:
    total = att.sum(dim=0)
    return beta * sum(math.log(min(float(c), 1.0)) for c in total if c > 0)


@pytest.mark.parametrize("beam,nbest", [(1, 1), (4, 4)])
def test_attention_of_each_hypothesis_matches_hf(pair, beam, nbest):
    engine, hf = pair
    cfg = engine.config
    src = random_sources(9, cfg.src_vocab_size, seed=11)  # mixed lengths: rows finish and leave the batch
    got = engine.generate(src, beam_size=beam, num_hypotheses=nbest, max_decoding_length=14, return_attention=True)
    plain = engine.generate(src, beam_size=beam, num_hypotheses=nbest, max_decoding_length=14)
    for source, g, p in zip(src, got, plain):
        assert g.tokens == p.tokens and g.scores == p.scores  # asking for attention changes nothing else
        assert p.attention is None and len(g.attention) == nbest
        for tokens, att in zip(g.tokens, g.attention):
            ours = torch.tensor(att, dtype=torch.float64).view(len(tokens), len(source))
            torch.testing.assert_close(ours, hf_attention(hf, cfg, source, tokens), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_asking_for_attention_changes_no_token_or_score(model_path, dtype):
    """In every dtype: a step that returns attention runs the Python layers (the C++ step's operations, equal to the
    bit) and takes its candidates from the same output layer as a plain step (the fused log-softmax + top-k where the
    linears are pyengine's own), so the scores are the same bits."""
    engine = pyengine.Engine.load(model_path, dtype=dtype)
    src = random_sources(9, engine.config.src_vocab_size, seed=11)
    for beam in (1, 4):
        got = engine.generate(src, beam_size=beam, num_hypotheses=2 if beam > 1 else 1, max_decoding_length=14,
                              return_attention=True)
        plain = engine.generate(src, beam_size=beam, num_hypotheses=2 if beam > 1 else 1, max_decoding_length=14)
        assert [(g.tokens, g.scores) for g in got] == [(p.tokens, p.scores) for p in plain]


def test_attention_with_a_target_prefix_covers_the_prefix_tokens(pair):
    engine, hf = pair
    cfg = engine.config
    src = random_sources(4, cfg.src_vocab_size, seed=5)
    prefixes = [[5, 6], [7, 8], [9, 10], [11, 12]]
    got = engine.generate(src, target_prefix=prefixes, beam_size=3, max_decoding_length=10, return_attention=True)
    for source, g in zip(src, got):
        tokens = g.tokens[0]
        assert tokens[:2] in prefixes
        ours = torch.tensor(g.attention[0], dtype=torch.float64)
        torch.testing.assert_close(ours, hf_attention(hf, cfg, source, tokens), rtol=0, atol=2e-5)


@pytest.mark.parametrize("beam", [1, 4])
def test_coverage_penalty_rescores_and_reranks(pair, beam):
    engine, hf = pair
    cfg = engine.config
    beta = 0.4
    src = random_sources(12, cfg.src_vocab_size, seed=3)
    plain = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=14)
    penalized = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=14,
                                coverage_penalty=beta)
    reranked = 0
    for source, p, c in zip(src, plain, penalized):
        # the search is the same; each hypothesis gains its penalty, from HF's attention, and the list is re-sorted
        expected = sorted(((s + coverage(hf_attention(hf, cfg, source, t), beta), t) for s, t in zip(p.scores, p.tokens)),
                          key=lambda st: -st[0])
        assert [t for _, t in expected] == c.tokens
        torch.testing.assert_close(torch.tensor(c.scores, dtype=torch.float64),
                                   torch.tensor([s for s, _ in expected], dtype=torch.float64), rtol=0, atol=1e-4)
        reranked += c.tokens != p.tokens
    if beam > 1:
        assert reranked > 0, "beta too small to change any ranking: the test would not notice the option ignored"
    else:
        assert any(abs(a.scores[0] - b.scores[0]) > 1e-3 for a, b in zip(plain, penalized))


def test_attention_options_are_validated(pair):
    engine, _ = pair
    with pytest.raises(pyengine.OptionError, match="return_attention"):
        engine.generate([[5, 0]], return_attention="yes")
    with pytest.raises(pyengine.OptionError, match="coverage_penalty"):
        engine.generate([[5, 0]], coverage_penalty="0.2")


def test_translate_returns_attention_rows_per_token(text_model_dir):
    engine = pyengine.Engine.load(text_model_dir)
    texts = ["a short one", "", "another sentence to translate here"]
    out = engine.translate_batch(texts, beam_size=2, max_decoding_length=8, return_attention=True)
    assert out[1].attention == [[]]
    for text, t in zip(texts, out):
        n_source = len(engine.tokenizer.encode(text)) if text else 0
        for tokens, att in zip(t.tokens, t.attention):
            assert len(att) == len(tokens)
            assert all(len(row) == n_source and abs(sum(row) - 1.0) < 1e-4 for row in att)
