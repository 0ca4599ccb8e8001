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
def test_default_model_matches_hf_generate_on_heldout(engine, beam, monkeypatch):
    """Same text and (beam) scores as HF generate, while finished sentences leave the batch step by step
    (recorded: the decoder's row count shrinks at several steps of the one batch)."""
    from transformers import MarianMTModel, MarianTokenizer

    from pyengine.model.cache import KVCache
    rows_seen: list[int] = []
    select = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, rows: (rows_seen.append(rows.numel()), select(self, rows)))

    texts = _heldout("ui", 24) + _heldout("bible", 8)
    tok = MarianTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    hf = MarianMTModel.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    expected, expected_scores = [], []
    for start in range(0, len(texts), 16):
        batch = tok(texts[start:start + 16], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = hf.generate(**batch, num_beams=beam, output_scores=True, return_dict_in_generate=True)
        expected += tok.batch_decode(out.sequences, skip_special_tokens=True)
        if beam > 1:
            expected_scores += out.sequences_scores.tolist()
    got = engine.translate_batch(texts, beam_size=beam)
    assert [t.hypotheses[0] for t in got] == expected
    if beam > 1:
        torch.testing.assert_close(torch.tensor([t.scores[0] for t in got]), torch.tensor(expected_scores),
                                   atol=1e-4, rtol=0)
    shrinking = [b for a, b in zip(rows_seen, rows_seen[1:]) if b < a]
    assert len(shrinking) >= 3, rows_seen


def test_cli_without_model_uses_the_default(engine):
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate"], input=b"Open the file\n",
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode().strip() == engine.translate(["Open the file"])[0]
