"""Sentence splitting: a text cut into spans the model translates one by one, the whitespace between them kept.

Sentences come from sentencex (Wikimedia's rule-based segmenter, ~300 languages, its rules in the wheel). Text mode
also cuts at every line break, so line structure survives; a span still over the model's input limit is cut again
at the best point near its middle (after ; or :, then after a comma, then at a space, and only for one unbroken
run of characters inside it), never truncated.
"""
from __future__ import annotations

import re
from typing import Callable

from sentencex import segment as sentencex_segment

WORD = re.compile(r"\S+")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
# split points for an over-long span, best first: each pattern matches the gap a cut may take
CUT_POINTS = (re.compile(r"(?<=[;:])\s+"), re.compile(r"(?<=,)\s+"), re.compile(r"\s+"))

Span = tuple[int, int]


def model_text(text: str) -> str:
    """What the model reads for a span: its words joined by single spaces (line breaks and runs of spaces in a
    sentence are layout, not content)."""
    return " ".join(WORD.findall(text))


def sentence_spans(text: str, language: str | None, lines: bool = True) -> list[Span]:
    """(start, end) of each sentence of `text`, without surrounding whitespace, in order. `lines`: every line
    break ends a sentence (plain text); otherwise a line break is whitespace (HTML)."""
    pieces = _line_spans(text) if lines else [(0, len(text))]
    spans: list[Span] = []
    for start, end in pieces:
        line = text[start:end]
        if not line.strip():
            continue
        pos = 0
        for sentence in sentencex_segment(language or "en", line):
            core = sentence.strip()
            if not core:
                continue
            at = line.find(core, pos)
            if at < 0:  # the segmenter changed the text: never guess, keep the rest whole
                rest = line[pos:].strip()
                at = line.find(rest, pos)
                spans.append((start + at, start + at + len(rest)))
                break
            spans.append((start + at, start + at + len(core)))
            pos = at + len(core)
    return spans


def _line_spans(text: str) -> list[Span]:
    """(start, end) of each line, line breaks excluded."""
    bounds = [0] + [x for m in LINE_BREAK.finditer(text) for x in m.span()] + [len(text)]
    return list(zip(bounds[::2], bounds[1::2]))


def fit_spans(text: str, spans: list[Span], count: Callable[[str], int], limit: int) -> list[Span]:
    """`spans` with each one whose model text is over `limit` tokens cut again until every piece fits."""
    out: list[Span] = []
    for span in spans:
        out.extend(_fit(text, span, count, limit))
    return out


def _fit(text: str, span: Span, count: Callable[[str], int], limit: int) -> list[Span]:
    start, end = span
    if count(model_text(text[start:end])) <= limit:
        return [span]
    if end - start < 2:
        raise ValueError(f"one character ({text[start:end]!r}) is over the model's input limit of {limit} tokens")
    middle = (start + end) / 2
    cut = None
    for pattern in CUT_POINTS:
        gaps = [m.span() for m in pattern.finditer(text, start, end) if start < m.start() and m.end() < end]
        if gaps:
            cut = min(gaps, key=lambda g: abs(g[0] - middle))
            break
    if cut is None:  # one unbroken run of characters (a long URL, say): cut in its middle
        at = int(middle)
        cut = (at, at)
    return _fit(text, (start, cut[0]), count, limit) + _fit(text, (cut[1], end), count, limit)


def split_text(text: str, language: str | None, count: Callable[[str], int], limit: int,
               lines: bool = True) -> list[Span]:
    """The spans of `text` to translate: its sentences, each cut further if it is over the model's limit."""
    return fit_spans(text, sentence_spans(text, language, lines), count, limit)


def join(text: str, spans: list[Span], translations: list[str]) -> str:
    """`text` with each span replaced by its translation: the whitespace and line breaks around them kept."""
    out, pos = [], 0
    for (start, end), translation in zip(spans, translations):
        out.append(text[pos:start])
        out.append(translation)
        pos = end
    out.append(text[pos:])
    return "".join(out)
