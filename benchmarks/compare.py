"""Side-by-side speed: pyengine (float32, bfloat16, int8) vs Hugging Face `generate` (float32, bfloat16) vs
CTranslate2 (float32, int8), on the same source ids and the same work (exactly N target positions:
min = max decoding length, so nobody stops early), each system in its own process, interleaved.

    python -m benchmarks.compare                   # all cases, 2 threads, writes benchmarks/results/*.json
    python -m benchmarks.compare --cases beam4_b32 --rounds 1
    python -m benchmarks.compare --device cuda --out OUTDIR   # a GPU: fp16/bf16 vs HF (and CTranslate2's CUDA build)

The model is opus-mt-en-de's shape (d_model 512, 6+6 layers, 8 heads, FFN 2048, vocab 58101, swish)
with random weights, saved by `MarianMTModel.save_pretrained` and converted offline by CTranslate2's
own converter. Needs transformers and ctranslate2 installed (benchmark dependencies, not runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import AS_CPU, cpu_name

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(d_model=512, layers=6, heads=8, ffn=2048, vocab=58101)
SYSTEMS = ("pyengine-fp32", "pyengine-bf16", "pyengine-int8", "hf-fp32", "hf-bf16", "ct2-fp32", "ct2-int8")
CUDA_SYSTEMS = ("pyengine-fp16", "pyengine-bf16", "hf-fp16", "hf-bf16", "ct2-fp16")
BASELINES = {"cpu": ("ct2-int8", "ct2-fp32", "hf-bf16"), "cuda": ("ct2-fp16", "hf-fp16", "hf-bf16")}
CASES = {
    # name: (batch, source length, target positions, beam)
    "beam4_b32": (32, 24, 32, 4),
    "greedy_b32": (32, 24, 32, 1),
    "greedy_b1": (1, 24, 32, 1),
    "corpus_beam4": (500, None, 32, 4),  # ~500 sentences of mixed lengths, each engine's own batching (≤ 32 each)
}


# -- model preparation --------------------------------------------------------------------------
def prepare_model() -> Path:
    """Random opus-mt-en-de-shaped Marian model + its CTranslate2 conversions (cached)."""
    model_dir = CACHE / "opus-mt-en-de-shape"
    if not (model_dir / "model.safetensors").exists():
        import torch
        from transformers import GenerationConfig, MarianConfig, MarianMTModel
        torch.manual_seed(0)
        v = SHAPE["vocab"]
        cfg = MarianConfig(vocab_size=v, decoder_vocab_size=v, d_model=SHAPE["d_model"],
                           encoder_layers=SHAPE["layers"], decoder_layers=SHAPE["layers"],
                           encoder_attention_heads=SHAPE["heads"], decoder_attention_heads=SHAPE["heads"],
                           encoder_ffn_dim=SHAPE["ffn"], decoder_ffn_dim=SHAPE["ffn"], activation_function="swish",
                           scale_embedding=True, pad_token_id=v - 1, decoder_start_token_id=v - 1, eos_token_id=0,
                           forced_eos_token_id=0, max_position_embeddings=512)
        model = MarianMTModel(cfg)
        model.generation_config = GenerationConfig(num_beams=4, max_length=512, bad_words_ids=[[v - 1]],
                                                   pad_token_id=v - 1, eos_token_id=0, decoder_start_token_id=v - 1,
                                                   forced_eos_token_id=0)
        model.save_pretrained(model_dir)
        _write_dummy_vocab(model_dir, v)
    for quant in ("float32", "int8"):
        out = CACHE / f"ct2-{quant}"
        if not (out / "model.bin").exists():
            try:
                from ctranslate2.converters import TransformersConverter
            except ImportError:  # a GPU machine without CTranslate2: its systems fail and are reported so
                print("ctranslate2 is not installed: no CTranslate2 systems", file=sys.stderr)
                return model_dir
            TransformersConverter(str(model_dir)).convert(str(out), quantization=quant, force=True)
    return model_dir


def _write_dummy_vocab(model_dir: Path, vocab: int) -> None:
    """CTranslate2's converter reads the vocabulary through MarianTokenizer: tok<i> names for the random ids."""
    import sentencepiece as spm
    words = {"</s>": 0, "<unk>": 1, **{f"tok{i}": i for i in range(2, vocab - 1)}, "<pad>": vocab - 1}
    (model_dir / "vocab.json").write_text(json.dumps(words))
    text = model_dir / "spm.txt"
    text.write_text("\n".join(f"tok{i} tok{i + 1}" for i in range(2, 2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(model_dir / "spm"), vocab_size=200,
                                   minloglevel=2)
    for name in ("source.spm", "target.spm"):
        (model_dir / name).write_bytes((model_dir / "spm.model").read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"source_lang": "en", "target_lang": "de"}))


def sources(case: str) -> list[list[int]]:
    """Source ids (EOS included): fixed length for the batch cases, mixed 3..60 for the corpus."""
    import random
    batch, length, _, _ = CASES[case]
    rng = random.Random(1234)
    v = SHAPE["vocab"]
    lengths = [length] * batch if length else [rng.randint(3, 60) for _ in range(batch)]
    return [[rng.randrange(2, v - 1) for _ in range(n - 1)] + [0] for n in lengths]


# -- workers: one system, one case, in its own process -------------------------------------------
def _runner(system: str, model_dir: Path, src: list[list[int]], n: int, beam: int, threads: int,
            device: str = "cpu"):
    import torch
    torch.set_num_threads(threads)
    precision = system.split("-")[1]
    if system.startswith("pyengine"):
        sys.path.insert(0, str(ROOT))
        import pyengine
        # at most 32 sentences per batch, as HF and CTranslate2 are run here (the token budget still applies)
        engine = pyengine.Engine.load(model_dir, device=device, dtype=precision, max_batch_size=32)
        return lambda: [len(t.tokens[0]) + 1 for t in engine.generate(
            src, beam_size=beam, max_decoding_length=n, min_decoding_length=n)]
    if system.startswith("hf"):
        from transformers import MarianMTModel
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        model = MarianMTModel.from_pretrained(model_dir, dtype=dtype).eval().to(device)
        pad = model.config.pad_token_id
        order = sorted(range(len(src)), key=lambda i: -len(src[i]))  # sorted batches of 32, as a user would

        def run():
            lengths = []
            for start in range(0, len(order), 32):
                chunk = [src[i] for i in order[start:start + 32]]
                width = max(map(len, chunk))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), num_beams=beam,
                                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
                lengths += [int((row != pad).sum()) - 1 + int(row[0] == pad) for row in out]
            return lengths
        return run
    import ctranslate2
    if device == "cuda":  # the float32 conversion, computed in half precision by CTranslate2's CUDA build
        translator = ctranslate2.Translator(str(CACHE / "ct2-float32"), device="cuda",
                                            compute_type={"fp16": "float16", "bf16": "bfloat16"}[precision])
    else:
        translator = ctranslate2.Translator(str(CACHE / system.replace("fp32", "float32")),
                                            device="cpu", intra_threads=threads, inter_threads=1)
    tokens = [[f"tok{i}" for i in s[:-1]] + ["</s>"] for s in src]
    return lambda: [len(r.hypotheses[0]) + 1 for r in translator.translate_batch(
        tokens, beam_size=beam, max_decoding_length=n, min_decoding_length=n, max_batch_size=32)]


def worker(system: str, case: str, threads: int, repeats: int, device: str = "cpu") -> dict:
    model_dir = CACHE / "opus-mt-en-de-shape"
    batch, _, n, beam = CASES[case]
    src = sources(case)
    if case == "greedy_b1":
        src = src[:1]
    corpus = CASES[case][1] is None
    if corpus:  # warm up on a slice; a full corpus run per system and round is long enough to time alone
        _runner(system, model_dir, src[:32], n, beam, threads, device)()
        repeats = 1
    run = _runner(system, model_dir, src, n, beam, threads, device)
    if device == "cuda":  # the clock stops when the GPU is done, not when the launches are queued
        import torch
        untimed = run

        def run():
            out = untimed()
            torch.cuda.synchronize()
            return out
    if not corpus:
        run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lengths = run()  # also the work check: every system decodes n positions
        times.append(time.perf_counter() - t0)
    return {"system": system, "case": case, "seconds": times, "min_len": min(lengths), "max_len": max(lengths),
            "sentences": len(lengths)}


# -- the machine's floor ------------------------------------------------------------------------
def gpu_floor() -> dict:
    """The GPU's fp16/bf16 matmul rate and copy bandwidth, measured now."""
    import torch

    def rate(fn, work, reps=20):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return work * reps / (time.perf_counter() - t0)

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(8192, 8192, dtype=dtype, device="cuda") for _ in range(2))
        out[f"{name}_matmul_tflops"] = rate(lambda: a @ b, 2 * 8192 ** 3) / 1e12
    x = torch.ones(256 * 2 ** 20, device="cuda")
    y = torch.empty_like(x)
    out["copy_gb_s"] = rate(lambda: y.copy_(x), 2 * x.numel() * 4) / 1e9
    return out


def machine_floor(threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)

    def rate(fn, work, reps=5):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return work * reps / (time.perf_counter() - t0)

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        out[f"{name}_matmul_tflops"] = rate(lambda: a @ b, 2 * 2048 ** 3) / 1e12
    # int8: a large dynamic int8 GEMM of the library CTranslate2-like engines use (oneDNN, VNNI where the CPU
    # has it), fp32 in and out; pyengine-int8 runs its own kernel, measured at this rate (README)
    import warnings
    warnings.simplefilter("ignore", UserWarning)
    if "onednn" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "onednn"
        w = torch.quantize_per_channel(torch.randn(2048, 2048), torch.full((2048,), 0.01, dtype=torch.double),
                                       torch.zeros(2048, dtype=torch.long), 0, torch.qint8)
        packed, a = torch.ops.quantized.linear_prepack(w, None), torch.randn(2048, 2048)
        out["int8_matmul_tflops"] = rate(lambda: torch.ops.quantized.linear_dynamic(a, packed, False),
                                         2 * 2048 ** 3) / 1e12
    x = torch.empty(64 * 2 ** 20, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    out["copy_gb_s"] = rate(lambda: y.copy_(x), 2 * x.numel() * 4) / 1e9
    return out


def decode_flops(case: str) -> float:
    """GEMM FLOPs of the case: encoder once, decoder + output layer per target position and row."""
    d, ff, layers, v = SHAPE["d_model"], SHAPE["ffn"], SHAPE["layers"], SHAPE["vocab"]
    src = sources(case)
    _, _, n, beam = CASES[case]
    if case == "greedy_b1":
        src = src[:1]
    enc = sum(2 * len(s) * layers * (4 * d * d + 2 * d * ff) for s in src)
    cross_kv = sum(2 * len(s) * layers * 2 * d * d for s in src)
    dec = 2 * len(src) * beam * n * (layers * (6 * d * d + 2 * d * ff) + v * d)
    return enc + cross_kv + dec


def weight_bytes(case: str, system: str) -> float:
    """Bytes of weights streamed: every decode step reads the decoder and output layer once per batch."""
    d, ff, layers, v = SHAPE["d_model"], SHAPE["ffn"], SHAPE["layers"], SHAPE["vocab"]
    per_param = 1 if system.endswith("int8") else (2 if system.endswith(("bf16", "fp16")) else 4)
    batch, _, n, _ = CASES[case]
    batches = 1 if case == "greedy_b1" else max(1, round(len(sources(case)) / 32))
    decoder = layers * (6 * d * d + 2 * d * ff) + v * d
    return batches * n * decoder * per_param


# -- driver -------------------------------------------------------------------------------------
class WorkerFailed(RuntimeError):
    """A worker process exited with an error (the message holds the tail of its stderr)."""


def run_worker(checkout: Path, system: str, case: str, threads: int, repeats: int, device: str = "cpu") -> dict:
    """One system and case timed by the worker of the checkout at `checkout` (this tree's, or another revision's:
    benchmarks.ab_checkouts), in a process of its own with `threads` OpenMP threads; the worker's result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--worker", system, case, "--threads",
                           str(threads), "--repeats", str(repeats), "--device", device],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise WorkerFailed(f"{system} {case} in {checkout} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each system once per round)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per worker after its warm-up")
    ap.add_argument("--cases", nargs="*", default=None, help="default: all (on a GPU: all but the corpus)")
    ap.add_argument("--systems", nargs="*", default=None, help="default: the device's systems")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the results JSON is written")
    ap.add_argument("--as-cpu", choices=sorted(AS_CPU), default=None,
                    help="every system (and the floor) capped as on a CPU with only these instructions (AS_CPU)")
    ap.add_argument("--worker", nargs=2, metavar=("SYSTEM", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    caps = AS_CPU.get(args.as_cpu, {})
    if any(os.environ.get(name) != value for name, value in caps.items()):  # the libraries read them at load
        given = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.compare", *given], {**os.environ, **caps})
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads, args.repeats, args.device)))
        return 0
    cuda = args.device == "cuda"
    args.systems = args.systems or list(CUDA_SYSTEMS if cuda else SYSTEMS)
    args.cases = args.cases or [c for c in CASES if not (cuda and c == "corpus_beam4")]

    prepare_model()
    runs: dict[tuple[str, str], list[float]] = {}
    checks: dict[tuple[str, str], dict] = {}
    measure_floor = gpu_floor if cuda else lambda: machine_floor(args.threads)
    floor = measure_floor()
    for rnd in range(args.rounds):
        for case in args.cases:
            systems = args.systems if rnd % 2 == 0 else list(reversed(args.systems))  # alternate the order
            for system in systems:
                try:
                    res = run_worker(ROOT, system, case, args.threads, args.repeats, args.device)
                except WorkerFailed as failed:
                    print(failed, file=sys.stderr)
                    continue
                runs.setdefault((system, case), []).extend(res["seconds"])
                checks[(system, case)] = res
                print(f"round {rnd + 1} {case:<13} {system:<14} {min(res['seconds']):8.3f} s", file=sys.stderr)
    # the floor again after the rounds, the better of the two kept: a shared VM's slow moment during one
    # measurement would lower the floor and raise every share of it
    after = measure_floor()
    floor = {k: max(v, after[k]) if isinstance(v, float) else v for k, v in floor.items()}
    report = summarize(runs, checks, floor, args)
    print_table(report)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare-{'cuda-' if cuda else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwritten {path}")
    return 0


def summarize(runs, checks, floor, args) -> dict:
    rows = []
    for (system, case), secs in sorted(runs.items()):
        batch, _, n, beam = CASES[case]
        sentences = checks[(system, case)]["sentences"]
        median = statistics.median(secs)
        tokens = sentences * n
        peak = floor.get(f"{system.rsplit('-', 1)[1]}_matmul_tflops")
        # the roofline of this machine: compute-bound at large batches, weight-bandwidth-bound at batch 1
        ideal = None if peak is None else max(decode_flops(case) / (peak * 1e12),
                                              weight_bytes(case, system) / (floor["copy_gb_s"] * 1e9))
        rows.append({"system": system, "case": case, "median_s": median, "tokens_per_s": tokens / median,
                     "latency_ms": median * 1e3 if case == "greedy_b1" else None,
                     "floor_fraction": None if peak is None else ideal / median,
                     "target_lengths": [checks[(system, case)]["min_len"], checks[(system, case)]["max_len"]],
                     "runs": secs})
    machine = {"cpu": cpu_name(), "threads": args.threads, "python": platform.python_version(), "device": args.device}
    if args.as_cpu:
        machine.update(as_cpu=args.as_cpu, caps=AS_CPU[args.as_cpu])
    return {"machine": {**machine, **floor}, "cases": {c: CASES[c] for c in args.cases}, "results": rows}


def print_table(report: dict) -> None:
    m = report["machine"]
    device = m.get("device", "cpu")
    if device == "cuda":
        print(f"\nGPU: {m['gpu']} (torch {m['torch']}, CUDA {m['cuda']}). Floor: fp16 matmul "
              f"{m['fp16_matmul_tflops']:.0f} TFLOP/s, bf16 {m['bf16_matmul_tflops']:.0f}, copy {m['copy_gb_s']:.0f} GB/s")
    else:
        int8 = f", int8 GEMM {m['int8_matmul_tflops']:.2f} TFLOP/s" if "int8_matmul_tflops" in m else ""
        capped = f" as a CPU with {m['as_cpu']} only ({m['caps']})" if m.get("as_cpu") else ""
        print(f"\nCPU: {m['cpu']}{capped}, {m['threads']} threads. "
              f"Floor: fp32 matmul {m['fp32_matmul_tflops']:.2f} TFLOP/s, "
              f"bf16 matmul {m['bf16_matmul_tflops']:.2f} TFLOP/s{int8}, copy {m['copy_gb_s']:.0f} GB/s")
    baselines = BASELINES[device]
    by = {(r["system"], r["case"]): r for r in report["results"]}
    for case in report["cases"]:
        print(f"\n{case}: batch/beam/target positions = {CASES[case][0]}/{CASES[case][3]}/{CASES[case][2]}")
        print(f"  {'system':<14} {'tokens/s':>9} {'latency':>9} " + " ".join(f"{'vs ' + b:>11}" for b in baselines)
              + f" {'floor':>6}")
        for system in CUDA_SYSTEMS if device == "cuda" else SYSTEMS:
            r = by.get((system, case))
            if not r:
                continue
            ratio = lambda other: (f"{r['tokens_per_s'] / by[(other, case)]['tokens_per_s']:.2f}x"  # noqa: E731
                                   if (other, case) in by else "-")
            lat = f"{r['latency_ms']:.0f} ms" if r["latency_ms"] else ""
            fl = f"{r['floor_fraction']:.0%}" if r["floor_fraction"] else "n/a"
            print(f"  {system:<14} {r['tokens_per_s']:>9.0f} {lat:>9} " + " ".join(f"{ratio(b):>11}" for b in baselines)
                  + f" {fl:>6}")


if __name__ == "__main__":
    sys.exit(main())
