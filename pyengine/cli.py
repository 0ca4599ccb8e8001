"""Command line: `pyengine translate [-m MODEL] [options] < input > output`, one sentence a line (or a document:
--paragraphs, --format html); `pyengine translate-file IN OUT` (.txt, .html, .docx); `pyengine serve` (HTTP server);
`pyengine convert` (pyengine's own format)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .errors import InputError, PyEngineError

CHUNK = 256  # lines per call, so the progress bar moves and memory stays bounded


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate stdin to stdout, one sentence a line", allow_abbrev=False)
    p.add_argument("-m", "--model", default="default", help="model directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, int8 (int8 GEMMs, CPU) or auto (bf16 where the CPU has it)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--beam-size", type=int)
    p.add_argument("--length-penalty", type=float)
    p.add_argument("--max-decoding-length", type=int)
    p.add_argument("--min-decoding-length", type=int)
    p.add_argument("--num-hypotheses", type=int, help="print the n best, tab-separated")
    p.add_argument("--scores", action="store_true", help="print each hypothesis's score before it")
    p.add_argument("--alignment", action="store_true",
                   help="append ' ||| ' and the hard alignment of each hypothesis, Marian's 's-t' token pairs")
    p.add_argument("--n-best", action="store_true",
                   help="Marian's n-best list: every hypothesis on its own line, 'N ||| text ||| F0= path score ||| "
                        "score' (N: the input line, from 0; the path score sums the tokens' log-probabilities)")
    p.add_argument("--word-scores", action="store_true",
                   help="append ' ||| WordScores=' and each output token's log-probability (EOS included), as Marian")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs instead of refusing them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--format", choices=("text", "html"), default="text",
                   help="html: the input is one HTML document, translated with its markup kept")
    p.add_argument("--input", help="a corpus file (.txt one sentence a line, .jsonl or .parquet with --column) "
                                   "translated on Ray into --output, resumably")
    p.add_argument("--output", help="where --input's translations go (same format; for .jsonl/.parquet the records "
                                    "gain a 'translation' column)")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run on a Ray cluster: its address, or 'auto' (the default) to start a local one")
    p.add_argument("--workers", type=int, default=1, help="Ray actors, one engine each (with --ray)")
    p.add_argument("--column", default="text", help="the text column of a .jsonl / .parquet input")
    p.add_argument("--shard-lines", type=int, default=256, help="lines per shard: the unit a restart skips")
    p.add_argument("--paragraphs", action="store_true",
                   help="the input is running text: sentences are split and re-joined with the original line breaks "
                        "and spacing (instead of one sentence a line)")


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score target sentences against their sources (one pair a line of two files)",
                       allow_abbrev=False)
    p.add_argument("--source", required=True, help="source sentences, one a line")
    p.add_argument("--target", required=True, help="target sentences, one a line, aligned with --source")
    p.add_argument("-m", "--model", default="default", help="model directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, int8 or auto")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--sum", action="store_true", help="print the summed log-probability (default: the mean per token)")
    p.add_argument("--word-scores", action="store_true", help="then, after a tab, each token's log-probability")
    p.add_argument("--source-lang")
    p.add_argument("--target-lang")


def score_main(args: argparse.Namespace) -> int:
    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sources = open(args.source, encoding="utf-8").read().splitlines()
        targets = open(args.target, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the pairs: {exc}") from None
    if len(sources) != len(targets):
        raise InputError(f"{args.source} has {len(sources)} lines but {args.target} has {len(targets)}")
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    out = sys.stdout
    for start in range(0, len(sources), CHUNK):
        for r in engine.score_batch(sources[start: start + CHUNK], targets[start: start + CHUNK],
                                    source_lang=args.source_lang, target_lang=args.target_lang):
            line = f"{r.cumulated_score if args.sum else r.normalized_score:.6f}"
            if args.word_scores:
                line += "\t" + " ".join(f"{x:.6f}" for x in r.log_probs)
            out.write(line + "\n")
    return 0


def _add_translate_file(sub) -> None:
    p = sub.add_parser("translate-file", help="translate a .txt, .html or .docx file, keeping its structure",
                       allow_abbrev=False)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("-m", "--model", default="default", help="model directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, int8 or auto")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    p.add_argument("--beam-size", type=int)
    p.add_argument("--source-lang", help="source language of a multilingual model")
    p.add_argument("--target-lang", help="target language of a multilingual model")


def translate_file_main(args: argparse.Namespace) -> int:
    from .engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    options = {k: v for k, v in {"beam_size": args.beam_size, "source_lang": args.source_lang,
                                 "target_lang": args.target_lang}.items() if v is not None}
    engine.translate_file(args.input, args.output, **options)
    print(f"translated {args.input} -> {args.output}", file=sys.stderr)
    return 0


def _add_serve(sub) -> None:
    from .config import ServerConfig

    defaults = ServerConfig()
    p = sub.add_parser("serve", help="HTTP server with continuous batching (/v1/translate, LibreTranslate's /translate)",
                       allow_abbrev=False)
    p.add_argument("-m", "--model", default="default", help="model directory (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, int8 or auto")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per worker (0: torch's default)")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="worker processes, each with its own running batch and --threads threads (inter-op)")
    p.add_argument("--max-batch-tokens", type=int, help="padded source tokens x beam in the running batch")
    p.add_argument("--max-batch-size", type=int, help="sentences in the running batch")
    p.add_argument("--max-memory-mb", type=float, help="cap on a batch's decoding buffers")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting sentences before 503")
    p.add_argument("--timeout", type=float, default=defaults.request_timeout, help="seconds per request before 504")
    p.add_argument("--max-texts", type=int, default=defaults.max_texts, help="texts per request")
    p.add_argument("--max-chars", type=int, default=defaults.max_chars, help="characters per text")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                   help="seconds to receive a request's headers, and again its body, before 408")
    p.add_argument("--max-beam-size", type=int, default=16, help="largest beam_size a request may ask for (0: none)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="require an API key: one key a line, optionally followed by its own requests per minute")
    p.add_argument("--req-limit", type=int, help="requests per minute per key (per client address without keys)")
    p.add_argument("--max-file-bytes", type=int, default=defaults.max_file_bytes, help="/translate_file upload limit")
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="serve on Ray Serve: a cluster's address, or 'auto' to start a local one")
    p.add_argument("--replicas", type=int, default=2, help="server replicas on Ray Serve (with --ray)")


def serve_main(args: argparse.Namespace) -> int:
    from .config import ServerConfig
    from .engine import Engine
    from .serving import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    engine_options = {k: v for k, v in {"max_batch_tokens": args.max_batch_tokens, "max_batch_size": args.max_batch_size,
                                        "max_memory_mb": args.max_memory_mb}.items() if v is not None}
    engine_options["max_beam_size"] = args.max_beam_size or None
    from .serving.access import read_keys

    config = ServerConfig(max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_chars=args.max_chars,
                          request_timeout=args.timeout, max_queue=args.max_queue, read_timeout=args.read_timeout,
                          api_keys=read_keys(args.api_keys) if args.api_keys else None, req_limit=args.req_limit,
                          max_file_bytes=args.max_file_bytes, workers=args.workers)
    if args.ray:
        if args.workers != 1:
            raise SystemExit("pyengine serve: --workers is for one machine; on Ray Serve, --replicas")
        from .distributed import require_ray
        require_ray()
        from .distributed.serve import serve_on_ray
        serve_on_ray(args.ray, args.host, args.port, args.replicas, args.model, args.dtype, args.threads or 1,
                     config, engine_options)
        return 0
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, **engine_options)
    serve(engine, args.host, args.port, config)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a model as one fast-loading pyengine directory", allow_abbrev=False)
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


def _read_lines(stream) -> tuple[list[str | None], dict[int, str]]:
    """The input's lines (None where a line cannot be read) and the error of each unreadable line."""
    lines: list[str | None] = []
    errors: dict[int, str] = {}
    for number, raw in enumerate(stream.buffer if hasattr(stream, "buffer") else stream, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors[number - 1] = f"line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
                lines.append(None)
                continue
        lines.append(raw.rstrip("\r\n"))
    return lines, errors


def _translate_chunk(engine, chunk: list[str | None], start: int, errors: dict[int, str], options: dict) -> list:
    """Translate the readable lines of a chunk; a line the engine refuses gets its error recorded (by line
    number) and no translation, and the others are translated all the same."""
    good = [i for i, line in enumerate(chunk) if line is not None and start + i not in errors]
    out: list = [None] * len(chunk)
    for i, r in zip(good, engine.translate_each([chunk[i] for i in good], **options)):
        if isinstance(r, InputError):
            errors[start + i] = f"line {start + i + 1}: {r.message}"
        else:
            out[i] = r
    return out


def translate_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .documents.align import alignment_text
    from .engine import Engine

    options = {k: v for k, v in {
        "beam_size": args.beam_size, "length_penalty": args.length_penalty,
        "max_decoding_length": args.max_decoding_length, "min_decoding_length": args.min_decoding_length,
        "num_hypotheses": args.num_hypotheses, "truncate_input": args.truncate or None,
        "return_attention": args.alignment or None}.items() if v is not None}
    if args.input or args.output or args.ray:
        return _translate_corpus(args, options)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    engine.options(**options)  # reject bad options before reading input
    if args.format == "html" or args.paragraphs:
        return _translate_document(engine, args, options)
    lines, errors = _read_lines(sys.stdin)
    bar = tqdm(total=len(lines), unit="sent", file=sys.stderr, disable=args.quiet or len(lines) < 100)
    out = sys.stdout
    for start in range(0, len(lines), CHUNK):
        chunk = lines[start: start + CHUNK]
        for i, r in enumerate(_translate_chunk(engine, chunk, start, errors, options)):
            if r is None:  # a refused line keeps its place as an empty line; its error goes to stderr
                out.write("\n")
                continue
            if args.n_best:
                out.write("".join(_n_best_line(engine, start + i, chunk[i], r, k, args) + "\n"
                                  for k in range(len(r.hypotheses))))
                continue
            fields = [f"{s:.4f}\t{h}" if args.scores else h for h, s in zip(r.hypotheses, r.scores)]
            if args.alignment:
                fields = [f"{f} ||| {alignment_text(r.hard_alignment(k))}" for k, f in enumerate(fields)]
            if args.word_scores:
                fields = [f"{f} ||| WordScores={_word_text(engine.token_scores([chunk[i]], [r], k)[0])}"
                          for k, f in enumerate(fields)]
            out.write("\t".join(fields) + "\n")
        out.flush()
        bar.update(len(chunk))
    bar.close()
    for line in sorted(errors):
        print(f"pyengine: error: {errors[line]}", file=sys.stderr)
    if errors:
        print(f"pyengine: {len(errors)} of {len(lines)} lines not translated (empty lines in the output)",
              file=sys.stderr)
    return 2 if errors else 0


def _word_text(scores: list[float]) -> str:
    """Marian's word scores: each output token's log-probability (EOS included), " %.5f" each."""
    return "".join(f" {v:.5f}" for v in scores)


def _n_best_line(engine, line: int, source: str, r, k: int, args: argparse.Namespace) -> str:
    """Hypothesis k as a line of Marian's n-best list (its output printer's layout)."""
    from .documents.align import alignment_text
    words = engine.token_scores([source], [r], k)[0]
    fields = [str(line), r.hypotheses[k]]
    if args.alignment:
        fields.append(alignment_text(r.hard_alignment(k)))
    if args.word_scores:
        fields.append(f"WordScores={_word_text(words)}")
    return " ||| ".join(fields) + f" ||| F0= {sum(words):.6g} ||| {r.scores[k]:.6g}"


def _translate_corpus(args: argparse.Namespace, options: dict) -> int:
    """--input FILE --output FILE --ray [ADDRESS]: a corpus on a Ray cluster, resumable by shard."""
    if not (args.input and args.output and args.ray):
        raise PyEngineError("--input, --output and --ray go together (without Ray, translate stdin to stdout)")
    if args.num_hypotheses or args.scores or args.alignment or args.word_scores or args.paragraphs or \
            args.format != "text":
        raise PyEngineError("--input/--output translate one sentence a line: --num-hypotheses, --scores, "
                            "--alignment, --word-scores, --paragraphs and --format html do not apply")
    from .config import DecodeOptions
    from .distributed import require_ray

    require_ray()
    DecodeOptions().replace(**options)  # bad options before any work
    from .distributed.files import translate_corpus

    counts = translate_corpus(args.input, args.output, args.model, args.ray, args.workers, args.threads or 1,
                              args.dtype, args.column, shard_lines=args.shard_lines, progress=not args.quiet,
                              **options)
    print(f"pyengine: {counts['shards']} shards: {counts['skipped']} done before, {counts['translated']} "
          f"translated now; {counts['errors']} lines refused", file=sys.stderr)
    return 2 if counts["errors"] else 0


def _translate_document(engine, args: argparse.Namespace, options: dict) -> int:
    """The whole input as one document: HTML, or running text split into sentences and re-joined."""
    if args.num_hypotheses or args.scores or args.alignment or args.word_scores:
        raise PyEngineError("--num-hypotheses, --scores, --alignment and --word-scores apply to one sentence a line, "
                            "not to --paragraphs or --format html")
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the input is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    sys.stdout.write(engine.translate([text], format=args.format, split_sentences=True, **options)[0])
    sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyengine", description="Fast Transformer translation inference",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_translate(sub)
    _add_serve(sub)
    _add_convert(sub)
    _add_translate_file(sub)
    _add_score(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "translate":
            return translate_main(args)
        if args.command == "convert":
            return convert_main(args)
        if args.command == "serve":
            return serve_main(args)
        if args.command == "translate-file":
            return translate_file_main(args)
        if args.command == "score":
            return score_main(args)
    except PyEngineError as exc:
        print(f"pyengine: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
