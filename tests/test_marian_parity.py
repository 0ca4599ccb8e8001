"""pyengine against Hugging Face's own MarianMTModel forward pass and `generate` (float32)."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, copy_with_config, hf_model, pad_batch, random_sources

ATOL = 1e-4


@pytest.fixture(scope="module")
def pair(marian_dir):
    return pyengine.Engine.load(marian_dir), hf_model(marian_dir)


def _sources(engine, n=7, seed=0):
    return random_sources(n, engine.config.src_vocab_size, seed)


def test_encoder_output_matches_hf(pair):
    engine, hf = pair
    src = _sources(engine)
    x, mask = pad_batch(src, engine.config.pad_id)
    with torch.no_grad():
        ref = hf.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        ours = engine.model.encode(x, mask.sum(1))
    valid = mask.bool()
    assert torch.allclose(ours[valid], ref[valid], atol=ATOL, rtol=0)


def test_step_logits_match_hf_forward(pair):
    """Teacher-forced logits, decoded all at once (causal) and one token per step over the KV cache."""
    engine, hf = pair
    src = _sources(engine, seed=1)
    x, mask = pad_batch(src, engine.config.pad_id)
    gen = torch.Generator().manual_seed(5)
    tgt = torch.randint(1, engine.config.tgt_vocab_size - 1, (len(src), 9), generator=gen)
    tgt[:, 0] = engine.config.decoder_start_id
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=tgt).logits
        from pyengine.model import ForcedDecoder
        all_at_once = ForcedDecoder(engine.model, x, mask.sum(1), 16).logits(tgt)
        forced = ForcedDecoder(engine.model, x, mask.sum(1), 16)
        stepwise = torch.cat([forced.logits(tgt[:, t:t + 1]) for t in range(tgt.shape[1])], 1)
    assert torch.allclose(all_at_once, ref, atol=ATOL, rtol=0), (all_at_once - ref).abs().max()
    assert torch.allclose(stepwise, ref, atol=ATOL, rtol=0), (stepwise - ref).abs().max()


def _hf_generate(hf, src, pad, **kwargs):
    x, mask = pad_batch(src, pad)
    with torch.no_grad():
        return hf.generate(input_ids=x, attention_mask=mask, return_dict_in_generate=True, output_scores=True,
                           **kwargs)


def _strip(seq: list[int], start: int, eos: int, pad: int) -> list[int]:
    assert seq[0] == start
    out = []
    for t in seq[1:]:
        if t == eos:
            break
        out.append(t)
    return out


def test_greedy_tokens_match_hf(pair):
    engine, hf = pair
    cfg = engine.config
    src = _sources(engine, n=9, seed=2)
    ref = _hf_generate(hf, src, cfg.pad_id, num_beams=1, max_new_tokens=20, output_logits=True)
    ours = engine.generate(src, beam_size=1, max_decoding_length=20, return_scores=True)
    for i, seq in enumerate(ref.sequences.tolist()):
        assert ours[i].tokens[0] == _strip(seq, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id), f"sentence {i}"
    # greedy score = sum of the chosen tokens' log-probs (raw logits) / length; a forced EOS counts 0, as in beam
    logp = torch.stack([torch.log_softmax(s, -1) for s in ref.logits], 1)  # (B, T, V)
    for i, seq in enumerate(ref.sequences.tolist()):
        n = min(len(ours[i].tokens[0]) + 1, 20)
        picked = logp[i, torch.arange(n), torch.tensor(seq[1:n + 1])]
        if n == 20:
            picked[-1] = 0.0
        assert ours[i].scores[0] == pytest.approx(float(picked.sum()) / n, abs=ATOL)


@pytest.mark.parametrize("beam", [2, 4, 5])
@pytest.mark.parametrize("length_penalty", [0.6, 1.0, 2.0])
def test_beam_nbest_and_scores_match_hf(pair, beam, length_penalty):
    engine, hf = pair
    cfg = engine.config
    src = _sources(engine, n=6, seed=10 + beam)
    ref = _hf_generate(hf, src, cfg.pad_id, num_beams=beam, num_return_sequences=beam, max_new_tokens=16,
                       length_penalty=length_penalty)
    ours = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=16,
                           length_penalty=length_penalty, return_scores=True)
    seqs = ref.sequences.view(len(src), beam, -1).tolist()
    scores = ref.sequences_scores.view(len(src), beam)
    for i in range(len(src)):
        expected = [_strip(s, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id) for s in seqs[i]]
        assert ours[i].tokens == expected, f"sentence {i}"
        assert torch.allclose(torch.tensor(ours[i].scores), scores[i], atol=ATOL, rtol=0), f"sentence {i}"


def test_defaults_come_from_generation_config(pair):
    """No options: beam size, max length, bad words and forced EOS as generation_config.json says."""
    engine, hf = pair
    cfg = engine.config
    assert engine.defaults.beam_size == 4 and engine.defaults.max_decoding_length == 39
    assert engine.defaults.suppress_tokens == (cfg.pad_id,) and engine.defaults.forced_eos
    src = _sources(engine, n=5, seed=3)
    ref = _hf_generate(hf, src, cfg.pad_id)
    ours = engine.generate(src)
    for i, seq in enumerate(ref.sequences.tolist()):
        assert ours[i].tokens[0] == _strip(seq, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id)


def test_min_decoding_length_matches_hf(pair):
    engine, hf = pair
    cfg = engine.config
    src = _sources(engine, n=4, seed=4)
    for beam in (1, 3):
        ref = _hf_generate(hf, src, cfg.pad_id, num_beams=beam, max_new_tokens=14, min_new_tokens=9)
        ours = engine.generate(src, beam_size=beam, max_decoding_length=14, min_decoding_length=9)
        for i, seq in enumerate(ref.sequences.tolist()):
            assert ours[i].tokens[0] == _strip(seq, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id)
            assert len(ours[i].tokens[0]) >= 8  # 9 generated tokens at least, EOS included



@pytest.mark.parametrize("beam", [1, 4])
def test_forced_eos_step_matches_hf_without_the_output_layer(pair, beam):
    """min = max length: every hypothesis reaches HF's forced-EOS step, whose scores the processor decides (EOS 0,
    the rest -inf): the same n-best and scores as HF, and that step ran neither the output layer nor (the cohort
    ends with it) the decoder."""
    engine, hf = pair
    cfg = engine.config
    src = _sources(engine, n=5, seed=21)
    ref = _hf_generate(hf, src, cfg.pad_id, num_beams=beam, num_return_sequences=beam, max_new_tokens=12,
                       min_new_tokens=12)
    engine.stats = pyengine.decoding.RuntimeStats()
    ours = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=12, min_decoding_length=12,
                           return_scores=True)
    seqs = ref.sequences.view(len(src), beam, -1).tolist()
    scores = ref.sequences_scores.view(len(src), beam) if beam > 1 else None
    for i in range(len(src)):
        assert ours[i].tokens == [_strip(s, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id) for s in seqs[i]]
        assert all(len(t) == 11 for t in ours[i].tokens)  # 12 generated, the forced EOS last
        if scores is not None:
            assert torch.allclose(torch.tensor(ours[i].scores), scores[i], atol=ATOL, rtol=0), f"sentence {i}"
    # one cohort: 11 steps with the output layer (fused with the top-k where the linears are pyengine's own), the last
    # none
    assert engine.stats.outputs == {engine.backends["output_layer"]: 11, "none": 1}
    assert sum(engine.stats.decoder_steps.values()) == engine.stats.steps == 11


@pytest.mark.parametrize("key", ["normalize_before", "normalize_embedding", "add_final_layer_norm"])
def test_keys_hf_ignores_are_ignored_with_a_warning(tmp_path, key):
    """A MarianMTModel saved with normalize_before=True (or another norm key HF's Marian does not read): HF loads it
    and runs post-norm, CTranslate2's converter gives HF's tokens; pyengine warns that the key is ignored and gives
    HF generate's tokens and scores, greedy and beam."""
    base = build_marian(tmp_path / "base", **ARCHS["swish-shared"])
    path = copy_with_config(base, tmp_path / "model", **{key: True})
    hf = hf_model(path)
    with pytest.warns(UserWarning, match=f"{key}=true, which Hugging Face's MarianMTModel ignores"):
        engine = pyengine.Engine.load(path)
    cfg = engine.config
    src = _sources(engine, n=6, seed=21)
    for beam in (1, 4):
        ref = _hf_generate(hf, src, cfg.pad_id, num_beams=beam, num_return_sequences=beam, max_new_tokens=16)
        ours = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=16)
        seqs = ref.sequences.view(len(src), beam, -1).tolist()
        for i in range(len(src)):
            assert ours[i].tokens == [_strip(s, cfg.decoder_start_id, cfg.eos_id, cfg.pad_id) for s in seqs[i]]
            if beam > 1:
                assert torch.allclose(torch.tensor(ours[i].scores), ref.sequences_scores.view(len(src), beam)[i],
                                      atol=ATOL, rtol=0)
