"""A/B of an engine option, paired in one process: two engines on the same model, one loaded with the option's
default and one with the given value, calls alternated between them (ABBA).

Measured in two processes one after the other, this machine's speed swings (minutes long) decide the result, not
the option (benchmarks.ab_builds does the same for a change to the C++ extension). Reported: the median of the
per-round ratios, overall and per part of a call (engine.stats), what each engine's backends say about the option,
and how many sentences' tokens or scores differ.

    python -m benchmarks.ab_options huge_pages=false --dtype int8 --case greedy_b1 --rounds 40
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from .ab_builds import paired_arguments, paired_ratios, paired_rounds
from . import cpu_name
from .compare import CASES, RESULTS, ROOT, prepare_model, sources


def parse_option(text: str) -> tuple[str, object]:
    """name=value, the value read as JSON (true, 3, "x"; a bare word is a string)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"ab_options: expected name=value, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("option", help="the engine option and the value the base engine is loaded with (name=value)")
    paired_arguments(parser, "greedy_b1", 40)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results JSON is written")
    args = parser.parse_args(argv)
    name, value = parse_option(args.option)

    import torch
    sys.path.insert(0, str(ROOT))
    import pyengine
    torch.set_num_threads(args.threads)
    model_dir = prepare_model()
    _, _, n, beam = CASES[args.case]
    src = sources(args.case)
    engines = {"base": pyengine.Engine.load(model_dir, dtype=args.dtype, max_batch_size=32, **{name: value}),
               "new": pyengine.Engine.load(model_dir, dtype=args.dtype, max_batch_size=32)}

    def run(which: str) -> list:
        return engines[which].generate(src, beam_size=beam, max_decoding_length=n, min_decoding_length=n)

    outputs = {which: [(t.tokens, t.scores) for t in run(which)] for which in engines}  # (and a warm-up)
    seconds, parts = paired_rounds(engines, run, args.rounds)
    speedup = paired_ratios(seconds["base"], seconds["new"])
    by_part = {part: paired_ratios([p[part] for p in parts["base"]], [p[part] for p in parts["new"]])
               for part in parts["new"][0]}
    differ = sum(a != b for a, b in zip(outputs["base"], outputs["new"]))
    backends = {which: e.backends for which, e in engines.items()}
    changed = [key for key in backends["new"] if backends["new"][key] != backends["base"].get(key)]
    for which in engines:
        print(f"{which:4s} median {statistics.median(seconds[which]):.4f} s; backends "
              f"{ {key: backends[which][key] for key in changed} }")
    print(f"speedup of the default over {args.option} (median of {args.rounds} paired ratios, ABBA): {speedup:.3f}")
    for part, ratio in by_part.items():
        print(f"  {part:8s} {ratio:.3f}")
    print(f"sentences whose tokens or scores differ: {differ} of {len(src)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab-options-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": "python -m benchmarks.ab_options " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(),
        "option": {name: value}, "dtype": args.dtype, "case": args.case, "threads": args.threads,
        "speedup": speedup, "parts": by_part, "differ": differ, "seconds": seconds, "backends": backends},
        indent=1))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
