"""target_prefix: forced first target tokens, against HF `generate` with the same decoder prompt."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, hf_model, pad_batch, random_sources, sample_lines


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = build_marian(tmp_path_factory.mktemp("prefix"), **ARCHS["swish-shared"])
    return pyengine.Engine.load(path), hf_model(path)


def _hf(hf, src, prefixes, cfg, beam, max_new=10):
    x, mask = pad_batch(src, cfg.pad_id)
    prompt = torch.tensor([[cfg.decoder_start_id] + p for p in prefixes])
    with torch.no_grad():
        return hf.generate(input_ids=x, attention_mask=mask, decoder_input_ids=prompt, num_beams=beam,
                           num_return_sequences=beam, max_new_tokens=max_new, output_scores=True,
                           return_dict_in_generate=True)


def _strip(seq, cfg):
    seq = seq[1:]
    return seq[:seq.index(cfg.eos_id)] if cfg.eos_id in seq else [t for t in seq if t != cfg.pad_id]


@pytest.mark.parametrize("beam", [1, 4])
def test_prefix_matches_hf_decoder_prompt(pair, beam):
    engine, hf = pair
    cfg = engine.config
    src = random_sources(6, cfg.src_vocab_size, seed=beam)
    gen = torch.Generator().manual_seed(beam)
    prefixes = torch.randint(2, cfg.tgt_vocab_size - 1, (6, 3), generator=gen).tolist()
    ref = _hf(hf, src, prefixes, cfg, beam)
    ours = engine.generate(src, target_prefix=prefixes, beam_size=beam, num_hypotheses=beam, max_decoding_length=10)
    seqs = ref.sequences.view(6, beam, -1).tolist()
    for i in range(6):
        assert ours[i].tokens == [_strip(s, cfg) for s in seqs[i]], f"sentence {i}"
        assert all(t[:3] == prefixes[i] for t in ours[i].tokens)
        if beam > 1:
            assert torch.allclose(torch.tensor(ours[i].scores), ref.sequences_scores.view(6, beam)[i], atol=1e-4)


def test_ragged_prefixes_in_one_call(pair):
    """Sentences with prefixes of different lengths (and none) in one call = each group on its own."""
    engine, hf = pair
    cfg = engine.config
    src = random_sources(6, cfg.src_vocab_size, seed=9)
    prefixes = [[5], [], [7, 8], [9], [], [10, 11]]
    together = engine.generate(src, target_prefix=prefixes, beam_size=2, max_decoding_length=8)
    for i, p in enumerate(prefixes):
        alone = engine.generate([src[i]], target_prefix=[p], beam_size=2, max_decoding_length=8)
        assert together[i].tokens == alone[0].tokens
        if p:
            ref = _hf(hf, [src[i]], [p], cfg, 2, max_new=8).sequences.view(1, 2, -1).tolist()[0]
            assert together[i].tokens[0] == _strip(ref[0], cfg)


def test_text_prefix(text_model_dir):
    engine = pyengine.Engine.load(text_model_dir)
    texts = sample_lines()[:3]
    plain = engine.translate_batch(texts, beam_size=2)
    start = engine.tokenizer.decode(plain[1].tokens[0][2:4])  # some other words to force
    forced = engine.translate_batch(texts, target_prefix=[None, start, ""], beam_size=2)
    assert forced[0].tokens == plain[0].tokens and forced[2].tokens == plain[2].tokens
    assert forced[1].hypotheses[0].startswith(start)
    with pytest.raises(pyengine.InputError, match="target_prefix has 1 items for 3 texts"):
        engine.translate(texts, target_prefix=["x"])
