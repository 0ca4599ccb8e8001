"""fairseq transformer checkpoints: written by fairseq's own Trainer (save_checkpoint) with its
Dictionary files, decoded by its own SequenceGenerator and compared with pyengine: encoder output and step
log-probs within 1e-4, greedy and beam n-best tokens identical, scores within 1e-4, on mixed-length
(left-padded, as fairseq batches them) inputs; post-norm and pre-norm, sinusoidal and learned positions."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import random_sources


fairseq = pytest.importorskip("fairseq", reason="fairseq is not installed (scripts/setup.sh --test installs it)")
logging.getLogger("fairseq").setLevel(logging.ERROR)

from fairseq import options, tasks  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq.trainer import Trainer  # noqa: E402

EOS_GAIN = 3.0
CONFIGS = {
    "postnorm-sinusoidal": ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                            "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
                            "--decoder-attention-heads", "4"],
    "prenorm-learned-shared": ["--encoder-embed-dim", "24", "--decoder-embed-dim", "24", "--encoder-ffn-embed-dim", "40",
                               "--decoder-ffn-embed-dim", "40", "--encoder-attention-heads", "3",
                               "--decoder-attention-heads", "3", "--encoder-normalize-before",
                               "--decoder-normalize-before", "--encoder-learned-pos", "--decoder-learned-pos",
                               "--layernorm-embedding", "--share-all-embeddings", "--no-scale-embedding",
                               "--activation-fn", "gelu", "--max-source-positions", "64",
                               "--max-target-positions", "64"],
}


def write_checkpoint(root: Path, extra: list[str], seed: int,
                     symbols: list[str] | None = None) -> tuple[Path, object, object]:
    data = root / "data"
    data.mkdir()
    for lang in ("en", "de"):
        d = Dictionary()
        for sym in symbols or [f"w{i}" for i in range(70)]:
            d.add_symbol(sym)
        d.save(str(data / f"dict.{lang}.txt"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--task", "translation", "--arch", "transformer", "-s", "en", "-t", "de", "--encoder-layers", "2",
        "--decoder-layers", "2", "--cpu", "--optimizer", "adam", "--lr", "1e-3", "--criterion", "cross_entropy",
        "--max-tokens", "1000", "--save-dir", str(root)] + extra)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peaky random weights: the decoders' choices are not near-ties
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.6 / p.shape[-1] ** 0.5))
        # a long EOS output vector: its logit swings widely, so hypotheses end at many different steps
        model.decoder.output_projection.weight[2] *= EOS_GAIN
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    trainer.consolidate_optimizer()
    path = root / "checkpoint_last.pt"
    trainer.save_checkpoint(str(path), {})
    (root / "dict.en.txt").write_bytes((data / "dict.en.txt").read_bytes())
    (root / "dict.de.txt").write_bytes((data / "dict.de.txt").read_bytes())
    model.eval()
    return path, model, task


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param], seed=len(request.param))


def sources(n: int, seed: int) -> list[list[int]]:
    """Token ids as fairseq's Dictionary.encode_line makes them: symbols, then </s>."""
    return [[t + 4 for t in s[:-1]] + [2] for s in random_sources(n, 70, seed=seed, lo=2, hi=12)]


def left_padded(src: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in src])
    tokens = torch.full((len(src), int(lengths.max())), 1)
    for i, s in enumerate(src):
        tokens[i, tokens.shape[1] - len(s):] = torch.tensor(s)
    return tokens, lengths


def fairseq_generate(model, task, src, beam: int, max_len_b: int, len_penalty: float = 1.0):
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=0, max_len_b=max_len_b,
                                  len_penalty=len_penalty)
    tokens, lengths = left_padded(src)
    with torch.no_grad():
        out = generator.generate([model], {"net_input": {"src_tokens": tokens, "src_lengths": lengths}})
    toks = [[[t for t in h["tokens"].tolist() if t != 2] for h in hyps] for hyps in out]
    scores = [[float(h["score"]) for h in hyps] for hyps in out]
    return toks, scores


def test_encoder_output_and_step_log_probs_match_fairseq(checkpoint):
    path, model, _ = checkpoint
    engine = pyengine.Engine.load(path)
    src = sources(5, seed=1)
    tokens, lengths = left_padded(src)
    tgt = torch.randint(4, 74, (len(src), 6))
    tgt[:, 0] = 2
    with torch.no_grad():
        enc = model.encoder(tokens, src_lengths=lengths)
        ref_logp = model.get_normalized_probs(model.decoder(tgt, encoder_out=enc), log_probs=True)
        right = torch.full_like(tokens, 1)
        for i, s in enumerate(src):
            right[i, : len(s)] = torch.tensor(s)
        from pyengine.model import ForcedDecoder
        hidden = engine.model.encode(right, lengths)
        ours = ForcedDecoder(engine.model, right, lengths, 8).logits(tgt).log_softmax(-1)
    ref_hidden = enc["encoder_out"][0].transpose(0, 1)  # (B, S, D), left-padded
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(hidden[i, :n], ref_hidden[i, ref_hidden.shape[1] - n:], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours, ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("beam,len_penalty", [(1, 1.0), (3, 1.0), (5, 1.0), (4, 0.6)])
def test_greedy_and_beam_match_sequence_generator(checkpoint, beam, len_penalty):
    path, model, task = checkpoint
    engine = pyengine.Engine.load(path)
    src = sources(9, seed=beam)
    ref_tokens, ref_scores = fairseq_generate(model, task, src, beam, max_len_b=14, len_penalty=len_penalty)
    got = engine.generate(src, beam_size=beam, num_hypotheses=beam, max_decoding_length=15,
                          length_penalty=len_penalty)
    assert [g.tokens for g in got] == ref_tokens
    torch.testing.assert_close(torch.tensor([g.scores for g in got]), torch.tensor(ref_scores), atol=1e-4, rtol=0)


def test_legacy_in_proj_weights_load_the_same(checkpoint, tmp_path):
    path, _, _ = checkpoint
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["model"]
    for key in [k for k in state if k.endswith("q_proj.weight")]:
        prefix = key[: -len("q_proj.weight")]
        state[prefix + "in_proj_weight"] = torch.cat([state.pop(f"{prefix}{p}_proj.weight") for p in "qkv"])
        state[prefix + "in_proj_bias"] = torch.cat([state.pop(f"{prefix}{p}_proj.bias") for p in "qkv"])
    torch.save(ckpt, tmp_path / "legacy.pt")
    for name in ("dict.en.txt", "dict.de.txt"):
        (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    src = sources(6, seed=3)
    a = pyengine.Engine.load(path).generate(src, beam_size=4)
    b = pyengine.Engine.load(tmp_path / "legacy.pt").generate(src, beam_size=4)
    assert [x.tokens for x in a] == [x.tokens for x in b] and [x.scores for x in a] == [x.scores for x in b]


def test_defaults_and_corrupt_inputs(checkpoint, tmp_path):
    path, _, _ = checkpoint
    engine = pyengine.Engine.load(path)
    assert engine.config.decoder_start_id == 2 and engine.defaults.min_decoding_length == 1
    with pytest.raises(pyengine.PyEngineError, match="generate"):
        engine.translate(["hello"])
    ckpt = torch.load(path, weights_only=False)
    for name in ("dict.en.txt", "dict.de.txt"):
        (tmp_path / name).write_bytes((path.parent / name).read_bytes())
    with open(tmp_path / "dict.de.txt", "a") as fh:  # one symbol more than the embeddings
        fh.write("extra 1\n")
    torch.save(ckpt, tmp_path / "bigvocab.pt")
    with pytest.raises(pyengine.CheckpointError, match="dict.de.txt: the target dictionary has 75 symbols"):
        pyengine.Engine.load(tmp_path / "bigvocab.pt")
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(pyengine.CheckpointError, match="truncated.pt: cannot read"):
        pyengine.Engine.load(tmp_path / "truncated.pt")
    (tmp_path / "dict.de.txt").write_bytes((path.parent / "dict.de.txt").read_bytes())
    model_opts = ckpt["cfg"]["model"]  # an argparse Namespace for fairseq's legacy architectures
    model_opts.adaptive_softmax_cutoff = "10,20"
    torch.save(ckpt, tmp_path / "adaptive.pt")
    with pytest.raises(pyengine.CheckpointError, match="adaptive.pt: fairseq option adaptive_softmax_cutoff"):
        pyengine.Engine.load(tmp_path / "adaptive.pt")
    model_opts.adaptive_softmax_cutoff, model_opts.arch = None, "lstm"  # a checkpoint of another architecture
    torch.save(ckpt, tmp_path / "lstm.pt")
    with pytest.raises(pyengine.CheckpointError, match="lstm.pt: fairseq architecture 'lstm' is not a transformer"):
        pyengine.Engine.load(tmp_path / "lstm.pt")


def test_converted_directory_decodes_the_same(checkpoint, tmp_path):
    from pyengine.cli import main
    path, _, _ = checkpoint
    assert main(["convert", str(path), str(tmp_path / "native")]) == 0
    src = sources(7, seed=5)
    a = pyengine.Engine.load(path).generate(src, beam_size=4, num_hypotheses=2)
    b = pyengine.Engine.load(tmp_path / "native").generate(src, beam_size=4, num_hypotheses=2)
    assert [x.tokens for x in a] == [x.tokens for x in b] and [x.scores for x in a] == [x.scores for x in b]


def test_sentencepiece_text_matches_fairseq_hub_translate(tmp_path):
    """Text in, text out: fairseq's own hub interface (`TransformerModel.from_pretrained(..., bpe="sentencepiece")
    .translate`) against pyengine.translate on the same checkpoint."""
    import sentencepiece as spm
    from conftest import sample_lines
    from fairseq.models.transformer import TransformerModel

    (tmp_path / "train.txt").write_text("\n".join(sample_lines()[:200]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"),
                                   vocab_size=150, model_type="bpe", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(3, sp.get_piece_size())]  # fairseq's recipe drops <unk> <s> </s>
    root = tmp_path / "ckpt"
    root.mkdir()
    path, _, _ = write_checkpoint(root, CONFIGS["prenorm-learned-shared"], seed=4, symbols=pieces)
    (root / "sentencepiece.bpe.model").write_bytes((tmp_path / "spm.model").read_bytes())
    with torch.serialization.safe_globals([argparse.Namespace]):  # fairseq 0.12 predates weights_only=True
        hub = TransformerModel.from_pretrained(str(root), checkpoint_file=path.name, data_name_or_path=str(root),
                                               bpe="sentencepiece",
                                               sentencepiece_model=str(root / "sentencepiece.bpe.model"))
    hub.eval()
    texts = [t for t in sample_lines()[200:] if len(sp.encode(t)) < 40][:12]  # the model has 64 positions
    expected = hub.translate(texts, beam=3, max_len_b=12)
    engine = pyengine.Engine.load(path)
    assert engine.translate(texts, beam_size=3, max_decoding_length=13) == expected
    assert any(e.strip() for e in expected)
