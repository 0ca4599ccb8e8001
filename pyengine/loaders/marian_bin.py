"""Marian's own checkpoints (`model.bin` / `model.npz`), including Bergamot's int8 students.

A .bin holds a table of items (name, type, shape, data; data 256-byte aligned) and the training YAML as
the item `special:model.yml`; a .npz holds the same items as numpy arrays. Matrices are stored input-major
(x·W). int8 items ("intgemm8") hold the matrix transposed (output-major), then its float32 quantization
multiplier q (value = int8 / q); Wemb is stored as the plain (vocab, dim) int8 table. Every int8 item is
dequantized at load, as Marian does for Wemb, and computed in float32/bfloat16: that is also what the
reference engine these tests compare with does (its outputs equal pyengine's float ones, and differ when
Marian's int8 activation rounding is emulated). The activation multipliers of "alphas" models
(`<W>_QuantMultA`) serve only that int8 arithmetic and are read past.

The decoder configuration beside it (`config*.yml`: models, vocabs, shortlist, beam-size, normalize, word-penalty,
max-length-factor, allow-unk) gives the decoding defaults, the vocabularies (sentencepiece or YAML word lists) and the
lexical shortlist. Such models decode with Marian's own beam rules (pyengine.decoding.rules.MarianBeamState).
Supported: post-norm transformers ("transformer-postprocess: dan"), decoder self-attention or Marian's
SSRU cell ("transformer-decoder-autoreg: rnn", "dec-cell: ssru"), tied embeddings ("tied-embeddings-all"),
relu/swish FFNs of depth 2; any other option that changes the math is refused by name.
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel

FLOAT32, INT8_MATRIX, TEXT = 0x0404, 0x4101, 0x0101  # Marian's Type codes for the items used here
MODEL_SUFFIXES = (".bin", ".npz")


@dataclass
class Item:
    name: str
    type: int
    shape: tuple[int, ...]
    data: bytes


def read_bin(path: Path) -> dict[str, Item]:
    """The items of a Marian .bin file."""
    try:
        buf = path.read_bytes()
        version, count = struct.unpack_from("<2Q", buf, 0)
        if version != 1:
            raise CheckpointError(f"{path}: Marian binary version {version}, expected 1")
        pos = 16
        headers = [struct.unpack_from("<4Q", buf, pos + 32 * i) for i in range(count)]
        pos += 32 * count
        names = []
        for name_len, _, _, _ in headers:
            names.append(buf[pos: pos + name_len].rstrip(b"\0").decode("utf-8"))
            pos += name_len
        shapes = []
        for _, _, shape_len, _ in headers:
            shapes.append(struct.unpack_from(f"<{shape_len}i", buf, pos))
            pos += 4 * shape_len
        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]  # padding to the 256-byte boundary
        items = {}
        for (_, kind, _, size), name, shape in zip(headers, names, shapes):
            if pos + size > len(buf):
                raise CheckpointError(f"{path}: truncated (item {name!r} ends past the end of the file)")
            items[name] = Item(name, kind, tuple(shape), buf[pos: pos + size])
            pos += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a Marian binary model ({exc})") from None
    return items


def read_npz(path: Path) -> dict[str, Item]:
    """The items of a Marian .npz file (float32 arrays; the YAML as a byte array)."""
    try:
        arrays = np.load(path)
        items = {}
        for name in arrays.files:
            a = arrays[name]
            if name.startswith("special:"):
                items[name] = Item(name, TEXT, a.shape, a.tobytes())
            elif a.dtype != np.float32:
                raise CheckpointError(f"{path}: item {name!r} has dtype {a.dtype}; .npz models hold float32")
            else:
                items[name] = Item(name, FLOAT32, a.shape, a.tobytes())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a Marian .npz model ({exc})") from None
    return items


def model_file(path: Path) -> Path | None:
    """The model file: the path itself, the one a decoder config lists, or the only model.* in a directory."""
    if path.is_file():
        return path if path.suffix in MODEL_SUFFIXES else None
    config = decoder_config(path)
    if config and config.get("models"):
        return path / config["models"][0]
    candidates = [p for p in sorted(path.glob("*")) if p.suffix in MODEL_SUFFIXES and p.name.startswith("model")]
    return candidates[0] if len(candidates) == 1 else None


def decoder_config(path: Path) -> dict | None:
    """The decoder YAML beside the model: Marian's `config*.yml`, `decoder.yml`, or the `<model>.decoder.yml` Marian's
    training writes beside each checkpoint (model.npz.decoder.yml)."""
    import yaml

    directory = path if path.is_dir() else path.parent
    candidates = sorted(directory.glob("config*.yml")) + sorted(directory.glob("decoder.yml")) + \
        sorted(directory.glob("*.decoder.yml"))
    for candidate in candidates:
        try:
            data = yaml.safe_load(candidate.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(data, dict) and "models" in data:
            return data
    return None


def detect(path: Path) -> bool:
    found = model_file(path)
    if found is None or not found.is_file():
        return False
    if found.suffix == ".npz":  # a zip; Marian writes special:model.yml last: read the zip's directory
        try:
            with zipfile.ZipFile(found) as z:
                return "special:model.yml.npy" in z.namelist()
        except (zipfile.BadZipFile, OSError):
            return False
    with open(found, "rb") as fh:
        head = fh.read(4096)
    return len(head) >= 16 and struct.unpack_from("<Q", head, 0)[0] == 1 and b"special:model.yml" in \
        found.read_bytes()[: 1 << 20]


class Items:
    """Items by name, each read once; unused items are an error (as for the other formats)."""

    def __init__(self, items: dict[str, Item], origin: Path):
        self.items, self.origin, self.used = items, origin, set()

    def has(self, name: str) -> bool:
        return name in self.items

    def float(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        item = self._get(name)
        if item.type == INT8_MATRIX:
            raise CheckpointError(f"{self.origin}: item {name!r} is int8 where float32 was expected")
        values = np.frombuffer(item.data, dtype=np.float32, count=int(np.prod(item.shape))).copy()
        return self._shaped(torch.from_numpy(values).reshape(item.shape), name, shape)

    def matrix(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A (rows=in, cols=out) Marian matrix as an nn.Linear weight (out, in), dequantized if stored int8."""
        item = self._get(name)
        if item.type != INT8_MATRIX:
            return self.float(name, (rows, cols)).t().contiguous()
        if item.shape != (rows, cols):
            raise CheckpointError(f"{self.origin}: item {name!r} has shape {item.shape}, the config implies "
                                  f"{(rows, cols)}")
        return dequantized(item, self.origin).reshape(cols, rows)  # stored transposed: the nn.Linear layout

    def embedding(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """Wemb (vocab, dim) in float (an int8 table dequantized as Marian does)."""
        item = self._get(name)
        if item.type != INT8_MATRIX:
            return self.float(name, (rows, cols))
        if item.shape != (rows, cols):
            raise CheckpointError(f"{self.origin}: item {name!r} has shape {item.shape}, the config implies "
                                  f"{(rows, cols)}")
        return dequantized(item, self.origin).reshape(rows, cols)

    def text(self, name: str) -> str:
        return self._get(name).data.rstrip(b"\0").decode("utf-8")

    def unused(self) -> list[str]:
        return sorted(set(self.items) - self.used)

    def _get(self, name: str) -> Item:
        if name not in self.items:
            raise CheckpointError(f"{self.origin}: missing item {name!r}")
        self.used.add(name)
        return self.items[name]

    def _shaped(self, tensor: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if tensor.numel() != int(np.prod(shape)):
            raise CheckpointError(f"{self.origin}: item {name!r} has shape {tuple(tensor.shape)}, the config "
                                  f"implies {shape}")
        return tensor.reshape(shape)


def dequantized(item: Item, origin: Path) -> torch.Tensor:
    """An intgemm8 item's values: int8 · (1 / q), q the float32 multiplier stored after them (Marian's
    unquantizeWemb arithmetic, reciprocal first)."""
    n = int(np.prod(item.shape))
    if len(item.data) < n + 4:
        raise CheckpointError(f"{origin}: int8 item {item.name!r} is shorter than its shape {item.shape}")
    values = torch.from_numpy(np.frombuffer(item.data, dtype=np.int8, count=n).astype(np.float32))
    q = torch.tensor(struct.unpack_from("<f", item.data, n)[0], dtype=torch.float32)
    return values * (1.0 / q)


REQUIRED = {"type": "transformer", "transformer-preprocess": "", "transformer-postprocess": "dan",
            "transformer-ffn-depth": 2, "transformer-train-position-embeddings": False}


def check_options(opts: dict, origin: Path) -> None:
    """Refuse, by option name, what this loader does not implement."""
    for key, want in REQUIRED.items():
        if opts.get(key, want) != want:
            raise CheckpointError(f"{origin}: {key}={opts.get(key)!r} is not supported (only {want!r})")
    if opts.get("transformer-postprocess-emb", "d") not in ("", "d"):
        raise CheckpointError(f"{origin}: transformer-postprocess-emb={opts['transformer-postprocess-emb']!r} "
                              "is not supported")
    if opts.get("transformer-postprocess-top", "") != "":
        raise CheckpointError(f"{origin}: transformer-postprocess-top is not supported")
    autoreg = opts.get("transformer-decoder-autoreg", "self-attention")
    if autoreg not in ("self-attention", "rnn"):
        raise CheckpointError(f"{origin}: transformer-decoder-autoreg={autoreg!r} is not supported")
    if autoreg == "rnn" and (opts.get("dec-cell") != "ssru" or opts.get("layer-normalization")):
        raise CheckpointError(f"{origin}: decoder cell {opts.get('dec-cell')!r} (layer-normalization="
                              f"{opts.get('layer-normalization')}) is not supported; only ssru without it")
    if not opts.get("tied-embeddings-all"):
        raise CheckpointError(f"{origin}: only tied-embeddings-all models are supported")
    if opts.get("transformer-ffn-activation", "swish") not in ("relu", "swish"):
        raise CheckpointError(f"{origin}: transformer-ffn-activation={opts['transformer-ffn-activation']!r}")
    for key in ("transformer-tied-layers", "input-types"):
        if opts.get(key):
            raise CheckpointError(f"{origin}: {key}={opts[key]!r} is not supported")


def load(path: Path) -> LoadedModel:
    import yaml

    from ..shortlist import Shortlist
    from .marian_vocab import marian_tokenizer

    found = model_file(path)
    items = Items(read_npz(found) if found.suffix == ".npz" else read_bin(found), found)
    opts = yaml.safe_load(items.text("special:model.yml"))
    check_options(opts, found)
    d, heads, ffn = opts["dim-emb"], opts["transformer-heads"], opts["transformer-dim-ffn"]
    vocab = opts["dim-vocabs"][0]
    if opts["dim-vocabs"][1] != vocab:
        raise CheckpointError(f"{found}: tied embeddings with vocabularies of {opts['dim-vocabs']}")
    ssru = opts.get("transformer-decoder-autoreg", "self-attention") == "rnn"
    cfg = ModelConfig(
        d_model=d, encoder_layers=opts["enc-depth"], decoder_layers=opts["dec-depth"], encoder_heads=heads,
        decoder_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=opts.get("transformer-dim-ffn", ffn),
        src_vocab_size=vocab, tgt_vocab_size=vocab, activation=opts.get("transformer-ffn-activation", "swish"),
        pad_id=0, eos_id=0, decoder_start_id=0, max_positions=1024, embed_scale=d ** 0.5,
        positions="sinusoidal_fairseq", layer_norm_eps=1e-6, shared_embeddings=True, tie_output=True,
        final_logits_bias=not opts.get("output-omit-bias", False),
        decoder_self="ssru" if ssru else "attention", zero_start_embedding=True, family="marian")
    directory = found.parent
    dcfg = decoder_config(path) or {}
    lex = (dcfg.get("shortlist") or [None])[0]
    state = map_items(items, cfg, ssru)
    unused = [n for n in items.unused() if not n.endswith("_QuantMultA")]  # int8-arithmetic multipliers
    if unused:
        raise CheckpointError(f"{found}: items the model does not use: {unused[:10]}")
    tokenizer, shortlist = None, None
    vocabs = dcfg.get("vocabs") or [p.name for p in sorted(directory.glob("vocab*.spm"))][:1] * 2
    if vocabs and (directory / vocabs[0]).is_file():
        tokenizer = marian_tokenizer(directory / vocabs[0], directory / vocabs[-1], eos_id=cfg.eos_id, vocab=vocab)
    if lex:
        shortlist = Shortlist.read(directory / lex, vocab, shared=bool((dcfg.get("shortlist") + [False, False])[1]))
    # marian-decoder's defaults where the decoder configuration is silent (beam-size 12, normalize 0, word-penalty 0,
    # max-length-factor 3); <unk> is never generated unless allow-unk (Marian suppresses it in the path scores)
    allow_unk = str(dcfg.get("allow-unk", False)).lower() == "true"
    defaults = DecodeOptions(beam_size=int(dcfg.get("beam-size", 12)), length_penalty=float(dcfg.get("normalize", 0.0)),
                             word_penalty=float(dcfg.get("word-penalty", 0.0)), max_decoding_length=cfg.max_positions,
                             max_length_factor=float(dcfg.get("max-length-factor", 3.0)),
                             suppress_tokens=() if allow_unk or tokenizer is None else (tokenizer.target_unk_id,),
                             alignment_heads=1)  # Marian's alignments read the first head
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"marian:{found}",
                       extra={"shortlist": shortlist})


def map_items(items: Items, cfg: ModelConfig, ssru: bool) -> dict[str, torch.Tensor]:
    """Marian's item names → pyengine's parameter names (q/k/v fused)."""
    d, state = cfg.d_model, {}

    def linear(ours: str, parts: list[tuple[str, str | None]], rows: int, cols: int) -> None:
        state[f"{ours}.weight"] = torch.cat([items.matrix(w_name, rows, cols) for w_name, _ in parts])
        if parts[0][1] is not None:
            state[f"{ours}.bias"] = torch.cat([items.float(b_name, (cols,)) for _, b_name in parts])

    def norm(ours: str, prefix: str) -> None:
        state[f"{ours}.weight"] = items.float(f"{prefix}_ln_scale", (d,))
        state[f"{ours}.bias"] = items.float(f"{prefix}_ln_bias", (d,))

    def ffn(ours: str, prefix: str, ffn_dim: int) -> None:
        linear(f"{ours}.ffn.fc1", [(f"{prefix}_W1", f"{prefix}_b1")], d, ffn_dim)
        linear(f"{ours}.ffn.fc2", [(f"{prefix}_W2", f"{prefix}_b2")], ffn_dim, d)
        norm(f"{ours}.ffn_norm", f"{prefix}_ffn")

    def attention(ours: str, prefix: str, fused: str) -> None:
        qkv = [(f"{prefix}_W{x}", f"{prefix}_b{x}") for x in "qkv"]
        if fused == "qkv":
            linear(f"{ours}.qkv", qkv, d, d)
        else:
            linear(f"{ours}.q", qkv[:1], d, d)
            linear(f"{ours}.kv", qkv[1:], d, d)
        linear(f"{ours}.out", [(f"{prefix}_Wo", f"{prefix}_bo")], d, d)

    for i in range(cfg.encoder_layers):
        p, ours = f"encoder_l{i + 1}", f"encoder_layers.{i}"
        attention(f"{ours}.self_attn", f"{p}_self", "qkv")
        norm(f"{ours}.self_attn_norm", f"{p}_self_Wo")
        ffn(ours, f"{p}_ffn", cfg.encoder_ffn_dim)
    for i in range(cfg.decoder_layers):
        p, ours = f"decoder_l{i + 1}", f"decoder_layers.{i}"
        if ssru:
            linear(f"{ours}.rnn.w", [(f"{p}_rnn_W", None)], d, d)
            linear(f"{ours}.rnn.wf", [(f"{p}_rnn_Wf", f"{p}_rnn_bf")], d, d)
            norm(f"{ours}.self_attn_norm", f"{p}_rnn_ffn")
        else:
            attention(f"{ours}.self_attn", f"{p}_self", "qkv")
            norm(f"{ours}.self_attn_norm", f"{p}_self_Wo")
        attention(f"{ours}.cross_attn", f"{p}_context", "q+kv")
        norm(f"{ours}.cross_attn_norm", f"{p}_context_Wo")
        ffn(ours, f"{p}_ffn", cfg.decoder_ffn_dim)
    state["src_embed.weight"] = items.embedding("Wemb", cfg.src_vocab_size, d)
    if cfg.final_logits_bias:
        state["final_logits_bias"] = items.float("decoder_ff_logit_out_b", (cfg.tgt_vocab_size,))
    return state
