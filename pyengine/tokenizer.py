"""Tokenizers per model family. MarianTokenizer reproduces transformers' MarianTokenizer ids and text
(sentencepiece pieces → vocab.json ids, </s> appended; decoding skips special tokens)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm

from .config import ModelConfig
from .errors import CheckpointError

SPIECE_UNDERLINE = "\u2581"


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization, applied only when tokenizer_config asks for it."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class MarianTokenizer:
    """source.spm / target.spm + vocab.json (+ target_vocab.json when vocabularies are separate)."""

    def __init__(self, source_spm: Path, target_spm: Path, vocab: dict[str, int],
                 target_vocab: dict[str, int] | None, unk: str = "<unk>", eos: str = "</s>", pad: str = "<pad>",
                 clean_up_spaces: bool = False):
        self.spm_source = spm.SentencePieceProcessor(model_file=str(source_spm))
        self.spm_target = spm.SentencePieceProcessor(model_file=str(target_spm))
        self.encoder = vocab
        self.separate = target_vocab is not None
        self.decoder = {i: t for t, i in (target_vocab or vocab).items()}
        for name in (unk, eos, pad):
            if name not in vocab:
                raise CheckpointError(f"vocab.json has no {name!r} entry")
        self.unk_id, self.eos_id, self.pad_id = vocab[unk], vocab[eos], vocab[pad]
        self.specials = {unk, eos, pad}
        # HF skips the *source* vocabulary's special ids when decoding, even with separate vocabularies
        self.special_ids = {self.unk_id, self.eos_id, self.pad_id}
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.specials, key=len)[::-1]) + ")")
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_dir(cls, path: Path, cfg: ModelConfig) -> "MarianTokenizer":
        def load_vocab(name: str) -> dict[str, int]:
            try:
                return json.loads((path / name).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise CheckpointError(f"{path}: missing {name}") from None
        tok_cfg = {}
        if (path / "tokenizer_config.json").is_file():
            tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        separate = bool(tok_cfg.get("separate_vocabs", False))
        vocab = load_vocab("vocab.json")
        target_vocab = load_vocab("target_vocab.json") if separate else None
        for spm_name in ("source.spm", "target.spm"):
            if not (path / spm_name).is_file():
                raise CheckpointError(f"{path}: missing {spm_name}")
        if max(vocab.values()) >= cfg.src_vocab_size:
            raise CheckpointError(f"{path / 'vocab.json'}: ids up to {max(vocab.values())} do not fit the "
                                  f"model's source vocabulary of {cfg.src_vocab_size}")
        if max((target_vocab or vocab).values()) >= cfg.tgt_vocab_size:
            raise CheckpointError(f"{path}: target vocabulary ids do not fit the model's {cfg.tgt_vocab_size} outputs")
        return cls(path / "source.spm", path / "target.spm", vocab, target_vocab,
                   clean_up_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str) -> list[int]:
        """Source ids with the trailing </s>, as MarianTokenizer(text).input_ids."""
        ids: list[int] = []
        for i, chunk in enumerate(self._special_re.split(text)):
            if i % 2:  # a special token written in the text
                ids.append(self.encoder[chunk])
                continue
            chunk = chunk.strip() if len(self._special_re.split(text)) > 1 else chunk
            if not chunk:
                continue
            code = []
            if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:  # target-language code
                code, chunk = [chunk[: end + 2]], chunk[end + 2:]
            pieces = code + self.spm_source.encode(chunk, out_type=str)
            ids.extend(self.encoder.get(p, self.unk_id) for p in pieces)
        return ids + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of target ids with special tokens skipped, as MarianTokenizer.decode(ids, skip_special_tokens=True)."""
        # HF decodes pieces with the source model when the vocabulary is shared
        sp = self.spm_target if self.separate else self.spm_source
        pieces = []
        for i in ids:
            if i in self.special_ids:
                continue
            piece = self.decoder.get(i) or sp.id_to_piece(i) or "<unk>"
            pieces.append(piece)
        text = sp.decode_pieces(pieces).replace(SPIECE_UNDERLINE, " ").strip()
        return _clean_up_tokenization(text) if self.clean_up_spaces else text
