"""Language detection: py3langid (the maintained fork of langid.py; its model of 97 languages ships in the wheel).

A model's language codes (en, __en__ tokens, eng_Latn) are read as BCP-47 tags by langcodes, so detection can be
limited to the languages a multilingual model translates from and its answer given in the model's own codes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import langcodes


@dataclass(frozen=True)
class Detection:
    """A candidate language (in the model's code where it has one) and the detector's confidence, 0-100."""

    language: str
    confidence: float


def iso_language(code: str) -> str:
    """The ISO 639 language of a model's code ("eng_Latn" → "en", "pt_BR" → "pt", "de" → "de")."""
    try:
        return langcodes.Language.get(code.replace("_", "-")).language or code
    except (ValueError, LookupError):
        return code


def language_name(code: str) -> str:
    """English name of a language code, as LibreTranslate's /languages shows it ("de" → "German")."""
    try:
        return langcodes.Language.get(code.replace("_", "-")).display_name()
    except (ValueError, LookupError):
        return code


class Detector:
    """Ranks languages for a text. `languages`: the model's source language codes; with two or more the detector
    is limited to them (the ones it knows), with fewer it ranks all 97 of its languages."""

    _lock = threading.Lock()
    _model = None

    def __init__(self, languages: Iterable[str] = ()):
        self.codes: dict[str, str] = {}  # ISO 639 → the model's code
        for code in languages:
            self.codes.setdefault(iso_language(code), code)
        self._restricted = None

    @classmethod
    def _identifier(cls, languages: Sequence[str] | None = None):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        with cls._lock:
            if cls._model is None:
                cls._model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        if languages is None:
            return cls._model
        restricted = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        restricted.set_languages(languages)
        return restricted

    @property
    def identifier(self):
        """The model's languages the detector knows when there are two or more (built once), else all 97."""
        if self._restricted is None:
            candidates = sorted(set(self.codes) & set(self._identifier().nb_classes))
            self._restricted = self._identifier(candidates) if len(candidates) >= 2 else self._identifier()
        return self._restricted

    def rank(self, text: str, top: int = 3) -> list[Detection]:
        """The `top` most likely languages of `text`, most likely first."""
        return [Detection(self.codes.get(lang, lang), round(100.0 * float(p), 2))
                for lang, p in self.identifier.rank(text)[:top]]

    def confidence(self, text: str, code: str) -> float:
        """The detector's confidence (0-100, over all its languages) that `text` is in the language of `code`."""
        probs = dict(self._identifier().rank(text))
        return round(100.0 * float(probs.get(iso_language(code), 0.0)), 2)
