"""Models trained by Marian itself (pymarian: Marian's own Python bindings, its trainer and its decoder), decoded by
pyengine with Marian's beam rules against `pymarian.Translator` on the same files: tokens identical under greedy and
beam search with --normalize and --word-penalty set, n-best lists with Marian's scores, the .npz and the .bin
(`marian convert`) loading identically. The models are small post-norm transformers with a self-attention decoder
and tied embeddings (swish and relu), trained for seconds on held-out UI strings with a YAML word vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import pyengine
from pyengine.errors import CheckpointError
from pyengine.loaders.marian_vocab import read_word_list

pymarian = pytest.importorskip("pymarian", reason="pymarian (test requirement) is the reference")
ROOT = Path(__file__).resolve().parent.parent
PAIRS = [json.loads(line) for name in ("ui", "gui") for line in (ROOT / "data" / "heldout" / f"test.{name}.jsonl").open()]
SOURCES = [p["en"] for p in PAIRS[:400:20]]  # 20 of the sentences it was trained on (it learns little in seconds)
CONFIGS = [(1, 0.0, 0.0), (4, 0.0, 0.0), (4, 1.0, 0.0), (4, 0.6, -2.0), (3, 0.0, -1.0)]  # beam, normalize, word-penalty


def train(directory: Path, activation: str, seed: int) -> Path:
    """A model trained by Marian's own trainer (400 updates, ~5 s on 2 cores); returns the .npz."""
    import _pymarian
    directory.mkdir(parents=True)
    (directory / "train.src").write_text("\n".join(p["en"] for p in PAIRS) + "\n", encoding="utf-8")
    (directory / "train.tgt").write_text("\n".join(p["de"] for p in PAIRS) + "\n", encoding="utf-8")
    d = directory
    _pymarian.Trainer(
        f"--type transformer --enc-depth 2 --dec-depth 2 --dim-emb 64 --transformer-dim-ffn 128 --transformer-heads 2 "
        f"--train-sets {d}/train.src {d}/train.tgt --vocabs {d}/vocab.yml {d}/vocab.yml --dim-vocabs 2000 2000 "
        f"--after-batches 400 --mini-batch 32 --learn-rate 0.003 --cpu-threads 2 --model {d}/model.npz "
        f"--tied-embeddings-all --transformer-postprocess dan --transformer-ffn-activation {activation} "
        f"--seed {seed} --max-length 64 --workspace 256 --quiet").train()
    return d / "model.npz"


@pytest.fixture(scope="module", params=[("swish", 1), ("relu", 2)], ids=["swish", "relu"])
def model(request, tmp_path_factory):
    return train(tmp_path_factory.mktemp("marian") / "model", *request.param)


def marian(model: Path, beam: int, normalize: float, word_penalty: float, n_best: bool = False) -> list[str]:
    """Marian's own decoder, one sentence per call (its length limit is factor × the batch's widest source)."""
    vocab = str(model.parent / "vocab.yml")
    translator = pymarian.Translator(models=str(model), vocabs=[vocab, vocab], beam_size=beam, normalize=normalize,
                                     word_penalty=word_penalty, n_best=n_best, cpu_threads=1, mini_batch=1,
                                     maxi_batch=1, quiet=True)
    return [translator.translate(s) for s in SOURCES]


def ours(engine, beam: int, normalize: float, word_penalty: float, **options) -> list:
    return [engine.translate_batch([s], beam_size=beam, length_penalty=normalize, word_penalty=word_penalty,
                                   **options)[0] for s in SOURCES]


@pytest.mark.parametrize("beam,normalize,word_penalty", CONFIGS)
def test_tokens_equal_marians_decoder(model, beam, normalize, word_penalty):
    engine = pyengine.Engine.load(model)
    assert engine.backends["search_rules"] == "marian"
    ref = marian(model, beam, normalize, word_penalty)
    assert [t.hypotheses[0] for t in ours(engine, beam, normalize, word_penalty)] == ref
    assert len(set(ref)) > 3  # it says different things, not one string for every input


def test_the_rules_and_the_options_matter(model):
    """HF's beam rules on the same model part from Marian's somewhere, and word-penalty changes Marian's output: the
    equalities above are Marian's rules and options at work."""
    engine = pyengine.Engine.load(model)
    hf = [t.hypotheses[0] for t in ours(engine, 3, 1.0, 0.0, search_rules="hf")]
    assert hf != marian(model, 3, 1.0, 0.0)
    assert marian(model, 4, 0.6, -2.0) != marian(model, 4, 0.6, 0.0)


def test_n_best_and_scores_equal_marians(model):
    """Marian's n-best (`id ||| text ||| F0= score ||| normalized`): the same hypotheses in the same order, the
    normalized score within float32 printing (Marian prints 6 significant digits)."""
    engine = pyengine.Engine.load(model)
    for ref, got in zip(marian(model, 4, 1.0, 0.2, n_best=True),
                        ours(engine, 4, 1.0, 0.2, num_hypotheses=4, return_scores=True)):
        lines = [line.split(" ||| ") for line in ref.splitlines()]
        assert [text for _, text, _, _ in lines] == got.hypotheses
        assert [float(score) for *_, score in lines] == pytest.approx(got.scores, rel=2e-5, abs=2e-5)


def test_npz_and_bin_load_identically(model):
    import _pymarian
    binary = model.with_suffix(".bin")
    assert _pymarian.main(["convert", "--from", str(model), "--to", str(binary)]) == 0
    a, b = pyengine.Engine.load(model), pyengine.Engine.load(binary)
    for name, tensor in a.model.state_dict().items():
        assert tensor.equal(b.model.state_dict()[name]), name
    assert a.translate(SOURCES, beam_size=4) == b.translate(SOURCES, beam_size=4)


def test_yaml_vocabulary_reads_every_word_as_a_string(tmp_path):
    """Marian's YAML reader keeps every key a string: `true`, `1` and `null` are words; a broken list is named."""
    path = tmp_path / "vocab.yml"
    path.write_text('</s>: 0\n<unk>: 1\ntrue: 2\n"1": 3\nnull: 4\n', encoding="utf-8")
    assert read_word_list(path, 10) == ["</s>", "<unk>", "true", "1", "null"]
    path.write_text("</s>: 0\n<unk>: 1\na: 3\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="ids must be 0..2"):
        read_word_list(path, 10)
    path.write_text("<unk>: 0\n</s>: 1\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="id 0 must be </s>"):
        read_word_list(path, 10)


def test_hard_alignments_equal_marians(model):
    """`--alignment hard`: Marian's pairs (its first attention head of the last layer, the end token included) equal
    pyengine's hard_alignment with Marian's default alignment_heads=1; averaging every head (alignment_heads=0) gives
    other pairs on some sentences."""
    from pyengine.documents.align import alignment_text
    vocab = str(model.parent / "vocab.yml")
    translator = pymarian.Translator(models=str(model), vocabs=[vocab, vocab], beam_size=4, normalize=1.0,
                                     alignment="hard", cpu_threads=1, mini_batch=1, maxi_batch=1, quiet=True)
    ref = [translator.translate(s) for s in SOURCES]
    engine = pyengine.Engine.load(model)

    def ours(heads: int) -> list[str]:
        out = [engine.translate_batch([s], beam_size=4, length_penalty=1.0, return_attention=True,
                                      alignment_heads=heads)[0] for s in SOURCES]
        return [f"{t.hypotheses[0]} ||| {alignment_text(t.hard_alignment())}" for t in out]

    assert ours(1) == ref
    assert ours(0) != ref
