"""Scoring (Engine.score_batch, `pyengine score`, POST /v1/score) against Hugging Face's teacher-forced
log-softmax, one pair at a time (no padding in the reference), on the shipped model and a random one, and against
CTranslate2's own score_batch on the model converted by its own converter."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyengine
from conftest import hf_model, sample_lines, zero_pad_copy

PAIRS = [("Open the file.", "Öffne die Datei."), ("The directory could not be created.",
                                                  "Das Verzeichnis konnte nicht erstellt werden."),
         ("Save the changes?", "Änderungen speichern?"), ("Close", "Schließen")]


def hf_log_probs(model_dir: Path, sources: list[str], targets: list[str],
                 dtype: torch.dtype = torch.float32) -> list[list[float]]:
    """HF's own tokenizer and model, teacher forced: log_softmax of the logits at each target token (EOS included)."""
    from transformers import MarianTokenizer

    tok = MarianTokenizer.from_pretrained(model_dir)
    model = hf_model(model_dir, dtype=dtype)
    out = []
    for s, t in zip(sources, targets):  # one pair at a time: no padding in the reference
        x = torch.tensor([tok(s).input_ids])
        labels = tok(text_target=t).input_ids
        decoder_input = torch.tensor([[model.config.decoder_start_token_id] + labels[:-1]])
        with torch.no_grad():
            logits = model(input_ids=x, decoder_input_ids=decoder_input).logits.double()
        lp = torch.log_softmax(logits[0], -1)
        out.append([float(lp[i, labels[i]]) for i in range(len(labels))])
    return out


@pytest.mark.parametrize("model", ["default", "text_model_dir"])
def test_log_probs_equal_hugging_face_teacher_forcing(model, request):
    path = pyengine.engine.resolve_model_path("default") if model == "default" else request.getfixturevalue(model)
    engine = pyengine.Engine.load(path)
    sources = [s for s, _ in PAIRS] + sample_lines()[:20]
    targets = [t for _, t in PAIRS] + sample_lines()[20:40]
    got = engine.score_batch(sources, targets)
    want = hf_log_probs(path, sources, targets)
    for g, w in zip(got, want):
        assert len(g.log_probs) == len(w)
        assert max(abs(a - b) for a, b in zip(g.log_probs, w)) < 1e-4
        assert g.cumulated_score == pytest.approx(sum(w), abs=1e-3)
        assert g.normalized_score == pytest.approx(sum(w) / len(w), abs=1e-4)
    assert engine.score_batch(sources[:1], targets[:1], offset=2)[0].log_probs == pytest.approx(got[0].log_probs[2:], abs=1e-5)


def test_scores_equal_ctranslate2_score_batch(tmp_path):
    """CTranslate2 converts a Marian model by starting the decoder from a zero embedding and dropping the <pad> row
    of the vocabulary (right for models Marian trained, whose pad embedding is zero). On a copy of the shipped model
    made that way (pad embedding 0, pad logit -1e4: the same model for all three), its score_batch gives
    pyengine's log-probabilities within CTranslate2's own float32 error (both against HF's float64 on that model)."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianTokenizer

    path = zero_pad_copy(pyengine.engine.resolve_model_path("default"), tmp_path / "zero-pad")
    tok = MarianTokenizer.from_pretrained(path)
    engine = pyengine.Engine.load(path)
    sources, targets = [s for s, _ in PAIRS], [t for _, t in PAIRS]
    ct2_dir = tmp_path / "ct2"
    TransformersConverter(str(path)).convert(str(ct2_dir), force=True)
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type="float32")
    ref = translator.score_batch([tok.convert_ids_to_tokens(tok(s).input_ids) for s in sources],
                                 [tok.convert_ids_to_tokens(tok(text_target=t).input_ids[:-1]) for t in targets])
    got = engine.score_batch(sources, targets)
    exact = hf_log_probs(path, sources, targets, torch.float64)  # the same model in float64: each one's error
    for g, r, x in zip(got, ref, exact):
        assert tok.convert_ids_to_tokens(g.tokens) == r.tokens
        ct2_error = [abs(b - c) for b, c in zip(r.log_probs, x)]
        assert max(ct2_error) < 5e-3  # CTranslate2's float32 (measured up to ~1.3e-3 on the retrained model)
        assert max(abs(a - c) for a, c in zip(g.log_probs, x)) < 1e-4
        # equal to CTranslate2 within CTranslate2's own float error
        assert all(abs(a - b) <= e + 1e-4 for a, b, e in zip(g.log_probs, r.log_probs, ct2_error))
        assert g.normalized_score == pytest.approx(sum(r.log_probs) / len(r.log_probs), abs=2e-3)


def test_bad_pairs_are_named():
    engine = pyengine.Engine.load("default")
    with pytest.raises(pyengine.InputError, match="2 sources but 1 targets"):
        engine.score_batch(["a", "b"], ["c"])
    with pytest.raises(pyengine.InputError, match="input 1: an empty target cannot be scored"):
        engine.score_batch(["a", "b"], ["c", " "])
    with pytest.raises(pyengine.InputError, match="input 0: source of .* tokens exceeds the model's 256 positions"):
        engine.score_batch(["word " * 400], ["c"])
    with pytest.raises(pyengine.OptionError, match="offset must be an integer >= 0"):
        engine.score_batch(["a"], ["b"], offset=-1)


def test_cli_and_server_give_the_api_numbers(tmp_path):
    from fastapi.testclient import TestClient

    from pyengine.serving import create_app

    engine = pyengine.Engine.load("default")
    sources, targets = [s for s, _ in PAIRS], [t for _, t in PAIRS]
    want = engine.score_batch(sources, targets)
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("\n".join(targets) + "\n", encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "pyengine", "score", "--source", str(tmp_path / "src.txt"),
                          "--target", str(tmp_path / "tgt.txt"), "--word-scores"], capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()
    lines = run.stdout.decode().splitlines()
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx([w.normalized_score for w in want], abs=1e-4)
    assert [[float(x) for x in line.split("\t")[1].split()] for line in lines] == \
        [pytest.approx(w.log_probs, abs=1e-4) for w in want]
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/score", json={"sources": sources, "targets": targets})
        assert r.status_code == 200
        for got, w in zip(r.json()["scores"], want):
            assert got["score"] == pytest.approx(w.normalized_score, abs=1e-5)
            assert got["log_probs"] == pytest.approx(w.log_probs, abs=1e-5)
            assert got["tokens"] == [engine.tokenizer.decoder.get(t, "") for t in w.tokens]
        r = client.post("/v1/score", json={"sources": sources, "targets": targets[:1]})
        assert r.status_code == 400 and "4 sources but 1 targets" in r.json()["error"]
        r = client.post("/v1/score", json={"sources": ["a"], "targets": [""]})
        assert r.status_code == 400 and "empty target" in r.json()["error"]
    assert json.loads(json.dumps(want[0].log_probs))  # plain floats
