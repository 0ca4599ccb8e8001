"""The project as a user meets it: Hugging Face's `kernels` package is not shadowed by pyengine's top-level
kernels/ folder when Python starts in the repository root (transformers imports it), every results file the
README and docs/ cite exists in benchmarks/results/, and benchmarks.ab_builds' rewrite of a revision's sources
applies."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# a results file: <kind>-<yyyymmdd>[-<hhmmss>].json, with or without the benchmarks/results/ prefix
CITED = re.compile(r"\b([a-z][a-z-]*-\d{8}(?:-\d{6})?\.json)\b")


def cited_results(text: str) -> set[str]:
    return set(CITED.findall(text))


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_cited_results_file_exists():
    missing = {f"{doc.relative_to(ROOT)}: {name}" for doc in documents()
               for name in cited_results(doc.read_text(encoding="utf-8")) if not (RESULTS / name).is_file()}
    assert not missing, f"cited but not in benchmarks/results/: {sorted(missing)}"
    assert cited_results((ROOT / "README.md").read_text(encoding="utf-8")), "the README cites its results files"


def test_the_citation_check_fails_on_a_missing_file():
    text = "measured in `benchmarks/results/compare-20991231-235959.json` and load-20991231.json"
    assert cited_results(text) == {"compare-20991231-235959.json", "load-20991231.json"}
    assert not any((RESULTS / name).is_file() for name in cited_results(text))


def test_hugging_face_kernels_is_not_shadowed_from_the_repository_root():
    """`import kernels` in Python started in the repository root is Hugging Face's package (transformers depends on
    it), not pyengine's kernels/ folder, which has no __init__.py and is installed as pyengine.kernels."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package comes with transformers >= 5.25")
    code = ("import transformers, kernels, pyengine, pyengine.kernels.attention as a; "
            "print(kernels.__file__); print(a.__name__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    hf_file, name = run.stdout.split()
    assert Path(hf_file).resolve().parent != (ROOT / "kernels").resolve(), hf_file
    assert "site-packages" in hf_file and name == "pyengine.kernels.attention"
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_data_card_lists_every_source_package_and_the_held_out_sets_are_disjoint():
    """Every Debian package the corpus script read (data/heldout/stats.json) is in the data card with its version
    and licence; the three held-out sets share no source string (the script also keeps them out of training)."""
    data = ROOT / "data"
    card = (data / "DATA_CARD.md").read_text(encoding="utf-8")
    stats = json.loads((data / "heldout" / "stats.json").read_text(encoding="utf-8"))
    assert stats["gui_packages"]
    for package, info in stats["gui_packages"].items():
        row = f"| {package} | {info['version']} | {info['licence']} |"
        assert row in card, row
    sources = {}
    for name in ("ui", "bible", "gui"):
        rows = [json.loads(line) for line in (data / "heldout" / f"test.{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 1000 and all(r["en"] and r["de"] for r in rows)
        sources[name] = {r["en"] for r in rows}
        assert len(sources[name]) == 1000  # distinct sources
    assert not (sources["ui"] & sources["bible"] or sources["ui"] & sources["gui"] or sources["bible"] & sources["gui"])
    assert all(len(s.split()) <= 8 for s in sources["gui"])


def test_ab_builds_rewrites_this_trees_extension_to_load_beside_it():
    """benchmarks.ab_builds builds a revision as pyengine._Cab with module-local classes: the rewrite applies to the
    current setup.py and bindings (every class declaration), and refuses sources in a form it does not know."""
    from benchmarks.ab_builds import patch_sources
    setup_py, bindings = (ROOT / "setup.py").read_text(), (ROOT / "csrc" / "bindings.cpp").read_text()
    new_setup, new_bindings = patch_sources(setup_py, bindings)
    assert '"pyengine._Cab"' in new_setup and '"pyengine._C"' not in new_setup
    classes = bindings.count("pybind11::class_<")
    assert classes >= 4 and new_bindings.count("pybind11::module_local()") == classes
    with pytest.raises(SystemExit, match="class declarations"):
        patch_sources(setup_py, bindings.replace('(m, "DecoderLayer",', '(m,\n "DecoderLayer",'))
    with pytest.raises(SystemExit, match="setup.py"):
        patch_sources(setup_py.replace('"pyengine._C"', '"pyengine.core"'), bindings)


def test_ab_builds_swaps_the_extension_every_pyengine_module_calls():
    """benchmarks.ab_builds' base engine runs the base build: the `_C` each pyengine module imported at module level
    is swapped with the package attribute (swapping the attribute alone paired the working tree's build with itself),
    and back."""
    import importlib
    import types
    from benchmarks.ab_builds import swap_extension
    for module in ("pyengine.decoding.processors", "pyengine.model.cache", "pyengine.model.step"):
        importlib.import_module(module)  # (modules that call the extension)
    real = sys.modules["pyengine._C"]
    holders = [m for n, m in sys.modules.items() if n.startswith("pyengine.") and getattr(m, "_C", None) is real]
    names = {m.__name__ for m in holders}
    assert {"pyengine.model.step", "pyengine.model.linear", "pyengine.model.cache", "pyengine.decoding.processors"} <= names
    fake = types.ModuleType("pyengine._Cab")
    try:
        swap_extension(fake)
        assert sys.modules["pyengine"]._C is fake and all(m._C is fake for m in holders)
    finally:
        swap_extension(real)
    assert sys.modules["pyengine"]._C is real and all(m._C is real for m in holders)


def test_ab_checkouts_takes_pyengine_runs_of_compare_only():
    """benchmarks.ab_checkouts runs compare's worker for SYSTEM:CASE pairs: pyengine's systems and compare's cases
    are taken; another engine's system (its checkout-independent speed), an unknown case or a bare system refused."""
    import argparse
    from benchmarks.ab_checkouts import parse_run
    assert parse_run("pyengine-int8:beam4_b32") == ("pyengine-int8", "beam4_b32")
    assert parse_run("pyengine-bf16:greedy_b1") == ("pyengine-bf16", "greedy_b1")
    for bad in ("ct2-int8:beam4_b32", "pyengine-int8:beam5_b32", "pyengine-int8", "pyengine-int4:greedy_b1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected SYSTEM:CASE"):
            parse_run(bad)
