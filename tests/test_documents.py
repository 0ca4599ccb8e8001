"""The document layer: sentence splitting, word alignment, HTML with its markup kept, .docx/.txt files and language
detection — each checked against something independent of it: the engine's own sentence translations, hand-written
expected markup, sentencepiece's own pieces, float64 argmax, python-docx reading the written file back."""
from __future__ import annotations

import html
import re
import subprocess
import sys

import pytest
import torch

import pyengine
from pyengine.documents import Detector, MarkupError
from pyengine.documents.align import attention_alignment, source_token_words, target_token_words
from pyengine.documents.inline import Aligned, Block, Inline, render_html
from pyengine.documents.markup import HtmlDocument
from pyengine.documents.segment import join, model_text, split_text
from pyengine.errors import InputError, OptionError


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load("default")


# -- sentence splitting ----------------------------------------------------------------------------------------
TEXTS = ["It was Mary. Dr. Smith went to the U.S.A. yesterday!  Then he left.\n\nNew line\r\nwithout a stop",
         "   leading and trailing whitespace.   ", "", "One.", "a\n\n\nb", "Tabs\tinside. Are kept? Yes!"]


@pytest.mark.parametrize("text", TEXTS)
def test_spans_cover_every_word_and_join_restores_the_text(text):
    spans = split_text(text, "en", lambda s: len(s.split()) + 1, 64)
    assert join(text, spans, [text[s:e] for s, e in spans]) == text
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    covered = "".join(text[s:e] for s, e in spans)
    assert re.sub(r"\s", "", covered) == re.sub(r"\s", "", text)  # nothing dropped
    assert all(text[s:e] == text[s:e].strip() and "\n" not in text[s:e] for s, e in spans)


def test_sentences_and_lines_are_split():
    text = "Open the file. Save the changes!\nClose the window"
    spans = split_text(text, "en", len, 10_000)
    assert [text[s:e] for s, e in spans] == ["Open the file.", "Save the changes!", "Close the window"]


def test_over_long_sentences_are_cut_at_the_best_point_never_truncated():
    count = lambda s: len(s.split()) + 1  # noqa: E731 - one token a word, plus EOS
    text = "alpha beta gamma; delta epsilon, zeta eta theta iota kappa"
    spans = split_text(text, "en", count, 5)
    pieces = [text[s:e] for s, e in spans]
    assert all(count(p) <= 5 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert pieces[0] == "alpha beta gamma;"  # the semicolon is the preferred cut
    url = "x" * 50
    spans = split_text(url, "en", len, 20)
    assert "".join(url[s:e] for s, e in spans) == url and all(e - s <= 20 for s, e in spans)


def test_translate_with_splitting_equals_the_sentences_translated_one_by_one(engine):
    text = "Open the file. Save the changes!\n\n  The directory could not be created.  Close the window."
    sentences = ["Open the file.", "Save the changes!", "The directory could not be created.", "Close the window."]
    each = engine.translate(sentences)
    want = f"{each[0]} {each[1]}\n\n  {each[2]}  {each[3]}."[:-1]
    assert engine.translate([text], split_sentences=True) == [want]
    assert engine.translate(["", "   "], split_sentences=True) == ["", "   "]


def test_a_paragraph_over_the_model_limit_is_split_not_refused(engine):
    limit = engine.config.max_positions
    long = ", ".join(["open the file and save the changes"] * 60) + "."
    assert len(engine.tokenizer.encode(long)) > limit
    with pytest.raises(InputError, match="exceed the limit"):
        engine.translate([long])
    out = engine.translate([long], split_sentences=True, max_decoding_length=32)[0]
    assert out.strip()
    plan = engine.documents.plan(long)
    assert len(plan.segments) > 1 and all(len(engine.tokenizer.encode(s)) <= limit for s in plan.segments)
    assert " ".join(plan.segments).split() == long.split()


# -- alignment -------------------------------------------------------------------------------------------------
def test_source_and_target_token_words_follow_sentencepiece_pieces(engine):
    tok = engine.tokenizer
    words = ["The", "directory", "couldn't", "be", "created."]
    pieces = tok.spm_source.encode(" ".join(words), out_type=str)
    want, w = [], -1
    for p in pieces:  # the reference: a piece starting with ▁ starts the next word
        w += p.startswith("\u2581")
        want.append(w)
    assert source_token_words(tok.encode, words) == want + [-1]  # EOS is special
    target = engine.translate_batch(["The directory could not be created."])[0].tokens[0]
    tpieces = [tok.decoder[t] for t in target]
    want, w = [], -1
    for p in tpieces:
        w += p.startswith("\u2581")
        want.append(max(w, 0))
    assert target_token_words(tok.decode, target) == want


def test_attention_alignment_is_both_argmax_directions():
    gen = torch.Generator().manual_seed(0)
    att = torch.rand(7, 6, generator=gen, dtype=torch.float64)
    source_words = [0, 0, 1, 2, 3, -1]  # last source token: EOS
    target_words = [0, 1, 1, 2, 3, 3, 4]
    got = attention_alignment(att.tolist(), source_words, target_words, 5)
    want = [set() for _ in range(5)]
    content = att[:, :5]
    for k in range(7):
        want[target_words[k]].add(source_words[int(content[k].argmax())])
    for j in range(5):
        want[target_words[int(content[:, j].argmax())]].add(source_words[j])
    assert got == want


# -- inline placement: hand-written expectations ---------------------------------------------------------------
def block_with(text: str, spec: list[tuple[str, str, str]]) -> Block:
    """A block over `text` with elements around the given substrings: (substring, open tag, close tag)."""
    elements = []
    for sub, open_, close in spec:
        start = text.index(sub)
        elements.append(Inline(start, start + len(sub), open=open_, close=close))
    return Block(text, elements)


def render(block: Block, words: list[str], alignment: list[set[int]]) -> str:
    block.segment("en", len, 10_000, lines=False)
    aligned = Aligned(words, [""] + [" "] * (len(words) - 1), alignment, "", "attention")
    block.place(aligned)
    return render_html(block, aligned)


def test_inline_elements_follow_their_aligned_words():
    block = block_with("the red house", [("red", "<b>", "</b>")])
    assert render(block, ["das", "rote", "Haus"], [{0}, {1}, {2}]) == "das <b>rote</b> Haus"
    block = block_with("the red house", [("red", "<b>", "</b>"), ("house", '<a href="h">', "</a>")])
    # reordered: "Haus" before "rote"
    assert render(block, ["das", "Haus", "rote"], [{0}, {2}, {1}]) == 'das <a href="h">Haus</a> <b>rote</b>'


def test_an_element_is_contiguous_and_gives_way_to_an_earlier_sibling():
    block = block_with("a b c d", [("a b", "<i>", "</i>"), ("c d", "<b>", "</b>")])
    # "a b" aligned to words 0 and 2 → range [0, 3); "c d" to words 1 and 3 → clipped to [3, 4)
    assert render(block, ["w0", "w1", "w2", "w3"], [{0}, {2}, {1}, {3}]) == "<i>w0 w1 w2</i> <b>w3</b>"


def test_nested_elements_stay_nested_and_unaligned_ones_are_kept_empty():
    block = Block("one two three", [Inline(0, 7, "<b>", "</b>", children=[Inline(4, 7, "<i>", "</i>")])])
    assert render(block, ["eins", "zwei", "drei"], [{0}, {1}, {2}]) == "<b>eins <i>zwei</i></b> drei"
    block = block_with("one two three", [("two", "<em>", "</em>")])
    # nothing aligned to "two": the element stays, empty, before the target of the word after it
    assert render(block, ["eins", "drei"], [{0}, {2}]) == "eins <em></em>drei"


# -- HTML end to end -------------------------------------------------------------------------------------------
PAGE = """<!DOCTYPE html>
<html><head><title>Files</title><style>p > b { color: red; }</style></head>
<body class="main">
  <h1 id="top">Open the file.</h1>
  <p>The <b>directory</b> could not be <a href="https://example.org/?a=1&amp;b=2" title="x">created</a>. Close the window.</p>
  <pre>keep  this &amp; that</pre>
  <p>Run <code>ls -l</code> now.<br>Save the <em>changes</em>!</p>
  <!-- a comment -->
  <script>var s = "<b>not markup</b>";</script>
  <ul><li>Open&nbsp;the file.</li><li translate="no">Brand Name</li></ul>
</body></html>"""


def visible_blocks(doc: HtmlDocument) -> list[str]:
    return [b.text for b in doc.blocks if b.has_words]


def test_html_keeps_markup_and_its_text_is_the_plain_translation(engine):
    out = engine.translate([PAGE], format="html")[0]
    for kept in ('<h1 id="top">', '<a href="https://example.org/?a=1&amp;b=2" title="x">', "<pre>keep  this &amp; that</pre>",
                 "<code>ls -l</code>", "<!-- a comment -->", '<script>var s = "<b>not markup</b>";</script>',
                 '<li translate="no">Brand Name</li>', "<style>p > b { color: red; }</style>", "<!DOCTYPE html>",
                 '<body class="main">\n  ', "</ul>\n</body></html>"):
        assert kept in out
    for tag in ("b", "a", "em", "code", "p", "h1", "li", "ul", "br", "title"):  # same tags, same counts
        assert len(re.findall(rf"<{tag}\b", out)) == len(re.findall(rf"<{tag}\b", PAGE)), tag
    HtmlDocument(out)  # balanced: pyengine's strict reader accepts it
    import lxml.html
    lxml.html.document_fromstring(out)
    # the text of every block is the plain translation of its sentences, joined as in the source
    plan = engine.documents.plan(PAGE, "html")
    plain = iter(engine.translate(plan.segments))
    want = [join(b.text, b.spans, [next(plain) for _ in b.spans]) for b in plan.doc.blocks if b.has_words]
    assert visible_blocks(HtmlDocument(out)) == want
    assert "Brand Name" not in " ".join(plan.segments) and "ls -l" not in " ".join(plan.segments)


def test_html_escapes_what_the_model_writes(engine):
    out = engine.translate(["<p>Tom &amp; Jerry &lt;3</p>"], format="html")[0]
    text = html.unescape(re.sub(r"<[^>]+>", "", out))
    assert "<" not in re.sub(r"<[^>]+>", "", out).replace("&lt;", "")
    assert text == engine.translate(["Tom & Jerry <3"])[0]


@pytest.mark.parametrize("bad, message", [
    ("<p>a <b>b</i></p>", r"</i> at line 1, column 10 has no open <i>"),
    ("<p><b><i>x</b></i></p>", r"</b> at line 1, column 11 closes <b> while <i> \(opened at line 1, column 7\)"),
    ("<p>a <b>never closed</p>", r"<b> at line 1, column 6 is never closed"),
    ("<p>x</p>\n<script>var a;", r"<script> at line 2, column 1 is never closed"),
    ("</span>", r"</span> at line 1, column 1 has no open <span>"),
])
def test_bad_html_is_refused_with_where(engine, bad, message):
    with pytest.raises(MarkupError, match=message):
        engine.translate(["<p>fine</p>", bad], format="html")
    try:
        engine.translate(["<p>fine</p>", bad], format="html")
    except MarkupError as exc:
        assert exc.index == 1


def test_unknown_format_is_refused(engine):
    with pytest.raises(OptionError, match="format must be one of"):
        engine.translate(["x"], format="markdown")


# -- files -----------------------------------------------------------------------------------------------------
def test_docx_runs_keep_their_formatting_and_the_text_is_the_translation(engine, tmp_path):
    import docx

    doc = docx.Document()
    p = doc.add_paragraph("The ")
    bold = p.add_run("directory")
    bold.bold = True
    p.add_run(" could not be created. Close the window.")
    doc.add_paragraph("")
    table = doc.add_table(rows=1, cols=2)
    table.cell(0, 0).text = "Open the file."
    table.cell(0, 1).text = "Save the changes!"
    src, dst = tmp_path / "in.docx", tmp_path / "out.docx"
    doc.save(src)
    engine.translate_file(src, dst)
    out = docx.Document(dst)
    runs = out.paragraphs[0].runs
    assert len(runs) == 3 and runs[1].bold and not runs[0].bold and not runs[2].bold
    assert runs[1].text.strip()  # the bold run carries the words aligned to "directory"
    assert out.paragraphs[0].text == " ".join(engine.translate(["The directory could not be created.",
                                                               "Close the window."]))
    assert [c.text for c in out.tables[0].rows[0].cells] == engine.translate(["Open the file.", "Save the changes!"])


def test_txt_and_html_files(engine, tmp_path):
    (tmp_path / "a.txt").write_text("Open the file. Save the changes!\n\nClose the window.\n", encoding="utf-8")
    engine.translate_file(tmp_path / "a.txt", tmp_path / "b.txt")
    a, b, c = engine.translate(["Open the file.", "Save the changes!", "Close the window."])
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == f"{a} {b}\n\n{c}\n"
    (tmp_path / "a.html").write_text("<p>Open the <b>file</b>.</p>", encoding="utf-8")
    engine.translate_file(tmp_path / "a.html", tmp_path / "b.html")
    assert (tmp_path / "b.html").read_text(encoding="utf-8").startswith("<p>")


def test_bad_files_are_refused_by_name(engine, tmp_path):
    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(InputError, match=r"file type '.pdf' of 'a.pdf' is not supported; supported: .txt"):
        engine.translate_file(tmp_path / "a.pdf", tmp_path / "b.pdf")
    (tmp_path / "bad.docx").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .docx file"):
        engine.translate_file(tmp_path / "bad.docx", tmp_path / "out.docx")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin1.txt is not UTF-8 text"):
        engine.translate_file(tmp_path / "latin1.txt", tmp_path / "out.txt")


# -- detection -------------------------------------------------------------------------------------------------
def test_detection(engine):
    ranked = engine.detect(["Die Datei konnte nicht geöffnet werden.", "The file could not be opened."])
    assert [r[0].language for r in ranked] == ["de", "en"]
    assert all(0 < r[0].confidence <= 100 and r[0].confidence >= r[1].confidence for r in ranked)
    restricted = Detector(["en", "de", "fr"])
    assert {d.language for d in restricted.rank("Le fichier est ouvert.", 3)} <= {"en", "de", "fr"}
    assert restricted.rank("Le fichier est ouvert.", 1)[0].language == "fr"
    # a model with one source language translates from it whatever the detector says, and says how sure it is
    short = engine.documents.detect_source("OK")
    assert short.language == "en" and 0 <= short.confidence <= 100
    german = engine.documents.detect_source("Die Datei konnte nicht geöffnet werden.")
    assert german.language == "en" and german.confidence < 5


def test_model_codes_map_to_detector_languages():
    from pyengine.documents.detect import iso_language, language_name
    assert [iso_language(c) for c in ("eng_Latn", "deu_Latn", "pt_BR", "de")] == ["en", "de", "pt", "de"]
    assert language_name("de") == "German"
    detector = Detector(["eng_Latn", "deu_Latn", "fra_Latn"])
    assert detector.rank("Das ist ein kleines Haus.", 1)[0].language == "deu_Latn"


def test_model_text_is_words_joined_by_single_spaces():
    assert model_text("  a\tb \n c  ") == "a b c"


# -- command line ----------------------------------------------------------------------------------------------
def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=stdin, capture_output=True, timeout=300)


def test_cli_paragraphs_html_and_files(engine, tmp_path):
    text = "Open the file. Save the changes!\n\nClose the window.\n"
    run = cli("translate", "--paragraphs", stdin=text.encode())
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout.decode() == engine.translate([text], split_sentences=True)[0]
    page = "<p>Open the <b>file</b>.</p>\n"
    run = cli("translate", "--format", "html", stdin=page.encode())
    assert run.returncode == 0 and run.stdout.decode() == engine.translate([page], format="html")[0]
    run = cli("translate", "--format", "html", stdin=b"<p><b>x</i></p>")
    assert run.returncode == 2 and "bad HTML: </i> at line 1, column 8" in run.stderr.decode()
    run = cli("translate", "--paragraphs", "--num-hypotheses", "2", stdin=b"x")
    assert run.returncode == 2 and "apply to one sentence a line" in run.stderr.decode()
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    run = cli("translate-file", str(tmp_path / "in.txt"), str(tmp_path / "out.txt"))
    assert run.returncode == 0, run.stderr.decode()
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == engine.translate([text], split_sentences=True)[0]
    run = cli("translate-file", str(tmp_path / "missing.docx"), str(tmp_path / "out.docx"))
    assert run.returncode == 2 and "cannot read" in run.stderr.decode()
