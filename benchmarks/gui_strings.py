"""The shipped model on the most common words of a graphical user interface, beside what German UIs say.

    python -m benchmarks.gui_strings               # writes benchmarks/results/gui-strings-*.json

The expected column is the German most desktop applications use (GTK, GNOME, LibreOffice, Firefox); a string
counts as matching when the model's output equals it or one of its common variants, ignoring a final period
and accelerator-free capitalisation. Beam 4, float32 (the README's first command).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# English -> the German forms desktop UIs use (first: the most common)
COMMON = {
    "Save": ["Speichern"], "Save As": ["Speichern unter"], "Cancel": ["Abbrechen"], "Open": ["Öffnen"],
    "Open File": ["Datei öffnen"], "Close": ["Schließen"], "Settings": ["Einstellungen"],
    "Preferences": ["Einstellungen"], "Print": ["Drucken"], "Quit": ["Beenden"], "Delete": ["Löschen"],
    "Undo": ["Rückgängig", "Rückgängig machen"], "Redo": ["Wiederholen", "Wiederherstellen"],
    "Copy": ["Kopieren"], "Paste": ["Einfügen"], "Cut": ["Ausschneiden"], "Select All": ["Alles auswählen",
    "Alles markieren"], "Find": ["Suchen"], "Replace": ["Ersetzen"], "Help": ["Hilfe"], "Edit": ["Bearbeiten"],
    "View": ["Ansicht"], "New Folder": ["Neuer Ordner", "Ordner anlegen"], "Rename": ["Umbenennen"],
    "Are you sure you want to delete this file?": ["Sind Sie sicher, dass Sie diese Datei löschen möchten?",
                                                    "Sind Sie sicher, dass Sie diese Datei löschen wollen?",
                                                    "Soll diese Datei wirklich gelöscht werden?",
                                                    "Wollen Sie diese Datei wirklich löschen?"],
}


def matches(output: str, expected: list[str]) -> bool:
    norm = lambda s: s.strip().rstrip(".").casefold()  # noqa: E731
    return norm(output) in {norm(e) for e in expected}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import pyengine
    from benchmarks import write_results
    engine = pyengine.Engine.load(args.model)
    outputs = engine.translate(list(COMMON), beam_size=4)
    rows = [{"en": en, "pyengine": out, "expected": COMMON[en], "matches": matches(out, COMMON[en])}
            for en, out in zip(COMMON, outputs)]
    for r in rows:
        print(f"{'✓' if r['matches'] else '✗'} {r['en']:<45} {r['pyengine']:<45} ({' / '.join(r['expected'])})")
    share = sum(r["matches"] for r in rows) / len(rows)
    print(f"{share:.0%} as a German UI says them")
    write_results("gui-strings", {"model": args.model, "beam_size": 4, "dtype": "float32", "matching": share,
                                  "strings": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
