"""A big file translated on a Ray cluster, resumably: `pyengine translate --input FILE --output FILE --ray ADDRESS`.

The input (text, one sentence a line; JSONL or Parquet with a text column) is cut into shards of `shard_lines`.
Shards run through Ray Data (`EngineTranslator` actors); the driver writes each finished shard to
OUTPUT.parts/ (atomically: a temporary file, then a rename) as results stream in. A run restarted with the same
arguments skips the shards already there; when all are done, the output is written in input order and the parts
are removed. A manifest records the input (size, modification time, lines) and the arguments, and a restart with
different ones is refused rather than mixed in.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, PyEngineError
from . import require_ray
from .corpus import EngineTranslator

FORMATS = (".txt", ".jsonl", ".parquet")


def read_corpus(path: Path, column: str) -> tuple[list[Any], list[dict] | None]:
    """The texts of a corpus file (and, for JSONL / Parquet, its records)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        records = pq.read_table(path).to_pylist()
    elif suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}, line {number}: not JSON ({exc.msg})") from None
    else:
        with path.open("rb") as f:
            return [_decode(line) for line in f], None
    missing = next((i for i, r in enumerate(records) if not isinstance(r, dict) or column not in r), None)
    if missing is not None:
        raise InputError(f"{path}: record {missing + 1} has no column {column!r}")
    return [r[column] for r in records], records


def _decode(line: bytes) -> Any:
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        return line  # not text: the engine refuses it, with the others translated


def write_corpus(path: Path, translations: list[str | None], records: list[dict] | None, output_column: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    suffix = path.suffix.lower()
    if records is None or suffix == ".txt":
        tmp.write_text("".join((t or "") + "\n" for t in translations), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([{**r, output_column: t} for r, t in zip(records, translations)]), tmp)
    else:
        with tmp.open("w", encoding="utf-8") as f:
            for r, t in zip(records, translations):
                f.write(json.dumps({**r, output_column: t}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _manifest(source: Path, n: int, shard_lines: int, settings: dict[str, Any]) -> dict[str, Any]:
    stat = source.stat()
    return {"input": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "lines": n,
            "shard_lines": shard_lines, "settings": settings}


def translate_corpus(source: str | Path, destination: str | Path, model: str = "default", address: str = "auto",
                     workers: int = 1, threads: int = 1, dtype: str = "float32", column: str = "text",
                     output_column: str = "translation", shard_lines: int = 256, progress: bool = True,
                     on_shard: Callable[[int], None] | None = None, **options: Any) -> dict[str, int]:
    """Translate `source` into `destination` on Ray (see the module's docstring). Returns counts: shards, skipped
    (already done by an earlier run), translated (by this run), errors (lines refused)."""
    ray = require_ray()
    source, destination = Path(source), Path(destination)
    if source.suffix.lower() not in FORMATS:
        raise InputError(f"{source}: expected one of {', '.join(FORMATS)}")
    texts, records = read_corpus(source, column)
    n = len(texts)
    shards = [(i, start, min(start + shard_lines, n)) for i, start in enumerate(range(0, n, shard_lines))]
    parts = destination.with_name(destination.name + ".parts")
    settings = {"model": str(model), "dtype": dtype, "column": column, "options": options}
    manifest = _manifest(source, n, shard_lines, settings)
    parts.mkdir(parents=True, exist_ok=True)
    manifest_file = parts / "manifest.json"
    if manifest_file.exists():
        previous = json.loads(manifest_file.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(manifest)):
            raise PyEngineError(f"{parts} holds shards of a run with another input or other arguments; delete it "
                                "to start over, or run with the same arguments to resume")
    else:
        manifest_file.write_text(json.dumps(manifest), encoding="utf-8")
    done = {i for i, _, _ in shards if (parts / f"{i:06d}.json").exists()}
    pending = [s for s in shards if s[0] not in done]
    if progress:
        print(f"pyengine: {len(shards)} shards of {shard_lines} lines; {len(done)} already done, {len(pending)} to "
              "translate", file=sys.stderr)
    if pending:
        if not ray.is_initialized():
            ray.init(address=None if address == "auto" else address, include_dashboard=False,
                     log_to_driver=False)
        _run_shards(ray, texts, pending, parts, model, dtype, workers, threads, options, progress, on_shard)
    translations: list[str | None] = []
    errors = 0
    for i, _, _ in shards:
        part = json.loads((parts / f"{i:06d}.json").read_text(encoding="utf-8"))
        translations.extend(part["translations"])
        for line, message in part["errors"]:
            errors += 1
            print(f"pyengine: error: line {line + 1}: {message}", file=sys.stderr)
    write_corpus(destination, translations, records, output_column)
    shutil.rmtree(parts)
    return {"shards": len(shards), "skipped": len(done), "translated": len(pending), "errors": errors}


def _run_shards(ray, texts: list[Any], pending: list[tuple[int, int, int]], parts: Path, model: str, dtype: str,
                workers: int, threads: int, options: dict[str, Any], progress: bool,
                on_shard: Callable[[int], None] | None) -> None:
    """One Ray Data row per shard through EngineTranslator actors; each finished shard written as it arrives."""
    from tqdm import tqdm

    rows = [{"shard": i, "first": start, "lines": texts[start:end]} for i, start, end in pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _ShardTranslator, batch_format="pandas", batch_size=1, concurrency=workers, num_cpus=threads,
        fn_constructor_kwargs={"model": str(model), "dtype": dtype, "threads": threads, "column": "lines",
                               "output_column": "translations", "error_column": "errors", "options": options,
                               "engine_options": {}})
    bar = tqdm(total=len(rows), unit="shard", file=sys.stderr, disable=not progress)
    for row in ds.iter_rows():
        shard = int(row["shard"])
        target = parts / f"{shard:06d}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"translations": list(row["translations"]), "errors": list(row["errors"])},
                                  ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, target)
        bar.update(1)
        if on_shard is not None:
            on_shard(shard)
    bar.close()


class _ShardTranslator(EngineTranslator):
    """One shard (a list of lines) per row: its translations, and (line, error) for each line refused."""

    def __call__(self, batch):
        import pandas as pd

        out = []
        for shard, first, lines in zip(batch["shard"], batch["first"], batch["lines"]):
            translations, errors = self.translate(list(lines))
            out.append({"shard": int(shard), "translations": translations,
                        "errors": [(int(first) + i, e) for i, e in enumerate(errors) if e is not None]})
        return pd.DataFrame(out)

