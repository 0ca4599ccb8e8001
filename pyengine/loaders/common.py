"""Shared loader pieces: reading tensors, exact key maps, q/k/v fusion and the consumed-keys check."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError


@dataclass
class LoadedModel:
    """What a loader returns: the architecture, weights in pyengine's names, decoding defaults, tokenizer."""

    config: ModelConfig
    state: dict[str, torch.Tensor]
    defaults: DecodeOptions
    tokenizer: Any = None
    source: str = ""
    extra: dict = field(default_factory=dict)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or a torch .bin/.pt state dict, on CPU, without executing pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or corrupt files raise many different types
        raise CheckpointError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    return state


class TensorSource:
    """A checkpoint's tensors; every read is recorded so unused tensors can be reported."""

    def __init__(self, tensors: dict[str, torch.Tensor], origin: str):
        self.tensors, self.origin, self.used = tensors, origin, set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if key not in self.tensors:
            raise CheckpointError(f"{self.origin}: missing tensor {key!r}")
        tensor = self.tensors[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{self.origin}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(shape)} from the config")
        self.used.add(key)
        return tensor

    def first(self, keys: list[str], shape: tuple[int, ...]) -> torch.Tensor:
        """The first present key of a group of tied aliases; the other present ones are checked and consumed."""
        present = [k for k in keys if k in self.tensors]
        if not present:
            raise CheckpointError(f"{self.origin}: missing tensor, none of {keys} is present")
        for key in present:
            self.get(key, shape)
        return self.tensors[present[0]]

    def ignore(self, keys: list[str]) -> None:
        """Mark tensors the engine recomputes (e.g. a saved sinusoid table) as consumed."""
        self.used.update(k for k in keys if k in self.tensors)

    def check_all_consumed(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            shown = unused[:20] + (["..."] if len(unused) > 20 else [])
            raise CheckpointError(f"{self.origin}: {len(unused)} tensor(s) matched nothing in the model: {shown}")


def fuse(*tensors: torch.Tensor) -> torch.Tensor:
    """Stack projections by rows (q, k, v → one (3D, D) matrix or (3D,) bias)."""
    return torch.cat(tensors, dim=0)


@dataclass(frozen=True)
class FormatLoader:
    """A checkpoint format: `detect(path)` says whether it applies, `load(path)` reads it."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], LoadedModel]
    looks_for: str
