"""eole model directories: a Transformer trained in the test by eole's own `build_vocab` and `train` commands (a
sentencepiece model trained here, eole's `sentencepiece` transform, GELU, biases, shared embeddings), compared with
eole's own predictor: encoder output and teacher-forced log-probs within 1e-4 on a mixed-length batch, and the text
`eole predict` writes (greedy; beam 4 with its 2-best) equal to pyengine's `translate`, scores within 1e-4."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import sample_lines

pytest.importorskip("eole", reason="eole is not installed (scripts/setup.sh --test installs it)")

TRAIN = """\
src_vocab: {d}/vocab.src
tgt_vocab: {d}/vocab.tgt
share_vocab: true
overwrite: true
seed: 1
transforms: [sentencepiece]
transforms_configs:
  sentencepiece:
    src_subword_model: {d}/sp.model
    tgt_subword_model: {d}/sp.model
data:
  corpus_1:
    path_src: {d}/train.src
    path_tgt: {d}/train.tgt
model:
  architecture: transformer
  hidden_size: 32
  layers: 2
  heads: 4
  transformer_ff: 64
  mlp_activation_fn: gelu
  add_qkvbias: true
  add_ffnbias: true
  add_final_linear_bias: true
  share_embeddings: true
  embeddings:
    word_vec_size: 32
    position_encoding_type: SinusoidalInterleaved
training:
  model_path: {d}/model
  train_steps: 300
  save_checkpoint_steps: 300
  valid_steps: 100000
  batch_size: 64
  batch_type: sents
  bucket_size: 2048
  bucket_size_init: 2048
  learning_rate: 0.003
  optim: adam
  dropout: [0.0]
  attention_dropout: [0.0]
  world_size: 1
  gpu_ranks: []
  num_workers: 0  # (the batches made in the trainer's process: two loader processes on 2 cores took 2x as long)
"""


def eole_command(*args: str, cwd: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "eole.bin.main", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"eole {args[0]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """eole trains a model to copy UI strings (300 steps: far from learned, but its outputs differ by input)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("eole")
    lines = [t for t in sample_lines() if 5 < len(t) < 60]
    for side in ("src", "tgt"):
        (d / f"train.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "train.src"), model_prefix=str(d / "sp"), vocab_size=200,
                                   model_type="unigram", minloglevel=2)
    (d / "train.yaml").write_text(TRAIN.format(d=d), encoding="utf-8")
    eole_command("build_vocab", "-config", "train.yaml", "-n_sample", "-1", cwd=d)
    eole_command("train", "-config", "train.yaml", cwd=d)
    return d / "model"


def test_loads_as_eole_with_openmt_rules(model_dir):
    engine = pyengine.Engine.load(model_dir)
    assert engine.source.startswith("eole:") and engine.backends["search_rules"] == "onmt"
    vocab = json.loads((model_dir / "vocab.json").read_text())
    assert engine.config.decoder_start_id == vocab["tgt"].index("<s>")
    assert engine.defaults.beam_size == 5 and engine.defaults.max_decoding_length == 250


@contextlib.contextmanager
def sdpa_flags_kept():
    """eole's inference engine switches PyTorch's math attention kernel off for the whole process (meant for CUDA,
    the flag governs the CPU too); the other test modules' references need it back afterwards."""
    b = torch.backends.cuda
    saved = (b.math_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled())
    try:
        yield
    finally:
        for enable, on in zip((b.enable_math_sdp, b.enable_flash_sdp, b.enable_mem_efficient_sdp,
                               b.enable_cudnn_sdp), saved):
            enable(on)


def test_encoder_output_and_log_probs_match_eole(model_dir):
    with sdpa_flags_kept():
        encoder_and_log_probs_match(model_dir)
    assert torch.backends.cuda.math_sdp_enabled()


def encoder_and_log_probs_match(model_dir):
    from eole.config.run import PredictConfig
    from eole.inference_engine import InferenceEnginePY

    config = PredictConfig(model_path=[str(model_dir)], src="unused", gpu_ranks=[], compute_dtype="fp32",
                           self_attn_backend="pytorch")
    predictor = InferenceEnginePY(config).predictor
    engine = pyengine.Engine.load(model_dir)
    texts = [t for t in sample_lines()[:60] if 10 < len(t) < 70][:6]
    ids = [engine.tokenizer.encode(t) for t in texts]
    lengths = torch.tensor([len(x) for x in ids])
    src = torch.full((len(ids), int(lengths.max())), engine.config.pad_id)
    for i, x in enumerate(ids):
        src[i, : len(x)] = torch.tensor(x)
    gen = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, engine.config.tgt_vocab_size, (len(ids), 7), generator=gen)
    tgt[:, 0] = engine.config.decoder_start_id
    with torch.no_grad():
        _, final, enc_out, src_len = predictor._run_encoder({"src": src, "srclen": lengths})
        predictor.model.decoder.init_state(enc_out=enc_out, enc_final_hs=final)
        ref_logp, _ = predictor._decode_and_generate(tgt, enc_out, src_len=src_len)
        from pyengine.model import ForcedDecoder
        ours_hidden = engine.model.encode(src, lengths)
        ours_logp = ForcedDecoder(engine.model, src, lengths, 8).logits(tgt).log_softmax(-1)
    assert not ref_logp.isnan().any()
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(ours_hidden[i, :n], enc_out[i, :n], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours_logp, ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("beam, n_best", [(1, 1), (4, 2)])
def test_text_equals_eole_predict(model_dir, tmp_path, beam, n_best):
    texts = [t for t in sample_lines()[:120] if 8 < len(t) < 70][:16]
    (tmp_path / "src.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    eole_command("predict", "-model_path", str(model_dir), "-src", str(tmp_path / "src.txt"), "-output",
                 str(tmp_path / "out.txt"), "-beam_size", str(beam), "-n_best", str(n_best), "-with_score",
                 "-max_length", "40", "-max_length_ratio", "0", cwd=tmp_path)
    rows = [line.split("\t") for line in (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n_best * len(texts)
    got = pyengine.Engine.load(model_dir).translate_batch(texts, beam_size=beam, num_hypotheses=n_best,
                                                          max_decoding_length=40, return_scores=True)
    assert [h for t in got for h in t.hypotheses] == [r[0] for r in rows]
    assert len({r[0] for r in rows}) > len(texts) // 2  # the outputs differ by input: the comparison can fail
    torch.testing.assert_close(torch.tensor([s for t in got for s in t.scores]),
                               torch.tensor([float(r[1]) for r in rows]), atol=1e-4, rtol=0)


def test_unsupported_options_and_broken_files_are_named(model_dir, tmp_path):
    def variant(name: str, edit) -> Path:
        target = tmp_path / name
        shutil.copytree(model_dir, target, symlinks=False)
        config = json.loads((target / "config.json").read_text())
        edit(config)
        (target / "config.json").write_text(json.dumps(config))
        return target

    rms = variant("rms", lambda c: c["model"]["decoder"].update(layer_norm="rms"))
    with pytest.raises(pyengine.CheckpointError, match=r"decoder.layer_norm='rms' is not supported"):
        pyengine.Engine.load(rms)
    rotary = variant("rotary", lambda c: c["model"].update(position_encoding_type="Rotary"))
    with pytest.raises(pyengine.CheckpointError, match="position_encoding_type='Rotary'"):
        pyengine.Engine.load(rotary)
    unknown = variant("unknown", lambda c: c["model"]["encoder"].update(new_option=3))
    with pytest.raises(pyengine.CheckpointError, match="encoder.new_option=3 is not known"):
        pyengine.Engine.load(unknown)
    missing = variant("missing", lambda c: None)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(missing / "model.00.safetensors"))
    del tensors["decoder.layer_norm.weight"]
    (missing / "model.00.safetensors").unlink()
    save_file(tensors, str(missing / "model.00.safetensors"))
    with pytest.raises(pyengine.CheckpointError, match="missing tensor 'decoder.layer_norm.weight'"):
        pyengine.Engine.load(missing)
    no_transform = variant("plain", lambda c: c.update(transforms=[]))
    with pytest.raises(pyengine.PyEngineError, match="generate"):
        pyengine.Engine.load(no_transform).translate(["hello"])
