"""pyengine convert: a native directory gives the same tokens as the original, without the source format."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
import sys

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources, sample_lines, save_rounded_to_bf16


def _convert(src, dst, dtype="float32"):
    run = subprocess.run([sys.executable, "-m", "pyengine", "convert", str(src), str(dst), "--dtype", dtype],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return dst


def test_converted_marian_translates_identically(text_model_dir, tmp_path):
    dst = _convert(text_model_dir, tmp_path / "native")
    original, converted = pyengine.Engine.load(text_model_dir), pyengine.Engine.load(dst)
    assert converted.source.startswith("pyengine:") and not (dst / "config.json").exists()
    texts = sample_lines()[:20]
    for beam in (1, 3):
        a = original.translate_batch(texts, beam_size=beam)
        b = converted.translate_batch(texts, beam_size=beam)
        assert [x.tokens for x in a] == [x.tokens for x in b]
        assert [x.hypotheses for x in a] == [x.hypotheses for x in b]
    assert converted.defaults == original.defaults


def test_converted_separate_vocab_model_and_bf16(tmp_path):
    src = build_marian(tmp_path / "src", **ARCHS["relu-separate"])
    ids = random_sources(8, 97, seed=1)
    ref = pyengine.Engine.load(src).generate(ids, beam_size=2)
    got = pyengine.Engine.load(_convert(src, tmp_path / "fp32")).generate(ids, beam_size=2)
    assert [x.tokens for x in got] == [x.tokens for x in ref]
    bf16 = _convert(src, tmp_path / "bf16", "bfloat16")
    assert (bf16 / "model.safetensors").stat().st_size < (tmp_path / "fp32" / "model.safetensors").stat().st_size * 0.6
    # the converted bf16 model is the source with every tensor rounded to bf16 (rounded here by HF itself)
    save_rounded_to_bf16(src, tmp_path / "rounded")
    bf16_ref = pyengine.Engine.load(tmp_path / "rounded", dtype=torch.bfloat16).generate(ids, beam_size=2)
    assert [x.tokens for x in pyengine.Engine.load(bf16, dtype=torch.bfloat16).generate(ids, beam_size=2)] == \
        [x.tokens for x in bf16_ref]


def test_bad_native_directories(text_model_dir, tmp_path):
    dst = _convert(text_model_dir, tmp_path / "native")
    meta = json.loads((dst / "pyengine_config.json").read_text())
    meta["format_version"] = 99
    (dst / "pyengine_config.json").write_text(json.dumps(meta))
    with pytest.raises(pyengine.CheckpointError, match="format_version 99"):
        pyengine.Engine.load(dst)
    run = subprocess.run([sys.executable, "-m", "pyengine", "convert", str(text_model_dir), str(tmp_path / "x"),
                          "--dtype", "int4"], capture_output=True, text=True)
    assert run.returncode == 2 and "unsupported --dtype 'int4'" in run.stderr


def test_int8_conversion_of_the_default_model(tmp_path):
    """int8 storage: each weight within half a quantization step of the original, a quarter of the float32
    file, and translations of held-out sentences mostly unchanged (int8 rounding may change a few)."""
    import json as _json

    from pyengine.engine import DEFAULT_MODEL_DIR
    from pyengine.loaders import load_model
    from pyengine.loaders.native import INT8_SCALE
    from safetensors.torch import load_file
    _convert("default", tmp_path / "fp32")
    _convert("default", tmp_path / "int8", "int8")
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "int8") < 0.3 * size(tmp_path / "fp32")
    original = load_model(DEFAULT_MODEL_DIR).state
    stored = load_file(str(tmp_path / "int8" / "model.safetensors"))
    restored = load_model(tmp_path / "int8").state
    for name, w in original.items():
        if w.dim() == 2:
            step = stored[name + INT8_SCALE][:, None]
            assert stored[name].dtype == torch.int8
            assert ((restored[name] - w.float()).abs() <= step / 2 + 1e-6).all(), name
    lines = (Path(__file__).resolve().parents[1] / "data/heldout/test.ui.jsonl").read_text().splitlines()[:40]
    texts = [_json.loads(line)["en"] for line in lines]
    a = pyengine.Engine.load("default").translate(texts)
    b = pyengine.Engine.load(tmp_path / "int8").translate(texts)
    assert sum(x == y for x, y in zip(a, b)) >= 0.75 * len(texts)
