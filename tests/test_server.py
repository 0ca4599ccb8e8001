"""The HTTP server: both APIs against the engine, limits with their 4xx/5xx answers, metrics, and load on
loopback (127.0.0.1 only) against a real `pyengine serve` process: 64 concurrent clients, zero lost,
failed or swapped responses, graceful shutdown with requests in flight."""
from __future__ import annotations

import signal
import threading

import pytest
from fastapi.testclient import TestClient

import pyengine
from benchmarks.load import ServerProcess, offline_translations, pool_of_texts, post, run_load
from conftest import sample_lines
from pyengine.config import ServerConfig
from pyengine.serving import create_app

OPTS = {"beam_size": 2, "max_decoding_length": 48}


@pytest.fixture(scope="module")
def engine():
    return pyengine.Engine.load("default")


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def test_v1_translate_matches_the_engine(client, engine):
    texts = sample_lines()[:6]
    r = client.post("/v1/translate", json={"texts": texts, "options": {**OPTS, "num_hypotheses": 2,
                                                                        "return_scores": True}})
    assert r.status_code == 200
    expected = engine.translate_batch(texts, **OPTS, num_hypotheses=2)
    for got, want in zip(r.json()["translations"], expected):
        assert got["translation"] == want.hypotheses[0]
        assert [h["translation"] for h in got["hypotheses"]] == want.hypotheses
        assert got["score"] == pytest.approx(want.scores[0], abs=1e-5)
    r = client.post("/v1/translate", json={"texts": texts[:2]})  # the model's own defaults
    assert [t["translation"] for t in r.json()["translations"]] == engine.translate(texts[:2])
    assert "score" not in r.json()["translations"][0]


def test_libretranslate_api(client, engine):
    text = "The directory could not be created."
    want = engine.translate([text])[0]
    assert client.post("/translate", json={"q": text, "source": "en", "target": "de"}).json() == {"translatedText": want}
    r = client.post("/translate", data={"q": text, "source": "en", "target": "de", "format": "text"})  # form post
    assert r.json() == {"translatedText": want}
    r = client.post("/translate", json={"q": [text, "Open the file"], "source": "auto", "target": "de",
                                         "alternatives": 2}).json()
    assert r["translatedText"] == engine.translate([text, "Open the file"])
    assert [d["language"] for d in r["detectedLanguage"]] == ["en", "en"] and all(len(a) == 2 for a in r["alternatives"])
    for body, message in (({"q": text, "source": "fr", "target": "de"}, "source 'fr' is not available"),
                          ({"q": text, "source": "en", "target": "es"}, "target 'es' is not available"),
                          ({"q": text, "source": "en"}, "missing target"),
                          ({"source": "en", "target": "de"}, "missing q"),
                          ({"q": text, "source": "en", "target": "de", "format": "rtf"}, "format must be")):
        r = client.post("/translate", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    assert client.get("/languages").json() == [{"code": "en", "name": "English", "targets": ["de"]},
                                               {"code": "de", "name": "German", "targets": []}]


def test_health_and_metrics(client):
    client.post("/v1/translate", json={"texts": ["Save the document?"]})
    client.post("/v1/translate", json={"texts": None})
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = client.get("/metrics").text
    for line in ('pyengine_requests_total{endpoint="/v1/translate",status="200"}',
                 'pyengine_requests_total{endpoint="/v1/translate",status="400"}',
                 "pyengine_request_latency_seconds_bucket", "pyengine_batch_rows_bucket",
                 "pyengine_target_tokens_total", "pyengine_source_tokens_total", "pyengine_queue_depth",
                 "pyengine_running_sentences"):
        assert line in text, line
    tokens = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("pyengine_target_tokens_total")]
    assert tokens and tokens[0] > 0


def test_limits(engine):
    config = ServerConfig(max_body_bytes=400, max_texts=3, max_chars=50, max_queue=4, retry_after=7)
    with TestClient(create_app(engine, config)) as c:
        r = c.post("/v1/translate", json={"texts": ["x" * 30] * 3 + ["y"] * 2})
        assert r.status_code == 413 and "5 texts exceed the limit of 3" in r.json()["error"]
        r = c.post("/v1/translate", json={"texts": ["z" * 51]})
        assert r.status_code == 413 and "51 characters, over the limit of 50" in r.json()["error"]
        r = c.post("/v1/translate", content=b'{"texts": ["' + b"a" * 500 + b'"]}',
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "exceeds the limit of 400 bytes" in r.json()["error"]
        scheduler = c.app.state.scheduler
        with scheduler._lock:  # the queue holds 3 of its 4 places: a request of 2 sentences is refused
            scheduler._queued += 3
        try:
            r = c.post("/v1/translate", json={"texts": ["Open the file", "Close"]})
        finally:
            with scheduler._lock:
                scheduler._queued -= 3
        assert r.status_code == 503 and r.headers["retry-after"] == "7" and "busy" in r.json()["error"]
        assert c.post("/v1/translate", json={"texts": ["Open the file"]}).status_code == 200


def test_request_timeout_answers_504_and_the_worker_goes_on(engine):
    texts = sample_lines()[:12]
    with TestClient(create_app(engine, ServerConfig(request_timeout=0.05))) as c:
        # 128 steps forced at beam 4 for 12 sentences: far past 0.05 s on any CPU
        forced = {"beam_size": 4, "max_decoding_length": 128, "min_decoding_length": 128}
        r = c.post("/v1/translate", json={"texts": texts, "options": forced})
        assert r.status_code == 504 and "within 0.05 s" in r.json()["error"]
        assert c.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("dtype, workers", [("int8", 1), ("int8", 2), ("bfloat16", 2), ("float32", 1)])
def test_load_on_loopback_64_clients_and_graceful_shutdown(dtype, workers):
    """64 clients × 3 requests at once against a real server process in each dtype (and with two worker processes of
    a thread each): every response is its own input's offline translation in that dtype, and the server's steps ran
    the decoder step and output path that translate() runs (engine.backends, against /health and /metrics); with two
    workers, both decoded and /metrics adds them up; then requests in flight when SIGTERM arrives still get their
    answers."""
    pool = pool_of_texts(48, seed=3)
    v1, libre = offline_translations("default", pool, OPTS, dtype)
    backends = pyengine.Engine.load("default", dtype=dtype).backends
    with ServerProcess("default", threads=2 // workers, extra=["--dtype", dtype, "--workers", str(workers)]) as server:
        outcomes = run_load(server.url, clients=64, requests=3, pool=pool, options=OPTS, seed=1, deadline_s=240)
        assert len(outcomes) == 64 * 3
        failed = [(o.status, o.error) for o in outcomes if o.status != 200]
        assert not failed, failed[:5]
        for o in outcomes:
            want = [libre[o.texts[0]]] if o.endpoint == "/translate" else [v1[t] for t in o.texts]
            assert o.translations == want, (o.endpoint, o.texts)
        metrics = post_metrics(server.url)
        assert max_batch_rows(metrics) > 8, "concurrent requests must have shared the running batch"
        health = get_json(server.url + "/health")
        assert health["backends"] == backends and health["workers"] == workers
        per_worker = counted(metrics, "pyengine_worker_sentences_total")
        assert len(per_worker) == workers and min(per_worker.values()) > 0, per_worker
        assert sum(per_worker.values()) == counted(metrics, "pyengine_sentences_total")[""]
        assert labelled(metrics, "pyengine_decoder_steps_total") == {backends["decoder_step"]}
        assert backends["output_layer"] in labelled(metrics, "pyengine_output_layer_total")
        # cohorts admitted while others ran joined their search state where the output layer is fused (runs.py)
        joined = counted(metrics, "pyengine_joined_cohorts_total")[""]
        assert (joined > 0) == (backends["output_layer"] == "fused-topk"), joined

        # graceful shutdown: requests in flight finish with their answers, then the process exits 0 (each forced to
        # its 48 steps, so that they are still decoding when /health is first asked on any machine)
        slow = {**OPTS, "min_decoding_length": OPTS["max_decoding_length"]}
        v1 = offline_translations("default", pool[:6], slow, dtype)[0]
        answers: list = []
        in_flight = [threading.Thread(target=lambda t=t: answers.append(
            (t, post(server.url + "/v1/translate", {"texts": [t], "options": slow}, 120)))) for t in pool[:6]]
        for t in in_flight:
            t.start()
        wait_for_running(server.url)
        code = server.stop()
        for t in in_flight:
            t.join()
    log = server.log.decode()
    assert code in (0, -signal.SIGTERM), log[-2000:]
    assert "Waiting for application shutdown" in log and "Application shutdown complete" in log, log[-2000:]
    assert sorted(t for t, _ in answers) == sorted(pool[:6])
    for text, (status, body) in answers:
        assert status == 200 and body["translations"][0]["translation"] == v1[text]


def test_target_prefix_through_the_server(client, engine):
    """target_prefix (an argument of translate_batch) works as an option of /v1/translate, per text."""
    texts = ["Open the file.", "Save your changes?", "Close"]
    prefixes = [None, "Ihre", ""]
    r = client.post("/v1/translate", json={"texts": texts, "options": {**OPTS, "target_prefix": prefixes}})
    assert r.status_code == 200, r.text
    want = engine.translate(texts, target_prefix=prefixes, **OPTS)
    assert [t["translation"] for t in r.json()["translations"]] == want and want[1].startswith("Ihre")


def counted(metrics: str, name: str) -> dict[str, float]:
    """A Prometheus counter's values by label value ("" for one without labels)."""
    return {(line.split('"')[1] if "{" in line else ""): float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")}


def labelled(metrics: str, name: str) -> set[str]:
    """The label values of a labelled Prometheus counter that counted something."""
    return {line.split('"')[1] for line in metrics.splitlines()
            if line.startswith(name + "{") and float(line.split()[-1]) > 0}


def get_json(url: str) -> dict:
    import json
    import urllib.request
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def post_metrics(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def max_batch_rows(metrics: str) -> float:
    """The largest bucket bound of pyengine_batch_rows that some step exceeded."""
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("pyengine_batch_rows_bucket"):
            bound = line.split('le="')[1].split('"')[0]
            counts[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    total = counts[float("inf")]
    return max((b for b, c in counts.items() if c < total), default=0.0)


def wait_for_running(url: str, timeout: float = 30.0) -> None:
    """Until the server reports a sentence queued or decoding (the requests are in flight)."""
    import json
    import time
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            h = json.loads(r.read())
        if h["running"] or h["queue_depth"]:
            return
        time.sleep(0.005)
    raise AssertionError("the requests never reached the worker")


def test_v1_documents(client, engine):
    texts = ["Open the file. Save the changes!", "<p>The <b>directory</b> could not be created.</p>"]
    r = client.post("/v1/translate", json={"texts": texts[:1], "split_sentences": True, "options": {"beam_size": 2}})
    assert r.json()["translations"][0]["translation"] == engine.translate(texts[:1], split_sentences=True,
                                                                          beam_size=2)[0]
    r = client.post("/v1/translate", json={"texts": texts[1:], "format": "html"})
    assert r.json()["translations"][0]["translation"] == engine.translate(texts[1:], format="html")[0]
    r = client.post("/v1/translate", json={"texts": texts[:1], "split_sentences": True,
                                           "options": {"beam_size": 2, "num_hypotheses": 2}})
    hyps = [h["translation"] for h in r.json()["translations"][0]["hypotheses"]]
    each = engine.translate_batch(["Open the file.", "Save the changes!"], beam_size=2, num_hypotheses=2)
    assert hyps == [f"{each[0].hypotheses[i]} {each[1].hypotheses[i]}" for i in range(2)]
    for body, message in (({"texts": texts[:1], "split_sentences": True, "options": {"return_scores": True}},
                           "'return_scores' applies to sentences"),
                          ({"texts": texts[:1], "split_sentences": "yes"}, "'split_sentences' must be a boolean"),
                          ({"texts": texts[:1], "format": "pdf"}, "'format' must be 'text' or 'html'"),
                          ({"texts": texts[:1], "options": {"format": "html"}}, "are fields of the request")):
        r = client.post("/v1/translate", json=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
