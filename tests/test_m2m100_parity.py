"""pyengine against Hugging Face's own M2M100 (the NLLB-200 architecture) forward pass and `generate`:
pre-norm layers with final norms, fairseq positions offset by pad + 1, forced target-language token."""
from __future__ import annotations

import pytest
import torch

import pyengine
from conftest import (copy_with_config, encoder_and_stepwise_logits, fairseq_style_sources,
                      hf_encoder_and_logits, pad_batch, randomize_)

VOCAB, PAD, EOS, LANG_DE = 90, 1, 2, 85
ATOL = 1e-4


def build_m2m100(path, *, d_model=36, heads=3, ffn=52, layers=(2, 2), activation="relu", seed=0, vocab=VOCAB):
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration
    cfg = M2M100Config(vocab_size=vocab, d_model=d_model, encoder_layers=layers[0], decoder_layers=layers[1],
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
    return fairseq_style_sources(n, LANG_DE, EOS, seed)


def test_detected_as_m2m100(pair):
    engine, _ = pair
    assert engine.source.startswith("hf-m2m100:") and engine.defaults.forced_bos_token == LANG_DE


def test_encoder_and_step_logits_match_hf(pair):
    engine, hf = pair
    src = _sources(6, seed=1)
    x, mask = pad_batch(src, PAD)
    tgt = torch.randint(3, VOCAB, (len(src), 7), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = EOS
    ref_enc, ref = hf_encoder_and_logits(hf, x, mask, tgt)
    hidden, ours = encoder_and_stepwise_logits(engine, x, mask, tgt)
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


@pytest.fixture(scope="module")
def text_m2m100(tmp_path_factory):
    """A random M2M100 with a sentencepiece vocabulary trained on real text; HF's tokenizer built the way
    the published configs build it (language tokens registered as special tokens)."""
    import json

    import sentencepiece as spm
    from transformers import M2M100ForConditionalGeneration, M2M100Tokenizer

    from conftest import SAMPLE_TEXT
    path = tmp_path_factory.mktemp("m2m-text")
    spm.SentencePieceTrainer.train(input=str(SAMPLE_TEXT), model_prefix=str(path / "sp"), vocab_size=300,
                                   minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(path / "sp.model"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(proc.get_piece_size()):
        vocab.setdefault(proc.id_to_piece(i), len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "sp.model").rename(path / "sentencepiece.bpe.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"language_codes": "m2m100", "src_lang": "en"}))
    from pyengine.tokenizer import M2M100_LANGUAGE_CODES
    lang_tokens = [f"__{c}__" for c in M2M100_LANGUAGE_CODES["m2m100"]]
    size = len(vocab) + len(lang_tokens) + 8  # + fairseq's madeup words
    from transformers import GenerationConfig, M2M100Config
    cfg = M2M100Config(vocab_size=size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=PAD,
                       bos_token_id=0, eos_token_id=EOS, decoder_start_token_id=EOS, max_position_embeddings=256)
    torch.manual_seed(3)
    model = M2M100ForConditionalGeneration(cfg)
    randomize_(model, 3)
    model.generation_config = GenerationConfig(num_beams=2, max_length=20, bad_words_ids=[[PAD]], pad_token_id=PAD,
                                               eos_token_id=EOS, decoder_start_token_id=EOS)
    model.save_pretrained(path)
    hf_tok = M2M100Tokenizer(str(path / "vocab.json"), str(path / "sentencepiece.bpe.model"), src_lang="en",
                             tgt_lang="de", additional_special_tokens=lang_tokens)
    return path, hf_tok


def test_m2m100_tokenizer_matches_hf(text_m2m100):
    from conftest import sample_lines
    path, hf_tok = text_m2m100
    ours = pyengine.Engine.load(path).tokenizer
    lines = sample_lines()[:150] + ["", "a </s> inside", "__de__ written out", "  spaced  "]
    for line in lines:
        assert ours.encode(line) == hf_tok(line).input_ids, repr(line)
    hf_tok.src_lang = "fr"
    assert ours.encode(lines[0], source_lang="fr") == hf_tok(lines[0]).input_ids
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, len(ours.decoder) + 8, (int(torch.randint(1, 25, (1,), generator=gen)),),
                            generator=gen).tolist()
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("beam", [1, 2])
def test_translate_to_target_language_matches_hf(text_m2m100, beam):
    from transformers import M2M100ForConditionalGeneration

    from conftest import sample_lines
    path, hf_tok = text_m2m100
    hf_tok.src_lang = "en"
    hf = M2M100ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    texts = sample_lines()[:12]
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = hf.generate(**batch, num_beams=beam, forced_bos_token_id=hf_tok.get_lang_id("de"))
    engine = pyengine.Engine.load(path)
    got = engine.translate(texts, source_lang="en", target_lang="de", beam_size=beam)
    assert got == hf_tok.batch_decode(ref, skip_special_tokens=True)
    with pytest.raises(pyengine.OptionError, match="unknown language 'xx'"):
        engine.translate(texts, target_lang="xx")
    # replace_unknowns copies source pieces: M2M100's tokenizer does not map text to pieces (the Marian ones do)
    with pytest.raises(pyengine.OptionError, match="maps text to pieces; this model's \\(M2M100Tokenizer\\)"):
        engine.translate(texts, target_lang="de", replace_unknowns=True)


def test_nllb_directory_loads_for_ids_and_says_why_text_does_not(pair, tmp_path):
    """An NLLB-200 directory (M2M100 weights, NllbTokenizer files): generate() works, translate() names the gap."""
    import json
    import shutil
    engine, _ = pair
    nllb = tmp_path / "nllb"
    shutil.copytree(engine.source.split(":", 1)[1], nllb)
    (nllb / "sentencepiece.bpe.model").write_bytes(b"")
    (nllb / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NllbTokenizer"}))
    loaded = pyengine.Engine.load(nllb)
    assert loaded.generate([[5, 6, EOS]], beam_size=2)[0].tokens == engine.generate([[5, 6, EOS]], beam_size=2)[0].tokens
    with pytest.raises(pyengine.PyEngineError, match="no tokenizer.json"):
        loaded.translate(["hello"])


def test_wrong_inputs_name_the_file_and_problem(text_m2m100, tmp_path):
    import json
    import shutil
    path, _ = text_m2m100
    # a vocabulary larger than the embeddings
    big = tmp_path / "big-vocab"
    shutil.copytree(path, big)
    vocab = json.loads((big / "vocab.json").read_text())
    vocab.update({f"extra{i}": len(vocab) + i for i in range(500)})
    (big / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(pyengine.CheckpointError, match=r"big-vocab.*language token ids up to \d+ do not fit"):
        pyengine.Engine.load(big)
    # an architecture no loader reads
    with pytest.raises(pyengine.UnknownFormatError, match="no known model format"):
        pyengine.Engine.load(copy_with_config(path, tmp_path / "t5", model_type="t5"))
    # M2M100 weights under a Marian config: the tensors do not fit and the error says which
    with pytest.raises(pyengine.CheckpointError, match="missing tensor 'final_logits_bias'|matched nothing"):
        pyengine.Engine.load(copy_with_config(path, tmp_path / "marian", model_type="marian"))


def test_nllb_tokenizer_json_translate_matches_hf(tmp_path):
    """An NLLB-200 directory as transformers 5 saves it (tokenizer.json): translate(source_lang=, target_lang=)
    equals NllbTokenizer + generate(forced_bos_token_id=target language)."""
    from transformers import M2M100ForConditionalGeneration, NllbTokenizer
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in "\u2581abcdefghijklmnopqrstuvwxyzHW,!":
        vocab.setdefault(ch, len(vocab))
    merges = [("\u2581", "t"), ("h", "e"), ("\u2581t", "he"), ("i", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = NllbTokenizer(vocab=vocab, merges=merges, src_lang="eng_Latn", tgt_lang="deu_Latn")
    build_m2m100(tmp_path, seed=3, vocab=len(tok))
    tok.save_pretrained(tmp_path)
    engine = pyengine.Engine.load(tmp_path)
    hf = M2M100ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    texts = ["the cat in the hat", "Hello World!", "then, the thin one"]
    for src_lang, tgt_lang in (("eng_Latn", "deu_Latn"), ("fra_Latn", "eng_Latn")):
        tok.src_lang = src_lang
        batch = tok(texts, return_tensors="pt", padding=True)
        assert [engine.tokenizer.encode(t, source_lang=src_lang) for t in texts] == \
            [tok(t).input_ids for t in texts]
        with torch.no_grad():
            out = hf.generate(**batch, num_beams=2, max_new_tokens=10,
                              forced_bos_token_id=tok.convert_tokens_to_ids(tgt_lang))
        expected = tok.batch_decode(out, skip_special_tokens=True)
        assert engine.translate(texts, source_lang=src_lang, target_lang=tgt_lang, beam_size=2,
                                max_decoding_length=10) == expected
    with pytest.raises(pyengine.OptionError, match="unknown language 'xx_Yyyy'"):
        engine.translate(texts, target_lang="xx_Yyyy")
    legacy = NllbTokenizer(vocab=vocab, merges=merges, src_lang="fra_Latn", legacy_behaviour=True)
    legacy.save_pretrained(tmp_path)
    engine = pyengine.Engine.load(tmp_path)
    assert [engine.tokenizer.encode(t) for t in texts] == [legacy(t).input_ids for t in texts]


def test_documents_on_a_multilingual_model(text_m2m100):
    """source "auto" on a multilingual model: each text of a list translated from its detected language (among the
    model's); HTML keeps its markup with the language token before the source words."""
    from fastapi.testclient import TestClient

    from pyengine.documents.markup import HtmlDocument
    from pyengine.serving import create_app

    path, _ = text_m2m100
    engine = pyengine.Engine.load(path)
    texts = ["Die Datei konnte nicht geöffnet werden.", "The file could not be opened.",
             "Le fichier n'a pas pu être ouvert."]
    assert [r[0].language for r in engine.detect(texts)] == ["de", "en", "fr"]
    with TestClient(create_app(engine)) as client:
        body = client.post("/translate", json={"q": texts, "source": "auto", "target": "de"}).json()
    assert [d["language"] for d in body["detectedLanguage"]] == ["de", "en", "fr"]
    assert body["translatedText"] == [engine.translate([t], source_lang=lang, target_lang="de", split_sentences=True)[0]
                                      for t, lang in zip(texts, ["de", "en", "fr"])]
    source = "<p>The <b>file</b> could not be opened. <a href='x'>Close</a> it.</p>"
    out = engine.translate([source], format="html", source_lang="en", target_lang="de")[0]
    HtmlDocument(out)
    assert out.count("<b>") == 1 and out.count("<a href='x'>") == 1
    plan = engine.documents.plan(source, "html", source_lang="en")
    block = plan.doc.blocks[0]
    from pyengine.documents.segment import join
    want = join(block.text, block.spans, engine.translate(plan.segments, source_lang="en", target_lang="de"))
    assert HtmlDocument(out).blocks[0].text == want
