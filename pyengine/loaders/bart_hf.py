"""Hugging Face BART and mBART directories (`BartForConditionalGeneration` / `MBartForConditionalGeneration`
`save_pretrained`).

Semantics follow HF (the reference): learned positions offset by 2 (counted from 0 per step, not
pad-aware), a layer norm on embeddings + positions (layernorm_embedding), GELU; BART is post-norm,
mBART pre-norm with a final layer norm in each stack; final_logits_bias; decoding starts from
decoder_start_token_id, with forced_bos/forced_eos as generation_config says.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from .common import LoadedModel, hf_model_type, hf_seq2seq_config, read_hf_seq2seq
from .marian_hf import decode_defaults

MODEL_TYPES = ("bart", "mbart")
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding.offset


def tokenizer_class(path: Path) -> str:
    """tokenizer_config.json's tokenizer_class without "Fast" ("" when there is none)."""
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return ""
    return str(json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class", "")).removesuffix("Fast")


def detect(path: Path) -> bool:
    return hf_model_type(path) in MODEL_TYPES


def model_config(raw: dict, origin: str) -> ModelConfig:
    pre_norm = raw.get("model_type") == "mbart"
    return hf_seq2seq_config(
        raw, origin, default_activation="gelu", default_scale=False, positions="learned",
        position_offset=POSITION_OFFSET, normalize_before=pre_norm, embedding_norm=True,
        encoder_final_norm=pre_norm, decoder_final_norm=pre_norm, shared_embeddings=True, final_logits_bias=True,
        decoder_start_id=raw["decoder_start_token_id"])


def load(path: Path) -> LoadedModel:
    cfg, state, gen = read_hf_seq2seq(path, model_config)
    defaults = decode_defaults(gen, cfg)
    if gen.get("forced_bos_token_id") is not None:
        defaults = defaults.replace(forced_bos_token=gen["forced_bos_token_id"])
    tokenizer, note = None, ""
    if (path / "tokenizer.json").is_file() and hf_model_type(path) == "bart":
        from ..tokenizer import TokenizerJson
        tokenizer = TokenizerJson.from_dir(path, cfg)
    elif (path / "tokenizer.json").is_file() and tokenizer_class(path) in ("MBart50Tokenizer", "MBartTokenizer"):
        from ..tokenizer import NllbTokenizerJson  # language codes as added tokens: source_lang / target_lang
        tokenizer = NllbTokenizerJson.from_dir(path, cfg)
    else:  # sentencepiece-only directories (transformers < 5 without tokenizer.json) are not handled
        note = ("this BART/mBART directory has no tokenizer pyengine reads (a tokenizer.json of BART, mBART or "
                "mBART-50 is); translate from token ids with generate()")
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"hf-bart:{path}",
                       extra={"tokenizer_note": note} if note else {})
