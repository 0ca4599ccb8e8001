"""HTML in, HTML out: text translated per block, markup kept.

The source is read by Python's HTML parser (html.parser, the standard library's tokenizer) with each construct's
exact source text, so everything that is not translated text (tags with their attributes, comments, entities
outside translated text, whitespace between blocks) is copied byte for byte. Block tags (p, div, li, h1, br, td…)
end a block; inline tags (b, a, em, span…) become inline elements carried onto the translation (inline.py);
script, style, pre, code and elements marked translate="no" (or class="notranslate") are copied untranslated.
Unbalanced inline markup (a stray or crossing end tag, an inline element never closed) is refused with a
MarkupError that says where.
"""
from __future__ import annotations

import bisect
import html
from html.parser import HTMLParser

from ..errors import InputError
from .inline import Block, Inline

# inline elements: carried onto the target words they cover
INLINE = frozenset("a abbr acronym b bdi bdo big cite data del dfn em font i ins label mark q s small span strike "
                   "strong sub sup time tt u".split())
# inline elements without content of their own: kept at their place in the sentence
INLINE_VOID = frozenset("img wbr input".split())
# copied untranslated: inside a sentence (code, kbd…) or as a block of their own (pre, script…)
INLINE_KEEP = frozenset("code kbd samp var".split())
BLOCK_KEEP = frozenset("script style pre textarea noscript template svg math iframe object".split())
VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())


class MarkupError(InputError):
    """HTML the document layer cannot translate without losing or crossing markup."""


def _keeps(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    """translate="no" or class="notranslate": the element's text is not to be translated (Google's and Bergamot's
    convention)."""
    values = dict(attrs)
    return (values.get("translate") or "").lower() == "no" or "notranslate" in (values.get("class") or "").split()


class _Lexer(HTMLParser):
    """Constructs in order with their offsets in the source: (kind, offset, tag, attrs)."""

    def __init__(self, source: str):
        super().__init__(convert_charrefs=False)
        self.source = source
        self.line_starts = [0] + [i + 1 for i, c in enumerate(source) if c == "\n"]
        self.tokens: list[tuple[str, int, str, list]] = []

    def _at(self) -> int:
        line, column = self.getpos()
        return self.line_starts[line - 1] + column

    def handle_starttag(self, tag, attrs):
        self.tokens.append(("start", self._at(), tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.tokens.append(("void", self._at(), tag, attrs))

    def handle_endtag(self, tag):
        self.tokens.append(("end", self._at(), tag, []))

    def handle_data(self, data):
        self.tokens.append(("text", self._at(), "", []))

    handle_entityref = handle_charref = handle_data  # an entity is text: its source is copied, its meaning decoded

    def handle_comment(self, data):
        self.tokens.append(("comment", self._at(), "", []))

    def handle_decl(self, decl):
        self.tokens.append(("decl", self._at(), "", []))

    handle_pi = unknown_decl = handle_decl


class _BlockBuilder:
    """Collects one block: its text, its element tree, the raw source (copied whole when it has no words) and
    the tags of elements that cross its edges."""

    def __init__(self):
        self.text: list[str] = []
        self.length = 0
        self.elements: list[Inline] = []
        self.open: list[Inline] = []  # elements opened in this block, still open
        self.raw: list[str] = []
        self.frame_closes: list[str] = []  # end tags of elements opened in an earlier block

    def add_text(self, decoded: str, raw: str) -> None:
        self.text.append(decoded)
        self.length += len(decoded)
        self.raw.append(raw)

    def add(self, el: Inline) -> None:
        (self.open[-1].children if self.open else self.elements).append(el)


class HtmlDocument:
    """A parsed HTML text: verbatim parts and blocks, in order."""

    def __init__(self, source: str):
        self.source = source
        self.parts: list[str | Block] = []
        self.frames: dict[int, tuple[list[str], list[str]]] = {}  # id(block): its frame closes and opens
        self.raw: dict[int, str] = {}  # id(block): its source, for a block without words
        self._parse()

    @property
    def blocks(self) -> list[Block]:
        return [p for p in self.parts if isinstance(p, Block)]

    def _where(self, lexer: _Lexer, offset: int) -> str:
        line = bisect.bisect_right(lexer.line_starts, offset)
        return f"line {line}, column {offset - lexer.line_starts[line - 1] + 1}"

    def _parse(self) -> None:
        lexer = _Lexer(self.source)
        lexer.feed(self.source)
        lexer.close()
        tokens = lexer.tokens
        ends = [t[1] for t in tokens[1:]] + [len(self.source)]
        stack: list[tuple[str, Inline, _BlockBuilder, int]] = []  # open inline elements: tag, element, its block
        block = _BlockBuilder()
        keep: tuple[str, int, int, bool] | None = None  # an element copied untranslated: tag, depth, start, inline
        for (kind, at, tag, attrs), end in zip(tokens, ends):
            raw = self.source[at:end]
            if keep is not None:
                keep_tag, depth, start, inline = keep
                if kind == "start" and tag == keep_tag:
                    depth += 1
                elif kind == "end" and tag == keep_tag:
                    depth -= 1
                if depth > 0:
                    keep = (keep_tag, depth, start, inline)
                    continue
                keep = None
                kept = self.source[start:end]
                if inline:
                    block.add(Inline(block.length, block.length, open=kept, verbatim=True))
                    block.raw.append(kept)
                else:
                    self.parts.append(kept)
                continue
            if kind == "text":
                block.add_text(html.unescape(raw), raw)
            elif kind == "start" and tag not in VOID and (tag in INLINE_KEEP or tag in BLOCK_KEEP or _keeps(tag, attrs)):
                inline = tag in INLINE or tag in INLINE_KEEP
                if not inline:
                    block = self._flush(block, stack)
                keep = (tag, 1, at, inline)
            elif kind == "start" and tag in INLINE:
                el = Inline(block.length, open=raw)
                block.add(el)
                block.open.append(el)
                block.raw.append(raw)
                stack.append((tag, el, block, at))
            elif kind == "end" and tag in INLINE:
                if not stack or stack[-1][0] != tag:
                    where = self._where(lexer, at)
                    if any(t == tag for t, *_ in stack):
                        inner, _, _, inner_at = stack[-1]
                        raise MarkupError(f"bad HTML: </{tag}> at {where} closes <{tag}> while <{inner}> (opened at "
                                          f"{self._where(lexer, inner_at)}) is still open")
                    raise MarkupError(f"bad HTML: </{tag}> at {where} has no open <{tag}>")
                _, el, owner, _ = stack.pop()
                block.raw.append(raw)
                if owner is block:
                    el.end, el.close = block.length, raw
                    block.open.remove(el)
                else:
                    block.frame_closes.append(raw)
            elif (kind in ("void", "start") and (tag in INLINE_VOID or tag in INLINE)) or kind == "comment":
                block.add(Inline(block.length, block.length, open=raw, verbatim=True))
                block.raw.append(raw)
            elif kind == "end" and (tag in INLINE_KEEP or tag in INLINE_VOID):
                raise MarkupError(f"bad HTML: </{tag}> at {self._where(lexer, at)} has no open <{tag}>")
            else:  # block tags, line breaks, declarations: a boundary, copied as written
                block = self._flush(block, stack)
                self.parts.append(raw)
        if keep is not None:
            raise MarkupError(f"bad HTML: <{keep[0]}> at {self._where(lexer, keep[2])} is never closed")
        if stack:
            tag, _, _, at = stack[-1]
            raise MarkupError(f"bad HTML: <{tag}> at {self._where(lexer, at)} is never closed")
        self._flush(block, stack)

    def _flush(self, builder: _BlockBuilder, stack: list) -> _BlockBuilder:
        """End the block: elements still open become frame tags (their start tag written after the block's text),
        and a fresh block starts."""
        if not builder.raw and not builder.frame_closes:
            return builder
        opens = []
        for el in list(builder.open):  # outermost first: stack order
            self._unwrap(builder, el)
            opens.append(el.open)
        block = Block("".join(builder.text), builder.elements)
        self.frames[id(block)] = (builder.frame_closes, opens)
        self.raw[id(block)] = "".join(builder.raw)
        self.parts.append(block)
        return _BlockBuilder()

    @staticmethod
    def _unwrap(builder: _BlockBuilder, el: Inline) -> None:
        """Replace a frame element by its children in the tree (its tags are written at the block's edges)."""
        def walk(items: list[Inline]) -> bool:
            for i, item in enumerate(items):
                if item is el:
                    items[i: i + 1] = el.children
                    return True
                if walk(item.children):
                    return True
            return False
        walk(builder.elements)
