"""A block of running text with inline elements (HTML's <b>, <a href>…; a .docx paragraph's runs), and how its
elements are carried onto the translation.

A block is translated sentence by sentence. Each inline element covers some source words; the target words
aligned to them (align.py) give it a range in the translation, made contiguous and nested as the source was:
a child stays inside its parent, a later sibling gives way to an earlier one it would cross. An element left with
no target words (or with none to begin with: <img>, <br/>, <code> copied untranslated) is kept as an empty element
at the target position of the source word after it. So the output keeps every element, is well nested, and its text
is exactly the plain translation of the same sentences.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .align import WordSets, word_alignment
from .segment import WORD, Span, model_text, split_text


@dataclass(eq=False)
class Inline:
    """An inline element: its span in the block's text, its markup, its children; after `place`, its target words
    [lo, hi) (lo == hi: empty, inserted before target word `anchor`)."""

    start: int
    end: int = -1
    open: str = ""  # start tag (verbatim: the element's whole original markup)
    close: str = ""
    verbatim: bool = False  # copied untranslated as it was (void elements, <code>, translate="no")
    children: list["Inline"] = field(default_factory=list)
    payload: object = None  # what the caller maps it back to (a .docx run)
    lo: int = 0
    hi: int = 0
    anchor: int = 0

    @property
    def empty(self) -> bool:
        return self.lo >= self.hi

    def empty_markup(self) -> str:
        """The element with no words in it: verbatim as it was, or its tags around its children's."""
        if self.verbatim:
            return self.open
        return self.open + "".join(c.empty_markup() for c in self.children) + self.close


@dataclass
class Aligned:
    """A block's translation as words: words[k] follows spaces[k]; alignment[k]: its source words."""

    words: list[str]
    spaces: list[str]
    alignment: WordSets
    tail: str  # text after the last word (the block's trailing whitespace)
    method: str  # "attention" or "proportional"


class Block:
    """Running text (`text`: the decoded characters) with its inline elements (`root.children`)."""

    def __init__(self, text: str, elements: list[Inline]):
        self.text = text
        self.root = Inline(0, len(text), children=elements)
        self.spans: list[Span] = []
        self.source_words: list[Span] = []  # char spans of the source words, in order
        self.sentence_words: list[tuple[int, int]] = []  # per sentence: its first word index and count

    @property
    def has_words(self) -> bool:
        return bool(self.text.strip())

    @property
    def has_elements(self) -> bool:
        return any(not e.verbatim for e in self.root.children) or any(e.children for e in self.root.children)

    def segment(self, language: str | None, count: Callable[[str], int], limit: int, lines: bool) -> list[str]:
        """Cut into sentences; returns what the model reads for each."""
        self.spans = split_text(self.text, language, count, limit, lines) if self.has_words else []
        self.source_words, self.sentence_words = [], []
        for start, end in self.spans:
            words = [m.span() for m in WORD.finditer(self.text, start, end)]
            self.sentence_words.append((len(self.source_words), len(words)))
            self.source_words.extend(words)
        return [model_text(self.text[s:e]) for s, e in self.spans]

    def align(self, translations: Sequence[tuple[str, Sequence[int], Sequence[Sequence[float]] | None]],
              encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]) -> Aligned:
        """The translation of each sentence (text, target ids, attention or None) as one word sequence aligned to
        this block's source words."""
        words: list[str] = []
        spaces: list[str] = []
        alignment: WordSets = []
        methods = set()
        pending = ""  # text before the next word (the block's leading whitespace is written by the renderer)
        for i, ((text, tokens, attention), (start, end)) in enumerate(zip(translations, self.spans)):
            first, n = self.sentence_words[i]
            src = [self.text[a:b] for a, b in self.source_words[first: first + n]]
            pos = 0
            target = list(WORD.finditer(text))
            sets, method = word_alignment(encode, decode, src, tokens, attention, len(target))
            methods.add(method)
            for m, aligned in zip(target, sets):
                spaces.append(pending + text[pos: m.start()])
                words.append(m.group())
                alignment.append({first + j for j in aligned})
                pending, pos = "", m.end()
            pending += text[pos:]
            nxt = self.spans[i + 1][0] if i + 1 < len(self.spans) else len(self.text)
            pending += self.text[end:nxt]
        return Aligned(words, spaces, alignment, pending, "attention" if methods <= {"attention"} else "proportional")

    def place(self, aligned: Aligned) -> None:
        """Give every element its target range or anchor (see the module's docstring)."""
        targets: list[list[int]] = [[] for _ in self.source_words]
        for k, sources in enumerate(aligned.alignment):
            for j in sources:
                targets[j].append(k)
        _place(self.root.children, self.source_words, targets, 0, len(aligned.words))

    def lead(self) -> str:
        return self.text[: self.spans[0][0]] if self.spans else self.text


def _covered(el: Inline, source_words: list[Span]) -> list[int]:
    return [j for j, (a, b) in enumerate(source_words) if a < el.end and b > el.start]


def _place(children: list[Inline], source_words: list[Span], targets: list[list[int]], lo: int, hi: int) -> None:
    ranged: list[Inline] = []
    for el in children:
        el.lo = el.hi = 0
        if el.verbatim:
            continue
        ks = [k for j in _covered(el, source_words) for k in targets[j] if lo <= k < hi]
        a, b = (min(ks), max(ks) + 1) if ks else (0, 0)
        for s in ranged:  # give way to earlier siblings: ranges stay disjoint
            if a >= b:
                break
            if b <= s.lo or a >= s.hi:
                continue
            if s.lo <= a and b <= s.hi:
                a = b
            elif a < s.lo and b > s.hi:  # it would contain a sibling: keep its larger side
                a, b = (a, s.lo) if s.lo - a >= b - s.hi else (s.hi, b)
            elif a < s.lo:
                b = s.lo
            else:
                a = s.hi
        if a < b:
            el.lo, el.hi = a, b
            ranged.append(el)
            _place(el.children, source_words, targets, a, b)
    for el in children:
        if el.empty:
            el.anchor = _anchor(el, source_words, targets, lo, hi, ranged)


def _anchor(el: Inline, source_words: list[Span], targets: list[list[int]], lo: int, hi: int,
            ranged: list[Inline]) -> int:
    """Before the target of the first source word at or after the element; else after the target of the word before."""
    after = next((j for j, (a, _) in enumerate(source_words) if a >= el.start), None)
    ks = [k for k in targets[after] if lo <= k < hi] if after is not None else []
    if ks:
        p = min(ks)
    else:
        before = [j for j, (_, b) in enumerate(source_words) if b <= el.start]
        ks = [k for k in targets[before[-1]] if lo <= k < hi] if before else []
        p = max(ks) + 1 if ks else (lo if before == [] else hi)
    p = min(max(p, lo), hi)
    for s in ranged:
        if s.lo < p < s.hi:
            p = s.hi
    return p


def render_html(block: Block, aligned: Aligned) -> str:
    """The block's translation with its elements as HTML: words escaped, tags as they were written."""
    words = [html.escape(w, quote=False) for w in aligned.words]
    out = [block.lead()]
    _emit(block.root.children, words, aligned.spaces, 0, len(words), True, out)
    out.append(aligned.tail)
    return "".join(out)


def _emit(children: list[Inline], words: list[str], spaces: list[str], lo: int, hi: int, done: bool,
          out: list[str]) -> None:
    """Words [lo, hi) with the elements among them. `done`: the space before word lo is already written."""
    p = lo
    order = sorted(range(len(children)), key=lambda i: (children[i].anchor if children[i].empty else children[i].lo,
                                                        0 if children[i].empty else 1, i))
    for el in (children[i] for i in order):
        start = el.anchor if el.empty else el.lo
        while p < start:
            out.append(words[p] if done else spaces[p] + words[p])
            p, done = p + 1, False
        if el.empty:
            if p < hi and not done:
                out.append(spaces[p])
                done = True
            out.append(el.empty_markup())
            continue
        if not done:
            out.append(spaces[p])
        out.append(el.open)
        _emit(el.children, words, spaces, el.lo, el.hi, True, out)
        out.append(el.close)
        p, done = el.hi, False
    while p < hi:
        out.append(words[p] if done else spaces[p] + words[p])
        p, done = p + 1, False

