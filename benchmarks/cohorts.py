"""What a continuous batch's cohorts cost, without HTTP: the same sentences decoded by the runtime offline-style and
server-style, in one process, one worker thread, alternated.

- `offline`: length-sorted batches of `--batch` sentences, each one cohort run to the end (`translate`'s way);
- `staggered`: in their arrival order, a cohort of `--cohort` sentences admitted whenever the running batch holds at
  most `--batch` − `--cohort` (the server's way under closed-loop clients: cohorts at different positions, sentences
  joining as others finish; a beam cohort joins the search state of a running one of its options where it can,
  decoding/runs.py, else keeps its own).

Both run the same decoder step, output layer and search rules over the same sentences, so what differs is what the
cohorts cost: search bookkeeping per search state every step, rows at scattered positions and cache rows, encoder
calls per cohort. "cohorts/step" counts the search states live a step. Reported per mode: the median wall seconds, the runtime's own parts (admit, decoder, output, search), steps,
row-steps and cohorts per step, and the ratio staggered / offline. With `--mixed`, every other cohort runs at the
model's default options (LibreTranslate's `/translate`) and the others at beam 2 (the load's `/v1`), as in
`benchmarks.load`, so one batch holds two beam widths. JSON goes to benchmarks/results/cohorts-*.json.

    python -m benchmarks.cohorts --dtype int8 --rounds 5 --mixed
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from benchmarks import cpu_name, write_results
from benchmarks.load import pool_of_texts


def decode_offline(engine, sources: list[tuple[list[int], object]], batch: int) -> dict:
    """Length-sorted batches of `batch` sentences per option set, each one cohort run to the end."""
    import torch

    from pyengine.decoding import Runtime, RuntimeStats
    stats, row_steps, live, cfg = RuntimeStats(), 0, 0, engine.config
    start = time.perf_counter()
    for opts in dict.fromkeys(o for _, o in sources):
        ids = sorted((s for s, o in sources if o is opts), key=len)
        for i in range(0, len(ids), batch):
            runtime = Runtime(engine.model, engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id,
                              cfg.eos_id, stats=stats)
            runtime.admit(ids[i: i + batch], list(range(len(ids[i: i + batch]))))
            while runtime.cohorts:
                row_steps += runtime.rows
                live += 1
                runtime.step()
            runtime.release()
    return report(stats, row_steps, live, time.perf_counter() - start)


def decode_staggered(engine, sources: list[tuple[list[int], object]], batch: int, cohort: int) -> dict:
    """In arrival order: a cohort of `cohort` sentences (one option set each) admitted whenever the batch holds at
    most batch - cohort sentences (a server's running batch, sized for `batch`)."""
    import torch

    from pyengine.decoding import Runtime, RuntimeStats
    stats, row_steps, live, cfg = RuntimeStats(), 0, 0, engine.config
    runtime = Runtime(engine.model, engine.rules, sources[0][1], torch.device("cpu"), cfg.decoder_start_id,
                      cfg.eos_id, stats=stats, capacity=batch)
    todo, tag = list(sources), 0
    start = time.perf_counter()
    while todo or runtime.cohorts:
        if todo and runtime.sentences <= batch - cohort:
            opts = todo[0][1]
            take = [s for s, o in todo[:cohort] if o is opts]
            todo = todo[len(take):]
            runtime.admit(take, list(range(tag, tag + len(take))), opts=opts)
            tag += len(take)
        row_steps += runtime.rows
        live += len(runtime.cohorts)
        runtime.step()
    runtime.release()
    return report(stats, row_steps, live, time.perf_counter() - start)


def report(stats, row_steps: int, live: int, wall: float) -> dict:
    return {"wall_s": wall, "steps": stats.steps, "row_steps": row_steps, "cohorts": stats.cohorts,
            "cohorts_per_step": live / max(1, stats.steps),
            "seconds": {k: round(v, 4) for k, v in stats.seconds.items()}}


def arrivals(engine, n: int, cohort: int, mixed: bool, seed: int = 0) -> list[tuple[list[int], object]]:
    """n sentences drawn from the load's pool, as (source ids, options), a cohort's worth per option set in turn."""
    rng = random.Random(seed)
    ids, _ = engine.prepare(pool_of_texts(96))
    sets = [engine.options(beam_size=2, max_decoding_length=64)] + ([engine.options()] if mixed else [])
    return [(rng.choice(ids), sets[(i // cohort) % len(sets)]) for i in range(n)]


def medians(runs: list[dict]) -> dict:
    parts = runs[0]["seconds"].keys()
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "seconds": {k: statistics.median(r["seconds"][k] for r in runs) for k in parts},
            **{k: runs[0][k] for k in ("steps", "row_steps", "cohorts", "cohorts_per_step")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--threads", type=int, default=1, help="a server worker's threads (serve --workers 2: 1 each)")
    ap.add_argument("--sentences", type=int, default=700)
    ap.add_argument("--batch", type=int, default=28, help="sentences a batch holds (a worker's share of the load)")
    ap.add_argument("--cohort", type=int, default=7, help="sentences admitted together (staggered)")
    ap.add_argument("--mixed", action="store_true", help="two option sets, beam 2 and the model's defaults")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import torch

    import pyengine
    torch.set_num_threads(args.threads)
    engine = pyengine.Engine.load(args.model, dtype=args.dtype)
    sources = arrivals(engine, args.sentences, args.cohort, args.mixed)
    runs: dict[str, list[dict]] = {"offline": [], "staggered": []}
    with torch.inference_mode():
        decode_staggered(engine, sources[:64], args.batch, args.cohort)  # warm-up
        for r in range(args.rounds):
            runs["offline"].append(decode_offline(engine, sources, args.batch))
            runs["staggered"].append(decode_staggered(engine, sources, args.batch, args.cohort))
            print(f"round {r}: offline {runs['offline'][-1]['wall_s']:.3f} s, "
                  f"staggered {runs['staggered'][-1]['wall_s']:.3f} s", flush=True)
    summary = {mode: medians(v) for mode, v in runs.items()}
    ratios = [s["wall_s"] / o["wall_s"] for o, s in zip(runs["offline"], runs["staggered"])]
    summary["staggered_over_offline"] = statistics.median(ratios)
    for mode in ("offline", "staggered"):
        m = summary[mode]
        print(f"{mode:9s} {m['wall_s']:.3f} s  steps {m['steps']}  row-steps {m['row_steps']}  cohorts/step "
              f"{m['cohorts_per_step']:.1f}  " + "  ".join(f"{k} {v:.3f}" for k, v in m["seconds"].items()))
    rounds = ", ".join(f"{x:.3f}" for x in ratios)
    print(f"staggered / offline: {summary['staggered_over_offline']:.3f} (rounds {rounds})")
    write_results("cohorts", {"cpu": cpu_name(), "args": vars(args), "summary": summary, "runs": runs,
                              "ratios": ratios})


if __name__ == "__main__":
    main()
