"""Command line: `pyengine translate [-m MODEL] [options] < input > output`, one sentence a line."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .errors import InputError, PyEngineError

CHUNK = 256  # lines per call, so the progress bar moves and memory stays bounded


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate stdin to stdout, one sentence a line")
    p.add_argument("-m", "--model", default="default", help="model directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (bf16 where the CPU has it)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--beam-size", type=int)
    p.add_argument("--length-penalty", type=float)
    p.add_argument("--max-decoding-length", type=int)
    p.add_argument("--min-decoding-length", type=int)
    p.add_argument("--num-hypotheses", type=int, help="print the n best, tab-separated")
    p.add_argument("--scores", action="store_true", help="print each hypothesis's score before it")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs instead of refusing them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a model as one fast-loading pyengine directory")
    p.add_argument("source", help="model directory in any supported format")
    p.add_argument("destination")
    p.add_argument("--dtype", default="float32",
                   help="float32, bfloat16, float16, or int8 (weights stored int8 with per-row scales, "
                        "dequantized at load)")


def convert_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine import resolve_model_path
    from .loaders import load_model, native

    src = resolve_model_path(args.source)
    native.save(load_model(src), Path(args.destination), src, args.dtype)
    print(f"converted {src} -> {args.destination} ({args.dtype})", file=sys.stderr)
    return 0


def _read_lines(stream) -> list[str]:
    lines = []
    for number, raw in enumerate(stream.buffer if hasattr(stream, "buffer") else stream, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        lines.append(raw.rstrip("\r\n"))
    return lines


def translate_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    options = {k: v for k, v in {
        "beam_size": args.beam_size, "length_penalty": args.length_penalty,
        "max_decoding_length": args.max_decoding_length, "min_decoding_length": args.min_decoding_length,
        "num_hypotheses": args.num_hypotheses, "truncate_input": args.truncate or None}.items() if v is not None}
    engine.options(**options)  # reject bad options before reading input
    lines = _read_lines(sys.stdin)
    bar = tqdm(total=len(lines), unit="sent", file=sys.stderr, disable=args.quiet or len(lines) < 100)
    out = sys.stdout
    for start in range(0, len(lines), CHUNK):
        chunk = lines[start: start + CHUNK]
        try:
            results = engine.translate_batch(chunk, **options)
        except InputError as exc:
            if exc.index is not None:  # name the line of the input, not the index in the chunk
                raise InputError(f"line {start + exc.index + 1}: {str(exc).split(': ', 1)[1]}") from None
            raise
        for r in results:
            fields = [f"{s:.4f}\t{h}" if args.scores else h for h, s in zip(r.hypotheses, r.scores)]
            out.write("\t".join(fields) + "\n")
        out.flush()
        bar.update(len(chunk))
    bar.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyengine", description="Fast Transformer translation inference")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_translate(sub)
    _add_convert(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "translate":
            return translate_main(args)
        if args.command == "convert":
            return convert_main(args)
    except PyEngineError as exc:
        print(f"pyengine: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
