"""Documents over the engine: a text or HTML input becomes a plan — the sentences the model translates, and how
to put their translations back — so translate(), the CLI and the server (which submits a plan's sentences to its
worker like any other request) share one implementation."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ..errors import InputError, OptionError
from .detect import Detection, Detector, iso_language
from .inline import Block, render_html
from .markup import HtmlDocument
from .segment import join, model_text, split_text

FORMATS = ("text", "html")


class Plan:
    """The sentences of one input (`segments`) and how to render their translations."""

    segments: list[str]
    needs_alignment = False  # its rendering maps markup through word alignments
    methods: set[str]  # how alignments were found when rendered ("attention", "proportional")

    def render(self, translations: Sequence[Any], hypothesis: int = 0) -> str:
        raise NotImplementedError


class TextPlan(Plan):
    """Plain text: its sentences (or the whole text, unsplit), re-joined with the whitespace between them."""

    def __init__(self, text: str, spans: list[tuple[int, int]] | None):
        self.text, self.spans, self.methods = text, spans, set()
        self.segments = [text] if spans is None else [model_text(text[s:e]) for s, e in spans]

    def render(self, translations: Sequence[Any], hypothesis: int = 0) -> str:
        texts = [t.hypotheses[hypothesis] for t in translations]
        return texts[0] if self.spans is None else join(self.text, self.spans, texts)


class HtmlPlan(Plan):
    """HTML: the sentences of its blocks; rendering carries the inline markup onto the translation."""

    def __init__(self, doc: HtmlDocument, segmenter: Callable[[Block], list[str]], encode, decode):
        self.doc, self.encode, self.decode, self.methods = doc, encode, decode, set()
        self.segments, self.slices = [], {}
        for block in doc.blocks:
            sentences = segmenter(block)
            self.slices[id(block)] = (len(self.segments), len(sentences))
            self.segments.extend(sentences)
        self.needs_alignment = any(b.has_elements and b.has_words for b in doc.blocks)

    def render(self, translations: Sequence[Any], hypothesis: int = 0) -> str:
        out = []
        for part in self.doc.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if not part.has_words:
                out.append(self.doc.raw[id(part)])
                continue
            start, n = self.slices[id(part)]
            aligned = part.align([sentence_result(t, hypothesis) for t in translations[start: start + n]],
                                 self.encode, self.decode)
            self.methods.add(aligned.method)
            part.place(aligned)
            closes, opens = self.doc.frames[id(part)]
            out.extend(closes)
            out.append(render_html(part, aligned))
            out.extend(opens)
        return "".join(out)


def sentence_result(t: Any, hypothesis: int) -> tuple[str, list[int], Any]:
    """(text, target ids, attention or None) of one hypothesis of a Translation."""
    return t.hypotheses[hypothesis], t.tokens[hypothesis], t.attention[hypothesis] if t.attention else None


class Documents:
    """The document layer of one engine: splitting, markup and detection with the engine's tokenizer and limits."""

    def __init__(self, engine):
        self.engine = engine
        self._detector: Detector | None = None

    # -- languages ---------------------------------------------------------------------------------------------
    def source_languages(self) -> list[str]:
        tok = self.engine.tokenizer
        if hasattr(tok, "lang_ids"):
            return sorted(tok.lang_ids)
        source = getattr(tok, "language_pair", (None, None))[0] or getattr(tok, "source_lang", None)
        return [source] if source else []

    def default_source(self) -> str | None:
        tok = self.engine.tokenizer
        return getattr(tok, "source_lang", None) or getattr(tok, "language_pair", (None, None))[0]

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            self._detector = Detector(self.source_languages())
        return self._detector

    def detect_source(self, text: str) -> Detection:
        """The language `source: "auto"` translates `text` from. A multilingual model: the detector's best guess
        among its source languages. A model with one source language: that language, whatever the detector says
        (short strings are often misdetected; translating them is the useful answer), with the detector's
        confidence that the text is in it."""
        languages = self.source_languages()
        if len(languages) != 1:
            return self.detector.rank(text, 1)[0]
        return Detection(languages[0], self.detector.confidence(text, languages[0]))

    # -- plans -------------------------------------------------------------------------------------------------
    def encoder(self, source_lang: str | None) -> Callable[[str], list[int]]:
        return self.engine._language_encoder(source_lang, None, {})

    def segmenter(self, source_lang: str | None = None, max_input_length: int | None = None):
        """(language, count, limit) of sentence splitting: the segmenter's language, the token count of a sentence
        and the model's input limit (a sentence over it is cut further)."""
        encode = self.encoder(source_lang)
        limit = min(max_input_length or self.engine.config.max_positions, self.engine.config.max_positions)
        language = iso_language(source_lang or self.default_source() or "en")
        return language, (lambda s: len(encode(s))), limit

    def block_segmenter(self, source_lang: str | None = None,
                        max_input_length: int | None = None) -> Callable[[Block], list[str]]:
        """Cuts a block (HTML, a .docx paragraph) into the sentences the model reads."""
        language, count, limit = self.segmenter(source_lang, max_input_length)
        return lambda block: block.segment(language, count, limit, lines=False)

    def plan(self, text: str, format: str = "text", split: bool = True, source_lang: str | None = None,
             max_input_length: int | None = None, index: int | None = None) -> Plan:
        """The plan for one input. Over-long sentences are cut further to fit the model's input limit."""
        if format not in FORMATS:
            raise OptionError(f"format must be one of {list(FORMATS)}, got {format!r}")
        try:
            if format == "html":
                return HtmlPlan(HtmlDocument(text), self.block_segmenter(source_lang, max_input_length),
                                self.encoder(source_lang), self.engine.tokenizer.decode)
            if not split:
                return TextPlan(text, None)
            language, count, limit = self.segmenter(source_lang, max_input_length)
            return TextPlan(text, split_text(text, language, count, limit))
        except InputError as exc:
            raise type(exc)(str(exc), index) from None
        except ValueError as exc:  # a single character over the limit
            raise InputError(str(exc), index) from None

    def plans(self, texts: Sequence[str], format: str = "text", split: bool = True, source_lang: str | None = None,
              max_input_length: int | None = None) -> list[Plan]:
        """One plan per input; an error names the input's index."""
        return [self.plan(t, format, split, source_lang, max_input_length, i) for i, t in enumerate(texts)]

    def translate(self, texts: Sequence[str], format: str = "text", split: bool = True,
                  source_lang: str | None = None, target_lang: str | None = None, **options: Any) -> list[str]:
        """translate() for documents: every input's sentences decoded together, then put back."""
        self.engine._validate_texts(texts)
        plans = self.plans(texts, format, split, source_lang, options.get("max_input_length"))
        segments = [s for p in plans for s in p.segments]
        options = self.alignment_options(plans, options)
        try:
            results = self.engine.translate_batch(segments, source_lang=source_lang, target_lang=target_lang,
                                                  **options)
        except InputError as exc:
            raise self.locate(exc, plans) from None
        return render_all(plans, results)

    def translate_file(self, name: str, data: bytes, source_lang: str | None = None, target_lang: str | None = None,
                       **options: Any) -> bytes:
        """A .txt, .html or .docx file (by `name`'s extension) translated, its structure kept."""
        from .files import plan_file

        plan = plan_file(self, name, data, source_lang)
        options = self.alignment_options([plan], options)
        results = self.engine.translate_batch(plan.segments, source_lang=source_lang, target_lang=target_lang,
                                              **options)
        return plan.render(results)

    def alignment_options(self, plans: Sequence[Plan], options: dict[str, Any]) -> dict[str, Any]:
        """`options` with the decoder's attention asked for when markup is to be carried."""
        if any(p.needs_alignment for p in plans):
            return {**options, "return_attention": True}
        return options

    @staticmethod
    def locate(exc: InputError, plans: Sequence[Plan]) -> InputError:
        """An error about a sentence, told about the input it came from."""
        if exc.index is None:
            return exc
        pos = exc.index
        for i, plan in enumerate(plans):
            if pos < len(plan.segments):
                return InputError(f"sentence {pos + 1}: {exc.message}" if len(plan.segments) > 1 else exc.message, i)
            pos -= len(plan.segments)
        return exc

    @property
    def alignment_method(self) -> str:
        """How inline markup is carried for this engine (reported in engine.backends): by the attention, which every
        family's beam rules return (a sentence whose source words the tokenizer cannot map falls back to proportional
        placement, which the rendered document reports)."""
        return "attention"


def render_all(plans: Sequence[Plan], results: Sequence[Any], hypothesis: int = 0) -> list[str]:
    out, pos = [], 0
    for plan in plans:
        n = len(plan.segments)
        out.append(plan.render(results[pos: pos + n], hypothesis))
        pos += n
    return out
