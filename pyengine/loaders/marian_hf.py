"""Hugging Face Marian (OPUS-MT) directories written by `MarianMTModel.save_pretrained`.

Reads config.json and generation_config.json; tensors from model.safetensors or pytorch_model.bin.
Semantics follow HF's MarianMTModel (the reference): post-norm layers, no final or embedding
norm, embeddings × √d when scale_embedding, Marian's half-sin/half-cos positions from 0,
final_logits_bias, decoding from decoder_start_token_id (= pad).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..config import DecodeOptions, ModelConfig
from ..errors import CheckpointError
from .common import LoadedModel, hf_model_type, hf_seq2seq_config, read_hf_seq2seq



def detect(path: Path) -> bool:
    return hf_model_type(path) == "marian"


def model_config(raw: dict, origin: str) -> ModelConfig:
    """ModelConfig from a Marian config.json, as HF's MarianMTModel (the reference) reads it: keys it ignores are
    ignored here too, with a warning that names them."""
    for key in ("normalize_before", "normalize_embedding", "add_final_layer_norm"):
        if raw.get(key):
            warnings.warn(f"{origin}: config sets {key}=true, which Hugging Face's MarianMTModel ignores (it runs "
                          "post-norm, without that norm); ignored here too", UserWarning, stacklevel=2)
    if raw.get("static_position_embeddings") is False:
        raise CheckpointError(f"{origin}: learned positions (static_position_embeddings=false) are not Marian's")
    shared = raw.get("share_encoder_decoder_embeddings", True)
    vocab = raw["vocab_size"]
    return hf_seq2seq_config(
        raw, origin, default_activation="gelu", default_scale=False, positions="sinusoidal_half",
        normalize_before=False, shared_embeddings=shared, final_logits_bias=True,
        tgt_vocab_size=vocab if shared else (raw.get("decoder_vocab_size") or vocab), eos_id=_single_eos(raw, origin))


def _single_eos(raw: dict, origin: str) -> int:
    eos = raw.get("eos_token_id", 0)  # Marian's EOS is 0
    if isinstance(eos, list):
        if len(eos) != 1:
            raise CheckpointError(f"{origin}: several eos_token_id values {eos} are not supported")
        eos = eos[0]
    return eos


def decode_defaults(gen: dict, cfg: ModelConfig) -> DecodeOptions:
    """DecodeOptions from generation_config.json, in HF's meaning of each field."""
    max_length = gen.get("max_length", 20)  # HF's default when the file does not say
    max_new = gen.get("max_new_tokens") or max(1, max_length - 1)  # HF counts the start token in max_length
    min_new = gen.get("min_new_tokens") or max(0, gen.get("min_length", 0) - 1)
    bad_words = gen.get("bad_words_ids") or []
    if any(len(seq) != 1 for seq in bad_words):
        raise CheckpointError("bad_words_ids with multi-token sequences are not supported yet")
    forced_eos = gen.get("forced_eos_token_id")
    beam = gen.get("num_beams", 1)
    return DecodeOptions(
        beam_size=beam, num_hypotheses=1, length_penalty=gen.get("length_penalty", 1.0),
        max_decoding_length=max_new, min_decoding_length=min(min_new, max_new),
        early_stopping=gen.get("early_stopping", False), suppress_tokens=tuple(s[0] for s in bad_words),
        repetition_penalty=gen.get("repetition_penalty") or 1.0, no_repeat_ngram_size=gen.get("no_repeat_ngram_size") or 0,
        forced_eos=forced_eos is not None and forced_eos in (cfg.eos_id, [cfg.eos_id]))


def load(path: Path) -> LoadedModel:
    from ..tokenizer import MarianTokenizer

    cfg, state, gen = read_hf_seq2seq(path, model_config)
    tokenizer = MarianTokenizer.from_dir(path, cfg) if (path / "source.spm").is_file() else None
    return LoadedModel(config=cfg, state=state, defaults=decode_defaults(gen, cfg), tokenizer=tokenizer,
                       source=f"hf-marian:{path}")
