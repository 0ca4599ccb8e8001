"""Hostile-but-legitimate clients against a real `pyengine serve` process on loopback (127.0.0.1): bad options, JSON
bombs, bad encodings, sizes, stalled and vanishing clients, queue exhaustion, timeouts and shutdown. Every probe
gets the 4xx/5xx docs/server.md lists (never a 500 for a client's mistake), good requests sent meanwhile get
exactly their offline translations, /health returns to zero queued and running sentences after each probe, and the
server's memory does not grow over rounds of probes."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import pyengine
from benchmarks.load import ServerProcess
from conftest import sample_lines

READ_TIMEOUT = 1.5
ROUNDS = int(__import__("os").environ.get("HOSTILE_ROUNDS", 4))
LIMITS = ["--max-queue", "24", "--max-texts", "40", "--max-chars", "2000", "--max-body-bytes", "65536",
          "--max-beam-size", "8", "--read-timeout", str(READ_TIMEOUT), "--timeout", "60"]
OPTS = {"beam_size": 2, "max_decoding_length": 48}
TEXT = "Open the file."
LONG = sorted(sample_lines(), key=len)[-24:]  # the longest sample sentences: slow to decode at beam 8


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load("default")


@pytest.fixture(scope="module")
def server():
    with ServerProcess("default", threads=2, extra=LIMITS) as s:
        yield s


def request(server, path: str, body: bytes | dict, content_type: str = "application/json",
            timeout: float = 120.0) -> tuple[int, dict, dict]:
    """One request on its own connection: (status, JSON body, headers)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"content-type": content_type})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else {}, dict(r.getheaders())
    finally:
        conn.close()


def health(server) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def metric(server, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def assert_idle(server, timeout: float = 30.0) -> None:
    """/health returns to zero queued and zero running sentences."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if h["queue_depth"] == 0 and h["running"] == 0:
            assert h["status"] == "ok"
            return
        assert time.monotonic() < deadline, f"/health did not return to zero: {h}"
        time.sleep(0.05)


def rss_mb(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def v1(options: dict, texts: list | None = None) -> dict:
    return {"texts": [TEXT] if texts is None else texts, "options": options}


# (probe id, path, body, content type, status, words the error must contain)
PROBES = [
    # decoding options: type, range, finiteness, vocabulary ids, the server's bounds
    ("suppress-nested", "/v1/translate", v1({"suppress_tokens": [[1]]}), None, 400, "suppress_tokens"),
    ("suppress-int", "/v1/translate", v1({"suppress_tokens": 5}), None, 400, "suppress_tokens"),
    ("suppress-strings", "/v1/translate", v1({"suppress_tokens": ["a"]}), None, 400, "suppress_tokens"),
    ("suppress-outside-vocab", "/v1/translate", v1({"suppress_tokens": [10 ** 9]}), None, 400, "vocabulary"),
    ("seed-string", "/v1/translate", v1({"seed": "1"}), None, 400, "seed"),
    ("seed-2^63", "/v1/translate", v1({"seed": 2 ** 63}), None, 400, "seed"),
    ("topp-string", "/v1/translate", v1({"sampling_topp": "0.9"}), None, 400, "sampling_topp"),
    ("temperature-null", "/v1/translate", v1({"sampling_temperature": None}), None, 400, "sampling_temperature"),
    ("temperature-tiny", "/v1/translate", v1({"sampling_temperature": 1e-300, "sampling_topk": 0}), None, 400,
     "sampling_temperature"),
    ("max-input-length-string", "/v1/translate", v1({"max_input_length": "5"}), None, 400, "max_input_length"),
    ("forced-bos-float", "/v1/translate", v1({"forced_bos_token": 5.5}), None, 400, "forced_bos_token"),
    ("forced-bos-outside-vocab", "/v1/translate", v1({"forced_bos_token": 10 ** 6}), None, 400, "vocabulary"),
    ("length-factor-1e308", "/v1/translate", v1({"max_length_factor": 1e308}), None, 400, "max_length_factor"),
    ("length-penalty-1e308", "/v1/translate", v1({"length_penalty": 1e308, "return_scores": True}), None, 400,
     "length_penalty"),
    ("beam-1e9", "/v1/translate", v1({"beam_size": 10 ** 9}), None, 400, "max_beam_size"),
    ("beam-1024", "/v1/translate", v1({"beam_size": 1024}), None, 400, "max_beam_size"),
    ("beam-true", "/v1/translate", v1({"beam_size": True}), None, 400, "beam_size"),
    ("n-best-over-beam", "/v1/translate", v1({"beam_size": 2, "num_hypotheses": 100}), None, 400, "num_hypotheses"),
    ("max-length-1e6", "/v1/translate", v1({"max_decoding_length": 10 ** 6}), None, 400, "max_decoding_length"),
    ("unknown-option", "/v1/translate", v1({"beam": 4}), None, 400, "unknown decoding option"),
    ("texts-in-options", "/v1/translate", v1({"texts": ["x"]}), None, 400, "not decoding options"),
    ("source-lang-in-options", "/v1/translate", v1({"source_lang": "en"}), None, 400, "not decoding options"),
    ("target-prefix-int", "/v1/translate", v1({"target_prefix": 5}), None, 400, "target_prefix"),
    ("options-not-object", "/v1/translate", {"texts": [TEXT], "options": [1]}, None, 400, "'options'"),
    # JSON bombs and non-JSON numbers
    ("nan", "/v1/translate", b'{"texts": ["x"], "options": {"length_penalty": NaN}}', None, 400, "NaN"),
    ("infinity", "/v1/translate", b'{"texts": ["x"], "options": {"length_penalty": -Infinity}}', None, 400,
     "Infinity"),
    ("5000-digits", "/v1/translate", b'{"texts": ["x"], "options": {"beam_size": 1' + b"0" * 5000 + b"}}", None,
     400, "digits"),
    ("nested-10000", "/v1/translate", b'{"texts": ' + b"[" * 10000 + b"]" * 10000 + b"}", None, 400,
     "nested too deeply"),
    ("not-json", "/v1/translate", b"{texts: [1]", None, 400, "not valid JSON"),
    ("not-object", "/v1/translate", b"[1, 2]", None, 400, "JSON object"),
    # encodings
    ("invalid-utf8", "/v1/translate", b'{"texts": ["\xff\xfe"]}', None, 400, "UTF-8"),
    ("surrogate", "/v1/translate", b'{"texts": ["\\ud800"]}', None, 400, "surrogates"),
    ("text-not-string", "/v1/translate", {"texts": [TEXT, 5]}, None, 400, "texts[1]"),
    # sizes
    ("body-over-limit", "/v1/translate", v1({}, ["word " * 13000]), None, 413, "limit"),
    ("text-over-chars", "/v1/translate", v1({}, ["a" * 2001]), None, 413, "characters"),
    ("texts-over-limit", "/v1/translate", v1({}, [TEXT] * 41), None, 413, "texts"),
    ("texts-over-queue", "/v1/translate", v1({}, [TEXT] * 25), None, 413, "never fit"),
    # the LibreTranslate API
    ("libre-missing-q", "/translate", {"source": "en", "target": "de"}, None, 400, "q"),
    ("libre-alternatives-word", "/translate", b"q=Hi&source=en&target=de&alternatives=two",
     "application/x-www-form-urlencoded", 400, "alternatives"),
    ("libre-alternatives-100", "/translate", {"q": "Hi", "source": "en", "target": "de", "alternatives": 100}, None,
     400, "alternatives"),
    ("libre-wrong-target", "/translate", {"q": "Hi", "source": "en", "target": "fr"}, None, 400, "target"),
]


@pytest.mark.parametrize("path,body,content_type,status,words", [p[1:] for p in PROBES], ids=[p[0] for p in PROBES])
def test_probe_gets_its_status_and_the_server_returns_to_idle(server, path, body, content_type, status, words):
    got, answer, _ = request(server, path, body, content_type or "application/json")
    assert got == status, answer
    assert words.lower() in answer["error"].lower(), answer
    assert_idle(server)


def test_libretranslate_form_fields_are_coerced_as_libretranslate_does(server, engine):
    """Form-encoded requests carry every field as a string: alternatives=2 means two alternatives."""
    status, answer, _ = request(server, "/translate", b"q=Open+the+file.&source=en&target=de&alternatives=2",
                                "application/x-www-form-urlencoded")
    assert status == 200, answer
    best = engine.translate_batch([TEXT], beam_size=max(3, engine.defaults.beam_size), num_hypotheses=3)[0]
    assert answer["translatedText"] == best.hypotheses[0] and answer["alternatives"] == best.hypotheses[1:]


def good_traffic(server, offline: dict, stop: threading.Event, failures: list) -> int:
    """Good requests, one after another, until `stop`; each answer is checked against `offline`."""
    sent, texts = 0, sorted(offline)
    while not stop.is_set():
        chunk = [texts[(sent + k) % len(texts)] for k in range(3)]
        status, answer, headers = request(server, "/v1/translate", v1(OPTS, chunk))
        if status == 503:  # the queue may be full of probes' sentences: obey Retry-After
            time.sleep(float(headers.get("retry-after", 1)) / 10)
            continue
        got = [t["translation"] for t in answer.get("translations", [])]
        if status != 200 or got != [offline[t] for t in chunk]:
            failures.append((status, answer, chunk))
        sent += 1
    return sent


def vanish(server, texts: list[str]) -> None:
    """Send a whole request, then close the connection without reading the answer."""
    body = json.dumps(v1({"beam_size": 8, "max_decoding_length": 200}, texts)).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.3)  # the server has read it and started


def test_probes_during_good_traffic_harm_no_one_and_memory_does_not_grow(server, engine):
    pool = sample_lines()[:30]
    offline = dict(zip(pool, engine.translate(pool, **OPTS)))
    stop, failures = threading.Event(), []
    sizes = []
    with ThreadPoolExecutor(4) as clients:
        traffic = [clients.submit(good_traffic, server, offline, stop, failures) for _ in range(2)]
        for _ in range(ROUNDS):
            with ThreadPoolExecutor(8) as probes:
                outcomes = list(probes.map(lambda p: (p, request(server, p[1], p[2], p[3] or "application/json")),
                                           PROBES))
                vanishing = probes.submit(vanish, server, LONG[:8])
                vanishing.result()
            for probe, (status, answer, _) in outcomes:
                assert status == probe[4], (probe[0], answer)
            sizes.append(rss_mb(server))
        stop.set()
        sent = [t.result() for t in traffic]
    assert not failures, failures[:3]
    assert min(sent) > 0
    assert_idle(server)
    # the first round warms the allocator; bounded caches (oneDNN keeps up to 1024 primitives, one per new batch
    # shape) still fill for ~30 rounds of this mix and then stop (measured: +80 MB in all); a leak per request grows
    # on (test_isolation counts the worker's objects exactly)
    assert sizes[-1] - sizes[1] < 40, f"server RSS grew over rounds of probes: {sizes} MB"


def test_a_vanishing_client_has_its_sentences_cancelled(server, engine):
    before = metric(server, "pyengine_cancelled_sentences_total")
    vanish(server, LONG)
    deadline = time.monotonic() + 30
    while metric(server, "pyengine_cancelled_sentences_total") - before < len(LONG):
        assert time.monotonic() < deadline, "the vanished client's sentences were not cancelled"
        time.sleep(0.05)
    assert_idle(server)
    status, answer, _ = request(server, "/v1/translate", v1(OPTS, LONG[:2]))
    assert status == 200 and [t["translation"] for t in answer["translations"]] == engine.translate(LONG[:2], **OPTS)


def stalled(server, data: bytes) -> tuple[bytes, float]:
    """Send `data`, then nothing: what the server answers before it closes, and after how long."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(READ_TIMEOUT * 10)
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received, time.monotonic() - start


@pytest.mark.parametrize("data,words", [
    (b"", b"headers not received"),
    (b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: appl", b"headers not received"),
    (b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
     b'{"texts": ["', b"body not received"),
], ids=["nothing", "half-headers", "short-body"])
def test_stalled_clients_get_408_and_are_closed(server, data, words):
    received, seconds = stalled(server, data)
    assert received.startswith(b"HTTP/1.1 408") and words in received, received
    assert seconds < READ_TIMEOUT * 5
    assert_idle(server)
    assert metric(server, 'pyengine_requests_total{endpoint="/v1/translate",status="500"}') == 0


def test_queue_exhaustion_answers_503_with_retry_after_and_recovers(server, engine):
    texts = LONG[:6]
    offline = engine.translate(texts, **OPTS)
    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda _: request(server, "/v1/translate", v1(OPTS, texts)), range(12)))
    statuses = sorted(status for status, _, _ in outcomes)
    assert 503 in statuses and 200 in statuses and set(statuses) == {200, 503}, statuses
    for status, answer, headers in outcomes:
        if status == 503:
            assert headers["retry-after"] and "busy" in answer["error"]
        else:
            assert [t["translation"] for t in answer["translations"]] == offline
    assert_idle(server)
    assert request(server, "/v1/translate", v1(OPTS))[0] == 200


def test_timeout_cancels_the_request_and_shutdown_answers_what_is_in_flight(engine):
    """A request past --timeout gets 504 and its sentences leave the batch; then SIGTERM with a good request in flight
    and a stalled connection open: the request is answered and the process exits."""
    # 200 steps forced at beam 8 for 24 sentences: seconds of decoding on any CPU, so the timeout of 0.5 s finds the
    # request inside the batch (a request that could end near the timeout may finish before the worker sees the
    # cancellation, leaving no sentence to take out: CI once saw that on a faster machine)
    forced = {"beam_size": 8, "max_decoding_length": 200, "min_decoding_length": 200}
    with ServerProcess("default", threads=2, extra=LIMITS[:-2] + ["--timeout", "0.5"]) as server:
        status, answer, _ = request(server, "/v1/translate", v1(forced, LONG))
        assert status == 504 and "within 0.5 s" in answer["error"]
        assert_idle(server)
        deadline = time.monotonic() + 10  # the worker counts them just after it frees their rows
        while metric(server, "pyengine_cancelled_sentences_total") < len(LONG) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, "pyengine_cancelled_sentences_total") == len(LONG)
        answers = []
        in_flight = threading.Thread(target=lambda: answers.append(request(server, "/v1/translate", v1(OPTS))))
        with socket.create_connection(("127.0.0.1", server.port)) as idle:
            idle.sendall(b"POST /v1/translate HTTP/1.1\r\n")
            in_flight.start()
            while health(server)["queue_depth"] + health(server)["running"] == 0 and in_flight.is_alive():
                time.sleep(0.01)
            code = server.stop()
        in_flight.join()
    assert code in (0, -signal.SIGTERM), server.log.decode()[-2000:]
    assert answers and answers[0][0] == 200
    assert answers[0][1]["translations"][0]["translation"] == engine.translate([TEXT], **OPTS)[0]
