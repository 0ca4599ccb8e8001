"""Translation quality and fast-path guards on held-out data.

    python -m benchmarks.quality                   # the shipped default model, every held-out set
    python -m benchmarks.quality --limit 200       # quicker

For each held-out set (data/heldout/): sacreBLEU BLEU and chrF of Hugging Face `generate` and of
pyengine (greedy and beam 4, float32, bfloat16 and int8) and CTranslate2 int8 (the int8 yardstick); the
share of sentences whose pyengine float32 tokens equal HF's (parity), whose bfloat16 tokens equal
float32's (the bf16 quality guard), and whose int8 tokens (pyengine's, CTranslate2's) equal float32's.
The guard is also run on random peaky Marian models like the parity tests'. Writes JSON to
benchmarks/results/. Needs transformers and sacrebleu (test dependencies).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# UI strings of command-line tools, Bible verses, and graphical interfaces (menus, buttons, dialogs: 1-8 words)
HELDOUT = {name: ROOT / "data" / "heldout" / f"test.{name}.jsonl" for name in ("ui", "bible", "gui")}
CONFIGS = [("greedy", 1), ("beam4", 4)]


def read_pairs(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = rows[:limit] if limit else rows
    return [r["en"] for r in rows], [r["de"] for r in rows]


def hf_translate(model_dir: Path, texts: list[str], beam: int) -> tuple[list[list[int]], list[str]]:
    """HF's own tokenizer and generate, float32, sorted batches of 32; returns target ids (no start/EOS) and text."""
    from transformers import MarianMTModel, MarianTokenizer
    tok = MarianTokenizer.from_pretrained(model_dir)
    model = MarianMTModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    ids: list = [None] * len(texts)
    out: list = [None] * len(texts)
    for start in range(0, len(order), 32):
        idx = order[start:start + 32]
        batch = tok([texts[i] for i in idx], return_tensors="pt", padding=True)
        with torch.inference_mode():
            gen = model.generate(**batch, num_beams=beam)
        for i, row in zip(idx, gen.tolist()):
            row = row[1:]
            ids[i] = row[: row.index(model.config.eos_token_id)] if model.config.eos_token_id in row else \
                [t for t in row if t != model.config.pad_token_id]
            out[i] = tok.decode(gen[idx.index(i)], skip_special_tokens=True)
    return ids, out


def pyengine_translate(model_dir: Path, texts: list[str], beam: int, dtype: torch.dtype):
    sys.path.insert(0, str(ROOT))
    import pyengine
    engine = pyengine.Engine.load(model_dir, dtype=dtype)
    results = engine.translate_batch(texts, beam_size=beam)
    return [r.tokens[0] for r in results], [r.hypotheses[0] for r in results]


def ct2_translate(model_dir: Path, texts: list[str], beam: int) -> tuple[list[list[int]], list[str]]:
    """CTranslate2's int8 compute type on the same model (converted by its own converter), sorted batches of 32."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianTokenizer
    tok = MarianTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        TransformersConverter(str(model_dir)).convert(tmp, quantization="int8", force=True)
        translator = ctranslate2.Translator(tmp, device="cpu", compute_type="int8",
                                            intra_threads=torch.get_num_threads())
        results = translator.translate_batch([tok.convert_ids_to_tokens(tok(t).input_ids) for t in texts],
                                             beam_size=beam, max_batch_size=32)
    tokens = [r.hypotheses[0] for r in results]
    return [tok.convert_tokens_to_ids(t) for t in tokens], [tok.convert_tokens_to_string(t) for t in tokens]


def same_share(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def evaluate(model_dir: Path, limit: int | None) -> dict:
    import sacrebleu
    report = {}
    for name, path in HELDOUT.items():
        src, ref = read_pairs(path, limit)
        row = {"sentences": len(src)}
        for label, beam in CONFIGS:
            t0 = time.perf_counter()
            hf_ids, hf_text = hf_translate(model_dir, src, beam)
            t_hf = time.perf_counter() - t0
            runs = {"hf-fp32": (hf_ids, hf_text, t_hf)}
            for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", "int8")):
                t0 = time.perf_counter()
                ids, text = pyengine_translate(model_dir, src, beam, dtype)
                runs[f"pyengine-{dname}"] = (ids, text, time.perf_counter() - t0)
            t0 = time.perf_counter()
            ids, text = ct2_translate(model_dir, src, beam)
            runs["ct2-int8"] = (ids, text, time.perf_counter() - t0)
            for system, (ids, text, secs) in runs.items():
                row[f"{label}/{system}"] = {
                    "bleu": round(sacrebleu.corpus_bleu(text, [ref]).score, 2),
                    "chrf": round(sacrebleu.corpus_chrf(text, [ref]).score, 2), "seconds": round(secs, 1)}
            row[f"{label}/parity_fp32_vs_hf"] = same_share(runs["pyengine-fp32"][0], hf_ids)
            row[f"{label}/bf16_same_as_fp32"] = same_share(runs["pyengine-bf16"][0], runs["pyengine-fp32"][0])
            row[f"{label}/int8_same_as_fp32"] = same_share(runs["pyengine-int8"][0], runs["pyengine-fp32"][0])
            row[f"{label}/ct2_int8_same_as_fp32"] = same_share(runs["ct2-int8"][0], runs["pyengine-fp32"][0])
            row[f"{label}/examples"] = [{"en": s, "reference": r, "pyengine": t}
                                        for s, r, t in list(zip(src, ref, runs["pyengine-fp32"][1]))[:3]]
        report[name] = row
    return report


def parity_model_guard(n_sentences: int = 200) -> dict:
    """bf16 vs fp32 best tokens on random peaky Marian models (the parity tests' construction), for pyengine and,
    as the yardstick, for HF's own bf16 against HF's fp32: as built (float32 weights, which bf16 rounds: a change
    of the model itself) and stored in bf16 (every weight rounded to bf16 first, as the shipped default model is
    stored; fp32 and bf16 then run the same model)."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import (ARCHS, build_marian, hf_model, pad_batch, random_sources,  # the tests' own builders
                          save_rounded_to_bf16)
    import pyengine
    out = {}
    for name, arch in ARCHS.items():
        with tempfile.TemporaryDirectory() as tmp:
            built = build_marian(Path(tmp) / "fp32", **arch)
            stored = save_rounded_to_bf16(built, Path(tmp) / "bf16")
            for variant, path in (("", built), ("/bf16-weights", stored)):
                fp32 = pyengine.Engine.load(path)
                bf16 = pyengine.Engine.load(path, dtype=torch.bfloat16)
                src = random_sources(n_sentences, fp32.config.src_vocab_size, seed=99)
                a = [t.tokens[0] for t in fp32.generate(src, beam_size=4, max_decoding_length=20)]
                b = [t.tokens[0] for t in bf16.generate(src, beam_size=4, max_decoding_length=20)]
                x, mask = pad_batch(src, fp32.config.pad_id)
                hf = {}
                for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                    with torch.inference_mode():
                        seqs = hf_model(path, dtype=dtype).generate(input_ids=x, attention_mask=mask, num_beams=4,
                                                                    max_new_tokens=20).tolist()
                    hf[dname] = [_strip(s, fp32.config.eos_id, fp32.config.pad_id) for s in seqs]
                out[name + variant] = {"pyengine": same_share(a, b), "hf": same_share(hf["fp32"], hf["bf16"])}
    return out


def _strip(seq: list[int], eos: int, pad: int) -> list[int]:
    seq = seq[1:]
    return seq[: seq.index(eos)] if eos in seq else [t for t in seq if t != pad]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, help="sentences per held-out set")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks import write_results
    from pyengine.engine import resolve_model_path
    model_dir = resolve_model_path(args.model)
    report = {"model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
              "heldout": evaluate(model_dir, args.limit), "parity_models_bf16_same_as_fp32": parity_model_guard()}
    for name, row in report["heldout"].items():
        print(f"\n{name} held-out set ({row['sentences']} sentences)")
        print(f"  {'decoding':<8} {'system':<15} {'BLEU':>6} {'chrF':>6} {'seconds':>8}")
        for label, _ in CONFIGS:
            for system in ("hf-fp32", "pyengine-fp32", "pyengine-bf16", "pyengine-int8", "ct2-int8"):
                r = row[f"{label}/{system}"]
                print(f"  {label:<8} {system:<15} {r['bleu']:>6.2f} {r['chrf']:>6.2f} {r['seconds']:>8.1f}")
            print(f"  {label}: pyengine fp32 tokens = HF tokens for {row[f'{label}/parity_fp32_vs_hf']:.1%}; "
                  f"bf16 = fp32 for {row[f'{label}/bf16_same_as_fp32']:.1%}; int8 = fp32 for "
                  f"{row[f'{label}/int8_same_as_fp32']:.1%} (CTranslate2 int8: {row[f'{label}/ct2_int8_same_as_fp32']:.1%})")
    print("\nrandom parity models, beam 4, share of sentences whose bf16 best tokens equal fp32's "
          "(/bf16-weights: the model's weights rounded to bf16 first):")
    for k, v in report["parity_models_bf16_same_as_fp32"].items():
        print(f"  {k:<28} pyengine {v['pyengine']:.1%}   (HF bf16 vs HF fp32: {v['hf']:.1%})")
    write_results("quality", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
