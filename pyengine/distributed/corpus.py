"""Corpus translation on Ray Data: `map_batches` over a pool of actors, each holding one Engine (loaded once per
actor, not per batch), as Ray's batch-inference guide does it. Rows the engine refuses get their error in an error
column and no translation; every other row is translated. Ray Data's actor pools restart a killed actor and retry
its unfinished batches, so nothing is lost or duplicated."""
from __future__ import annotations

from typing import Any

from ..config import DecodeOptions
from . import require_ray


class EngineTranslator:
    """A Ray Data map_batches class: one Engine per actor."""

    def __init__(self, model: str, dtype: str, threads: int, column: str, output_column: str, error_column: str,
                 options: dict[str, Any], engine_options: dict[str, Any]):
        import torch

        from ..engine import Engine

        torch.set_num_threads(threads)
        self.engine = Engine.load(model, dtype=dtype, **engine_options)
        self.column, self.output_column, self.error_column = column, output_column, error_column
        self.options = options

    def translate(self, texts: list[Any]) -> tuple[list[str | None], list[str | None]]:
        """Translations and errors, one each per text (None where there is none)."""
        from ..errors import InputError

        results = self.engine.translate_each(texts, **self.options)
        return ([None if isinstance(r, InputError) else r.hypotheses[0] for r in results],
                [r.message if isinstance(r, InputError) else None for r in results])

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        texts = batch[self.column].tolist()
        out, errors = self.translate(texts)
        batch[self.output_column] = np.array(out, dtype=object)
        batch[self.error_column] = np.array(errors, dtype=object)
        return batch


def translate_dataset(ds, model: str = "default", column: str = "text", output_column: str = "translation",
                      error_column: str = "error", workers: int = 1, threads: int = 1, batch_size: int = 64,
                      dtype: str = "float32", engine_options: dict[str, Any] | None = None, **options: Any):
    """`ds` (a ray.data.Dataset with a text column) with `output_column` added: each row's translation, in the
    caller's row order (or None, with the reason in `error_column`, for a row the engine refuses).

    workers: actors, each with one Engine on `threads` intra-op threads (and as many CPUs reserved);
    options: decoding options (beam_size, ...), checked here before any actor starts."""
    require_ray()
    DecodeOptions().replace(**{k: v for k, v in options.items() if k not in ("source_lang", "target_lang")})
    out = ds.map_batches(EngineTranslator, batch_format="numpy", batch_size=batch_size, concurrency=workers,
                          num_cpus=threads,
                          fn_constructor_kwargs={"model": str(model), "dtype": dtype, "threads": threads,
                                                 "column": column, "output_column": output_column,
                                                 "error_column": error_column, "options": options,
                                                 "engine_options": engine_options or {}})
    # Ray Data may hand blocks on out of order; the caller's order is the contract (this dataset's own context)
    out.context.execution_options.preserve_order = True
    return out
