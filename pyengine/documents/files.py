"""Files: .txt, .html and .docx translated whole, their structure kept.

A .docx paragraph is a block whose runs (and hyperlinks) are its inline elements: each keeps its formatting and
gets the target words aligned to its source words (inline.py), in reading order, so the paragraph's text is
exactly the plain translation of its sentences. Tables are read cell by cell.
"""
from __future__ import annotations

import io
from pathlib import PurePath
from typing import Any, Callable, Sequence

from ..errors import InputError
from .document import Plan
from .inline import Block, Inline

FILE_TYPES = (".txt", ".html", ".htm", ".docx")


class FileTypeError(InputError):
    """A file the document layer does not translate."""


def file_type(name: str) -> str:
    suffix = PurePath(name).suffix.lower()
    if suffix not in FILE_TYPES:
        raise FileTypeError(f"file type {suffix or '(none)'!r} of {name!r} is not supported; supported: "
                            f"{', '.join(FILE_TYPES)}")
    return suffix


class FilePlan:
    """A file's sentences and how to write the translated file."""

    def __init__(self, plan: Plan, write: Callable[[str], bytes]):
        self.plan, self.write = plan, write
        self.segments, self.needs_alignment = plan.segments, plan.needs_alignment

    def render(self, translations: Sequence[Any]) -> bytes:
        return self.write(self.plan.render(translations))


def plan_file(documents, name: str, data: bytes, source_lang: str | None = None) -> FilePlan | "DocxPlan":
    """The plan of a file by its name's extension."""
    suffix = file_type(name)
    if suffix == ".docx":
        return DocxPlan(documents, data, source_lang)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    fmt = "html" if suffix in (".html", ".htm") else "text"
    return FilePlan(documents.plan(text, fmt, True, source_lang), lambda out: out.encode("utf-8"))


class DocxPlan:
    """A Word document: every paragraph (body and tables) a block, its runs and hyperlinks the inline elements."""

    needs_alignment = True

    def __init__(self, documents, data: bytes, source_lang: str | None):
        import docx
        from docx.opc.exceptions import PackageNotFoundError

        try:
            self.doc = docx.Document(io.BytesIO(data))
        except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
            raise InputError(f"not a readable .docx file ({exc})") from None
        except Exception as exc:  # zipfile.BadZipFile, lxml's XMLSyntaxError: a damaged file
            raise InputError(f"not a readable .docx file ({type(exc).__name__}: {exc})") from None
        self.documents = documents
        self.encode = documents.encoder(source_lang)
        segment = documents.block_segmenter(source_lang)
        self.blocks: list[tuple[Block, list[Any]]] = []
        self.segments: list[str] = []
        self.slices: list[tuple[int, int]] = []
        for paragraph in self._paragraphs():
            units = list(paragraph.iter_inner_content())
            elements, pos = [], 0
            for unit in units:
                text = unit.text
                elements.append(Inline(pos, pos + len(text), payload=unit))
                pos += len(text)
            block = Block("".join(u.text for u in units), elements)
            if not block.has_words:
                continue
            sentences = segment(block)
            self.blocks.append((block, units))
            self.slices.append((len(self.segments), len(sentences)))
            self.segments.extend(sentences)

    def _paragraphs(self):
        def walk(container):
            for p in container.paragraphs:
                yield p
            for table in getattr(container, "tables", []):
                for row in table.rows:
                    for cell in row.cells:
                        yield from walk(cell)
        seen = set()
        for p in walk(self.doc):
            if id(p._p) not in seen:  # merged cells repeat the same cell
                seen.add(id(p._p))
                yield p

    def render(self, translations: Sequence[Any]) -> bytes:
        from .document import sentence_result

        for (block, units), (start, n) in zip(self.blocks, self.slices):
            aligned = block.align([sentence_result(t, 0) for t in translations[start: start + n]], self.encode,
                                  self.documents.engine.tokenizer.decode)
            block.place(aligned)
            texts = _unit_texts(block, aligned)
            for unit, text in zip(units, texts):
                _set_text(unit, text)
        out = io.BytesIO()
        self.doc.save(out)
        return out.getvalue()


def _unit_texts(block: Block, aligned) -> list[str]:
    """Each run's share of the translation: runs take the target words from their placed start, in reading order
    (a run placed before an earlier one starts where that one does), so the runs' text read in order is the
    translation."""
    n = len(aligned.words)
    starts = []
    for el in block.root.children:
        starts.append(el.lo if not el.empty else el.anchor)
    for i in range(1, len(starts)):  # reading order is the runs' order
        starts[i] = max(starts[i], starts[i - 1])
    if starts:
        starts[0] = 0
    texts = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        parts = [aligned.spaces[k] + aligned.words[k] for k in range(start, end)]
        texts.append("".join(parts))
    if texts:
        texts[0] = block.lead() + texts[0]
        texts[-1] += aligned.tail
    return texts


def _set_text(unit: Any, text: str) -> None:
    """A run's text, or a hyperlink's (in its first run, the others emptied)."""
    runs = getattr(unit, "runs", None)
    if runs is None:
        unit.text = text
        return
    if runs:
        runs[0].text = text
        for run in runs[1:]:
            run.text = ""
