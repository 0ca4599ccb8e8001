"""The model shipped with pyengine: found without a path, translates real text, and decodes exactly as
Hugging Face `generate` does on held-out sentences."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine
from pyengine.engine import DEFAULT_MODEL_DIR

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout"


def _heldout(name: str, n: int) -> list[str]:
    lines = (HELDOUT / f"test.{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line)["en"] for line in lines]


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load()  # "default"


def test_default_model_translates_ui_text(engine):
    out = engine.translate(["Open the file", "Save the document?"])
    assert "Datei" in out[0], out
    assert all(o and o != i for o, i in zip(out, ["Open the file", "Save the document?"]))


@pytest.mark.parametrize("beam", [1, 4])
def test_default_model_matches_hf_generate_on_heldout(engine, beam):
    from transformers import MarianMTModel, MarianTokenizer

    texts = _heldout("ui", 24) + _heldout("bible", 8)
    tok = MarianTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    hf = MarianMTModel.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    expected = []
    for start in range(0, len(texts), 16):
        batch = tok(texts[start:start + 16], return_tensors="pt", padding=True)
        with torch.inference_mode():
            expected += tok.batch_decode(hf.generate(**batch, num_beams=beam), skip_special_tokens=True)
    assert engine.translate(texts, beam_size=beam) == expected


def test_cli_without_model_uses_the_default(engine):
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate"], input=b"Open the file\n",
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().strip() == engine.translate(["Open the file"])[0]
