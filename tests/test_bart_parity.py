"""pyengine against Hugging Face's own BART (post-norm) and mBART (pre-norm, final norms) forward pass and
`generate`: learned positions offset by 2, layernorm_embedding, final_logits_bias, GELU."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import (encoder_and_stepwise_logits, fairseq_style_sources,
                      hf_encoder_and_logits, pad_batch, randomize_)

VOCAB, PAD, EOS = 90, 1, 2
ATOL = 1e-4


def build(path, kind: str, seed: int):
    from transformers import (BartConfig, BartForConditionalGeneration, GenerationConfig, MBartConfig,
                              MBartForConditionalGeneration)
    config_cls, model_cls = (BartConfig, BartForConditionalGeneration) if kind == "bart" else \
        (MBartConfig, MBartForConditionalGeneration)
    cfg = config_cls(vocab_size=VOCAB, d_model=36, encoder_layers=2, decoder_layers=2, encoder_attention_heads=3,
                     decoder_attention_heads=3, encoder_ffn_dim=52, decoder_ffn_dim=44, max_position_embeddings=64,
                     pad_token_id=PAD, bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS,
                     forced_eos_token_id=EOS, scale_embedding=kind == "mbart")
    torch.manual_seed(seed)
    model = model_cls(cfg)
    randomize_(model, seed)
    with torch.no_grad():  # learned positions: random too, so a wrong offset shows
        for emb in (model.model.encoder.embed_positions, model.model.decoder.embed_positions):
            emb.weight.copy_(torch.randn(emb.weight.shape, generator=torch.Generator().manual_seed(seed)))
    model.generation_config = GenerationConfig(num_beams=4, max_length=30, forced_bos_token_id=0,
                                               forced_eos_token_id=EOS, bad_words_ids=[[PAD]], pad_token_id=PAD,
                                               eos_token_id=EOS, decoder_start_token_id=EOS)
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["bart", "mbart"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build(path, request.param, seed=5 if request.param == "bart" else 6)
    return pyengine.Engine.load(path), hf


def _sources(n, seed):
    return fairseq_style_sources(n, VOCAB, EOS, seed)


def test_encoder_and_step_logits_match_hf(pair):
    engine, hf = pair
    src = _sources(6, 1)
    x, mask = pad_batch(src, PAD)
    tgt = torch.randint(3, VOCAB, (6, 7), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = EOS
    ref_enc, ref = hf_encoder_and_logits(hf, x, mask, tgt)
    hidden, ours = encoder_and_stepwise_logits(engine, x, mask, tgt)
    valid = mask.bool()
    assert torch.allclose(hidden[valid], ref_enc[valid], atol=ATOL, rtol=0)
    assert torch.allclose(ours, ref, atol=ATOL, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize("beam", [1, 4])
def test_generate_matches_hf(pair, beam):
    engine, hf = pair
    src = _sources(7, 10 + beam)
    x, mask = pad_batch(src, PAD)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, num_beams=beam, num_return_sequences=beam,
                          max_new_tokens=12, output_scores=True, return_dict_in_generate=True)
    ours = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=12)
    seqs = ref.sequences.view(7, beam, -1).tolist()
    for i in range(7):
        expected = []
        for s in seqs[i]:
            s = s[1:]
            expected.append(s[:s.index(EOS)] if EOS in s else [t for t in s if t != PAD])
        assert ours[i].tokens == expected, f"sentence {i}"
        if beam > 1:
            assert torch.allclose(torch.tensor(ours[i].scores), ref.sequences_scores.view(7, beam)[i], atol=ATOL)


def test_text_translation_says_tokenizer_is_missing(pair):
    engine, _ = pair
    with pytest.raises(pyengine.PyEngineError, match="has no tokenizer pyengine reads"):
        engine.translate(["hello"])


TEXTS = ["the cat on the mat", "Hello, World!", "in the inner ring, there", "  spaced   out  ", "émigré café"]


def _bart_tokenizer(path):
    """A byte-level BPE tokenizer made by transformers' BartTokenizer and saved beside the model (tokenizer.json)."""
    from transformers import BartTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    byte_chars = bytes_to_unicode()
    for ch in sorted({byte_chars[b] for text in TEXTS for b in text.encode("utf-8")}):
        vocab.setdefault(ch, len(vocab))
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("o", "n"), ("e", "r")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<mask>"] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = BartTokenizer(vocab=vocab, merges=merges)
    tok.save_pretrained(path)
    return tok


def test_bart_tokenizer_json_translate_matches_hf(tmp_path):
    hf = build(tmp_path, "bart", seed=9)
    tok = _bart_tokenizer(tmp_path)
    from transformers import BartTokenizer
    tok = BartTokenizer.from_pretrained(tmp_path)
    engine = pyengine.Engine.load(tmp_path)
    texts = TEXTS
    for text in texts:
        assert engine.tokenizer.encode(text) == tok(text).input_ids, text
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = tok.batch_decode(hf.generate(**batch, num_beams=3, max_new_tokens=12), skip_special_tokens=True)
    assert engine.translate(texts, beam_size=3, max_decoding_length=12) == expected
    assert any(e.strip() for e in expected)  # the comparison has text to compare


def test_mbart50_text_translation_matches_hf(tmp_path):
    """A random mBART-50-shaped model with MBart50Tokenizer's files as `save_pretrained` writes them
    (tokenizer.json with the language codes as added tokens): translate(source_lang=, target_lang=) equals the
    tokenizer + generate(forced_bos_token_id=the target language) — ids and text, greedy and beam 4."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer, GenerationConfig, MBartConfig, MBartForConditionalGeneration

    from conftest import SAMPLE_TEXT
    raw = tmp_path / "raw"
    raw.mkdir()
    spm.SentencePieceTrainer.train(input=str(SAMPLE_TEXT), model_prefix=str(raw / "sp"), vocab_size=300,
                                   model_type="unigram", minloglevel=2)
    (raw / "sp.model").rename(raw / "sentencepiece.bpe.model")
    (raw / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MBart50Tokenizer",
                                                           "src_lang": "en_XX", "tgt_lang": "de_DE"}))
    model_dir = tmp_path / "mbart50"
    tok = AutoTokenizer.from_pretrained(raw)  # transformers converts the sentencepiece model, as for mbart-50
    tok.save_pretrained(model_dir)
    cfg = MBartConfig(vocab_size=len(tok), d_model=36, encoder_layers=2, decoder_layers=2, encoder_attention_heads=3,
                      decoder_attention_heads=3, encoder_ffn_dim=52, decoder_ffn_dim=44, max_position_embeddings=64,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                      scale_embedding=True)
    torch.manual_seed(3)
    model = MBartForConditionalGeneration(cfg)
    randomize_(model, 3)
    model.generation_config = GenerationConfig(num_beams=4, max_length=30, forced_eos_token_id=2, pad_token_id=1,
                                               eos_token_id=2, decoder_start_token_id=2)
    model.save_pretrained(model_dir)
    hf = MBartForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, src_lang="fr_XX")
    engine = pyengine.Engine.load(model_dir)
    texts = ["Open the file in a new window.", "The printer is out of paper", "Save your changes?"]
    for text in texts:
        assert engine.tokenizer.encode(text, source_lang="fr_XX") == tok(text).input_ids
    batch = tok(texts, return_tensors="pt", padding=True)
    for beam in (1, 4):
        with torch.no_grad():
            out = hf.generate(**batch, num_beams=beam, max_new_tokens=12,
                              forced_bos_token_id=tok.convert_tokens_to_ids("de_DE"))
        got = engine.translate_batch(texts, source_lang="fr_XX", target_lang="de_DE", beam_size=beam,
                                     max_decoding_length=12)
        assert [t.tokens[0] for t in got] == [[i for i in row.tolist()[1:] if i not in (1, 2)] for row in out]
        assert [t.hypotheses[0] for t in got] == tok.batch_decode(out, skip_special_tokens=True)
        assert all(t.tokens[0][0] == tok.convert_tokens_to_ids("de_DE") for t in got)
        assert any(t.hypotheses[0].strip() for t in got)  # there is text to compare
    with pytest.raises(pyengine.OptionError, match="unknown language 'xx_YY'"):
        engine.translate(["x"], target_lang="xx_YY")


def test_mbart_tokenizer_json_puts_the_language_after_the_text(tmp_path):
    """mBART (cc25)'s MBartTokenizer: pieces + </s> + source language, read from its saved tokenizer.json."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from conftest import SAMPLE_TEXT
    from pyengine.tokenizer import NllbTokenizerJson
    spm.SentencePieceTrainer.train(input=str(SAMPLE_TEXT), model_prefix=str(tmp_path / "sp"), vocab_size=300,
                                   model_type="unigram", minloglevel=2)
    (tmp_path / "sp.model").rename(tmp_path / "sentencepiece.bpe.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MBartTokenizer",
                                                                "src_lang": "en_XX", "tgt_lang": "ro_RO"}))
    AutoTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "saved")
    tok = AutoTokenizer.from_pretrained(tmp_path / "saved", src_lang="ro_RO")
    ours = NllbTokenizerJson(tmp_path / "saved")
    for text in ("Open the file.", "The printer is out of paper"):
        assert ours.encode(text, source_lang="ro_RO") == tok(text).input_ids
        assert ours.encode(text, source_lang="ro_RO")[-2:] == [tok.eos_token_id, tok.convert_tokens_to_ids("ro_RO")]
