"""fairseq transformer checkpoints (`checkpoint*.pt` written by fairseq's Trainer: `model` plus `cfg` or the
legacy `args`), with `dict.<lang>.txt` beside them.

Semantics follow fairseq 0.12's TransformerModel and SequenceGenerator (the reference): post-norm, or
pre-norm with a final norm per stack (`encoder_normalize_before` / `decoder_normalize_before`),
embeddings × √d unless `no_scale_embedding`, sinusoidal (fairseq's formula) or learned positions
numbered from padding_idx + 1, `layernorm_embedding`, `share_all_embeddings` /
`share_decoder_input_output_embed`, legacy fused `in_proj_weight`; decoding starts from `</s>`, with
fairseq's beam rules (decoding.FairseqBeamState). Options that change the math in ways this engine
does not implement (adaptive softmax, NormFormer scaling, cross-self-attention, layer dropping, per-side
position kinds that differ) are refused by name. Read with torch's restricted unpickler
(common.read_pickled_checkpoint).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel, TensorSource, fuse, read_pickled_checkpoint

ACTIVATIONS = {"relu": "relu", "gelu": "gelu"}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # fairseq.data.Dictionary's first four symbols
BOS, PAD, EOS, UNK = range(4)
def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".pt"):
        return False
    try:
        ckpt = read_pickled_checkpoint(path)
    except CheckpointError:
        return False  # the OpenNMT-py loader claims unreadable .pt files and reports them
    return isinstance(ckpt, dict) and "model" in ckpt and ("cfg" in ckpt or "args" in ckpt) and "vocab" not in ckpt


def _options(ckpt: dict) -> tuple[dict, dict]:
    """(model options, task options) from `cfg` (fairseq ≥ 0.10) or `args` (older)."""
    def as_dict(x) -> dict:
        if x is None:
            return {}
        return dict(vars(x)) if isinstance(x, argparse.Namespace) else dict(x)
    cfg = ckpt.get("cfg")
    if cfg:
        return as_dict(cfg.get("model")), as_dict(cfg.get("task"))
    args = as_dict(ckpt.get("args"))
    return args, args


def _refuse_unsupported(m: dict, origin: str) -> None:
    if str(m.get("arch", m.get("_name", "transformer"))).split("_")[0] not in ("transformer",):
        raise CheckpointError(f"{origin}: fairseq architecture {m.get('arch', m.get('_name'))!r} is not a transformer")
    for name in ("adaptive_softmax_cutoff", "encoder_layers_to_keep", "decoder_layers_to_keep"):
        if m.get(name):
            raise CheckpointError(f"{origin}: fairseq option {name}={m[name]!r} is not supported")
    for name in ("cross_self_attention", "no_token_positional_embeddings", "tie_adaptive_weights", "scale_fc",
                 "scale_attn", "scale_heads", "scale_resids", "no_decoder_final_norm", "adaptive_input"):
        if m.get(name):
            raise CheckpointError(f"{origin}: fairseq option {name}=True is not supported")
    if bool(m.get("encoder_normalize_before")) != bool(m.get("decoder_normalize_before")):
        raise CheckpointError(f"{origin}: encoder_normalize_before != decoder_normalize_before is not supported")
    if bool(m.get("encoder_learned_pos")) != bool(m.get("decoder_learned_pos")):
        raise CheckpointError(f"{origin}: encoder_learned_pos != decoder_learned_pos is not supported")
    if m.get("activation_fn", "relu") not in ACTIVATIONS:
        raise CheckpointError(f"{origin}: activation {m.get('activation_fn')!r} is not supported "
                              f"(supported: {sorted(ACTIVATIONS)})")
    for side in ("encoder", "decoder"):
        if m.get(f"{side}_embed_dim") != m.get("encoder_embed_dim"):
            raise CheckpointError(f"{origin}: encoder and decoder widths differ ({side}_embed_dim)")
    if m.get("decoder_output_dim", m.get("decoder_embed_dim")) != m.get("decoder_embed_dim"):
        raise CheckpointError(f"{origin}: decoder_output_dim != decoder_embed_dim is not supported")


def read_dictionary(path: Path) -> list[str]:
    """fairseq.data.Dictionary.load: the four specials, then one `symbol count [#fairseq:overwrite]` per line."""
    symbols = list(SPECIALS)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the dictionary ({exc})") from None
    for number, line in enumerate(lines, 1):
        fields = line.rstrip().rsplit(" ", 2 if line.rstrip().endswith("#fairseq:overwrite") else 1)
        if len(fields) < 2 or not fields[1].lstrip("-").isdigit():
            raise CheckpointError(f"{path}:{number}: expected '<symbol> <count>', got {line!r}")
        symbols.append(fields[0])
    return symbols


def model_config(m: dict, src_vocab: int, tgt_vocab: int, origin: str) -> ModelConfig:
    _refuse_unsupported(m, origin)
    d = int(m["encoder_embed_dim"])
    learned = bool(m.get("encoder_learned_pos"))
    pre_norm = bool(m.get("encoder_normalize_before"))
    max_positions = min(int(m.get("max_source_positions", 1024)), int(m.get("max_target_positions", 1024)))
    return ModelConfig(
        d_model=d, encoder_layers=int(m["encoder_layers"]), decoder_layers=int(m["decoder_layers"]),
        encoder_heads=int(m["encoder_attention_heads"]), decoder_heads=int(m["decoder_attention_heads"]),
        encoder_ffn_dim=int(m["encoder_ffn_embed_dim"]), decoder_ffn_dim=int(m["decoder_ffn_embed_dim"]),
        src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab, activation=ACTIVATIONS[m.get("activation_fn", "relu")],
        pad_id=PAD, eos_id=EOS, decoder_start_id=EOS, max_positions=max_positions,
        embed_scale=1.0 if m.get("no_scale_embedding") else math.sqrt(d),
        positions="learned" if learned else "sinusoidal_fairseq", position_offset=PAD + 1,
        normalize_before=pre_norm, embedding_norm=bool(m.get("layernorm_embedding")),
        encoder_final_norm=pre_norm, decoder_final_norm=pre_norm, layer_norm_eps=1e-5,
        shared_embeddings=bool(m.get("share_all_embeddings")), tie_output=False, final_logits_bias=False,
        family="fairseq")


def fairseq_tensors(src: TensorSource, cfg: ModelConfig) -> dict:
    """fairseq names → pyengine names (q/k/v fused; legacy in_proj_weight is already fused)."""
    d = cfg.d_model
    out = {}

    def pair(ours: str, theirs: str, shape: tuple[int, ...]):
        out[f"{ours}.weight"] = src.get(f"{theirs}.weight", shape)
        out[f"{ours}.bias"] = src.get(f"{theirs}.bias", shape[:1])

    def qkv(theirs: str) -> tuple[torch.Tensor, torch.Tensor]:
        if src.has(f"{theirs}.in_proj_weight"):  # fairseq < 0.7 stored q, k, v stacked
            return src.get(f"{theirs}.in_proj_weight", (3 * d, d)), src.get(f"{theirs}.in_proj_bias", (3 * d,))
        parts = [(src.get(f"{theirs}.{p}_proj.weight", (d, d)), src.get(f"{theirs}.{p}_proj.bias", (d,))) for p in "qkv"]
        return fuse(*[w for w, _ in parts]), fuse(*[b for _, b in parts])

    out["src_embed.weight"] = src.get("encoder.embed_tokens.weight", (cfg.src_vocab_size, d))
    if cfg.shared_embeddings:
        src.get("decoder.embed_tokens.weight", (cfg.tgt_vocab_size, d))
    else:
        out["tgt_embed.weight"] = src.get("decoder.embed_tokens.weight", (cfg.tgt_vocab_size, d))
    out["lm_head.weight"] = src.first(["decoder.output_projection.weight", "decoder.embed_out"], (cfg.tgt_vocab_size, d)) \
        if (src.has("decoder.output_projection.weight") or src.has("decoder.embed_out")) \
        else src.get("decoder.embed_tokens.weight", (cfg.tgt_vocab_size, d))  # older checkpoints tie it implicitly
    if cfg.positions == "learned":
        rows = cfg.max_positions + cfg.position_offset
        out["src_positions"] = src.get("encoder.embed_positions.weight", (rows, d))
        out["tgt_positions"] = src.get("decoder.embed_positions.weight", (rows, d))
    src.ignore(["encoder.version", "decoder.version", "encoder.embed_positions._float_tensor",
                "decoder.embed_positions._float_tensor"])
    for i in range(cfg.encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"encoder.layers.{i}"
        out[f"{ours}.self_attn.qkv.weight"], out[f"{ours}.self_attn.qkv.bias"] = qkv(f"{theirs}.self_attn")
        pair(f"{ours}.self_attn.out", f"{theirs}.self_attn.out_proj", (d, d))
        pair(f"{ours}.self_attn_norm", f"{theirs}.self_attn_layer_norm", (d,))
        pair(f"{ours}.ffn.fc1", f"{theirs}.fc1", (cfg.encoder_ffn_dim, d))
        pair(f"{ours}.ffn.fc2", f"{theirs}.fc2", (d, cfg.encoder_ffn_dim))
        pair(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm", (d,))
    for i in range(cfg.decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"decoder.layers.{i}"
        out[f"{ours}.self_attn.qkv.weight"], out[f"{ours}.self_attn.qkv.bias"] = qkv(f"{theirs}.self_attn")
        pair(f"{ours}.self_attn.out", f"{theirs}.self_attn.out_proj", (d, d))
        pair(f"{ours}.self_attn_norm", f"{theirs}.self_attn_layer_norm", (d,))
        w, b = qkv(f"{theirs}.encoder_attn")
        out[f"{ours}.cross_attn.q.weight"], out[f"{ours}.cross_attn.q.bias"] = w[:d], b[:d]
        out[f"{ours}.cross_attn.kv.weight"], out[f"{ours}.cross_attn.kv.bias"] = w[d:], b[d:]
        pair(f"{ours}.cross_attn.out", f"{theirs}.encoder_attn.out_proj", (d, d))
        pair(f"{ours}.cross_attn_norm", f"{theirs}.encoder_attn_layer_norm", (d,))
        pair(f"{ours}.ffn.fc1", f"{theirs}.fc1", (cfg.decoder_ffn_dim, d))
        pair(f"{ours}.ffn.fc2", f"{theirs}.fc2", (d, cfg.decoder_ffn_dim))
        pair(f"{ours}.ffn_norm", f"{theirs}.final_layer_norm", (d,))
    if cfg.embedding_norm:
        pair("src_embed_norm", "encoder.layernorm_embedding", (d,))
        pair("tgt_embed_norm", "decoder.layernorm_embedding", (d,))
    if cfg.encoder_final_norm:
        pair("encoder_norm", "encoder.layer_norm", (d,))
        pair("decoder_norm", "decoder.layer_norm", (d,))
    return out


def load(path: Path) -> LoadedModel:
    ckpt = read_pickled_checkpoint(path, keep=False)
    origin = str(path)
    model_opts, task_opts = _options(ckpt)
    state = ckpt["model"]
    if "encoder.embed_tokens.weight" not in state or "decoder.embed_tokens.weight" not in state:
        raise CheckpointError(f"{origin}: not a fairseq translation checkpoint (no encoder/decoder embed_tokens)")
    src_rows, tgt_rows = state["encoder.embed_tokens.weight"].shape[0], state["decoder.embed_tokens.weight"].shape[0]
    dictionaries = {}
    for side, lang_key, rows in (("source", "source_lang", src_rows), ("target", "target_lang", tgt_rows)):
        lang = task_opts.get(lang_key)
        dict_path = path.parent / f"dict.{lang}.txt"
        if lang and dict_path.is_file():
            symbols = read_dictionary(dict_path)
            if len(symbols) != rows:
                raise CheckpointError(f"{dict_path}: the {side} dictionary has {len(symbols)} symbols, the checkpoint's "
                                      f"embeddings have {rows} rows")
            dictionaries[side] = symbols
    cfg = model_config(model_opts, src_rows, tgt_rows, origin)
    src = TensorSource(dict(state), origin)
    tensors = fairseq_tensors(src, cfg)
    src.check_all_consumed()
    # SequenceGenerator's defaults: beam 5, max_len_b 200 (+ the final EOS), min_len 1, pad never generated
    defaults = DecodeOptions(beam_size=5, num_hypotheses=1, max_decoding_length=min(201, cfg.max_positions),
                             min_decoding_length=1, suppress_tokens=(PAD,))
    tokenizer, note = text_pipeline(path, ckpt, dictionaries)
    return LoadedModel(config=cfg, state=tensors, defaults=defaults, tokenizer=tokenizer, source=f"fairseq:{path}",
                       extra={"tokenizer_note": note, "dictionaries": dictionaries})


SPM_NAMES = ("sentencepiece.bpe.model", "spm.model", "sentencepiece.model")


def text_pipeline(path: Path, ckpt: dict, dictionaries: dict):
    """(tokenizer, note): fairseq's sentencepiece BPE when its model is found (the path the checkpoint's
    `bpe` config records, that file name beside the checkpoint, or a usual name beside it) and both
    dictionaries are present; otherwise None and why."""
    cfg = ckpt.get("cfg") or {}
    bpe = cfg.get("bpe") if isinstance(cfg, dict) else None
    bpe = dict(vars(bpe)) if isinstance(bpe, argparse.Namespace) else dict(bpe or {})
    name = bpe.get("_name") or bpe.get("bpe")
    if name not in (None, "sentencepiece"):
        return None, (f"this checkpoint's text pipeline is fairseq's {name!r} BPE, which pyengine does not run; "
                      "translate from token ids with generate()")
    candidates = []
    if bpe.get("sentencepiece_model"):
        recorded = Path(bpe["sentencepiece_model"])
        candidates += [recorded, path.parent / recorded.name]
    candidates += [path.parent / n for n in SPM_NAMES]
    spm_file = next((c for c in candidates if c.is_file()), None)
    if spm_file is None or set(dictionaries) != {"source", "target"}:
        return None, ("no sentencepiece model and dict.<lang>.txt files beside the checkpoint; "
                      "translate from token ids with generate()")
    from ..tokenizer import FairseqSpmTokenizer
    return FairseqSpmTokenizer(spm_file, dictionaries["source"], dictionaries["target"]), ""
