"""Reliability: batch invariance (translate and the server), and bad input through the API, the CLI and
the server, each with its defined answer while the other sentences of the batch are unharmed."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

import pyengine
from conftest import sample_lines
from pyengine.errors import InputError, OptionError
from pyengine.serving import create_app

OPTS = dict(beam_size=2, max_decoding_length=48)


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load("default")


@pytest.fixture(scope="module")
def corpus(engine):
    """64 sentences of mixed lengths (UI strings and verses) and each one's translation alone."""
    lines = sample_lines()
    rng = random.Random(7)
    texts = rng.sample(lines, 64)
    alone = [engine.translate_batch([t], **OPTS)[0].tokens for t in texts]
    return texts, alone


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def too_long(engine) -> str:
    """Ten times the model's length in tokens."""
    return " ".join(["translation"] * (10 * engine.config.max_positions))


def test_batch_invariance_through_translate(engine, corpus):
    texts, alone = corpus
    order = list(range(len(texts)))
    random.Random(1).shuffle(order)  # batches of other lengths than the sorted neighbours
    for size in (8, 64):
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            got = engine.translate_batch([texts[i] for i in idx], **OPTS)
            assert [g.tokens for g in got] == [alone[i] for i in idx], f"batch of {size}"


def test_batch_invariance_through_the_server(client, corpus, engine):
    """Requests of 1, 8 and 64 sentences sent at once share the running batch; each sentence comes back
    with its tokens alone (compared as text: the server returns text)."""
    texts, alone = corpus
    expected = [engine.tokenizer.decode(t[0]) for t in alone]
    order = list(range(len(texts)))
    random.Random(2).shuffle(order)
    requests = [order[i:i + 8] for i in range(0, 64, 8)] + [[i] for i in order[:16]] + [order]

    def post(idx):
        r = client.post("/v1/translate", json={"texts": [texts[i] for i in idx], "options": OPTS})
        assert r.status_code == 200, r.text
        return idx, [t["translation"] for t in r.json()["translations"]]

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        for idx, got in pool.map(post, requests):
            assert got == [expected[i] for i in idx]
    assert max(client.app.state.scheduler.stats.rows_per_step) > 64, "the requests must have shared batches"


# -- bad input: the API --------------------------------------------------------------------------

def test_api_bad_input_answers(engine, corpus):
    texts, alone = corpus
    good = texts[:3]
    base = engine.translate_batch(good, **OPTS)
    assert engine.translate(["", "   \t ", good[0]], **OPTS) == ["", "", base[0].hypotheses[0]]
    for bad, pattern in ((None, "input 1: expected str, got NoneType"), (42, "input 1: expected str, got int"),
                         (too_long(engine), r"input 1: \d+ tokens exceed the limit of 256"),
                         ("\ud800 broken", "input 1: not valid Unicode text")):
        with pytest.raises(InputError, match=pattern):
            engine.translate([good[0], bad, good[1]], **OPTS)
    with pytest.raises(OptionError, match=r"unknown decoding option\(s\) \['beam'\]"):
        engine.translate(good, beam=3)
    with pytest.raises(InputError, match="list of strings"):
        engine.translate("a bare string")
    # truncation on request, said in the option's name
    assert isinstance(engine.translate([too_long(engine)], truncate_input=True, **OPTS)[0], str)
    # control characters reach the tokenizer as they are (like the model's own tokenizer): a defined
    # translation, and the other sentences of the batch are unchanged
    control = "Open\x00 the\x07 file\x1b[0m"
    got = engine.translate_batch([good[0], control, good[1], good[2]], **OPTS)
    assert [got[i].tokens for i in (0, 2, 3)] == [b.tokens for b in base]
    assert got[1].tokens == engine.translate_batch([control], **OPTS)[0].tokens
    assert engine.translate_batch(good, **OPTS)[0].tokens == base[0].tokens  # still usable after the errors


# -- bad input: the command line ----------------------------------------------------------------

def test_cli_bad_lines_are_named_and_the_others_translated(engine, corpus):
    texts, alone = corpus
    good = texts[:4]
    lines = [good[0].encode(), b"", b"  ", b"\xff\xfe broken", good[1].encode(), too_long(engine).encode(),
             "Open\x07 the file".encode(), good[2].encode(), good[3].encode()]
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate", "--beam-size", "2",
                          "--max-decoding-length", "48"], input=b"\n".join(lines) + b"\n", capture_output=True,
                         timeout=300)
    out = run.stdout.decode().split("\n")[:-1]
    assert run.returncode == 2, run.stderr.decode()
    assert len(out) == len(lines)
    stderr = run.stderr.decode()
    assert "line 4 is not valid UTF-8" in stderr and "line 6:" in stderr and "exceed the limit" in stderr
    assert "2 of 9 lines not translated" in stderr
    assert out[1] == out[2] == out[3] == out[5] == ""
    expected = engine.translate([good[0], good[1], "Open\x07 the file", good[2], good[3]], **OPTS)
    assert [out[0], out[4], out[6], out[7], out[8]] == expected
    run = subprocess.run([sys.executable, "-m", "pyengine", "translate", "--beam", "2"], input=b"x\n",
                         capture_output=True, timeout=300)
    assert run.returncode == 2 and b"unrecognized arguments" in run.stderr


# -- bad input: the server ----------------------------------------------------------------------

BAD_BODIES = [
    ({"texts": [None]}, 400, "texts[0] must be a string, got null"),
    ({"texts": ["ok", 7]}, 400, "texts[1] must be a string, got number"),
    ({"texts": "just a string"}, 400, "'texts' must be a list of strings, got string"),
    ({"texts": ["ok"], "options": {"beam": 2}}, 400, "unknown decoding option(s) ['beam']"),
    ({"texts": ["ok"], "options": {"beam_size": "wide"}}, 400, "beam_size must be an integer"),
    ({"texts": ["ok"], "options": {"target_prefix": "Die"}}, 400, "target_prefix must be a list of strings"),
    ({"texts": ["ok"], "colour": "red"}, 400, "unknown field(s) ['colour']"),
    ({"options": {}}, 400, "missing field 'texts'"),
    ([1, 2], 400, "must be a JSON object, got array"),
]


@pytest.mark.parametrize("body,status,message", BAD_BODIES)
def test_server_bad_requests(client, body, status, message):
    r = client.post("/v1/translate", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_server_bad_bytes_and_text(client, engine):
    r = client.post("/v1/translate", content=b'{"texts": ["caf\xe9"]}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]
    r = client.post("/v1/translate", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/v1/translate", content=json.dumps({"texts": ["\ud800"]}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "input 0: not valid Unicode text" in r.json()["error"]
    r = client.post("/v1/translate", json={"texts": ["fine", too_long(engine)]})  # over the characters limit
    assert r.status_code == 413 and "texts[1] has" in r.json()["error"] and "over the limit of" in r.json()["error"]
    r = client.post("/v1/translate", json={"texts": ["fine", " ".join(["translation"] * 700)]})  # over the tokens
    assert r.status_code == 400 and "input 1:" in r.json()["error"] and "exceed the limit" in r.json()["error"]
    r = client.post("/v1/translate", json={"texts": ["", "  ", "Open\x00 the\x07 file"], "options": OPTS})
    assert r.status_code == 200
    assert [t["translation"] for t in r.json()["translations"]] == \
        engine.translate(["", "  ", "Open\x00 the\x07 file"], **OPTS)


def test_bad_requests_do_not_harm_the_running_batch(client, corpus, engine):
    """Bad requests sent among good ones, all at once: every good one gets its offline translation."""
    texts, alone = corpus
    expected = [engine.tokenizer.decode(t[0]) for t in alone]
    bodies = []
    for k in range(24):
        if k % 3 == 1:
            bodies.append(("bad", BAD_BODIES[k % len(BAD_BODIES)][0]))
        else:
            idx = [(k * 5 + j) % len(texts) for j in range(1 + k % 4)]
            bodies.append((idx, {"texts": [texts[i] for i in idx], "options": OPTS}))

    def post(item):
        idx, body = item
        return idx, client.post("/v1/translate", json=body)

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        for idx, r in pool.map(post, bodies):
            if idx == "bad":
                assert r.status_code == 400
            else:
                assert r.status_code == 200 and [t["translation"] for t in r.json()["translations"]] == \
                    [expected[i] for i in idx]
