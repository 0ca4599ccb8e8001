"""The server's worker fed directly (no HTTP) against offline `translate_batch`, in one process, alternated.

~500 mixed-length held-out sentences (UI strings and Bible verses) are submitted to a Scheduler all at once, in
requests of 1-8 sentences (saturation: the queue never runs dry), and the same sentences are translated offline
in one call (length-sorted token-budget batches). Both must give the same translations; the ratio of their
throughputs is the worker's share of offline speed. JSON goes to benchmarks/results/.

With `--workers 1 2` each layout is measured: one Scheduler in the calling thread with all threads (worker 0 of
`pyengine serve`), and N forked worker processes sharing them, fed through the front end's WorkerPool over their
pipes (`serve --workers N` without HTTP).

    python -m benchmarks.scheduler --dtypes int8 bfloat16 --rounds 4 --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HELDOUT = ROOT / "data" / "heldout"


def heldout_mix(n: int, seed: int = 0) -> list[str]:
    """n held-out English sentences, half UI strings and half Bible verses, shuffled."""
    rows = []
    for name in ("ui", "bible"):
        lines = (HELDOUT / f"test.{name}.jsonl").read_text(encoding="utf-8").splitlines()
        rows += [json.loads(line)["en"] for line in lines[: n // 2]]
    random.Random(seed).shuffle(rows)
    return rows


def requests_of(texts: list[str], seed: int = 0) -> list[list[str]]:
    """The texts cut into requests of 1-8 sentences."""
    rng, out, i = random.Random(seed), [], 0
    while i < len(texts):
        n = rng.randint(1, 8)
        out.append(texts[i: i + n])
        i += n
    return out


def run_offline(engine, texts: list[str], options: dict) -> tuple[float, list[str], dict]:
    from pyengine.decoding import RuntimeStats
    engine.stats = RuntimeStats()
    t0 = time.perf_counter()
    out = engine.translate(texts, **options)
    seconds = time.perf_counter() - t0
    return seconds, out, {"steps": engine.stats.steps,
                          "seconds": {k: round(v, 3) for k, v in engine.stats.seconds.items()}}


def run_scheduler(engine, requests: list[list[str]], options: dict) -> tuple[float, list[str], dict]:
    """Every request queued at once, then the worker run in this thread (as `pyengine serve` runs it) until done."""
    from pyengine.serving.scheduler import Scheduler
    scheduler = Scheduler(engine, max_queue=1 << 20)
    t0 = time.perf_counter()
    futures = [scheduler.submit(r, **options)[1] for r in requests]
    scheduler.run(until=lambda: True)
    out = [t.hypotheses[0] for f in futures for t in f.result()]
    seconds = time.perf_counter() - t0
    rows = statistics.mean(scheduler.stats.rows_per_step)
    return seconds, out, {**counted(scheduler.stats), "mean_rows_per_step": rows}


def counted(stats, before=None) -> dict:
    """What a worker's counters say of a run: their values, or their growth since `before` (a pool's, read at the
    run's start)."""
    b = before if before is not None else type(stats)()
    return {"steps": stats.steps - b.steps, "decoder_steps": dict(stats.decoder_steps - b.decoder_steps),
            "outputs": dict(stats.outputs - b.outputs),
            "seconds": {k: round(v - b.seconds[k], 3) for k, v in stats.seconds.items()}}


class WorkerProcesses:
    """`workers` worker processes of `pyengine serve --workers N` (forked, `threads` each) and the front end's
    WorkerPool over their pipes, in this process: the workers fed directly, without HTTP."""

    def __init__(self, engine, workers: int, threads: int):
        from multiprocessing import Pipe

        import torch

        from pyengine.config import ServerConfig
        from pyengine.serving.processes import fork_worker
        from pyengine.serving.worker_link import WorkerClient, WorkerPool
        config = ServerConfig(workers=workers, max_queue=1 << 20)
        self.links = [Pipe() for _ in range(workers)]
        own = torch.get_num_threads()
        torch.set_num_threads(threads)  # what the forked workers start with
        self.pids = [fork_worker(engine, config, self.links, k) for k in range(workers)]
        torch.set_num_threads(own)
        for worker_end, _ in self.links:
            worker_end.close()
        self.pool = WorkerPool([WorkerClient(front_end) for _, front_end in self.links])

    def run(self, requests: list[list[str]], options: dict) -> tuple[float, list[str], dict]:
        """Every request sent at once; the seconds until the last answer (and what the workers counted meanwhile)."""
        before = self.pool.state().result(60)["stats"]
        t0 = time.perf_counter()
        futures = [self.pool.submit(r, **options)[1] for r in requests]
        out = [t.hypotheses[0] for f in futures for t in f.result()]
        seconds = time.perf_counter() - t0
        return seconds, out, counted(self.pool.state().result(60)["stats"], before)

    def close(self) -> None:
        import os
        self.pool.close()
        for pid in self.pids:
            os.waitpid(pid, 0)


def measure(dtype: str, texts: list[str], options: dict, rounds: int, threads: int, workers: int) -> dict:
    import torch

    import pyengine
    torch.set_num_threads(threads)
    import pyengine.serving.scheduler  # noqa: F401 - imported before timing
    engine = pyengine.Engine.load("default", dtype=dtype)
    requests = requests_of(texts)
    engine.translate(texts[:16], **options)  # warm-up
    processes = WorkerProcesses(engine, workers, threads // workers) if workers > 1 else None
    offline, worker, stats, offline_stats = [], [], {}, {}
    for _ in range(rounds):  # alternated (worker processes idle while this one decodes offline)
        seconds, want, offline_stats = run_offline(engine, texts, options)
        offline.append(seconds)
        seconds, got, stats = processes.run(requests, options) if processes else \
            run_scheduler(engine, requests, options)
        worker.append(seconds)
        print(f"  {dtype} round: offline {offline[-1]:.2f} s {offline_stats['seconds']}, worker {worker[-1]:.2f} s "
              f"{stats['seconds']}", file=sys.stderr)
        mismatches = sum(a != b for a, b in zip(got, want))
        if mismatches:
            raise SystemExit(f"{dtype}: {mismatches} of {len(texts)} translations differ between the worker and "
                             "translate()")
    if processes:
        processes.close()
    off, wrk = statistics.median(offline), statistics.median(worker)
    # the machine's speed drifts between runs (a shared VM): the ratio of each round's adjacent pair, median
    ratio = statistics.median(o / w for o, w in zip(offline, worker))
    return {"dtype": dtype, "workers": workers, "threads_per_worker": threads // workers,
            "backends": engine.backends, "sentences": len(texts), "requests": len(requests),
            "offline_s": offline, "worker_s": worker, "offline_sentences_per_s": len(texts) / off,
            "worker_sentences_per_s": len(texts) / wrk, "worker_over_offline": ratio, "worker_stats": stats,
            "offline_stats": offline_stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"])
    ap.add_argument("--sentences", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="offline's threads, and the workers' in all")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker layouts: 1 (a Scheduler in this thread, as serve's worker 0) or N worker processes "
                         "of --threads / N threads each, fed through the front end's WorkerPool")
    ap.add_argument("--beam-size", type=int, default=4)
    ap.add_argument("--max-decoding-length", type=int, default=128)
    args = ap.parse_args(argv)
    texts = heldout_mix(args.sentences)
    options = {"beam_size": args.beam_size, "max_decoding_length": args.max_decoding_length}
    results = []
    if any(args.threads % w for w in args.workers):
        ap.error("--threads must be a multiple of each --workers")
    for dtype, workers in ((d, w) for d in args.dtypes for w in args.workers):
        r = measure(dtype, texts, options, args.rounds, args.threads, workers)
        results.append(r)
        print(f"{dtype:<9} workers {workers} offline {r['offline_sentences_per_s']:6.1f} sent/s  "
              f"worker {r['worker_sentences_per_s']:6.1f} sent/s  = {r['worker_over_offline']:.2f}x  "
              f"({r['worker_stats']['decoder_steps']}, {r['worker_stats']['outputs']})",
              file=sys.stderr)
    from benchmarks import cpu_name
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"scheduler-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"cpu": cpu_name(), "threads": args.threads, "options": options, "results": results},
                               indent=1))
    print(f"written {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
