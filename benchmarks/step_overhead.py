"""Per-step time outside the model's forward (search, cache reorder, bookkeeping) in beam search.

    python -m benchmarks.step_overhead [--dtype bf16] [--batch 32] [--beam 4] [--steps 32] [--threads 2]

On the opus-mt-en-de-shaped random model of benchmarks.compare, decodes exactly --steps target tokens
(min = max length, so no sentence stops early) and times every decoder forward; the rest of each
step is the overhead. Runs the C++ paths (fused log-softmax + top-k, C++ beam step, and the indirect
KV cache, which reorders a row index instead of rows) and the PyTorch/Python versions they replace
(`reference=True`: rows gathered by index_select), alternated, median of
--repeats, and prints both as ms per step and as a share of the forward time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.compare import prepare_model, sources


class ForwardTimer:
    """Wraps model.decode to accumulate the time spent in the decoder forward."""

    def __init__(self, model):
        self.model, self.inner, self.seconds, self.calls = model, model.decode, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def run_once(engine, ids, lengths, opts, reference: bool) -> tuple[float, float, int]:
    from pyengine.search import search
    model, cfg = engine.model, engine.config
    timer = ForwardTimer(model)
    model.decode = timer
    try:
        with torch.inference_mode():
            memory = model.memory(model.encode(ids, lengths), lengths)
            start = time.perf_counter()
            search(model, memory, opts, cfg.decoder_start_id, cfg.eos_id, engine.engine_config.dtype,
                   reference=reference)
            total = time.perf_counter() - start
    finally:
        del model.decode
    return total, timer.seconds, timer.calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import pyengine
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    engine = pyengine.Engine.load(prepare_model(), dtype=dtype)
    src = sources("greedy_b32")[: args.batch]
    lengths = torch.tensor([len(s) for s in src])
    ids = torch.full((len(src), int(lengths.max())), engine.config.pad_id)
    for i, s in enumerate(src):
        ids[i, : len(s)] = torch.tensor(s)
    opts = engine.options(beam_size=args.beam, max_decoding_length=args.steps, min_decoding_length=args.steps)
    runs: dict[str, list[tuple[float, float, int]]] = {"cpp": [], "reference": []}
    run_once(engine, ids, lengths, opts, False)  # warm-up
    for _ in range(args.repeats):
        for name in ("cpp", "reference"):
            runs[name].append(run_once(engine, ids, lengths, opts, name == "reference"))
    report = {"dtype": args.dtype, "batch": args.batch, "beam": args.beam, "steps": args.steps,
              "threads": args.threads}
    for name, rs in runs.items():
        steps = rs[0][2]
        forward = statistics.median(f for _, f, _ in rs) / steps * 1e3
        outside = statistics.median(t - f for t, f, _ in rs) / steps * 1e3
        report[name] = {"forward_ms_per_step": round(forward, 2), "outside_ms_per_step": round(outside, 2),
                        "outside_share_of_forward": round(outside / forward, 3)}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"batch {args.batch} x beam {args.beam}, {args.steps} steps, {args.dtype}, {args.threads} threads")
        for name in ("cpp", "reference"):
            r = report[name]
            print(f"  {name:9s} forward {r['forward_ms_per_step']:7.2f} ms/step   outside the forward "
                  f"{r['outside_ms_per_step']:6.2f} ms/step = {100 * r['outside_share_of_forward']:5.1f}% of it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
