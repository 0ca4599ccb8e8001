"""HTTP front end: FastAPI over one continuous-batching worker (pyengine.serving.scheduler) per engine.

Endpoints: POST /v1/translate (texts + decoding options), POST /v1/score; LibreTranslate's API (POST /translate,
/detect, /translate_file, GET /languages, /frontend/settings: libretranslate.py), so its clients work unchanged;
the page at /, GET /health, GET /metrics (Prometheus text: metrics.py). Body reading and shape checks: http.py;
keys and limits: access.py.
Every refusal is a 4xx/5xx with a JSON body {"error": "..."} that names the problem; a refused request
never reaches the running batch, so it cannot harm the other requests in it. A request whose client goes away or
that times out is cancelled: its sentences leave the running batch at the next step. docs/server.md lists the
limits and what each bad input gets.

    pyengine serve -m MODEL --host 127.0.0.1 --port 8000
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.formparsers import MultiPartParser

from ..config import ServerConfig
from ..documents import Documents, Plan, TextPlan, render_all
from ..documents.files import plan_file
from ..engine import Engine, Translation
from ..errors import BatchMemoryError, InputError, PyEngineError
from .access import Access, HTTPError
from .files import FileStore
from .http import CLIENT_CLOSED, check_texts, disconnected, json_type, read_body, read_json
from .libretranslate import frontend, language_list, language_options, libre_alternatives
from .metrics import CONTENT_TYPE_PROMETHEUS, Metrics
from .request import SchedulerStats
from .scheduler import QueueFullError, RequestTooLargeError, Scheduler

if TYPE_CHECKING:
    from .worker_link import WorkerClient

log = logging.getLogger("pyengine.serving")


def translation_json(t: Translation, scores: bool, n_best: int) -> dict[str, Any]:
    out: dict[str, Any] = {"translation": t.hypotheses[0]}
    if scores:
        out["score"] = t.scores[0]
    if n_best > 1:
        out["hypotheses"] = [{"translation": h, **({"score": s} if scores else {})}
                             for h, s in zip(t.hypotheses, t.scores)]
    return out


def create_app(engine: Engine, config: ServerConfig = ServerConfig(),
               scheduler: Scheduler | WorkerClient | None = None) -> FastAPI:
    """The ASGI app. Without `scheduler`, its lifespan starts a worker thread and, at shutdown, lets it finish what
    it holds; with one, the caller runs that worker (`serve` runs it in another process: a WorkerClient)."""
    owned = scheduler is None
    scheduler = scheduler or Scheduler(engine, max_queue=config.max_queue)
    metrics = Metrics(scheduler)
    documents: Documents = engine.documents
    access = Access(config.api_keys, config.req_limit)
    files = FileStore(config.files_kept)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if owned:
            scheduler.start()
        yield
        files.close()
        if owned:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="pyengine", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.config = scheduler, metrics, config

    async def run(http: Request, texts: list[str], plans: list[Plan] | None = None, **options: Any) -> list[Translation]:
        """Through the worker, with the request timeout; errors become HTTPError. A request whose client goes away
        or that times out is cancelled: the worker takes its sentences out of the batch. `plans`: the documents the
        texts are the sentences of (an error then names the document)."""
        try:  # an in-process worker refuses here; a worker process through the future
            request, future = scheduler.submit(texts, **options)
        except PyEngineError as exc:
            raise http_error(exc, plans) from None
        answer, gone = asyncio.wrap_future(future), asyncio.ensure_future(disconnected(http))
        try:
            await asyncio.wait((answer, gone), timeout=config.request_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if answer.done():
            try:
                return answer.result()
            except PyEngineError as exc:
                raise http_error(exc, plans) from None
        scheduler.cancel(request)
        answer.cancel()
        if gone.done() and not gone.cancelled():
            raise HTTPError(CLIENT_CLOSED, "the client closed the connection; its request was cancelled")
        raise HTTPError(504, f"translation did not finish within {config.request_timeout} s") from None

    def http_error(exc: PyEngineError, plans: list[Plan] | None = None) -> HTTPError:
        """The answer to a request the worker refused or failed with an error of the caller's."""
        if isinstance(exc, RequestTooLargeError):
            return HTTPError(413, str(exc))
        if isinstance(exc, QueueFullError):
            return HTTPError(503, f"server busy: {exc}", {"Retry-After": str(config.retry_after)})
        if isinstance(exc, BatchMemoryError):
            return HTTPError(507, str(exc))
        if plans is not None and isinstance(exc, InputError):
            exc = Documents.locate(exc, plans)
        return HTTPError(400, str(exc))

    async def run_documents(http: Request, plans: list[Plan], source_lang: str | None = None,
                            target_lang: str | None = None, hypotheses: int = 1, **options: Any) -> list[list[str]]:
        """The plans' sentences through the worker as one request; per plan, its `hypotheses` renderings."""
        segments = [s for p in plans for s in p.segments]
        options = documents.alignment_options(plans, options)
        results = await run(http, segments, plans, source_lang=source_lang, target_lang=target_lang, **options)
        def render() -> list[list[str]]:  # plain text: joins on the event loop (µs); markup's transfer: a thread
            return [render_all(plans, results, h) for h in range(hypotheses)]
        rendered = render() if all(isinstance(p, TextPlan) for p in plans) else await asyncio.to_thread(render)
        return [[r[i] for r in rendered] for i in range(len(plans))]

    async def make_plans(texts: list[str], fmt: str, split: bool, source_lang: str | None, field: str,
                         max_input_length: int | None = None) -> list[Plan]:
        try:
            if fmt == "text" and sum(map(len, texts)) <= INLINE_PLAN_CHARS:  # a thread's hand-offs cost more
                return documents.plans(texts, fmt, split, source_lang, max_input_length)
            return await asyncio.to_thread(documents.plans, texts, fmt, split, source_lang, max_input_length)
        except PyEngineError as exc:
            if isinstance(exc, InputError) and exc.index is not None:
                raise HTTPError(400, f"{field}[{exc.index}]: {exc.message}") from None
            raise HTTPError(400, str(exc)) from None

    def gate(http: Request, body: Any = None) -> None:
        """API key and request limit (403 / 429)."""
        key = body.get("api_key") if isinstance(body, dict) else None
        if key is not None and not isinstance(key, str):
            raise HTTPError(400, f"api_key must be a string, got {json_type(key)}")
        header = http.headers.get("authorization", "")
        key = key or http.headers.get("x-api-key") or (header[7:].strip() if header.lower().startswith("bearer ")
                                                        else None)
        access.check(key, http.client.host if http.client else "")

    async def answer(endpoint: str, request: Request, handler, read) -> Response:
        start = time.monotonic()
        try:
            body = await read(request)
            result = await handler(request, body)
            response: Response = result if isinstance(result, Response) else JSONResponse(result)
        except HTTPError as exc:
            response = JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        except Exception as exc:  # noqa: BLE001 - a bug answers 500 with its message, the server stays up
            log.exception("%s failed", endpoint)
            response = JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        return response

    def json_body(request: Request):
        return read_json(request, config.max_body_bytes, config.read_timeout)

    def checked_object(http: Request, body: Any, fields) -> None:
        """A /v1 body: a JSON object of known fields, past the key and rate gate (400 / 403 / 429)."""
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {json_type(body)}")
        gate(http)
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; known: {sorted(fields)}")

    async def v1_translate(http: Request, body: Any) -> dict[str, Any]:
        checked_object(http, body, V1_FIELDS)
        if "texts" not in body:
            raise HTTPError(400, "missing field 'texts'")
        texts = check_texts(body["texts"], "texts", config)
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise HTTPError(400, f"'options' must be an object, got {json_type(options)}")
        misplaced = [name for name in V1_FIELDS if name in options]
        if misplaced:
            raise HTTPError(400, f"{misplaced} are fields of the request, not decoding options: move them out of "
                                 "'options'")
        for name in ("source_lang", "target_lang"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise HTTPError(400, f"'{name}' must be a string, got {json_type(body[name])}")
        fmt, split = body.get("format", "text"), body.get("split_sentences", False)
        if fmt not in ("text", "html"):
            raise HTTPError(400, f"'format' must be 'text' or 'html', got {fmt!r}")
        if not isinstance(split, bool):
            raise HTTPError(400, f"'split_sentences' must be a boolean, got {json_type(split)}")
        langs = {"source_lang": body.get("source_lang"), "target_lang": body.get("target_lang")}
        if fmt == "text" and not split:  # the sentence API: Engine.translate_batch
            results = await run(http, texts, **langs, **options)
            scores, n_best = bool(options.get("return_scores")), len(results[0].hypotheses) if results else 1
            return {"translations": [translation_json(t, scores, n_best) for t in results]}
        for name in DOCUMENT_REFUSES:
            if options.get(name):
                raise HTTPError(400, f"option {name!r} applies to sentences: it needs format 'text' and "
                                     "split_sentences false")
        plans = await make_plans(texts, fmt, True, langs["source_lang"], "texts", options.get("max_input_length"))
        n = engine.options(**options).num_hypotheses if options else engine.defaults.num_hypotheses
        rendered = await run_documents(http, plans, **langs, hypotheses=n, **options)
        return {"translations": [{"translation": r[0], **({"hypotheses": [{"translation": h} for h in r]}
                                                         if n > 1 else {})} for r in rendered]}

    async def libretranslate(http: Request, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {json_type(body)}")
        gate(http, body)
        if "q" not in body:
            raise HTTPError(400, "Invalid request: missing q parameter")
        q = body["q"]
        texts = check_texts(q if isinstance(q, list) else [q], "q", config)
        fmt = body.get("format") or "text"
        if fmt not in ("text", "html"):
            raise HTTPError(400, f"Invalid request: format must be 'text' or 'html', got {fmt!r}")
        alternatives = libre_alternatives(body.get("alternatives", 0))
        source, target = body.get("source") or "auto", body.get("target")
        if not isinstance(target, str):
            raise HTTPError(400, "Invalid request: missing target parameter")
        if not isinstance(source, str):
            raise HTTPError(400, f"source must be a string, got {json_type(source)}")
        detected = await asyncio.to_thread(lambda: [documents.detect_source(t) for t in texts]) \
            if source == "auto" else None
        sources = [d.language for d in detected] if detected else [source] * len(texts)
        options: dict[str, Any] = {}
        if alternatives:
            options = {"beam_size": max(alternatives + 1, engine.defaults.beam_size), "num_hypotheses": alternatives + 1}
        out_texts: list[list[str]] = [[] for _ in texts]
        groups: dict[str | None, list[int]] = {}
        for i, lang in enumerate(sources):  # a list q may hold several detected languages: one request each
            groups.setdefault(lang, []).append(i)

        async def translate_group(lang: str | None, members: list[int]) -> None:
            langs = language_options(engine, lang or "auto", target)
            plans = await make_plans([texts[i] for i in members], fmt, True, langs.get("source_lang"), "q")
            for i, r in zip(members, await run_documents(http, plans, hypotheses=alternatives + 1, **langs,
                                                         **options)):
                out_texts[i] = r
        await asyncio.gather(*(translate_group(lang, m) for lang, m in groups.items()))
        out: dict[str, Any] = {"translatedText": [r[0] for r in out_texts]}
        if alternatives:
            out["alternatives"] = [r[1:] for r in out_texts]
        if detected:
            out["detectedLanguage"] = [{"confidence": d.confidence, "language": d.language} for d in detected]
        if not isinstance(q, list):
            out = {k: v[0] for k, v in out.items()}
        return out

    async def detect(http: Request, body: Any) -> Any:
        if not isinstance(body, dict):
            raise HTTPError(400, f"request body must be a JSON object, got {json_type(body)}")
        gate(http, body)
        if "q" not in body:
            raise HTTPError(400, "Invalid request: missing q parameter")
        q = body["q"]
        texts = check_texts(q if isinstance(q, list) else [q], "q", config)
        ranked = await asyncio.to_thread(lambda: [documents.detector.rank(t) for t in texts])
        out = [[{"confidence": d.confidence, "language": d.language} for d in r] for r in ranked]
        return out if isinstance(q, list) else out[0]

    async def read_form(request: Request) -> Any:
        body = await read_body(request, config.max_file_bytes + FORM_OVERHEAD, config.read_timeout)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPError(400, "Invalid request: send the file as multipart/form-data (field 'file')")

        async def chunks():
            yield body
        try:
            return await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
        except Exception as exc:  # noqa: BLE001 - python-multipart's errors: a malformed form
            raise HTTPError(400, f"Invalid request: not a multipart form ({exc})") from None

    async def translate_file(http: Request, form: Any) -> dict[str, Any]:
        gate(http, {"api_key": form.get("api_key")} if form.get("api_key") else None)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, "Invalid request: missing file parameter")
        source, target = form.get("source") or "auto", form.get("target")
        if not target:
            raise HTTPError(400, "Invalid request: missing target parameter")
        data = await upload.read()
        if len(data) > config.max_file_bytes:
            raise HTTPError(413, f"file of {len(data)} bytes exceeds the limit of {config.max_file_bytes} bytes")
        name = upload.filename or "file.txt"
        langs = language_options(engine, source, target)  # a language the model lacks: 400 before the work
        try:
            plan = await asyncio.to_thread(plan_file, documents, name, data, langs.get("source_lang"))
        except PyEngineError as exc:
            raise HTTPError(400, f"{name}: {exc}") from None
        if source == "auto":  # the file's language, from its first sentences
            detected = documents.detect_source(" ".join(plan.segments[:50])).language
            langs = language_options(engine, detected or "auto", target)
        options = documents.alignment_options([plan], {})
        results = await run(http, plan.segments, **langs, **options)
        translated = await asyncio.to_thread(plan.render, results)
        stored = files.put(name, translated)
        return {"translatedFileUrl": f"{str(http.base_url).rstrip('/')}/download_file/{stored}"}

    async def v1_score(http: Request, body: Any) -> dict[str, Any]:
        checked_object(http, body, SCORE_FIELDS)
        for name in ("sources", "targets"):
            if name not in body:
                raise HTTPError(400, f"missing field '{name}'")
        sources, targets = check_texts(body["sources"], "sources", config), check_texts(body["targets"], "targets",
                                                                                       config)
        args = {k: body[k] for k in ("source_lang", "target_lang", "offset") if body.get(k) is not None}
        try:  # in the worker's thread, between two decoder steps
            results = await asyncio.wait_for(asyncio.wrap_future(scheduler.score(sources, targets, **args)),
                                             config.request_timeout)
        except TimeoutError:
            raise HTTPError(504, f"scoring did not finish within {config.request_timeout} s") from None
        except PyEngineError as exc:
            raise http_error(exc) from None
        pieces = getattr(engine.tokenizer, "decoder", {})
        return {"scores": [{"score": r.normalized_score, "cumulated_score": r.cumulated_score,
                            "log_probs": r.log_probs, "tokens": [pieces.get(t, "") for t in r.tokens]}
                           for r in results]}

    def post(path: str, handler, read=json_body) -> None:
        """POST `path`: the body read by `read`, answered by `handler` through `answer` (errors, metrics)."""
        async def endpoint(request: Request) -> Response:
            return await answer(path, request, handler, read)
        # a plain Starlette route: FastAPI's dependency layer cost ~0.2 of the front end's ~0.6 ms a request
        app.add_route(path, endpoint, methods=["POST"], name=handler.__name__)

    post("/v1/translate", v1_translate)
    post("/v1/score", v1_score)
    post("/translate", libretranslate)
    post("/detect", detect)
    post("/translate_file", translate_file, read_form)

    @app.get("/download_file/{name}")
    async def download_file(name: str) -> Response:
        path = files.get(name)
        if path is None:
            return JSONResponse({"error": f"no translated file {name!r} (files are kept for the last "
                                          f"{config.files_kept} translations)"}, status_code=404)
        return FileResponse(path, filename=name.split("-", 1)[1])

    @app.get("/languages")
    async def languages() -> list[dict[str, Any]]:
        return language_list(engine)

    @app.get("/frontend/settings")
    async def frontend_settings() -> dict[str, Any]:
        return frontend(engine, config, access)

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> Response:
        state = await worker_state()
        return JSONResponse({"status": "ok" if state["alive"] else "worker stopped", "model": engine.source,
                             "backends": engine.backends, "queue_depth": state["queue_depth"],
                             "running": state["running"], "workers": len(state["workers"])},
                            status_code=200 if state["alive"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(await worker_state()), media_type=CONTENT_TYPE_PROMETHEUS)

    async def worker_state() -> dict[str, Any]:
        """The worker's counters (Scheduler.state), awaited: a worker in another process answers between rounds."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(scheduler.state()), STATE_TIMEOUT)
        except Exception:  # noqa: BLE001 - gone or stuck: /health says so
            return {"alive": False, "queue_depth": 0, "running": 0, "stats": SchedulerStats(), "workers": []}

    return app


STATE_TIMEOUT = 10.0  # seconds /health and /metrics wait for the worker's counters
INLINE_PLAN_CHARS = 2000  # plain text this short is split on the event loop (µs); longer text and markup in a thread
FORM_OVERHEAD = 64 * 1024  # multipart headers and the other fields, beyond the file itself
# /v1/translate's top-level fields (and the names Scheduler.submit takes besides decoding options)
V1_FIELDS = ("texts", "options", "source_lang", "target_lang", "format", "split_sentences")
SCORE_FIELDS = ("sources", "targets", "source_lang", "target_lang", "offset")
# decoding options that describe one sentence's decoding: refused for documents (split or HTML)
DOCUMENT_REFUSES = ("return_scores", "return_attention", "target_prefix")
PAGE = Path(__file__).parent / "static" / "index.html"
