"""HTTP front end: FastAPI over one continuous-batching worker (pyengine.serving.scheduler) per engine.

Endpoints: POST /v1/translate (texts + decoding options), POST /translate and GET /languages (the
LibreTranslate API, so its clients work unchanged), GET /health, GET /metrics (Prometheus text).
Every refusal is a 4xx/5xx with a JSON body {"error": "..."} that names the problem; a refused request
never reaches the running batch, so it cannot harm the other requests in it. A request whose client goes away or
that times out is cancelled: its sentences leave the running batch at the next step. docs/server.md lists the
limits and what each bad input gets.

    pyengine serve -m MODEL --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.parse
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..config import ServerConfig
from ..engine import Engine, Translation
from ..errors import BatchMemoryError, InputError, OptionError, PyEngineError
from .scheduler import QueueFullError, RequestTooLargeError, Scheduler

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer" (logged, never sent)
# names of /v1/translate's top level (and of Scheduler.submit's arguments): not decoding options
TOP_LEVEL = ("texts", "source_lang", "target_lang")
log = logging.getLogger("pyengine.serving")


class HTTPError(Exception):
    """A refusal: HTTP status and the message of the JSON body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def read_json(request: Request, limit: int, timeout: float) -> Any:
    """The body as JSON (or a form for the LibreTranslate API), refused past `limit` bytes, when it does not arrive
    within `timeout` seconds, or when it is not UTF-8 / not JSON (NaN and Infinity, numbers of more than 4300
    digits and nesting deeper than Python's recursion limit included)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout} s ({len(body)} bytes came)") from None
    except ClientDisconnect:
        raise HTTPError(CLIENT_CLOSED, "the client closed the connection while sending the body") from None
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPError(400, f"request body is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return {k: v[0] if len(v) == 1 else v for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}
    try:
        return json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HTTPError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # integers past Python's digit limit, NaN / Infinity
        raise HTTPError(400, f"request body is not valid JSON: {exc}") from None


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_texts(texts: Any, field: str, config: ServerConfig) -> list[str]:
    """A non-empty list of strings within the limits; the first offending item is named."""
    if not isinstance(texts, list):
        raise HTTPError(400, f"'{field}' must be a list of strings, got {json_type(texts)}")
    if len(texts) > config.max_texts:
        raise HTTPError(413, f"{len(texts)} texts exceed the limit of {config.max_texts} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise HTTPError(400, f"{field}[{i}] must be a string, got {json_type(text)}")
        if len(text) > config.max_chars:
            raise HTTPError(413, f"{field}[{i}] has {len(text)} characters, over the limit of {config.max_chars}")
    return texts


def json_type(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


class Metrics:
    """Prometheus metrics of one app: request counts and latencies here, the worker's counters read at
    scrape time."""

    def __init__(self, scheduler: Scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("pyengine_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("pyengine_request_latency_seconds", "Time from arrival to answer",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_rows = Histogram("pyengine_batch_rows", "Decoder rows (sentences x beam) per decode step",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        scheduler.on_step = self.batch_rows.observe
        self.registry.register(_WorkerCollector(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCollector:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler.stats
        for name, doc, value in (("sentences", "Sentences admitted to a batch", s.sentences),
                                 ("source_tokens", "Source tokens admitted (EOS included)", s.source_tokens),
                                 ("target_tokens", "Target tokens generated (best hypothesis, EOS included)",
                                  s.target_tokens),
                                 ("decode_steps", "Decoder steps run", s.steps),
                                 ("cohorts", "Cohorts admitted (sentences encoded together)", s.cohorts),
                                 ("evictions", "Cohorts evicted and retried after running out of memory",
                                  s.evictions),
                                 ("cancelled_sentences", "Sentences taken out of the queue or the batch because "
                                  "their client went away or their request timed out", s.cancelled),
                                 ("failed_requests", "Requests failed by an error in the worker (logged)",
                                  s.failures)):
            yield CounterMetricFamily(f"pyengine_{name}", doc, value=value)
        # what the steps ran (the implementations translate() runs: engine.backends), and where their time went
        steps = CounterMetricFamily("pyengine_decoder_steps", "Decoder steps by implementation", labels=["implementation"])
        for name, n in s.decoder_steps.items():
            steps.add_metric([name], n)
        yield steps
        outputs = CounterMetricFamily("pyengine_output_layer", "Cohort steps by output path (fused-topk: output layer "
                                      "fused with log-softmax + top-k; logits; none: a target prefix token)",
                                      labels=["path"])
        for name, n in s.outputs.items():
            outputs.add_metric([name], n)
        yield outputs
        seconds = CounterMetricFamily("pyengine_worker_seconds", "Worker time by part (admit: encoding)",
                                      labels=["part"])
        for name, value in s.seconds.items():
            seconds.add_metric([name], value)
        yield seconds
        yield GaugeMetricFamily("pyengine_queue_depth", "Sentences waiting for a batch",
                                value=self.scheduler.queue_depth)
        yield GaugeMetricFamily("pyengine_running_sentences", "Sentences decoding now", value=self.scheduler.running)


def translation_json(t: Translation, scores: bool, n_best: int) -> dict[str, Any]:
    out: dict[str, Any] = {"translation": t.hypotheses[0]}
    if scores:
        out["score"] = t.scores[0]
    if n_best > 1:
        out["hypotheses"] = [{"translation": h, **({"score": s} if scores else {})}
                             for h, s in zip(t.hypotheses, t.scores)]
    return out


def create_app(engine: Engine, config: ServerConfig = ServerConfig(), scheduler: Scheduler | None = None) -> FastAPI:
    """The ASGI app. Without `scheduler`, its lifespan starts a worker thread and, at shutdown, lets it finish what
    it holds; with one, the caller runs that worker (`serve` runs it in the thread that loaded the model)."""
    owned = scheduler is None
    scheduler = scheduler or Scheduler(engine, max_queue=config.max_queue)
    metrics = Metrics(scheduler)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if owned:
            scheduler.start()
        yield
        if owned:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="pyengine", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config

    async def run(http: Request, texts: list[str], **options: Any) -> list[Translation]:
        """Through the worker, with the request timeout; errors become HTTPError. A request whose client goes away
        or that times out is cancelled: the worker takes its sentences out of the batch."""
        try:
            request, future = scheduler.submit(texts, **options)
        except RequestTooLargeError as exc:
            raise HTTPError(413, str(exc)) from None
        except QueueFullError as exc:
            raise HTTPError(503, f"server busy: {exc}", {"Retry-After": str(config.retry_after)}) from None
        except PyEngineError as exc:  # input and option errors, named by the engine
            raise HTTPError(400, str(exc)) from None
        answer, gone = asyncio.wrap_future(future), asyncio.ensure_future(disconnected(http))
        try:
            await asyncio.wait((answer, gone), timeout=config.request_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer.done():
            try:
                return answer.result()
            except BatchMemoryError as exc:
                raise HTTPError(507, str(exc)) from None
            except (InputError, OptionError) as exc:  # found when its sentences were admitted
                raise HTTPError(400, str(exc)) from None
        scheduler.cancel(request)
        answer.cancel()
        if gone.done() and not gone.cancelled():
            raise HTTPError(CLIENT_CLOSED, "the client closed the connection; its request was cancelled")
        raise HTTPError(504, f"translation did not finish within {config.request_timeout} s") from None

    async def answer(endpoint: str, request: Request, handler) -> Response:
        start = time.monotonic()
        try:
            body = await read_json(request, config.max_body_bytes, config.read_timeout)
            response: Response = JSONResponse(await handler(request, body))
        except HTTPError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 with its message, the server stays up
            log.exception("%s failed", endpoint)
            response = JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        return response

    async def v1_translate(http: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {json_type(body)}")
        unknown = sorted(set(body) - {"texts", "options", "source_lang", "target_lang"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; known: ['options', 'source_lang', 'target_lang', 'texts']")
        if "texts" not in body:
            raise HTTPError(400, "missing field 'texts'")
        texts = check_texts(body["texts"], "texts", config)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise HTTPError(400, f"'options' must be an object, got {json_type(options)}")
        misplaced = [name for name in TOP_LEVEL if name in options]
        if misplaced:
            raise HTTPError(400, f"{misplaced} are fields of the request, not decoding options: move them out of "
                                 "'options'")
        for name in ("source_lang", "target_lang"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise HTTPError(400, f"'{name}' must be a string, got {json_type(body[name])}")
        results = await run(http, texts, source_lang=body.get("source_lang"), target_lang=body.get("target_lang"),
                            **options)
        scores, n_best = bool(options.get("return_scores")), len(results[0].hypotheses) if results else 1
        return {"translations": [translation_json(t, scores, n_best) for t in results]}

    async def libretranslate(http: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {json_type(body)}")
        if "q" not in body:
            raise HTTPError(400, "Invalid request: missing q parameter")
        q = body["q"]
        texts = check_texts(q if isinstance(q, list) else [q], "q", config)
        if body.get("format", "text") != "text":
            raise HTTPError(400, f"format {body.get('format')!r} is not supported; use 'text'")
        alternatives = libre_alternatives(body.get("alternatives", 0))
        source, target = body.get("source", "auto"), body.get("target")
        if not isinstance(target, str):
            raise HTTPError(400, "Invalid request: missing target parameter")
        if not isinstance(source, str):
            raise HTTPError(400, f"source must be a string, got {json_type(source)}")
        options: dict[str, Any] = {}
        if alternatives:
            options = {"beam_size": max(alternatives + 1, engine.defaults.beam_size), "num_hypotheses": alternatives + 1}
        results = await run(http, texts, **language_options(engine, source, target), **options)
        out: dict[str, Any] = {"translatedText": [t.hypotheses[0] for t in results]}
        if alternatives:
            out["alternatives"] = [t.hypotheses[1:] for t in results]
        if not isinstance(q, list):
            out = {k: v[0] for k, v in out.items()}
        if source == "auto":
            out["detectedLanguage"] = {"confidence": 100.0, "language": default_source(engine)}
        return out

    @app.post("/v1/translate")
    async def translate_v1(request: Request) -> Response:
        return await answer("/v1/translate", request, v1_translate)

    @app.post("/translate")
    async def translate_libre(request: Request) -> Response:
        return await answer("/translate", request, libretranslate)

    @app.get("/languages")
    async def languages() -> list[dict[str, Any]]:
        return language_list(engine)

    @app.get("/health")
    async def health() -> Response:
        alive = scheduler.alive
        return JSONResponse({"status": "ok" if alive else "worker stopped", "model": engine.source,
                             "backends": engine.backends, "queue_depth": scheduler.queue_depth,
                             "running": scheduler.running}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_PROMETHEUS)

    return app


MAX_ALTERNATIVES = 8


def libre_alternatives(value: Any) -> int:
    """LibreTranslate's `alternatives`: an integer, or its digits as a form sends them; below 0 counts as 0."""
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,9}\s*", value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise HTTPError(400, f"Invalid request: alternatives must be an integer, got {value!r}")
    if value > MAX_ALTERNATIVES:
        raise HTTPError(400, f"Invalid request: alternatives must be <= {MAX_ALTERNATIVES}, got {value}")
    return max(0, value)


def default_source(engine: Engine) -> str | None:
    tok = engine.tokenizer
    return getattr(tok, "source_lang", None) or getattr(tok, "language_pair", (None, None))[0]


def language_options(engine: Engine, source: str, target: str) -> dict[str, Any]:
    """LibreTranslate's source/target for this model: language codes of a multilingual model, or a check
    against the pair a bilingual model translates."""
    tok = engine.tokenizer
    if hasattr(tok, "lang_id"):  # multilingual: the codes select the languages
        return {"source_lang": None if source == "auto" else source, "target_lang": target}
    pair = getattr(tok, "language_pair", (None, None))
    if pair[0] is not None and source not in ("auto", pair[0]):
        raise HTTPError(400, f"this model translates {pair[0]} to {pair[1]}; source {source!r} is not available")
    if pair[1] is not None and target != pair[1]:
        raise HTTPError(400, f"this model translates {pair[0]} to {pair[1]}; target {target!r} is not available")
    return {}


def language_list(engine: Engine) -> list[dict[str, Any]]:
    """LibreTranslate's GET /languages."""
    tok = engine.tokenizer
    if hasattr(tok, "lang_ids"):
        codes = sorted(tok.lang_ids)
        return [{"code": c, "name": c, "targets": [t for t in codes if t != c]} for c in codes]
    source, target = getattr(tok, "language_pair", (None, None))
    if source is None or target is None:
        return []
    return [{"code": source, "name": source, "targets": [target]}, {"code": target, "name": target, "targets": []}]


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's httptools protocol with a deadline for a request's headers: a connection that opens and sends
    nothing, or stalls inside its headers, gets 408 and is closed after `timeout` seconds instead of being held
    forever (uvicorn's own keep-alive timeout only starts after a first response). The body's deadline is
    read_json's."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps({"error": f"request headers not received within {timeout} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        header_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self.header_deadline is None:
                self.header_deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def _expired(self) -> None:
            self.header_deadline = None
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete headers within %s s", timeout)
                self.transport.write(answer)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig = ServerConfig(),
          graceful_seconds: float = 30.0) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish first (up to graceful_seconds).

    The worker runs in this thread, the one that loaded the model, and the HTTP front end (uvicorn, which answers
    requests and does no model work) in another: see Scheduler.run for why the model's work stays in one thread."""
    import signal
    import threading

    import uvicorn

    scheduler = Scheduler(engine, max_queue=config.max_queue)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config, scheduler), host=host, port=port,
                                           log_level="info", timeout_graceful_shutdown=graceful_seconds,
                                           http=header_timeout_protocol(config.read_timeout)))
    front = threading.Thread(target=server.run, name="pyengine-http")
    # uvicorn installs no signal handlers outside the main thread: this thread takes the signals and asks it to
    # shut down gracefully (stop accepting, let requests in flight finish; the worker keeps serving them)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    front.start()
    try:
        scheduler.run(until=lambda: not front.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        front.join()
        scheduler.stop()
    if not server.started:
        raise PyEngineError(f"the HTTP server did not start on {host}:{port} (see the log above)")
