"""Corpus throughput on Ray Data with 1 and 2 workers (one engine on 1 thread each), and its scaling efficiency.

    python -m benchmarks.distributed                  # 1000 held-out sentences, 2 rounds, the shipped model
    python -m benchmarks.distributed --sentences 300 --rounds 1

A local Ray cluster with 2 CPUs is started once; the runs alternate (1, 2, 1, 2 workers); each run's wall time
counts everything a user waits for (actors started and the model loaded in each, the corpus translated, the rows
back in order). The floor it is compared with: the same sentences through Engine.translate in one process on 1
thread (its own process, run between the rounds). Scaling efficiency = throughput(2) / (2 × throughput(1)).
Writes JSON to benchmarks/results/distributed-*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = [ROOT / "data" / "heldout" / "test.ui.jsonl", ROOT / "data" / "heldout" / "test.bible.jsonl"]


def corpus(n: int) -> list[str]:
    rows = [json.loads(line)["en"] for path in HELDOUT for line in path.read_text(encoding="utf-8").splitlines()]
    return rows[::2][:n] if n <= len(rows) // 2 else rows[:n]  # UI strings and verses interleaved by file order


def single_process(model: str, texts: list[str]) -> float:
    """Seconds for Engine.translate of `texts` on 1 thread, in a fresh process (model load excluded)."""
    code = ("import json, sys, time, torch; torch.set_num_threads(1); import pyengine; "
            f"e = pyengine.Engine.load({model!r}); texts = json.load(sys.stdin); e.translate(texts[:8]); "
            "t = time.perf_counter(); e.translate(texts); print(time.perf_counter() - t)")
    run = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts).encode(), capture_output=True,
                         cwd=ROOT, check=True, timeout=3600)
    return float(run.stdout.decode().split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import ray

    from benchmarks import write_results
    from benchmarks import cpu_name
    from pyengine.distributed import translate_dataset

    texts = corpus(args.sentences)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[float]] = {"1": [], "2": []}
    floor: list[float] = []
    reference = None
    for _ in range(args.rounds):
        for workers in (1, 2):
            ds = ray.data.from_items([{"text": t} for t in texts])
            t0 = time.perf_counter()
            rows = translate_dataset(ds, args.model, workers=workers, threads=1, batch_size=args.batch_size).take_all()
            runs[str(workers)].append(time.perf_counter() - t0)
            out = [r["translation"] for r in rows]
            assert reference is None or out == reference, "the runs disagree"
            reference = out
        floor.append(single_process(args.model, texts))
    ray.shutdown()
    best = {k: min(v) for k, v in runs.items()}
    throughput = {k: len(texts) / s for k, s in best.items()}
    report = {"machine": {"cpu": cpu_name(), "cpus_for_ray": 2, "threads_per_worker": 1},
              "model": args.model, "sentences": len(texts), "batch_size": args.batch_size, "rounds": args.rounds,
              "seconds": runs, "single_process_1_thread_seconds": floor,
              "sentences_per_s": {"ray_1_worker": round(throughput["1"], 2), "ray_2_workers": round(throughput["2"], 2),
                                  "single_process_1_thread": round(len(texts) / min(floor), 2)},
              "scaling_efficiency_2_workers": round(throughput["2"] / (2 * throughput["1"]), 3),
              "ray_1_worker_share_of_single_process": round(throughput["1"] / (len(texts) / min(floor)), 3)}
    print(json.dumps({k: report[k] for k in ("sentences_per_s", "scaling_efficiency_2_workers",
                                             "ray_1_worker_share_of_single_process")}, indent=1))
    write_results("distributed", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
