"""A/B of a change to the C++ extension, paired in one process: a revision's build of pyengine._C against the
working tree's, an engine on each, calls alternated between them.

Measured in two processes one after the other, this machine's 2-3x speed swings (minutes long) decide the result,
not the code. Here the revision's sources are built in a git worktree as the module pyengine._Cab (its pybind
classes module-local, so both builds load side by side), one engine is loaded on each build, and each round times
one call of each, in alternating order (ABBA). Reported: the median of the per-round ratios, overall and for each
part of a call (engine.stats: admit, decoder, output, search), and how many sentences' tokens differ.

The Python code is the working tree's for both engines: this compares changes under csrc/ only.

    python -m benchmarks.ab_builds HEAD --dtype int8 --case beam4_b32 --rounds 16
"""
from __future__ import annotations

import argparse
import json
import importlib.machinery
import importlib.util
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from .compare import CACHE, CASES, ROOT, prepare_model, sources

BASE_MODULE = "_Cab"
CLASS_DECLARATION = re.compile(r'pybind11::class_<(pyengine::\w+)>\(m, ("\w+"),')


def patch_sources(setup_py: str, bindings: str) -> tuple[str, str]:
    """The revision's setup.py and bindings.cpp rewritten to build pyengine._Cab with module-local classes.
    Refuses sources the rewrite does not recognize (an old or new layout) rather than build something else."""
    if setup_py.count('"pyengine._C"') != 1:
        raise SystemExit("ab_builds: setup.py does not name the extension \"pyengine._C\" once")
    patched_bindings, classes = CLASS_DECLARATION.subn(r"pybind11::class_<\1>(m, \2, pybind11::module_local(),",
                                                       bindings)
    if "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)" not in bindings or classes != bindings.count("pybind11::class_<"):
        raise SystemExit("ab_builds: csrc/bindings.cpp's module or class declarations are not in the expected form")
    return setup_py.replace('"pyengine._C"', f'"pyengine.{BASE_MODULE}"'), patched_bindings


def revision_tree(rev: str, prefix: str) -> tuple[str, Path]:
    """A git worktree of the revision under benchmarks/.cache (made once per commit and prefix); its commit, path."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    tree = CACHE / f"{prefix}-{commit[:12]}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return commit, tree


def build_extension(tree: Path, module: str, rev: str) -> Path:
    """The tree's extension pyengine.<module>, built in place unless already there; its path."""
    built = sorted((tree / "pyengine").glob(f"{module}.*.so"))
    if not built:
        print(f"building {rev} in {tree} ...", file=sys.stderr)
        log = tree / "build.log"
        with log.open("w") as out:
            done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, stdout=out,
                                  stderr=subprocess.STDOUT)
        built = sorted((tree / "pyengine").glob(f"{module}.*.so"))
        if done.returncode != 0 or not built:
            raise SystemExit(f"building {rev} failed; see {log}")
    return built[0]


def build_revision(rev: str) -> Path:
    """The revision's extension as pyengine._Cab, built (once per commit) in a worktree under benchmarks/.cache."""
    _, tree = revision_tree(rev, "ab")
    if f'"pyengine.{BASE_MODULE}"' not in (tree / "setup.py").read_text():  # (also after a run stopped here)
        setup_py, bindings = patch_sources((tree / "setup.py").read_text(), (tree / "csrc/bindings.cpp").read_text())
        (tree / "setup.py").write_text(setup_py)
        (tree / "csrc/bindings.cpp").write_text(bindings)
    return build_extension(tree, BASE_MODULE, rev)


def load_extension(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(f"pyengine.{BASE_MODULE}", str(path))
    spec = importlib.util.spec_from_file_location(f"pyengine.{BASE_MODULE}", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def swap_extension(module: ModuleType) -> None:
    """Make `module` the extension pyengine calls: the package attribute, sys.modules, and the `_C` that each pyengine
    module imported at module level (from 8517376 on; swapping the package attribute alone then left every call on
    the working tree's build, and each pairing compared that build with itself)."""
    sys.modules["pyengine"]._C = sys.modules["pyengine._C"] = module
    for name, loaded in list(sys.modules.items()):
        if name.startswith("pyengine.") and isinstance(getattr(loaded, "_C", None), ModuleType):
            loaded._C = module


def check_runs_own_build(engine, module: ModuleType, name: str) -> None:
    """Refuse a pairing whose engine's native decoder step was made by the other build (a reference to the
    extension that swap_extension missed)."""
    layers = getattr(engine.model.step, "layers", None)
    if layers and not isinstance(layers[0], module.DecoderLayer):
        raise SystemExit(f"ab_builds: the {name} engine's decoder layers are not its build's ({module.__name__})")


def paired_ratios(base: list[float], new: list[float]) -> float:
    """The median over rounds of base time / new time (above 1: the working tree is faster)."""
    return statistics.median(b / n for b, n in zip(base, new))


def paired_arguments(parser: argparse.ArgumentParser, case: str, rounds: int) -> None:
    """The arguments of a paired A/B (this module's and benchmarks.ab_options')."""
    parser.add_argument("--dtype", default="int8", choices=("float32", "bfloat16", "int8"))
    parser.add_argument("--case", default=case, choices=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=2)


def paired_rounds(engines: dict, run, rounds: int) -> tuple[dict, dict]:
    """Each round times one call of each engine ("base", "new"), in ABBA order; the seconds of each call and its
    parts (engine.stats), per engine. run(name) makes the call."""
    seconds = {name: [] for name in engines}
    parts = {name: [] for name in engines}
    for i in range(rounds):
        for name in ("base", "new") if i % 2 == 0 else ("new", "base"):
            engines[name].stats.seconds.clear()
            start = time.perf_counter()
            run(name)
            seconds[name].append(time.perf_counter() - start)
            parts[name].append(dict(engines[name].stats.seconds))
    return seconds, parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the revision to compare the working tree's build with (e.g. HEAD)")
    paired_arguments(parser, "beam4_b32", 16)
    parser.add_argument("--json", type=Path, help="also write each round's seconds (and parts) here")
    args = parser.parse_args(argv)

    import torch
    sys.path.insert(0, str(ROOT))
    import pyengine
    from pyengine import _C as new_module
    base_module = load_extension(build_revision(args.rev))
    torch.set_num_threads(args.threads)
    model_dir = prepare_model()
    _, _, n, beam = CASES[args.case]
    src = sources(args.case)
    modules = {"base": base_module, "new": new_module}

    def use(name: str) -> None:
        swap_extension(modules[name])

    engines = {}
    for name in modules:
        use(name)
        engines[name] = pyengine.Engine.load(model_dir, dtype=args.dtype, max_batch_size=32)
        check_runs_own_build(engines[name], modules[name], name)

    def run(name: str) -> list:
        use(name)
        return engines[name].generate(src, beam_size=beam, max_decoding_length=n, min_decoding_length=n)

    tokens = {name: [t.tokens for t in run(name)] for name in engines}  # (and a warm-up)
    seconds, parts = paired_rounds(engines, run, args.rounds)
    use("new")
    for name in engines:
        print(f"{name:4s} median {statistics.median(seconds[name]):.4f} s, min {min(seconds[name]):.4f} s")
    print(f"speedup of the working tree over {args.rev} (median of {args.rounds} paired ratios): "
          f"{paired_ratios(seconds['base'], seconds['new']):.3f}")
    for part in parts["new"][0]:
        print(f"  {part:8s} {paired_ratios([p[part] for p in parts['base']], [p[part] for p in parts['new']]):.3f}")
    differ = sum(a != b for a, b in zip(tokens["base"], tokens["new"]))
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "parts": parts}))
    print(f"sentences whose tokens differ: {differ} of {len(src)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
