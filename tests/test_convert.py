"""pyengine convert: a native directory gives the same tokens as the original, without the source format."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import pyengine
from conftest import ARCHS, build_marian, random_sources, sample_lines


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
    bf16_ref = pyengine.Engine.load(src, dtype=torch.bfloat16).generate(ids, beam_size=2)
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
                          "--dtype", "int8"], capture_output=True, text=True)
    assert run.returncode == 2 and "int8 is not supported yet" in run.stderr
