"""pyengine against Hugging Face's own M2M100 (the NLLB-200 architecture) forward pass and `generate`:
pre-norm layers with final norms, fairseq positions offset by pad + 1, forced target-language token."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import pad_batch, randomize_

VOCAB, PAD, EOS, LANG_DE = 90, 1, 2, 85
ATOL = 1e-4


def build_m2m100(path, *, d_model=36, heads=3, ffn=52, layers=(2, 2), activation="relu", seed=0):
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration
    cfg = M2M100Config(vocab_size=VOCAB, d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
                       encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
                       decoder_ffn_dim=ffn + 4, activation_function=activation, pad_token_id=PAD, bos_token_id=0,
                       eos_token_id=EOS, decoder_start_token_id=EOS, max_position_embeddings=128, scale_embedding=True)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(cfg)
    randomize_(model, seed)
    # bad_words_ids: a generated pad would shift HF's later positions (they count non-pad tokens)
    model.generation_config = GenerationConfig(num_beams=4, max_length=30, forced_bos_token_id=LANG_DE,
                                               bad_words_ids=[[PAD]], pad_token_id=PAD, eos_token_id=EOS,
                                               decoder_start_token_id=EOS)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[("relu", 36, 3), ("gelu", 40, 5)], ids=["relu-d36", "gelu-d40"])
def pair(request, tmp_path_factory):
    from transformers import M2M100ForConditionalGeneration
    act, d, heads = request.param
    path = build_m2m100(tmp_path_factory.mktemp("m2m"), activation=act, d_model=d, heads=heads, seed=d)
    return pyengine.Engine.load(path), M2M100ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _sources(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, LANG_DE, (int(torch.randint(1, 14, (1,), generator=gen)),), generator=gen).tolist()
            + [EOS] for _ in range(n)]


def test_detected_as_m2m100(pair):
    engine, _ = pair
    assert engine.source.startswith("hf-m2m100:") and engine.defaults.forced_bos_token == LANG_DE


def test_encoder_and_step_logits_match_hf(pair):
    engine, hf = pair
    src = _sources(6, seed=1)
    x, mask = pad_batch(src, PAD)
    tgt = torch.randint(3, VOCAB, (len(src), 7), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = EOS
    with torch.no_grad():
        ref_enc = hf.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=tgt).logits
        hidden = engine.model.encode(x, mask.sum(1))
        memory = engine.model.memory(hidden, mask.sum(1))
        cache = engine.model.new_cache(len(src), 8, torch.device("cpu"), torch.float32)
        ours = torch.cat([engine.model.decode(tgt[:, t:t + 1], t, cache, memory) for t in range(7)], 1)
    valid = mask.bool()
    assert torch.allclose(hidden[valid], ref_enc[valid], atol=ATOL, rtol=0)
    assert torch.allclose(ours, ref, atol=ATOL, rtol=0), (ours - ref).abs().max()


def _strip(seq):
    assert seq[0] == EOS
    out = []
    for t in seq[1:]:
        if t == EOS:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("beam", [1, 2, 4])
def test_generate_with_forced_language_matches_hf(pair, beam):
    engine, hf = pair
    src = _sources(7, seed=10 + beam)
    x, mask = pad_batch(src, PAD)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, num_beams=beam, num_return_sequences=beam,
                          max_new_tokens=12, output_scores=True, return_dict_in_generate=True)
    ours = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=12)
    seqs = ref.sequences.view(len(src), beam, -1).tolist()
    for i in range(len(src)):
        assert ours[i].tokens == [_strip(s) for s in seqs[i]], f"sentence {i}"
        assert all(t[0] == LANG_DE for t in ours[i].tokens)
        if beam > 1:
            expected = ref.sequences_scores.view(len(src), beam)[i]
            assert torch.allclose(torch.tensor(ours[i].scores), expected, atol=ATOL, rtol=0)
