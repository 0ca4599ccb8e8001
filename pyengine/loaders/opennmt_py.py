"""OpenNMT-py v3 checkpoints (`*.pt` written by its ModelSaver: `model`, `generator`, `vocab`, `opt`).

Semantics follow OpenNMT-py 3.5 (the reference): pre-norm layers (`layer_norm_1`, `layer_norm_2`, the
feed-forward's own `layer_norm`) with a final norm per stack, embeddings × √d plus interleaved
sinusoids (sin on even, cos on odd dimensions), attention and feed-forward biases only when
`add_qkvbias` / `add_ffnbias`, the generator's bias as the logits bias, decoding from `<s>` and
OpenNMT's beam rules (see decoding.OnmtBeamState). Options that change the math in ways this engine
does not implement (relative positions, average attention, RMS norm, gated FFN, parallel residual,
grouped K/V, alignment heads, copy attention) are refused by name.

The checkpoint is a pickle holding tensors, lists and OpenNMT-py's options as an argparse Namespace;
it is read with torch's restricted unpickler (`weights_only=True`, the Namespace allowed), so no code
in it runs.
"""
from __future__ import annotations

import importlib.util

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel, TensorSource, fuse, read_pickled_checkpoint

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "swish"}
SPECIALS = {"unk": "<unk>", "pad": "<blank>", "bos": "<s>", "eos": "</s>"}


def detect(path: Path) -> bool:
    """A .pt file holding OpenNMT-py's keys; an unreadable .pt file is claimed too, so that the error
    names the file and what is wrong with it."""
    if not (path.is_file() and path.suffix == ".pt"):
        return False
    try:
        ckpt = read_pickled_checkpoint(path)
    except CheckpointError:
        return True
    return isinstance(ckpt, dict) and {"model", "vocab", "opt"} <= set(ckpt)


def _refuse_unsupported(opt, origin: str) -> None:
    checks = {
        "encoder_type": ("transformer",), "decoder_type": ("transformer",), "layer_norm": ("standard",),
        "self_attn_type": ("scaled-dot", "scaled-dot-flash"), "position_encoding_type": ("SinusoidalInterleaved",),
    }
    for name, allowed in checks.items():
        value = getattr(opt, name, allowed[0])
        if value not in allowed:
            raise CheckpointError(f"{origin}: OpenNMT-py option {name}={value!r} is not supported (supported: {allowed})")
    for name in ("max_relative_positions", "num_kv", "num_experts", "alignment_layer_heads"):
        value = getattr(opt, name, 0) or 0
        if value not in (0, -2) or (name == "max_relative_positions" and value != 0):
            raise CheckpointError(f"{origin}: OpenNMT-py option {name}={value!r} is not supported")
    for name in ("parallel_residual", "copy_attn", "shared_layer_norm", "rotary_interleave"):
        if getattr(opt, name, False) and name != "rotary_interleave":
            raise CheckpointError(f"{origin}: OpenNMT-py option {name}=True is not supported")
    if not getattr(opt, "position_encoding", False):
        raise CheckpointError(f"{origin}: a Transformer without position_encoding is not supported")
    if getattr(opt, "pos_ffn_activation_fn", "relu") not in ACTIVATIONS:
        raise CheckpointError(f"{origin}: activation {opt.pos_ffn_activation_fn!r} is not supported "
                              f"(supported: {sorted(ACTIVATIONS)})")
    if getattr(opt, "model_task", "seq2seq") != "seq2seq":
        raise CheckpointError(f"{origin}: only seq2seq (encoder-decoder) checkpoints are supported")


def _vocab_ids(tokens: list[str], origin: str, side: str) -> dict[str, int]:
    ids = {}
    for role, token in SPECIALS.items():
        if token not in tokens:
            raise CheckpointError(f"{origin}: the {side} vocabulary has no {token!r} token")
        ids[role] = tokens.index(token)
    return ids


def model_config(ckpt: dict, origin: str) -> tuple[ModelConfig, dict]:
    opt = ckpt["opt"]
    _refuse_unsupported(opt, origin)
    src_tokens, tgt_tokens = list(ckpt["vocab"]["src"]), list(ckpt["vocab"]["tgt"])
    tgt = _vocab_ids(tgt_tokens, origin, "target")
    start_token = ckpt["vocab"].get("decoder_start_token", SPECIALS["bos"])
    d = int(opt.hidden_size)
    cfg = ModelConfig(
        d_model=d, encoder_layers=int(opt.enc_layers), decoder_layers=int(opt.dec_layers),
        encoder_heads=int(opt.heads), decoder_heads=int(opt.heads), encoder_ffn_dim=int(opt.transformer_ff),
        decoder_ffn_dim=int(opt.transformer_ff), src_vocab_size=len(src_tokens), tgt_vocab_size=len(tgt_tokens),
        activation=ACTIVATIONS[getattr(opt, "pos_ffn_activation_fn", "relu")], pad_id=tgt["pad"], eos_id=tgt["eos"],
        decoder_start_id=tgt_tokens.index(start_token), max_positions=5000, embed_scale=math.sqrt(d),
        positions="sinusoidal_interleaved", normalize_before=True, encoder_final_norm=True, decoder_final_norm=True,
        layer_norm_eps=float(getattr(opt, "norm_eps", 1e-6)), shared_embeddings=bool(getattr(opt, "share_embeddings", False)),
        tie_output=False, final_logits_bias=True, family="onmt")
    return cfg, {"src_tokens": src_tokens, "tgt_tokens": tgt_tokens}


@dataclass(frozen=True)
class LayerNames:
    """Where an OpenNMT-style checkpoint (OpenNMT-py, eole) keeps each part of its layers ("{i}": the index)."""

    encoder: str
    decoder: str
    encoder_self_norm: str
    decoder_self_norm: str
    context_norm: str
    ffn_norm: str
    fc1: str
    fc2: str


ONMT_NAMES = LayerNames("encoder.transformer.{i}", "decoder.transformer_layers.{i}", "layer_norm", "layer_norm_1",
                        "layer_norm_2", "feed_forward.layer_norm", "feed_forward.w_1", "feed_forward.w_2")


def layer_tensors(src: TensorSource, cfg: ModelConfig, names: LayerNames, out: dict) -> None:
    """The layers and final norms of an OpenNMT-style checkpoint, in pyengine's names, into `out`. A linear's bias is
    read where the checkpoint holds one (OpenNMT-py and eole write exactly the biases their options create:
    add_qkvbias, add_final_linear_bias, add_ffnbias) and is zero elsewhere."""
    d, ff = cfg.d_model, cfg.encoder_ffn_dim

    def linear(prefix: str, shape: tuple[int, int]):
        weight = src.get(f"{prefix}.weight", shape)
        bias = src.get(f"{prefix}.bias", shape[:1]) if src.has(f"{prefix}.bias") else torch.zeros(shape[0])
        return weight, bias.to(weight.dtype)

    def norm(ours: str, theirs: str):
        out[f"{ours}.weight"] = src.get(f"{theirs}.weight", (d,))
        out[f"{ours}.bias"] = src.get(f"{theirs}.bias", (d,))

    def attention(theirs: str):
        return [linear(f"{theirs}.linear_{p}", (d, d)) for p in ("query", "keys", "values")] + \
            [linear(f"{theirs}.final_linear", (d, d))]

    def self_attention(ours: str, theirs: str):
        (qw, qb), (kw, kb), (vw, vb), (ow, ob) = attention(theirs)
        out[f"{ours}.qkv.weight"], out[f"{ours}.qkv.bias"] = fuse(qw, kw, vw), fuse(qb, kb, vb)
        out[f"{ours}.out.weight"], out[f"{ours}.out.bias"] = ow, ob

    def ffn(ours: str, theirs: str):
        out[f"{ours}.ffn.fc1.weight"], out[f"{ours}.ffn.fc1.bias"] = linear(f"{theirs}.{names.fc1}", (ff, d))
        out[f"{ours}.ffn.fc2.weight"], out[f"{ours}.ffn.fc2.bias"] = linear(f"{theirs}.{names.fc2}", (d, ff))
        norm(f"{ours}.ffn_norm", f"{theirs}.{names.ffn_norm}")

    for i in range(cfg.encoder_layers):
        ours, theirs = f"encoder_layers.{i}", names.encoder.format(i=i)
        self_attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        norm(f"{ours}.self_attn_norm", f"{theirs}.{names.encoder_self_norm}")
        ffn(ours, theirs)
    for i in range(cfg.decoder_layers):
        ours, theirs = f"decoder_layers.{i}", names.decoder.format(i=i)
        self_attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        norm(f"{ours}.self_attn_norm", f"{theirs}.{names.decoder_self_norm}")
        (qw, qb), (kw, kb), (vw, vb), (ow, ob) = attention(f"{theirs}.context_attn")
        out[f"{ours}.cross_attn.q.weight"], out[f"{ours}.cross_attn.q.bias"] = qw, qb
        out[f"{ours}.cross_attn.kv.weight"], out[f"{ours}.cross_attn.kv.bias"] = fuse(kw, vw), fuse(kb, vb)
        out[f"{ours}.cross_attn.out.weight"], out[f"{ours}.cross_attn.out.bias"] = ow, ob
        norm(f"{ours}.cross_attn_norm", f"{theirs}.{names.context_norm}")
        ffn(ours, theirs)
    if cfg.encoder_final_norm:
        norm("encoder_norm", "encoder.layer_norm")
    norm("decoder_norm", "decoder.layer_norm")


def onmt_tensors(src: TensorSource, cfg: ModelConfig) -> dict:
    """OpenNMT-py names → pyengine names."""
    d = cfg.d_model
    out = {}
    enc_emb = "encoder.embeddings.make_embedding.emb_luts.0.weight"
    dec_emb = "decoder.embeddings.make_embedding.emb_luts.0.weight"
    out["src_embed.weight"] = src.get(enc_emb, (cfg.src_vocab_size, d))
    if cfg.shared_embeddings:
        src.get(dec_emb, (cfg.tgt_vocab_size, d))
    else:
        out["tgt_embed.weight"] = src.get(dec_emb, (cfg.tgt_vocab_size, d))
    src.ignore(["encoder.embeddings.make_embedding.pe.pe", "decoder.embeddings.make_embedding.pe.pe"])
    out["lm_head.weight"] = src.get("generator.weight", (cfg.tgt_vocab_size, d))
    out["final_logits_bias"] = src.get("generator.bias", (cfg.tgt_vocab_size,))
    layer_tensors(src, cfg, ONMT_NAMES, out)
    return out


def load(path: Path) -> LoadedModel:
    ckpt = read_pickled_checkpoint(path, keep=False)
    origin = str(path)
    if not isinstance(ckpt, dict) or not {"model", "vocab", "opt"} <= set(ckpt):
        raise CheckpointError(f"{origin}: not an OpenNMT-py checkpoint (expected 'model', 'vocab' and 'opt')")
    cfg, vocab = model_config(ckpt, origin)
    tensors = dict(ckpt["model"])
    for key, value in (ckpt.get("generator") or {}).items():
        tensors[f"generator.{key}"] = value
    src = TensorSource(tensors, origin)
    state = onmt_tensors(src, cfg)
    src.check_all_consumed()
    # OpenNMT-py's translate defaults: beam 5, max_length 250 (its max_length_ratio is not applied), avg length
    # penalty with alpha 1 (see OnmtBeamState)
    defaults = DecodeOptions(beam_size=5, num_hypotheses=1, max_decoding_length=250)
    tokenizer, note = text_tokenizer(ckpt["opt"], path, vocab)
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"opennmt-py:{path}",
                       extra={"tokenizer_note": note, **vocab} if note else vocab)


def text_tokenizer(opt, path: Path, vocab: dict):
    """The text tokenizer of a checkpoint trained with OpenNMT-py's `sentencepiece` or `onmt_tokenize` transform, its
    subword models where the options name them or by the same file name beside the checkpoint. (tokenizer, note: why
    there is none)"""
    from .onmt_text import OnmtSpmTokenizer, OnmtTokTokenizer
    transforms = list(getattr(opt, "transforms", None) or [])
    kind = next((t for t in transforms if t in ("sentencepiece", "onmt_tokenize")), None)
    if kind is None:
        return None, ("OpenNMT-py tokenization is the training config's transforms (text is read with the "
                      f"sentencepiece or onmt_tokenize transform; this checkpoint has {transforms or 'none'}); "
                      "translate from token ids with generate()")
    if kind == "sentencepiece":
        models, note = both_sides(subword_file, opt, path)
        if models is None:
            return None, note
        return OnmtSpmTokenizer(models[0], models[1], vocab["src_tokens"], vocab["tgt_tokens"],
                                set(SPECIALS.values())), ""
    if importlib.util.find_spec("pyonmttok") is None:  # the OpenNMT Tokenizer, an extra
        return None, ("the checkpoint's onmt_tokenize transform needs the OpenNMT Tokenizer: pip install "
                      "pyengine[opennmt] (pyonmttok); translate from token ids with generate()")
    sides, note = both_sides(onmttok_kwargs, opt, path)
    if sides is None:
        return None, note
    # the transform's rule, both sides: the source's subword type and the target's preserve_placeholders decide
    newline = getattr(opt, "src_subword_type", "none") == "sentencepiece" \
        and not sides[1].get("preserve_placeholders", False)
    return OnmtTokTokenizer(sides[0], sides[1], vocab["src_tokens"], vocab["tgt_tokens"], newline), ""


def both_sides(read, opt, path: Path) -> tuple[list | None, str]:
    """read(opt, side, path) → (value, note) for "src" then "tgt": both values, or None and the first side's note."""
    values = []
    for side in ("src", "tgt"):
        value, note = read(opt, side, path)
        if value is None:
            return None, note
        values.append(value)
    return values, ""


def subword_file(opt, side: str, path: Path) -> tuple[Path | None, str]:
    """The side's subword model where the options name it, else by its file name beside the checkpoint."""
    named = getattr(opt, f"{side}_subword_model", None)
    candidates = [Path(named), path.parent / Path(named).name] if named else []
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None, (f"the checkpoint's {side}_subword_model {named!r} is neither where its options say nor "
                      f"beside {path.name}; translate from token ids with generate()")
    return found, ""


def onmttok_kwargs(opt, side: str, path: Path) -> tuple[dict | None, str]:
    """pyonmttok.Tokenizer's arguments as OpenNMT-py's onmt_tokenize transform makes them for `side` (its
    _get_subword_kwargs and {side}_onmttok_kwargs); subword sampling and GPT-2 pre-tokenization are refused (a note)."""
    import ast
    raw = getattr(opt, f"{side}_onmttok_kwargs", None) or {}
    other = ast.literal_eval(raw) if isinstance(raw, str) else dict(raw)  # a dict, or the string training parsed
    subword = getattr(opt, f"{side}_subword_type", "none") or "none"
    nbest, alpha = getattr(opt, f"{side}_subword_nbest", 1), getattr(opt, f"{side}_subword_alpha", 0)
    if getattr(opt, "gpt2_pretok", False) or nbest not in (0, 1) or alpha:
        return None, (f"the checkpoint's onmt_tokenize options sample subwords or pre-tokenize as GPT-2 "
                      f"({side}_subword_nbest {nbest}, {side}_subword_alpha {alpha}, gpt2_pretok); translate from "
                      "token ids with generate()")
    kwargs: dict = {}
    if subword in ("bpe", "sentencepiece"):
        found, note = subword_file(opt, side, path)
        if found is None:
            return None, note
        kwargs = {"bpe_model_path": str(found), "bpe_dropout": alpha} if subword == "bpe" else \
            {"sp_model_path": str(found), "sp_nbest_size": nbest, "sp_alpha": alpha}
    threshold, vocab_path = getattr(opt, f"{side}_vocab_threshold", 0), getattr(opt, f"{side}_subword_vocab", "")
    if threshold > 0 and vocab_path:
        kwargs.update(vocabulary_path=vocab_path, vocabulary_threshold=threshold)
    return {**kwargs, **other}, ""
