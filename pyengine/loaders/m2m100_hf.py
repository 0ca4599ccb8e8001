"""Hugging Face M2M100 and NLLB-200 directories (`M2M100ForConditionalGeneration.save_pretrained`).

Semantics follow HF's M2M100 (the reference): pre-norm layers with a final layer norm in each stack,
embeddings × √d when scale_embedding, fairseq sinusoidal positions offset by pad + 1 (right-padded
inputs), no logits bias, decoding from decoder_start_token_id (</s>) with the target language forced
as the first generated token (forced_bos_token_id).
"""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from .common import LoadedModel, hf_model_type, hf_seq2seq_config, read_hf_seq2seq, read_json
from .marian_hf import decode_defaults


def detect(path: Path) -> bool:
    return hf_model_type(path) == "m2m_100"


def model_config(raw: dict, origin: str) -> ModelConfig:
    return hf_seq2seq_config(
        raw, origin, default_activation="relu", default_scale=True, positions="sinusoidal_fairseq",
        position_offset=raw["pad_token_id"] + 1, normalize_before=True, encoder_final_norm=True,
        decoder_final_norm=True, shared_embeddings=True, final_logits_bias=False,
        decoder_start_id=raw.get("decoder_start_token_id", 2))


def load(path: Path) -> LoadedModel:
    cfg, state, gen = read_hf_seq2seq(path, model_config)
    defaults = decode_defaults(gen, cfg)
    if gen.get("forced_bos_token_id") is not None:
        defaults = defaults.replace(forced_bos_token=gen["forced_bos_token_id"])
    tokenizer, note = None, ""
    tok_cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    if str(tok_cfg.get("tokenizer_class", "")).startswith("Nllb"):
        if (path / "tokenizer.json").is_file():
            from ..tokenizer import NllbTokenizerJson
            tokenizer = NllbTokenizerJson.from_dir(path, cfg)
        else:  # sentencepiece.bpe.model alone (transformers < 5 saves): fairseq-offset ids, not read yet
            note = ("this NLLB-200 directory has no tokenizer.json (the format transformers >= 5 saves); "
                    "its sentencepiece-only tokenizer is not supported yet: translate from token ids with generate()")
    elif (path / "sentencepiece.bpe.model").is_file() and (path / "vocab.json").is_file():
        from ..tokenizer import M2M100Tokenizer
        tokenizer = M2M100Tokenizer.from_dir(path, cfg)
    return LoadedModel(config=cfg, state=state, defaults=defaults, tokenizer=tokenizer, source=f"hf-m2m100:{path}",
                       extra={"tokenizer_note": note} if note else {})
