"""Tokenizers per model family. MarianTokenizer reproduces transformers' MarianTokenizer ids and text
(sentencepiece pieces → vocab.json ids, </s> appended; decoding skips special tokens)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from .config import ModelConfig
from .errors import CheckpointError


@runtime_checkable
class PieceTokenizer(Protocol):
    """A tokenizer that maps text to its pieces and pieces back to text (replace_unknowns copies source pieces):
    the HF Marian tokenizer and Marian's own (loaders.marian_vocab)."""

    def source_pieces(self, text: str) -> list[str]:
        """The text's source pieces, in the order of its token ids (EOS included)."""

    def target_pieces(self, ids: list[int]) -> list[str]:
        """The pieces of target ids."""

    def decode_pieces(self, pieces: list[str]) -> str:
        """Text from target pieces."""

SPIECE_UNDERLINE = "\u2581"


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization, applied only when tokenizer_config asks for it."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def split_specials(text: str, pattern: re.Pattern) -> list[tuple[bool, str]]:
    """Text cut at special tokens written in it, as transformers' slow tokenizers cut it: (is_special, chunk).

    When the text holds a special token, the plain chunks around it lose their outer whitespace."""
    parts = pattern.split(text)
    out = []
    for i, chunk in enumerate(parts):
        if i % 2:
            out.append((True, chunk))
        elif (chunk := chunk.strip() if len(parts) > 1 else chunk):
            out.append((False, chunk))
    return out


def specials_pattern(tokens) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")")


def language_id(tokenizer, code: str) -> int:
    """The token id of a language code of a multilingual tokenizer (its `lang_ids`), or a KeyError naming the known ones."""
    if code not in tokenizer.lang_ids:
        raise KeyError(f"unknown language {code!r}; known: {', '.join(sorted(tokenizer.lang_ids))}")
    return tokenizer.lang_ids[code]


def check_language_ids_fit(tokenizer, cfg: ModelConfig, origin: Path) -> None:
    top = max(tokenizer.lang_ids.values())
    if top >= cfg.src_vocab_size:
        raise CheckpointError(f"{origin}: language token ids up to {top} do not fit the model's "
                              f"vocabulary of {cfg.src_vocab_size}")


class MarianTokenizer:
    """source.spm / target.spm + vocab.json (+ target_vocab.json when vocabularies are separate)."""

    def __init__(self, source_spm: Path, target_spm: Path, vocab: dict[str, int],
                 target_vocab: dict[str, int] | None, unk: str = "<unk>", eos: str = "</s>", pad: str = "<pad>",
                 clean_up_spaces: bool = False):
        self.spm_source = spm.SentencePieceProcessor(model_file=str(source_spm))
        self.spm_target = spm.SentencePieceProcessor(model_file=str(target_spm))
        self.encoder = vocab
        self.separate = target_vocab is not None
        self.target_encoder = target_vocab or vocab
        self.decoder = {i: t for t, i in (target_vocab or vocab).items()}
        for name in (unk, eos, pad):
            if name not in vocab:
                raise CheckpointError(f"vocab.json has no {name!r} entry")
        self.unk_id, self.eos_id, self.pad_id = vocab[unk], vocab[eos], vocab[pad]
        self.target_unk_id = self.target_encoder.get(unk)  # the id disable_unk suppresses
        self.specials = {unk, eos, pad}
        # HF skips the *source* vocabulary's special ids when decoding, even with separate vocabularies
        self.special_ids = {self.unk_id, self.eos_id, self.pad_id}
        self._special_re = specials_pattern(self.specials)
        self.clean_up_spaces = clean_up_spaces
        self.language_pair: tuple[str | None, str | None] = (None, None)

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
        tok = cls(path / "source.spm", path / "target.spm", vocab, target_vocab,
                  clean_up_spaces=bool(tok_cfg.get("clean_up_tokenization_spaces", False)))
        # the language pair, where the tokenizer config names it (OPUS-MT's and the default model's do)
        tok.language_pair = (tok_cfg.get("source_lang"), tok_cfg.get("target_lang"))
        return tok

    def encode(self, text: str) -> list[int]:
        """Source ids with the trailing </s>, as MarianTokenizer(text).input_ids."""
        return [self.encoder.get(p, self.unk_id) for p in self.source_pieces(text)]

    def source_pieces(self, text: str) -> list[str]:
        """The source's pieces, one per id of `encode` (a piece outside the vocabulary stays itself), </s> last."""
        pieces: list[str] = []
        for special, chunk in split_specials(text, self._special_re):
            if special:
                pieces.append(chunk)
                continue
            if chunk.startswith(">>") and (end := chunk.find("<<")) != -1:  # target-language code
                pieces.append(chunk[: end + 2])
                chunk = chunk[end + 2:]
            pieces.extend(self.spm_source.encode(chunk, out_type=str))
        return pieces + ["</s>"]

    def encode_target(self, text: str) -> list[int]:
        """Target-side ids without </s> (a forced target prefix), as MarianTokenizer(text_target=text) minus EOS."""
        encoder = self.target_encoder if self.separate else self.encoder
        ids: list[int] = []
        for special, chunk in split_specials(text, self._special_re):
            if special:
                ids.append(encoder[chunk])
            else:
                ids.extend(encoder.get(p, encoder["<unk>"]) for p in self.spm_target.encode(chunk, out_type=str))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of target ids with special tokens skipped, as MarianTokenizer.decode(ids, skip_special_tokens=True)."""
        return self._text([p for i, p in zip(ids, self.target_pieces(ids)) if i not in self.special_ids])

    def target_pieces(self, ids: list[int]) -> list[str]:
        sp = self.spm_target if self.separate else self.spm_source
        return [self.decoder.get(i) or sp.id_to_piece(i) or "<unk>" for i in ids]

    def decode_pieces(self, pieces: list[str]) -> str:
        """Text of target pieces (some perhaps the source's: replace_unknowns), special tokens skipped."""
        return self._text([p for p in pieces if p not in self.specials])

    def _text(self, pieces: list[str]) -> str:
        # HF decodes pieces with the source model when the vocabulary is shared
        sp = self.spm_target if self.separate else self.spm_source
        text = sp.decode_pieces(pieces).replace(SPIECE_UNDERLINE, " ").strip()
        return _clean_up_tokenization(text) if self.clean_up_spaces else text


# Language codes of fairseq's M2M100 models, in id order after vocab.json (transformers' table).
M2M100_LANGUAGE_CODES = {
    "m2m100": ['af', 'am', 'ar', 'ast', 'az', 'ba', 'be', 'bg', 'bn', 'br', 'bs', 'ca', 'ceb', 'cs', 'cy', 'da', 'de', 'el', 'en', 'es', 'et', 'fa', 'ff', 'fi', 'fr', 'fy', 'ga', 'gd', 'gl', 'gu', 'ha', 'he', 'hi', 'hr', 'ht', 'hu', 'hy', 'id', 'ig', 'ilo', 'is', 'it', 'ja', 'jv', 'ka', 'kk', 'km', 'kn', 'ko', 'lb', 'lg', 'ln', 'lo', 'lt', 'lv', 'mg', 'mk', 'ml', 'mn', 'mr', 'ms', 'my', 'ne', 'nl', 'no', 'ns', 'oc', 'or', 'pa', 'pl', 'ps', 'pt', 'ro', 'ru', 'sd', 'si', 'sk', 'sl', 'so', 'sq', 'sr', 'ss', 'su', 'sv', 'sw', 'ta', 'th', 'tl', 'tn', 'tr', 'uk', 'ur', 'uz', 'vi', 'wo', 'xh', 'yi', 'yo', 'zh', 'zu'],
    "wmt21": ['en', 'ha', 'is', 'ja', 'cs', 'ru', 'zh', 'de'],
}


class M2M100Tokenizer:
    """sentencepiece.bpe.model + vocab.json with `__xx__` language tokens after the vocabulary, as
    transformers' M2M100Tokenizer: source = [source language] + pieces + [</s>]; the target language is
    the forced first generated token; decoding skips special and language tokens (as the published
    tokenizer configs make them)."""

    SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")

    def __init__(self, spm_file: Path, vocab: dict[str, int], language_codes: str = "m2m100",
                 source_lang: str = "en"):
        if language_codes not in M2M100_LANGUAGE_CODES:
            raise CheckpointError(f"unknown language_codes {language_codes!r}; known: {sorted(M2M100_LANGUAGE_CODES)}")
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        self.encoder = vocab
        self.decoder = {i: t for t, i in vocab.items()}
        for name in self.SPECIALS:
            if name not in vocab:
                raise CheckpointError(f"vocab.json has no {name!r} entry")
        self.target_unk_id = vocab["<unk>"]
        self.lang_ids = {code: len(vocab) + i for i, code in enumerate(M2M100_LANGUAGE_CODES[language_codes])}
        self.lang_tokens = {f"__{code}__": i for code, i in self.lang_ids.items()}
        self.decoder.update({i: t for t, i in self.lang_tokens.items()})
        self.unk_id, self.eos_id = vocab["<unk>"], vocab["</s>"]
        self.special_tokens = set(self.SPECIALS) | set(self.lang_tokens)
        self.special_ids = {vocab[t] for t in self.SPECIALS} | set(self.lang_tokens.values())
        self._special_re = specials_pattern(self.special_tokens)
        self.source_lang = source_lang

    @classmethod
    def from_dir(cls, path: Path, cfg: ModelConfig) -> "M2M100Tokenizer":
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (path / "tokenizer_config.json").is_file() else {}
        try:
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing vocab.json") from None
        tok = cls(path / "sentencepiece.bpe.model", vocab, tok_cfg.get("language_codes", "m2m100"),
                  tok_cfg.get("src_lang") or "en")
        check_language_ids_fit(tok, cfg, path)
        return tok

    lang_id = language_id

    def encode(self, text: str, source_lang: str | None = None) -> list[int]:
        ids = [self.lang_id(source_lang or self.source_lang)]
        for special, chunk in split_specials(text, self._special_re):
            if special:
                ids.append(self.lang_tokens.get(chunk, self.encoder.get(chunk)))
            else:
                ids.extend(self.encoder.get(p, self.unk_id) for p in self.sp.encode(chunk, out_type=str))
        return ids + [self.eos_id]

    def encode_target(self, text: str) -> list[int]:
        """Target pieces without language token or </s> (a forced target prefix)."""
        return self.encode(text)[1:-1]

    def decode(self, ids: list[int]) -> str:
        out, pieces = "", []
        for i in ids:
            if i in self.special_ids:
                continue
            token = self.decoder.get(i, "<unk>")
            if token in self.special_tokens:  # an id outside the vocabulary decodes to a literal <unk>
                out += self.sp.decode(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return (out + self.sp.decode(pieces)).strip()


class TokenizerJson:
    """A `tokenizer.json` (the file transformers ≥ 5 saves for BART/mBART and every "fast" tokenizer), run by
    the `tokenizers` library as transformers runs it: its post-processor adds the special tokens
    (BART: <s> … </s>); decoding skips special tokens and applies `clean_up_tokenization_spaces` when
    tokenizer_config.json asks for it."""

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise CheckpointError(f"{path}: reading tokenizer.json needs the tokenizers package "
                                  "(pip install tokenizers)") from None
        try:
            self.tk = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the library raises its own exception types for bad files
            raise CheckpointError(f"{path / 'tokenizer.json'}: cannot read ({exc})") from None
        cfg_file = path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        self.clean_up = bool(tok_cfg.get("clean_up_tokenization_spaces", False))
        unk = tok_cfg.get("unk_token") or "<unk>"
        self.target_unk_id = self.tk.token_to_id(unk["content"] if isinstance(unk, dict) else unk)

    @classmethod
    def from_dir(cls, path: Path, cfg: ModelConfig) -> "TokenizerJson":
        tok = cls(path)
        size = tok.tk.get_vocab_size(with_added_tokens=True)
        if size > cfg.src_vocab_size:
            raise CheckpointError(f"{path / 'tokenizer.json'}: {size} tokens do not fit the model's vocabulary "
                                  f"of {cfg.src_vocab_size}")
        return tok

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=True).ids

    def encode_target(self, text: str) -> list[int]:
        """Target tokens without the special tokens (a forced target prefix)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tk.decode(ids, skip_special_tokens=True)
        return _clean_up_tokenization(text) if self.clean_up else text


NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")  # FLORES-200 codes: eng_Latn, deu_Latn, ...
MBART_CODE = re.compile(r"^[a-z]{2}_[A-Z]{2}$")  # mBART's: en_XX, de_DE, ...
# tokenizer_class -> (its language codes, the source language where the config names none, codes after the text)
LANGUAGE_CODE_TOKENIZERS = {"NllbTokenizer": (NLLB_CODE, "eng_Latn", None),
                            "MBart50Tokenizer": (MBART_CODE, "en_XX", False),
                            "MBartTokenizer": (MBART_CODE, "en_XX", True)}


class NllbTokenizerJson(TokenizerJson):
    """A multilingual tokenizer.json whose language codes are added special tokens, as transformers' NllbTokenizer,
    MBart50Tokenizer and MBartTokenizer use it: source = [source language] + pieces + [</s>] (NLLB, mBART-50), or
    pieces + [</s>, source language] (mBART, and NLLB with `legacy_behaviour`); the target language is the forced
    first generated token."""

    def __init__(self, path: Path):
        super().__init__(path)
        cfg_file = path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        tokenizer_class = str(tok_cfg.get("tokenizer_class", "NllbTokenizer")).removesuffix("Fast")
        codes, default_source, suffix = LANGUAGE_CODE_TOKENIZERS.get(tokenizer_class,
                                                                     LANGUAGE_CODE_TOKENIZERS["NllbTokenizer"])
        self.lang_ids = {t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if codes.match(t.content)}
        if not self.lang_ids:
            raise CheckpointError(f"{path / 'tokenizer.json'}: no language code tokens (like {default_source}) in it")
        self.eos_id = self.tk.token_to_id("</s>")
        if self.eos_id is None:
            raise CheckpointError(f"{path / 'tokenizer.json'}: no '</s>' token")
        self.legacy = bool(tok_cfg.get("legacy_behaviour", False)) if suffix is None else suffix
        self.source_lang = tok_cfg.get("src_lang") or default_source

    @classmethod
    def from_dir(cls, path: Path, cfg: ModelConfig) -> "NllbTokenizerJson":
        tok = cls(path)
        check_language_ids_fit(tok, cfg, path / "tokenizer.json")
        return tok

    lang_id = language_id

    def encode(self, text: str, source_lang: str | None = None) -> list[int]:
        lang = self.lang_id(source_lang or self.source_lang)
        pieces = self.tk.encode(text, add_special_tokens=False).ids
        return pieces + [self.eos_id, lang] if self.legacy else [lang] + pieces + [self.eos_id]


class FairseqSpmTokenizer:
    """fairseq's `--bpe sentencepiece` text path, as its hub interface runs it: sentencepiece pieces looked up
    in the source dictionary (unknown → <unk>), then </s>; output symbols joined, </s> and <s> dropped,
    pieces merged by SentencepieceBPE.decode (spaces removed, ▁ → space)."""

    def __init__(self, spm_file: Path, source: list[str], target: list[str], unk: int = 3, eos: int = 2, bos: int = 0):
        self.sp = spm.SentencePieceProcessor(model_file=str(spm_file))
        self.source_ids = {sym: i for i, sym in reversed(list(enumerate(source)))}  # first occurrence wins
        self.target = target
        self.unk, self.eos, self.bos = unk, eos, bos
        self.target_unk_id = unk

    def encode(self, text: str) -> list[int]:
        return [self.source_ids.get(p, self.unk) for p in self.sp.encode(text, out_type=str)] + [self.eos]

    def encode_target(self, text: str) -> list[int]:
        target_ids = {sym: i for i, sym in reversed(list(enumerate(self.target)))}
        return [target_ids.get(p, self.unk) for p in self.sp.encode(text, out_type=str)]

    def decode(self, ids: list[int]) -> str:
        symbols = " ".join(self.target[i] if 0 <= i < len(self.target) else self.target[self.unk]
                           for i in ids if i not in (self.eos, self.bos))
        return symbols.replace(" ", "").replace(SPIECE_UNDERLINE, " ").strip()
