"""The LibreTranslate API as its clients use it, against a real `pyengine serve` process on 127.0.0.1: the
`libretranslatepy` client (translate, detect, languages) with and without keys, Mastodon's request shape (JSON, a
list of HTML texts, source auto, format html, api_key), /translate_file with .txt/.html/.docx, 403/429, and bad
input answered with named errors while the other requests go on."""
from __future__ import annotations

import io
from typing import Any
import json
import re
import threading
import urllib.error
import urllib.request
import uuid

import pytest
from libretranslatepy import LibreTranslateAPI

import pyengine
from benchmarks.load import ServerProcess
from pyengine.documents.markup import INLINE, HtmlDocument

TOOT = ('<p>Hello <span class="h-card"><a href="https://example.social/@ana" class="u-url mention">@<span>ana</span>'
        '</a></span>, the <strong>file</strong> could not be opened. Close the window.</p>'
        '<p>Save the changes! <a href="https://example.org/x" rel="nofollow noopener" target="_blank">'
        '<span class="invisible">https://</span><span class="">example.org/x</span></a></p>')


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load("default")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(extra=["--max-file-bytes", "60000"]) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# key [requests per minute]\nsecret-key\nsmall-key 1\n", encoding="utf-8")
    with ServerProcess(extra=["--api-keys", str(keys), "--req-limit", "50"]) as s:
        yield s


def post_json(url: str, body) -> tuple[int, dict, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def post_file(url: str, name: str, data: bytes, **fields: str) -> tuple[int, dict]:
    """multipart/form-data as browsers and LibreTranslate's clients send it."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for key, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
               f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    req = urllib.request.Request(url, data=body.getvalue(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def inline_tags(markup: str) -> list[str]:
    return sorted(m.group(0) for m in re.finditer(r"<([a-z]+)\b[^>]*>", markup) if m.group(1) in INLINE)


def test_libretranslatepy_translate_detect_languages(server, engine):
    lt = LibreTranslateAPI(server.url)
    paragraph = "The directory could not be created. Close the window."
    assert lt.translate(paragraph, "en", "de") == engine.translate([paragraph], split_sentences=True)[0]
    assert lt.translate("Open the file", "auto", "de") == engine.translate(["Open the file"])[0]
    detected = lt.detect("Die Datei konnte nicht geöffnet werden.")
    assert detected[0]["language"] == "de" and 50 < detected[0]["confidence"] <= 100
    assert lt.languages() == [{"code": "en", "name": "English", "targets": ["de"]},
                              {"code": "de", "name": "German", "targets": []}]


def test_mastodon_request_shape(server, engine):
    texts = [TOOT, "<p>Open the <em>file</em>.</p>"]
    status, body, _ = post_json(server.url + "/translate", {"q": texts, "source": "auto", "target": "de",
                                                            "format": "html", "api_key": None})
    assert status == 200, body
    assert body["translatedText"] == engine.translate(texts, format="html")
    for src, out in zip(texts, body["translatedText"]):
        HtmlDocument(out)  # well formed
        assert inline_tags(out) == inline_tags(src)
        assert out.count("<p>") == src.count("<p>")
    assert [d["language"] for d in body["detectedLanguage"]] == ["en", "en"]
    status, body, _ = post_json(server.url + "/translate", {"q": TOOT, "source": "en", "target": "de", "format": "html"})
    assert status == 200 and isinstance(body["translatedText"], str) and "detectedLanguage" not in body


def test_lists_and_alternatives(server):
    status, body, _ = post_json(server.url + "/translate", {"q": ["Open the file.", "Save the changes! Close it."],
                                                            "source": "en", "target": "de", "alternatives": 2})
    assert status == 200 and len(body["translatedText"]) == 2
    assert [len(a) for a in body["alternatives"]] == [2, 2]


def test_bad_input_is_named_and_other_requests_go_on(server, engine):
    good = "The directory could not be created."
    want = engine.translate([good], split_sentences=True)[0]
    results: dict[str, tuple] = {}

    def call(name, body):
        results[name] = post_json(server.url + "/translate", body)
    threads = [threading.Thread(target=call, args=(f"good{i}", {"q": good, "source": "en", "target": "de"}))
               for i in range(4)]
    threads.append(threading.Thread(target=call, args=("bad", {"q": ["<p>ok</p>", "<p>a <b>b</i></p>"], "source": "en",
                                                                "target": "de", "format": "html"})))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status, body, _ = results["bad"]
    assert status == 400 and body["error"] == "q[1]: bad HTML: </i> at line 1, column 10 has no open <i>"
    assert all(results[f"good{i}"][:2] == (200, {"translatedText": want}) for i in range(4))
    status, body, _ = post_json(server.url + "/translate", {"q": "x", "target": "de", "format": "markdown"})
    assert status == 400 and "format must be 'text' or 'html'" in body["error"]


def test_translate_file(server, engine):
    status, body = post_file(server.url + "/translate_file", "notes.txt", b"Open the file.\n\nSave the changes!\n",
                             source="en", target="de")
    assert status == 200, body
    assert body["translatedFileUrl"].startswith(server.url + "/download_file/")
    a, b = engine.translate(["Open the file.", "Save the changes!"])
    assert download(body["translatedFileUrl"]).decode() == f"{a}\n\n{b}\n"
    status, body = post_file(server.url + "/translate_file", "page.html", b"<p>Open the <b>file</b>.</p>", target="de")
    assert status == 200 and download(body["translatedFileUrl"]).decode().count("<b>") == 1

    import docx
    doc = docx.Document()
    p = doc.add_paragraph("Open the ")
    p.add_run("file").italic = True
    p.add_run(".")
    buf = io.BytesIO()
    doc.save(buf)
    status, body = post_file(server.url + "/translate_file", "letter.docx", buf.getvalue(), source="en", target="de")
    assert status == 200, body
    out = docx.Document(io.BytesIO(download(body["translatedFileUrl"])))
    assert out.paragraphs[0].text == engine.translate(["Open the file."])[0]
    assert [r.italic for r in out.paragraphs[0].runs] == [None, True, None]

    status, body = post_file(server.url + "/translate_file", "scan.pdf", b"%PDF", target="de")
    assert status == 400 and "file type '.pdf' of 'scan.pdf' is not supported" in body["error"]
    status, body = post_file(server.url + "/translate_file", "big.txt", b"word " * 13000, target="de")
    assert status == 413 and "exceeds the limit" in body["error"]
    status, body = post_file(server.url + "/translate_file", "bad.html", b"<p><b>x</i></p>", target="de")
    assert status == 400 and "bad.html: bad HTML" in body["error"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        download(server.url + "/download_file/nothing-here.txt")
    assert exc.value.code == 404


def test_frontend_settings_and_page(server):
    with urllib.request.urlopen(server.url + "/frontend/settings", timeout=30) as r:
        settings = json.loads(r.read())
    assert settings["keyRequired"] is False and settings["filesTranslation"] is True
    assert ".docx" in settings["supportedFilesFormat"] and settings["language"]["target"]["code"] == "de"
    with urllib.request.urlopen(server.url + "/", timeout=30) as r:
        page = r.read().decode()
    assert r.headers["content-type"].startswith("text/html") and 'id="translate"' in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # no external assets


def test_keys(keyed, engine):
    text = "Open the file"
    with pytest.raises(urllib.error.HTTPError) as exc:
        LibreTranslateAPI(keyed.url).translate(text, "en", "de")
    assert exc.value.code == 403 and "API key" in json.loads(exc.value.read())["error"]
    with pytest.raises(urllib.error.HTTPError) as exc:
        LibreTranslateAPI(keyed.url, api_key="wrong").translate(text, "en", "de")
    assert exc.value.code == 403 and json.loads(exc.value.read())["error"] == "Invalid API key"
    lt = LibreTranslateAPI(keyed.url, api_key="secret-key")
    assert lt.translate(text, "en", "de") == engine.translate([text])[0]
    assert lt.detect("Die Datei wurde gespeichert.")[0]["language"] == "de"
    assert lt.languages()[0]["code"] == "en"  # /languages needs no key
    # Mastodon's shape with a key
    status, body, _ = post_json(keyed.url + "/translate", {"q": [TOOT], "source": "auto", "target": "de",
                                                           "format": "html", "api_key": "secret-key"})
    assert status == 200 and len(body["translatedText"]) == 1
    status, body, _ = post_json(keyed.url + "/translate", {"q": [TOOT], "source": "auto", "target": "de",
                                                           "format": "html", "api_key": None})
    assert status == 403
    # a key with its own limit of 1 a minute
    status, _, _ = post_json(keyed.url + "/translate", {"q": text, "target": "de", "api_key": "small-key"})
    assert status == 200
    status, body, headers = post_json(keyed.url + "/translate", {"q": text, "target": "de", "api_key": "small-key"})
    assert status == 429 and "Too many request" in body["error"] and 1 <= int(headers["Retry-After"]) <= 60
    status, _, _ = post_json(keyed.url + "/translate", {"q": text, "target": "de", "api_key": "secret-key"})
    assert status == 200  # other keys unharmed
    status, _ = post_file(keyed.url + "/translate_file", "a.txt", b"Open the file.", target="de")
    assert status == 403
    status, _ = post_file(keyed.url + "/translate_file", "a.txt", b"Open the file.", target="de", api_key="secret-key")
    assert status == 200
    with urllib.request.urlopen(keyed.url + "/frontend/settings", timeout=30) as r:
        assert json.loads(r.read())["keyRequired"] is True


def test_per_address_limit_without_keys(engine):
    from fastapi.testclient import TestClient

    from pyengine.config import ServerConfig
    from pyengine.serving import create_app

    with TestClient(create_app(engine, ServerConfig(req_limit=2))) as c:
        codes = [c.post("/translate", json={"q": "Open", "target": "de"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.post("/v1/translate", json={"texts": ["Open"]})
        assert r.status_code == 429 and "retry-after" in r.headers
        assert c.get("/languages").status_code == 200
