"""float16 end to end on the CPU (weights and activations in float16, PyTorch ops), held to the kernels' rule: its
error against float64 at most twice Hugging Face's own float16 error — teacher-forced log-probabilities of the
float32 translations of held-out sentences, the shipped model — and translations that do not depend on the batch."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import pyengine

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout"


def sentences(n: int = 8) -> list[str]:
    rows = []
    for name in ("test.ui.jsonl", "test.bible.jsonl"):
        with open(HELDOUT / name, encoding="utf-8") as fh:
            rows += [json.loads(line)["en"] for _, line in zip(range(n // 2), fh)]
    return rows


def hf_log_probs(texts: list[str], targets: list[str], dtype: torch.dtype) -> list[torch.Tensor]:
    from transformers import MarianMTModel, MarianTokenizer
    path = pyengine.engine.resolve_model_path("default")
    tok = MarianTokenizer.from_pretrained(path)
    model = MarianMTModel.from_pretrained(path, dtype=dtype).eval()
    out = []
    for src, tgt in zip(texts, targets):
        batch = tok([src], text_target=[tgt], return_tensors="pt")
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).logits
        logp = torch.log_softmax(logits.double(), dim=-1)[0]
        out.append(logp.gather(1, batch["labels"][0][:, None])[:, 0])
    return out


def test_float16_log_probs_within_twice_hfs_own_float16_error():
    texts = sentences()
    targets = pyengine.Engine.load("default").translate(texts)
    engine = pyengine.Engine.load("default", dtype="float16")
    assert engine.engine_config.dtype == next(engine.model.parameters()).dtype == torch.float16
    ref = hf_log_probs(texts, targets, torch.float64)
    hf = hf_log_probs(texts, targets, torch.float16)
    ours = [torch.tensor(r.log_probs, dtype=torch.float64) for r in engine.score_batch(texts, targets)]
    assert [len(o) for o in ours] == [len(r) for r in ref]
    ours_err = max((o - r).abs().max().item() for o, r in zip(ours, ref))
    hf_err = max((h - r).abs().max().item() for h, r in zip(hf, ref))
    assert 0 < ours_err <= 2 * hf_err, (ours_err, hf_err)


def test_float16_translations_do_not_depend_on_the_batch():
    """Greedy and beam 4 (on AVX512-FP16 CPUs, oneDNN's float16 product of one row and SDPA's float16 kernel over
    padded keys each rounded unlike the batch's: a sentence's tokens depended on its batch mates)."""
    engine = pyengine.Engine.load("default", dtype="float16")
    texts = sentences(12)
    for beam_size in (1, 4):
        together = engine.translate_batch(texts, beam_size=beam_size)
        alone = [engine.translate_batch([t], beam_size=beam_size)[0] for t in texts]
        assert [t.tokens for t in together] == [t.tokens for t in alone], beam_size
    together = engine.translate_batch(texts, beam_size=4)
    assert sum(t.hypotheses[0] == a for t, a in zip(together, pyengine.Engine.load("default").translate(texts))) >= 10
