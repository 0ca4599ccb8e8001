"""eole checkpoints (OpenNMT-py's successor): the directory its ModelSaver writes — `config.json` (the options set
for training, nothing else), `vocab.json` (src / tgt token lists, decoder start token, specials),
`model.00.safetensors` and the transforms' artifacts (a sentencepiece model, named `${MODEL_PATH}/...` in the config).

Semantics of eole 0.6 (the reference, checked against its own predictor in tests/test_eole_parity.py): the encoder-
decoder `transformer` architecture with pre-norm layers (`input_layernorm`, `precontext_layernorm`,
`post_attention_layernorm`) and a final norm per stack, embeddings × √d plus interleaved sinusoids, a linear's bias
wherever the checkpoint holds one (`add_qkvbias`, `add_final_linear_bias`, `add_ffnbias`, `generator_bias`),
decoding from the decoder start token with OpenNMT's beam rules (eole's BeamSearch is OpenNMT-py's; see
decoding.OnmtBeamState). config.json leaves out every option left at its default, so the defaults below are eole
0.6's; an option this engine does not implement (RMS norm, rotary / relative / learned positions, grouped K/V,
gated or MoE feed-forward, post-norm or parallel-residual layers, alignment heads, ...) is refused by name, and so is
any option not known here set away from its default.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel, TensorSource, read_json, read_tensors
from .opennmt_py import LayerNames, layer_tensors

FILES = ("config.json", "vocab.json", "model.00.safetensors")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "silu": "swish"}
# options whose value the engine follows: read below
READ = {"hidden_size", "layers", "heads", "transformer_ff", "mlp_activation_fn", "norm_eps", "add_qkvbias",
        "add_key_bias", "add_final_linear_bias", "add_ffnbias", "share_embeddings", "share_decoder_embeddings",
        "generator_bias", "final_encoder_layer_norm", "encoder", "decoder", "embeddings", "word_vec_size",
        "src_word_vec_size", "tgt_word_vec_size"}
# options that must keep one value (eole 0.6's default, or the only one this engine computes)
FIXED = {"layer_norm": ("standard", "standardFP32"), "position_encoding_type": ("SinusoidalInterleaved",),
         "position_encoding": (True,), "encoder_layer_style": ("standard",), "with_cross_attn": (True,),
         "encoder_type": ("transformer",), "decoder_type": ("transformer",), "architecture": ("transformer",),
         "heads_kv": (None,), "head_dim": (None,), "n_positions": (None,), "rope_config": (None,),
         "parallel_residual": (False,), "shared_layer_norm": (False,), "ffn_layernorm": (False,),
         "query_norm": (False,), "key_norm": (False,), "value_norm": (False,), "attn_scaling": (None,),
         "sliding_window": (0,), "relative_positions_buckets": (0,), "max_relative_positions": (0,),
         "alignment_layer": (-2,), "alignment_heads": (0,), "full_context_alignment": (False,),
         "lambda_align": (0.0,), "num_experts": (0,), "layer_types": (None,), "normalize": (False,),
         "embedding_layer_norm": (False,), "position_shift": (0,), "embedding_type": ("standard",),
         "add_estimator": (False,), "coverage_attn": (False,), "lambda_coverage": (0.0,),
         "freeze_word_vecs_enc": (False,), "freeze_word_vecs_dec": (False,), "token_type_vocab_size": (0,),
         "moe_transformer_ff": (None,), "num_mtp_heads": (0,)}


def detect(path: Path) -> bool:
    """A directory holding eole's three files (Hugging Face directories have no model.00.safetensors)."""
    return path.is_dir() and all((path / name).is_file() for name in FILES)


def _checked_options(model: dict, origin: str) -> None:
    """Every option set in the model config (and its encoder / decoder / embeddings sections) is one the engine
    follows, or keeps the one value it computes."""
    sections = [("model", model)] + [(name, model.get(name) or {}) for name in ("encoder", "decoder", "embeddings")]
    for section, options in sections:
        for name, value in options.items():
            if name in FIXED and value not in FIXED[name]:
                raise CheckpointError(f"{origin}: eole option {section}.{name}={value!r} is not supported "
                                      f"(supported: {FIXED[name]})")
            if name not in FIXED and name not in READ:
                raise CheckpointError(f"{origin}: eole option {section}.{name}={value!r} is not known to this engine")


def _option(model: dict, side: str, name: str, default):
    """A transformer option of one side: its own section, else the model's, else eole 0.6's default."""
    for section in (model.get(side) or {}, model):
        if section.get(name) is not None:
            return section[name]
    return default


def model_config(raw: dict, vocab: dict, origin: str) -> ModelConfig:
    model = raw.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{origin}: config.json has no 'model' section")
    _checked_options(model, origin)
    sides = {}
    for side in ("encoder", "decoder"):
        values = {name: _option(model, side, name, None) for name in ("hidden_size", "layers", "heads", "transformer_ff")}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise CheckpointError(f"{origin}: the {side} has no {', '.join(missing)} in config.json")
        values["activation"] = _option(model, side, "mlp_activation_fn", "relu")
        values["norm_eps"] = float(_option(model, side, "norm_eps", 1e-5))
        if values["activation"] not in ACTIVATIONS:
            raise CheckpointError(f"{origin}: eole mlp_activation_fn {values['activation']!r} is not supported "
                                  f"(supported: {sorted(ACTIVATIONS)})")
        sides[side] = values
    enc, dec = sides["encoder"], sides["decoder"]
    for name in ("hidden_size", "heads", "activation", "norm_eps"):
        if enc[name] != dec[name]:
            raise CheckpointError(f"{origin}: encoder and decoder differ in {name} ({enc[name]} / {dec[name]})")
    if enc["transformer_ff"] != dec["transformer_ff"]:
        raise CheckpointError(f"{origin}: encoder and decoder feed-forward sizes differ")
    d = int(enc["hidden_size"])
    for side, key in (("src", "src_word_vec_size"), ("tgt", "tgt_word_vec_size")):
        width = (model.get("embeddings") or {}).get(key)
        if width not in (None, d):
            raise CheckpointError(f"{origin}: {side} embeddings of {width} dimensions for a model of {d}")
    src_tokens, tgt_tokens = list(vocab["src"]), list(vocab["tgt"])
    specials = vocab.get("specials") or {}
    ids = {}
    for role, default in (("eos", "</s>"), ("pad", "<blank>")):
        token = specials.get(f"{role}_token", default)
        if token not in tgt_tokens:
            raise CheckpointError(f"{origin}: the target vocabulary has no {role} token {token!r}")
        ids[role] = tgt_tokens.index(token)
    start = vocab.get("decoder_start_token", specials.get("bos_token", "<s>"))
    if start not in tgt_tokens:
        raise CheckpointError(f"{origin}: the target vocabulary has no decoder start token {start!r}")
    return ModelConfig(
        d_model=d, encoder_layers=int(enc["layers"]), decoder_layers=int(dec["layers"]), encoder_heads=int(enc["heads"]),
        decoder_heads=int(dec["heads"]), encoder_ffn_dim=int(enc["transformer_ff"]),
        decoder_ffn_dim=int(dec["transformer_ff"]), src_vocab_size=len(src_tokens), tgt_vocab_size=len(tgt_tokens),
        activation=ACTIVATIONS[enc["activation"]], pad_id=ids["pad"], eos_id=ids["eos"],
        decoder_start_id=tgt_tokens.index(start), max_positions=5000, embed_scale=math.sqrt(d),
        positions="sinusoidal_interleaved", normalize_before=True,
        encoder_final_norm=bool(_option(model, "encoder", "final_encoder_layer_norm", True)), decoder_final_norm=True,
        layer_norm_eps=enc["norm_eps"], shared_embeddings=bool(model.get("share_embeddings", False)),
        tie_output=bool(model.get("share_decoder_embeddings", False)), final_logits_bias=True, family="onmt")


EOLE_NAMES = LayerNames("encoder.transformer_layers.{i}", "decoder.transformer_layers.{i}", "input_layernorm",
                        "input_layernorm", "precontext_layernorm", "post_attention_layernorm", "mlp.gate_up_proj",
                        "mlp.down_proj")


def eole_tensors(src: TensorSource, cfg: ModelConfig) -> dict:
    """eole names → pyengine names (its layers are OpenNMT-py's, renamed)."""
    d = cfg.d_model
    out = {"src_embed.weight": src.get("src_emb.embeddings.weight", (cfg.src_vocab_size, d))}
    if not cfg.shared_embeddings:  # shared: eole drops tgt_emb's copy when it saves
        out["tgt_embed.weight"] = src.get("tgt_emb.embeddings.weight", (cfg.tgt_vocab_size, d))
    src.ignore(["src_emb.pe.pe", "tgt_emb.pe.pe"])  # the sinusoid tables, recomputed
    if not cfg.tie_output:  # tied: eole drops the generator's copy of the decoder embedding
        out["lm_head.weight"] = src.get("generator.weight", (cfg.tgt_vocab_size, d))
    out["final_logits_bias"] = src.get("generator.bias", (cfg.tgt_vocab_size,)) if src.has("generator.bias") \
        else torch.zeros(cfg.tgt_vocab_size)
    layer_tensors(src, cfg, EOLE_NAMES, out)
    for i in range(cfg.decoder_layers):  # a buffer applied only by the Gemma-style layers refused above
        scalar = f"decoder.transformer_layers.{i}.layer_scalar"
        if src.has(scalar) and not torch.equal(src.get(scalar), torch.ones_like(src.get(scalar))):
            raise CheckpointError(f"{src.origin}: {scalar} is not 1")
    return out


def load(path: Path) -> LoadedModel:
    origin = str(path)
    raw, vocab = read_json(path / "config.json"), read_json(path / "vocab.json")
    if not isinstance(vocab, dict) or not {"src", "tgt"} <= set(vocab):
        raise CheckpointError(f"{origin}/vocab.json: expected eole's 'src' and 'tgt' token lists")
    cfg = model_config(raw, vocab, origin)
    src = TensorSource(read_tensors(path / "model.00.safetensors"), origin)
    state = eole_tensors(src, cfg)
    src.check_all_consumed()
    # eole's predict defaults: beam 5, max_length 250, avg length penalty with alpha 1 (OpenNMT's); its
    # max_length_ratio (2 × the source length) is not applied: pass max_length_factor=2 for that
    defaults = DecodeOptions(beam_size=5, num_hypotheses=1, max_decoding_length=250)
    tokens = {"src_tokens": list(vocab["src"]), "tgt_tokens": list(vocab["tgt"])}
    tokenizer, note = sentencepiece_tokenizer(raw, path, tokens, vocab.get("specials") or {})
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"eole:{path}",
                       extra={"tokenizer_note": note, **tokens} if note else tokens)


def sentencepiece_tokenizer(raw: dict, path: Path, vocab: dict, specials: dict):
    """The text tokenizer of a model trained with eole's `sentencepiece` transform: its subword models, which eole
    saves beside the weights as `${MODEL_PATH}/<name>`. (tokenizer, note)"""
    from .onmt_text import OnmtSpmTokenizer
    transforms = list(raw.get("transforms") or [])
    if transforms != ["sentencepiece"]:
        return None, ("eole tokenization is the training config's transforms (text is read when they are exactly "
                      f"['sentencepiece']; this model has {transforms or 'none'}); translate from token ids with "
                      "generate()")
    options = (raw.get("transforms_configs") or {}).get("sentencepiece") or {}
    models = []
    for side in ("src", "tgt"):
        named = options.get(f"{side}_subword_model")
        if not named:
            return None, f"the sentencepiece transform names no {side}_subword_model; translate with generate()"
        found = Path(named.replace("${MODEL_PATH}", str(path)))
        if not found.is_file():
            return None, f"the {side}_subword_model {named!r} is not at {found}; translate with generate()"
        models.append(found)
    names = set(specials.values()) | {"<unk>", "<blank>", "<s>", "</s>"}
    return OnmtSpmTokenizer(models[0], models[1], vocab["src_tokens"], vocab["tgt_tokens"], names), ""
