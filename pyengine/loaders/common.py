"""Shared loader pieces: reading tensors, exact key maps, q/k/v fusion and the consumed-keys check."""
from __future__ import annotations

import argparse
import json
import math
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


_PICKLED: dict[Path, dict] = {}  # the last .pt read: the loaders' detect() and load() share one read


def read_pickled_checkpoint(path: Path, keep: bool = True) -> dict:
    """A .pt checkpoint (fairseq, OpenNMT-py: tensors, lists, options as an argparse Namespace), read with
    torch's restricted unpickler (weights_only=True, only the Namespace allowed), so no code in it runs.
    With keep=False the cached copy is released (the loader is about to consume it)."""
    key = path.resolve()
    if key not in _PICKLED:
        _PICKLED.clear()
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                _PICKLED[key] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or corrupt files raise many different types
            raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    return _PICKLED[key] if keep else _PICKLED.pop(key)


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


def hf_model_type(path: Path) -> str | None:
    """`model_type` of a Hugging Face directory's config.json, None when there is none to read."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return read_json(cfg).get("model_type")
    except CheckpointError:
        return None


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}


def hf_seq2seq_config(raw: dict, origin: str, *, default_activation: str, default_scale: bool,
                      **family: Any) -> ModelConfig:
    """The fields every HF BART-family config.json shares; `family` sets what the architecture fixes
    (positions, norms, vocabularies, ...)."""
    act = raw.get("activation_function", default_activation)
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"{origin}: unsupported activation_function {act!r}; supported: {sorted(HF_ACTIVATIONS)}")
    d = raw["d_model"]
    eos = raw.get("eos_token_id", 2)
    if isinstance(eos, list):
        if len(eos) != 1:
            raise CheckpointError(f"{origin}: several eos_token_id values {eos} are not supported")
        eos = eos[0]
    fields = dict(
        d_model=d, encoder_layers=raw["encoder_layers"], decoder_layers=raw["decoder_layers"],
        encoder_heads=raw["encoder_attention_heads"], decoder_heads=raw["decoder_attention_heads"],
        encoder_ffn_dim=raw["encoder_ffn_dim"], decoder_ffn_dim=raw["decoder_ffn_dim"],
        src_vocab_size=raw["vocab_size"], tgt_vocab_size=raw["vocab_size"], activation=HF_ACTIVATIONS[act],
        pad_id=raw["pad_token_id"], eos_id=eos, decoder_start_id=raw.get("decoder_start_token_id", raw["pad_token_id"]),
        max_positions=raw.get("max_position_embeddings", 1024),
        embed_scale=math.sqrt(d) if raw.get("scale_embedding", default_scale) else 1.0,
        layer_norm_eps=1e-5, tie_output=raw.get("tie_word_embeddings", True), family="hf")
    fields.update(family)
    return ModelConfig(**fields)


def read_hf_seq2seq(path: Path, make_config: Callable[[dict, str], ModelConfig]) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, state dict in our names, generation_config) of a HF BART-family directory."""
    raw = read_json(path / "config.json")
    try:
        cfg = make_config(raw, str(path))
    except KeyError as exc:
        raise CheckpointError(f"{path / 'config.json'}: missing field {exc.args[0]!r}") from None
    gen_file = path / "generation_config.json"
    gen = read_json(gen_file) if gen_file.is_file() else {}
    weights = next((path / n for n in HF_WEIGHT_FILES if (path / n).is_file()), None)
    if weights is None:
        if any(path.glob("model-*.safetensors")):
            raise CheckpointError(f"{path}: sharded safetensors checkpoints are not supported yet")
        raise CheckpointError(f"{path}: no weights file; looked for {list(HF_WEIGHT_FILES)}")
    src = TensorSource(read_tensors(weights), str(weights))
    state = hf_seq2seq_tensors(src, cfg)
    src.check_all_consumed()
    return cfg, state, gen


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


def hf_seq2seq_tensors(src: TensorSource, cfg: ModelConfig) -> dict:
    """HF BART-family names (Marian, M2M100/NLLB) → pyengine names, with q/k/v (self) and k/v (cross) fused."""
    d, ff_e, ff_d = cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim
    out = {}
    if cfg.shared_embeddings:
        out["src_embed.weight"] = src.first(
            ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
            + (["lm_head.weight"] if cfg.tie_output else []), (cfg.src_vocab_size, d))
    else:
        out["src_embed.weight"] = src.first(["model.encoder.embed_tokens.weight"], (cfg.src_vocab_size, d))
        out["tgt_embed.weight"] = src.first(["model.decoder.embed_tokens.weight"]
                                            + (["lm_head.weight"] if cfg.tie_output else []), (cfg.tgt_vocab_size, d))
        src.ignore(["model.shared.weight"])  # HF keeps a copy of the encoder table under this name
    if not cfg.tie_output:
        out["lm_head.weight"] = src.get("lm_head.weight", (cfg.tgt_vocab_size, d))
    if cfg.final_logits_bias:
        out["final_logits_bias"] = src.get("final_logits_bias", (1, cfg.tgt_vocab_size))[0]
    if cfg.positions == "learned":
        rows = cfg.max_positions + cfg.position_offset
        out["src_positions"] = src.get("model.encoder.embed_positions.weight", (rows, d))
        out["tgt_positions"] = src.get("model.decoder.embed_positions.weight", (rows, d))
    else:  # sinusoidal tables are recomputed
        src.ignore(["model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"])

    def linear(prefix: str, shape: tuple[int, int]):
        return src.get(f"{prefix}.weight", shape), src.get(f"{prefix}.bias", shape[:1])

    def norm(ours: str, theirs: str):
        out[f"{ours}.weight"] = src.get(f"{theirs}.weight", (d,))
        out[f"{ours}.bias"] = src.get(f"{theirs}.bias", (d,))

    def self_attn(ours: str, theirs: str):
        (qw, qb), (kw, kb), (vw, vb) = (linear(f"{theirs}.{p}_proj", (d, d)) for p in "qkv")
        out[f"{ours}.qkv.weight"], out[f"{ours}.qkv.bias"] = fuse(qw, kw, vw), fuse(qb, kb, vb)
        out[f"{ours}.out.weight"], out[f"{ours}.out.bias"] = linear(f"{theirs}.out_proj", (d, d))

    def ffn(ours: str, theirs: str, ff: int):
        out[f"{ours}.fc1.weight"], out[f"{ours}.fc1.bias"] = linear(f"{theirs}.fc1", (ff, d))
        out[f"{ours}.fc2.weight"], out[f"{ours}.fc2.bias"] = linear(f"{theirs}.fc2", (d, ff))

    for i in range(cfg.encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"model.encoder.layers.{i}"
        self_attn(f"{ours}.self_attn", f"{theirs}.self_attn")
        norm(f"{ours}.self_attn_norm", f"{theirs}.self_attn_layer_norm")
        ffn(f"{ours}.ffn", theirs, ff_e)
        norm(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm")
    for i in range(cfg.decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"model.decoder.layers.{i}"
        self_attn(f"{ours}.self_attn", f"{theirs}.self_attn")
        norm(f"{ours}.self_attn_norm", f"{theirs}.self_attn_layer_norm")
        (qw, qb), (kw, kb), (vw, vb) = (linear(f"{theirs}.encoder_attn.{p}_proj", (d, d)) for p in "qkv")
        out[f"{ours}.cross_attn.q.weight"], out[f"{ours}.cross_attn.q.bias"] = qw, qb
        out[f"{ours}.cross_attn.kv.weight"], out[f"{ours}.cross_attn.kv.bias"] = fuse(kw, vw), fuse(kb, vb)
        out[f"{ours}.cross_attn.out.weight"], out[f"{ours}.cross_attn.out.bias"] = linear(
            f"{theirs}.encoder_attn.out_proj", (d, d))
        norm(f"{ours}.cross_attn_norm", f"{theirs}.encoder_attn_layer_norm")
        ffn(f"{ours}.ffn", theirs, ff_d)
        norm(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm")
    if cfg.embedding_norm:
        norm("src_embed_norm", "model.encoder.layernorm_embedding")
        norm("tgt_embed_norm", "model.decoder.layernorm_embedding")
    if cfg.encoder_final_norm:
        norm("encoder_norm", "model.encoder.layer_norm")
    if cfg.decoder_final_norm:
        norm("decoder_norm", "model.decoder.layer_norm")
    return out
