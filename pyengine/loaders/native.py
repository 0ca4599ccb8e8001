"""pyengine's own directory format, written by `pyengine convert`: model.safetensors in pyengine's tensor
names (q/k/v already fused), pyengine_config.json (ModelConfig, decoding defaults, tokenizer kind), and
the tokenizer files copied from the source. Loads without the source library or its key map.

`--dtype int8` stores every weight matrix as int8 with one float32 scale per row (symmetric, scale =
max |row| / 127): a quarter of the float32 size on disk. It is a storage format: the matrices are
dequantized at load and the engine computes in its float32 or bfloat16 dtype."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from ..quant import quantize_rows
from .common import LoadedModel, TensorSource, read_json, read_tensors

CONFIG_FILE = "pyengine_config.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json", "target_vocab.json", "tokenizer_config.json",
                   "sentencepiece.bpe.model", "tokenizer.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8_SCALE = ".int8_row_scale"  # suffix of the per-row scale stored beside an int8 matrix


def _storage(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    if dtype != "int8":
        # clone: tied tables (embedding = output layer) share memory, which safetensors refuses to write
        return {k: v.to(DTYPES[dtype]).contiguous().clone() for k, v in state.items()}
    out = {}
    for name, tensor in state.items():
        if tensor.dim() == 2 and tensor.is_floating_point():
            out[name], out[name + INT8_SCALE] = quantize_rows(tensor)
        else:
            out[name] = tensor.float().contiguous().clone()
    return out


def _dequantize(tensors: dict[str, torch.Tensor], origin: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(INT8_SCALE):
            continue
        if tensor.dtype == torch.int8:
            scale = tensors.get(name + INT8_SCALE)
            if scale is None or scale.shape != tensor.shape[:1]:
                raise CheckpointError(f"{origin}: int8 tensor {name!r} has no matching per-row scale")
            tensor = tensor.float() * scale.float()[:, None]
        out[name] = tensor
    return out


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save(loaded: LoadedModel, dst: Path, src_dir: Path, dtype: str) -> None:
    """Write `loaded` (from any loader) as a native directory."""
    if dtype not in DTYPES and dtype != "int8":
        raise CheckpointError(f"unsupported --dtype {dtype!r}; supported: {sorted(DTYPES) + ['int8']}")
    dst.mkdir(parents=True, exist_ok=True)
    tensors = _storage(loaded.state, dtype)
    save_file(tensors, str(dst / "model.safetensors"))
    tokenizer = type(loaded.tokenizer).__name__ if loaded.tokenizer is not None else None
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst / name)
    defaults = dataclasses.asdict(loaded.defaults)  # tuples of ids are written as JSON lists
    (dst / CONFIG_FILE).write_text(json.dumps({
        "format_version": FORMAT_VERSION, "converted_from": loaded.source, "dtype": dtype,
        "model": dataclasses.asdict(loaded.config), "defaults": defaults, "tokenizer": tokenizer,
        "tokenizer_note": loaded.extra.get("tokenizer_note", "")}, indent=1))


def load(path: Path) -> LoadedModel:
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}; convert the source checkpoint again")
    try:
        cfg = ModelConfig(**meta["model"])
        defaults = DecodeOptions().replace(**meta["defaults"])  # replace() reads JSON lists of ids back as tuples
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable configuration ({exc})") from None
    weights = path / "model.safetensors"
    src = TensorSource(_dequantize(read_tensors(weights), str(weights)), str(weights))
    state = {name: src.get(name) for name in list(src.tensors)}
    from .. import tokenizer as tokenizers
    tokenizer = None
    if meta.get("tokenizer"):
        kind = getattr(tokenizers, meta["tokenizer"], None)
        if kind is None:
            raise CheckpointError(f"{path / CONFIG_FILE}: unknown tokenizer {meta['tokenizer']!r}")
        tokenizer = kind.from_dir(path, cfg)
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer,
                       source=f"pyengine:{path}", extra={"tokenizer_note": meta.get("tokenizer_note", "")})
