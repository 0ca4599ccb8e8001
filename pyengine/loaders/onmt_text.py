"""The text of OpenNMT-py and eole checkpoints: the tokenizers of their training transforms (`sentencepiece`, and
OpenNMT-py's `onmt_tokenize`, the OpenNMT Tokenizer), looked up in the checkpoint's own vocabularies."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class OnmtSpmTokenizer:
    """OpenNMT-py's `sentencepiece` transform: pieces of the source sentencepiece model looked up in the checkpoint's
    source vocabulary (unknown → <unk>), no special tokens added (OpenNMT-py's seq2seq source has none); output
    ids → target vocabulary tokens, specials dropped, joined by the target sentencepiece model."""

    def __init__(self, source_spm: Path, target_spm: Path, source: list[str], target: list[str], specials: set[str]):
        self.spm_source = spm.SentencePieceProcessor(model_file=str(source_spm))
        self.spm_target = spm.SentencePieceProcessor(model_file=str(target_spm))
        self.source_ids = {tok: i for i, tok in reversed(list(enumerate(source)))}
        self.target = target
        self.target_ids = {tok: i for i, tok in reversed(list(enumerate(target)))}
        self.unk = self.source_ids["<unk>"]
        self.target_unk_id = self.target_ids["<unk>"]
        self.special_ids = {self.target_ids[t] for t in specials if t in self.target_ids}

    def encode(self, text: str) -> list[int]:
        return [self.source_ids.get(p, self.unk) for p in self.spm_source.encode(text, out_type=str)]

    def encode_target(self, text: str) -> list[int]:
        return [self.target_ids.get(p, self.target_unk_id) for p in self.spm_target.encode(text, out_type=str)]

    def decode(self, ids: list[int]) -> str:
        return self.spm_target.decode_pieces([self.target[i] for i in ids if i not in self.special_ids])


class OnmtTokTokenizer:
    """OpenNMT-py's `onmt_tokenize` transform: the OpenNMT Tokenizer (pyonmttok) built as the transform builds it from
    the checkpoint's options (its {src,tgt}_onmttok_kwargs with the subword model of {src,tgt}_subword_type); tokens
    looked up in the checkpoint's vocabularies (unknown → <unk>); every output token detokenized by the target side's
    tokenizer — OpenNMT-py's Translation drops only the final </s> (a <blank> or <unk> the model wrote stays in the
    text). A text's newline placeholder is the transform's (｟newline｠ ↔ "\\n" around sentencepiece)."""

    NEWLINE = "｟newline｠"  # OpenNMT-py's DefaultTokens.SEP

    def __init__(self, source_kwargs: dict, target_kwargs: dict, source: list[str], target: list[str], newline: bool):
        import pyonmttok
        self.source_tokenizer = pyonmttok.Tokenizer(**source_kwargs)
        self.target_tokenizer = pyonmttok.Tokenizer(**target_kwargs)
        self.newline = newline  # the transform turns ｟newline｠ into "\n" before tokenizing
        self.source_ids = {tok: i for i, tok in reversed(list(enumerate(source)))}
        self.target = target
        self.target_ids = {tok: i for i, tok in reversed(list(enumerate(target)))}
        self.unk = self.source_ids["<unk>"]
        self.target_unk_id = self.target_ids["<unk>"]

    def _tokens(self, tokenizer, text: str) -> list[str]:
        return tokenizer(text.replace(self.NEWLINE, "\n") if self.newline else text)

    def encode(self, text: str) -> list[int]:
        return [self.source_ids.get(t, self.unk) for t in self._tokens(self.source_tokenizer, text)]

    def encode_target(self, text: str) -> list[int]:
        return [self.target_ids.get(t, self.target_unk_id) for t in self._tokens(self.target_tokenizer, text)]

    def decode(self, ids: list[int]) -> str:
        return self.target_tokenizer.detokenize([self.target[i] for i in ids]).replace("\n", self.NEWLINE)
