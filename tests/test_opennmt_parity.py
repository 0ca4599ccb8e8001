"""OpenNMT-py v3 checkpoints: written by OpenNMT-py's own model builder and ModelSaver, decoded by its own
Translator (onmt.translate.BeamSearch) and compared with pyengine: encoder output and step log-probs within
1e-4, greedy and beam n-best tokens identical, scores within 1e-4, on mixed-length batches."""
from __future__ import annotations

import argparse
import importlib.machinery
import sys
import types

import pytest
import torch

import pyengine
from conftest import random_sources

# OpenNMT-py imports the libraries of two optional data transforms at import time (spaCy, fastText: large,
# and unused here); they are stood in for by empty modules, with a spec so importlib-based probes cope
for _name in ("spacy", "fasttext"):
    if _name not in sys.modules:
        _module = types.ModuleType(_name)
        _module.__spec__ = importlib.machinery.ModuleSpec(_name, None)
        sys.modules[_name] = _module
onmt = pytest.importorskip("onmt", reason="OpenNMT-py is not installed (requirements-test.txt installs it)")
pyonmttok = pytest.importorskip("pyonmttok")

from onmt.model_builder import build_base_model  # noqa: E402
from onmt.models.model_saver import build_model_saver  # noqa: E402
from onmt.utils.parse import ArgumentParser  # noqa: E402
import onmt.opts  # noqa: E402
from onmt.translate.translator import build_translator  # noqa: E402

VOCAB = ["<unk>", "<blank>", "<s>", "</s>"] + [f"w{i}" for i in range(70)]
EOS_GAIN = 3.0
CONFIGS = {
    "relu-bias-free": ["-hidden_size", "32", "-word_vec_size", "32", "-heads", "4", "-transformer_ff", "64"],
    "gelu-biases-shared": ["-hidden_size", "24", "-word_vec_size", "24", "-heads", "3", "-transformer_ff", "40",
                           "-pos_ffn_activation_fn", "gelu", "-add_qkvbias", "-add_ffnbias", "-share_embeddings"],
}


class _Optim:  # ModelSaver stores the optimizer's state; there is none to store for a model never trained
    def state_dict(self):
        return {}


def write_checkpoint(tmp_path, extra: list[str], seed: int, tokens: list[str] = VOCAB) -> str:
    parser = ArgumentParser()
    onmt.opts.train_opts(parser)
    opt = parser.parse_args(["-data", "{}", "-src_vocab", "unused", "-save_model", str(tmp_path / "model"),
                             "-encoder_type", "transformer", "-decoder_type", "transformer", "-enc_layers", "2",
                             "-dec_layers", "2", "-position_encoding", "-model_dtype", "fp32"] + extra)
    ArgumentParser.update_model_opts(opt)
    ArgumentParser.validate_model_opts(opt)
    vocab = pyonmttok.build_vocab_from_tokens(tokens)
    vocabs = {"src": vocab, "tgt": vocab, "data_task": "seq2seq", "decoder_start_token": "<s>"}
    model = build_base_model(opt, vocabs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peaky random weights, so the decoders' choices are not near-ties
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.6 / p.shape[-1] ** 0.5))
        # a long EOS output vector: its logit swings widely, so hypotheses end at many different steps
        model.generator.weight[tokens.index("</s>")] *= EOS_GAIN
    saver = build_model_saver(opt, opt, model, vocabs, _Optim(), 0)
    path, _ = saver._save(1, model)
    return path


def onmt_translate(path: str, sources: list[list[int]], beam: int, max_length: int):
    parser = ArgumentParser()
    onmt.opts.translate_opts(parser)
    opt = parser.parse_args(["-model", path, "-src", "unused", "-beam_size", str(beam), "-n_best", str(beam),
                             "-max_length", str(max_length), "-max_length_ratio", "0", "-gpu", "-1",
                             "-output", "/dev/null"])
    ArgumentParser.validate_translate_opts(opt)
    # OpenNMT-py 3.5 predates torch's weights_only default; its checkpoint needs the Namespace allowed
    with torch.serialization.safe_globals([argparse.Namespace]):
        translator = build_translator(opt, report_score=False)
    lengths = torch.tensor([len(s) for s in sources])
    src = torch.full((len(sources), int(lengths.max()), 1), VOCAB.index("<blank>"))
    for i, s in enumerate(sources):
        src[i, : len(s), 0] = torch.tensor(s)
    results = translator.translate_batch({"src": src, "srclen": lengths}, attn_debug=False)
    eos = VOCAB.index("</s>")
    tokens = [[[t for t in p.tolist() if t != eos] for p in preds] for preds in results["predictions"]]
    scores = [[float(s) for s in sc] for sc in results["scores"]]
    return translator, tokens, scores


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=len(request.param))


def sources(n: int, seed: int) -> list[list[int]]:
    return [[t + 4 for t in s] for s in random_sources(n, len(VOCAB) - 4, seed=seed, hi=12)]  # no special tokens


def test_encoder_output_and_step_log_probs_match_opennmt(checkpoint):
    engine = pyengine.Engine.load(checkpoint)
    translator, _, _ = onmt_translate(checkpoint, [[5, 6]], 1, 2)
    model = translator.model
    src_ids = sources(5, seed=1)
    lengths = torch.tensor([len(s) for s in src_ids])
    src = torch.full((len(src_ids), int(lengths.max())), VOCAB.index("<blank>"))
    for i, s in enumerate(src_ids):
        src[i, : len(s)] = torch.tensor(s)
    tgt = torch.randint(4, len(VOCAB), (len(src_ids), 6))
    tgt[:, 0] = VOCAB.index("<s>")
    with torch.no_grad():
        enc_out, _, _ = model.encoder(src[:, :, None], lengths)
        model.decoder.init_state(src[:, :, None], enc_out, None)
        dec_out, _ = model.decoder(tgt[:, :, None], enc_out, src_len=lengths)
        ref_logp = model.generator(dec_out).log_softmax(-1)
        from pyengine.model import ForcedDecoder
        ours_hidden = engine.model.encode(src, lengths)
        ours_logp = ForcedDecoder(engine.model, src, lengths, 8).logits(tgt).log_softmax(-1)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours_hidden[i, :n], enc_out[i, :n], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_logp, ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_greedy_and_beam_match_opennmt_translator(checkpoint, beam):
    engine = pyengine.Engine.load(checkpoint)
    src = sources(9, seed=beam)
    _, ref_tokens, ref_scores = onmt_translate(checkpoint, src, beam, max_length=16)
    got = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=16)
    assert [g.tokens for g in got] == ref_tokens
    torch.testing.assert_close(torch.tensor([g.scores for g in got]), torch.tensor(ref_scores), atol=1e-4, rtol=0)


def test_checkpoint_defaults_and_refusals(checkpoint, tmp_path):
    engine = pyengine.Engine.load(checkpoint)
    assert engine.config.decoder_start_id == VOCAB.index("<s>") and engine.config.eos_id == VOCAB.index("</s>")
    assert engine.defaults.beam_size == 5 and engine.defaults.max_decoding_length == 250
    with pytest.raises(pyengine.PyEngineError, match="generate"):
        engine.translate(["hello"])
    ckpt = torch.load(checkpoint, weights_only=False)  # noqa: S614  (our own test file)
    ckpt["opt"].max_relative_positions = 20
    torch.save(ckpt, tmp_path / "relative.pt")
    with pytest.raises(pyengine.CheckpointError, match="max_relative_positions"):
        pyengine.Engine.load(tmp_path / "relative.pt")
    data = open(checkpoint, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(pyengine.CheckpointError, match="truncated.pt"):
        pyengine.Engine.load(tmp_path / "truncated.pt")
    ckpt = torch.load(checkpoint, weights_only=False)  # noqa: S614  (our own test file)
    ckpt["vocab"]["tgt"] = ckpt["vocab"]["tgt"] + ["extra"]
    torch.save(ckpt, tmp_path / "vocab.pt")
    with pytest.raises(pyengine.CheckpointError, match=r"vocab.pt: tensor .* has shape \(74, .*expected \(75"):
        pyengine.Engine.load(tmp_path / "vocab.pt")


def test_converted_directory_decodes_the_same(checkpoint, tmp_path):
    from pyengine.cli import main
    assert main(["convert", checkpoint, str(tmp_path / "native")]) == 0
    src = sources(7, seed=5)
    a = pyengine.Engine.load(checkpoint).generate(src, beam_size=4, num_hypotheses=2)
    b = pyengine.Engine.load(tmp_path / "native").generate(src, beam_size=4, num_hypotheses=2)
    assert [x.tokens for x in a] == [x.tokens for x in b] and [x.scores for x in a] == [x.scores for x in b]


# OpenNMT-py's onmt_translate in a child process (the modules its transforms import but never use stubbed)
ONMT_TRANSLATE = ("import sys, types, importlib.machinery\n"
                  "for n in ('spacy', 'fasttext'):\n"
                  "    m = types.ModuleType(n); m.__spec__ = importlib.machinery.ModuleSpec(n, None); sys.modules[n] = m\n"
                  "import argparse, torch\n"
                  "torch.serialization.add_safe_globals([argparse.Namespace])\n"
                  "from onmt.bin.translate import main\n"
                  "sys.argv = ['onmt_translate'] + sys.argv[1:]\n"
                  "main()\n")


def assert_text_equals_onmt_translate(engine, checkpoint: str, transform: list[str], tmp_path) -> None:
    """engine.translate of eight sample sentences equals what OpenNMT-py's own onmt_translate (its transforms,
    Translator and detokenization, given the checkpoint's transform options) writes for the same text file, greedy
    and beam 3."""
    import subprocess

    from conftest import sample_lines
    texts = [t for t in sample_lines()[:40] if 10 < len(t) < 70][:8]
    (tmp_path / "src.txt").write_text("\n".join(texts) + "\n")
    for beam in (1, 3):
        out = tmp_path / f"out{beam}.txt"
        run = subprocess.run([sys.executable, "-c", ONMT_TRANSLATE, "-model", checkpoint, "-src", str(tmp_path / "src.txt"),
                              "-output", str(out), "-beam_size", str(beam), "-max_length", "16",
                              "-max_length_ratio", "0", "-gpu", "-1", *transform], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        want = out.read_text().splitlines()
        assert engine.translate(texts, beam_size=beam, max_decoding_length=16) == want
        assert sum(bool(w.strip()) for w in want) >= len(texts) - 1, want  # text to compare, not blanks


def test_text_through_the_sentencepiece_transform_matches_opennmt_translate(tmp_path):
    """A checkpoint trained with OpenNMT-py's `sentencepiece` transform translates text: pyengine reads the subword
    model its options name and gives what OpenNMT-py's own `onmt_translate` (transforms, Translator, detokenization)
    writes for the same text file, greedy and beam 3."""
    import sentencepiece as spm

    from conftest import SAMPLE_TEXT
    spm.SentencePieceTrainer.train(input=str(SAMPLE_TEXT), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                   model_type="unigram", minloglevel=2)
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    tokens = ["<unk>", "<blank>", "<s>", "</s>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    model = str(tmp_path / "sp.model")
    subword = ["-transforms", "sentencepiece", "-src_subword_model", model, "-tgt_subword_model", model]
    checkpoint = write_checkpoint(tmp_path, CONFIGS["gelu-biases-shared"] + subword, seed=3, tokens=tokens)
    assert_text_equals_onmt_translate(pyengine.Engine.load(checkpoint), checkpoint, subword, tmp_path)


@pytest.mark.parametrize("kwargs,subword", [("{'mode': 'none'}", "sentencepiece"),
                                            ("{'mode': 'conservative', 'joiner_annotate': True}", "none")])
def test_text_through_the_onmt_tokenize_transform_matches_opennmt_translate(tmp_path, kwargs, subword):
    """A checkpoint trained with OpenNMT-py's `onmt_tokenize` transform (the OpenNMT Tokenizer, pyonmttok) translates
    text as OpenNMT-py's own `onmt_translate` does: a sentencepiece model through it, and its conservative mode with
    joiners over whole words (a vocabulary of the sample text's tokens), greedy and beam 3."""
    import ast

    import sentencepiece as spm

    from conftest import SAMPLE_TEXT, sample_lines
    options = ["-transforms", "onmt_tokenize", "-src_onmttok_kwargs", kwargs, "-tgt_onmttok_kwargs", kwargs,
               "-src_subword_type", subword, "-tgt_subword_type", subword]
    tokenizer_kwargs = ast.literal_eval(kwargs)
    if subword == "sentencepiece":
        spm.SentencePieceTrainer.train(input=str(SAMPLE_TEXT), model_prefix=str(tmp_path / "sp"), vocab_size=120,
                                       model_type="unigram", minloglevel=2)
        model = str(tmp_path / "sp.model")
        options += ["-src_subword_model", model, "-tgt_subword_model", model]
        tokenizer_kwargs["sp_model_path"] = model
    seen = dict.fromkeys(t for line in sample_lines() for t in pyonmttok.Tokenizer(**tokenizer_kwargs)(line))
    tokens = ["<unk>", "<blank>", "<s>", "</s>"] + [t for t in seen if t not in ("<unk>", "<s>", "</s>")][:150]
    checkpoint = write_checkpoint(tmp_path, CONFIGS["gelu-biases-shared"] + options, seed=3, tokens=tokens)
    engine = pyengine.Engine.load(checkpoint)
    assert engine.tokenizer is not None, engine.tokenizer_note
    assert_text_equals_onmt_translate(engine, checkpoint, options, tmp_path)
