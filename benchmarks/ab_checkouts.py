"""A/B of two checkouts, the whole engine (Python and C++): a revision's checkout against the working tree, each run
of benchmarks.compare's own worker (load, warm-up, timed calls) in its own process, the two checkouts alternated.

benchmarks.ab_builds pairs calls in one process but compares changes under csrc/ only; this measures what a user of
each revision gets, e.g. whether a machine kind regressed since the README's last table of it was measured. Each
round runs each checkout's worker once (order alternated between rounds); reported per system and case: the median
over rounds of the revision's fastest call / the working tree's fastest call (above 1: the working tree is faster).

    python -m benchmarks.ab_checkouts c2bfd88 --runs pyengine-int8:beam4_b32 pyengine-bf16:greedy_b1 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .ab_builds import build_extension, paired_ratios, revision_tree
from .compare import CACHE, CASES, RESULTS, ROOT, SYSTEMS, WorkerFailed, prepare_model, run_worker


def parse_run(text: str) -> tuple[str, str]:
    """'SYSTEM:CASE' (a pyengine system of benchmarks.compare and one of its cases) as a pair."""
    system, _, case = text.partition(":")
    if not system.startswith("pyengine-") or system not in SYSTEMS or case not in CASES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SYSTEM:CASE, SYSTEM one of {[s for s in SYSTEMS if s.startswith('pyengine-')]}, "
            f"CASE one of {sorted(CASES)}")
    return system, case


def share_models(tree: Path) -> None:
    """The revision's worker reads the benchmark models from its own benchmarks/.cache: link this tree's there."""
    (tree / "benchmarks" / ".cache").mkdir(parents=True, exist_ok=True)
    for model in [CACHE / "opus-mt-en-de-shape", *CACHE.glob("ct2-*")]:
        link = tree / "benchmarks" / ".cache" / model.name
        if not link.exists():
            link.symlink_to(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the revision to compare the working tree with")
    parser.add_argument("--runs", nargs="+", type=parse_run, required=True, metavar="SYSTEM:CASE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=4, help="timed calls per worker after its warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results JSON is written")
    args = parser.parse_args(argv)

    commit, tree = revision_tree(args.rev, "tree")
    build_extension(tree, "_C", args.rev)
    prepare_model()
    share_models(tree)
    checkouts = {"base": tree, "new": ROOT}
    results = []
    for system, case in args.runs:
        runs = {name: [] for name in checkouts}
        for i in range(args.rounds):
            for name in ("base", "new") if i % 2 == 0 else ("new", "base"):
                try:
                    runs[name].append(run_worker(checkouts[name], system, case, args.threads, args.repeats)["seconds"])
                except WorkerFailed as failed:
                    raise SystemExit(str(failed)) from None
        fastest = {name: [min(seconds) for seconds in runs[name]] for name in checkouts}
        ratio = paired_ratios(fastest["base"], fastest["new"])
        rounds = " ".join(f"{b / n:.3f}" for b, n in zip(fastest["base"], fastest["new"]))
        print(f"{system:14s} {case:11s} working tree over {args.rev}: {ratio:.3f} (rounds {rounds})")
        results.append({"system": system, "case": case, "speedup": ratio, "seconds": runs})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-checkouts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    path.write_text(json.dumps({"base": commit, "new": head, "threads": args.threads, "rounds": args.rounds,
                                "command": "python -m benchmarks.ab_checkouts " + " ".join(argv or sys.argv[1:]),
                                "results": results}, indent=1))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
