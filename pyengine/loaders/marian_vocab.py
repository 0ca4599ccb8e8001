"""Marian's own vocabularies, as the decoder configuration beside a model names them: sentencepiece models
(`*.spm`, Marian's SentencePieceVocab) and YAML word lists (`*.yml` / `*.yaml`, its DefaultVocab: what `marian`
writes when it trains without sentencepiece). Either way the source gets the end token appended and decoding drops it."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from ..errors import CheckpointError


class MarianSpmTokenizer:
    """Sentencepiece vocabularies: ids are the sentencepiece ids."""

    def __init__(self, source_spm: Path, target_spm: Path, eos_id: int, vocab: int):
        self.spm_source = spm.SentencePieceProcessor(model_file=str(source_spm))
        self.spm_target = spm.SentencePieceProcessor(model_file=str(target_spm))
        for proc, path in ((self.spm_source, source_spm), (self.spm_target, target_spm)):
            if proc.get_piece_size() > vocab:
                raise CheckpointError(f"{path}: {proc.get_piece_size()} pieces do not fit the model's {vocab}")
        self.eos_id = eos_id
        self.target_unk_id = self.spm_target.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.spm_source.encode(text) + [self.eos_id]

    def source_pieces(self, text: str) -> list[str]:
        return self.spm_source.encode(text, out_type=str) + ["</s>"]

    def encode_target(self, text: str) -> list[int]:
        return self.spm_target.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.spm_target.decode([i for i in ids if i != self.eos_id])

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.spm_target.id_to_piece(i) for i in ids]

    def decode_pieces(self, pieces: list[str]) -> str:
        return self.spm_target.decode_pieces([p for p in pieces if p != "</s>"])


def read_word_list(path: Path, vocab: int) -> list[str]:
    """A YAML vocabulary (`token: id` per line) as a list indexed by id. Every key is read as a string, as Marian's
    YAML reader does (`true`, `1` or `null` are words here, not values)."""
    import yaml
    mapping = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    if not isinstance(mapping, dict):
        raise CheckpointError(f"{path}: not a Marian YAML vocabulary (token: id per line)")
    words: list[str | None] = [None] * len(mapping)
    for token, index in mapping.items():
        if not str(index).isdigit() or int(index) >= len(mapping) or words[int(index)] is not None:
            raise CheckpointError(f"{path}: {token!r} has id {index!r}: ids must be 0..{len(mapping) - 1}, once each")
        words[int(index)] = token
    if len(words) > vocab:
        raise CheckpointError(f"{path}: {len(words)} words do not fit the model's {vocab}")
    for special, index in (("</s>", 0), ("<unk>", 1)):
        if words[index] != special:
            raise CheckpointError(f"{path}: id {index} must be {special} (Marian's DefaultVocab), not {words[index]!r}")
    return words


class MarianWordTokenizer:
    """YAML word lists (Marian's DefaultVocab): a sentence is its space-separated words, an unknown word is <unk>
    (id 1), </s> (id 0) is appended to the source; decoding joins the words with spaces."""

    def __init__(self, source: Path, target: Path, vocab: int):
        self.source = {w: i for i, w in enumerate(read_word_list(source, vocab))}
        self.target = read_word_list(target, vocab)
        self.target_ids = {w: i for i, w in enumerate(self.target)}
        self.eos_id, self.target_unk_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [self.source.get(w, 1) for w in self.source_pieces(text)[:-1]] + [self.eos_id]

    def source_pieces(self, text: str) -> list[str]:
        return [w for w in text.split(" ") if w] + ["</s>"]

    def encode_target(self, text: str) -> list[int]:
        return [self.target_ids.get(w, 1) for w in text.split(" ") if w]

    def decode(self, ids: list[int]) -> str:
        return self.decode_pieces(self.target_pieces(ids))

    def target_pieces(self, ids: list[int]) -> list[str]:
        return [self.target[i] for i in ids]

    def decode_pieces(self, pieces: list[str]) -> str:
        return " ".join(p for p in pieces if p != "</s>")


def marian_tokenizer(source: Path, target: Path, eos_id: int, vocab: int):
    """The tokenizer for these vocabulary files: sentencepiece unless they are YAML word lists."""
    if source.suffix in (".yml", ".yaml"):
        if target.suffix not in (".yml", ".yaml"):
            raise CheckpointError(f"{source}, {target}: a YAML source vocabulary with a {target.suffix} target one")
        return MarianWordTokenizer(source, target, vocab)
    return MarianSpmTokenizer(source, target, eos_id=eos_id, vocab=vocab)
