"""Hugging Face M2M100 and NLLB-200 directories (`M2M100ForConditionalGeneration.save_pretrained`).

Semantics follow HF's M2M100 (the reference): pre-norm layers with a final layer norm in each stack,
embeddings × √d when scale_embedding, fairseq sinusoidal positions offset by pad + 1 (right-padded
inputs), no logits bias, decoding from decoder_start_token_id (</s>) with the target language forced
as the first generated token (forced_bos_token_id).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..config import ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel, hf_model_type, read_hf_seq2seq, read_json
from .marian_hf import ACTIVATION_NAMES, decode_defaults


def detect(path: Path) -> bool:
    return hf_model_type(path) == "m2m_100"


def model_config(raw: dict, origin: str) -> ModelConfig:
    act = raw.get("activation_function", "relu")
    if act not in ACTIVATION_NAMES:
        raise CheckpointError(f"{origin}: unsupported activation_function {act!r}")
    d = raw["d_model"]
    pad = raw["pad_token_id"]
    return ModelConfig(
        d_model=d, encoder_layers=raw["encoder_layers"], decoder_layers=raw["decoder_layers"],
        encoder_heads=raw["encoder_attention_heads"], decoder_heads=raw["decoder_attention_heads"],
        encoder_ffn_dim=raw["encoder_ffn_dim"], decoder_ffn_dim=raw["decoder_ffn_dim"],
        src_vocab_size=raw["vocab_size"], tgt_vocab_size=raw["vocab_size"], activation=ACTIVATION_NAMES[act],
        pad_id=pad, eos_id=raw.get("eos_token_id", 2), decoder_start_id=raw.get("decoder_start_token_id", 2),
        max_positions=raw.get("max_position_embeddings", 1024),
        embed_scale=math.sqrt(d) if raw.get("scale_embedding", True) else 1.0,
        positions="sinusoidal_fairseq", position_offset=pad + 1, normalize_before=True,
        encoder_final_norm=True, decoder_final_norm=True, layer_norm_eps=1e-5, shared_embeddings=True,
        tie_output=raw.get("tie_word_embeddings", True), final_logits_bias=False, family="hf")


def load(path: Path) -> LoadedModel:
    cfg, state, gen = read_hf_seq2seq(path, model_config)
    defaults = decode_defaults(gen, cfg)
    if gen.get("forced_bos_token_id") is not None:
        defaults = defaults.replace(forced_bos_token=gen["forced_bos_token_id"])
    tokenizer, note = None, ""
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    if str(tok_cfg.get("tokenizer_class", "")).startswith("Nllb"):
        # NLLB-200's tokenizer numbers sentencepiece ids with fairseq's offset: not supported yet
        note = "NLLB-200 tokenization is not supported yet; translate from token ids with generate()"
    elif (path / "sentencepiece.bpe.model").is_file() and (path / "vocab.json").is_file():
        from ..tokenizer import M2M100Tokenizer
        tokenizer = M2M100Tokenizer.from_dir(path, cfg)
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"hf-m2m100:{path}",
                       extra={"tokenizer_note": note} if note else {})
