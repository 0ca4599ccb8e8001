"""Replicated serving on Ray Serve: `pyengine serve --ray ADDRESS --replicas N`.

Each replica is a Ray actor holding one Engine with its own continuous-batching worker (serving.Scheduler) and the
same FastAPI app `pyengine serve` runs, so both APIs (native and LibreTranslate), the page and keys behave the same.
An ingress deployment spreads requests over the replicas through Serve's handles and, since translating is
idempotent, sends a request whose replica died under it to another one; Serve restarts the dead replica (its health
check is the worker's). Nothing is left hanging: after the retries, 503 with the reason.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from ..config import ServerConfig
from ..errors import PyEngineError
from . import require_ray

APP_NAME = "pyengine"
HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection"}
RETRIES = 3  # times a request is sent to another replica after the one serving it died


def deployment(model: str = "default", dtype: str = "float32", threads: int = 1, replicas: int = 2,
               config: ServerConfig = ServerConfig(), engine_options: dict[str, Any] | None = None,
               retries: int = RETRIES):
    """A bound Ray Serve application: an ingress (no CPU of its own) in front of `replicas` copies of the pyengine
    server (`threads` CPUs each). Translation is idempotent, so a request whose replica dies under it is sent to
    another one, up to `retries` times, and only then answered 503 with the reason."""
    require_ray()
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    if config.req_limit:
        raise PyEngineError("request limits (--req-limit) are counted per process and would multiply by the "
                            "replicas; with --ray, limit requests in front of Serve")
    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    @serve.deployment(name="PyengineReplica", num_replicas=replicas, ray_actor_options={"num_cpus": threads},
                      max_ongoing_requests=config.max_texts * 8, health_check_period_s=2,
                      health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
    class PyengineReplica:
        def __init__(self):
            import httpx
            import torch

            from ..engine import Engine
            from ..serving.app import create_app
            from ..serving.scheduler import Scheduler

            torch.set_num_threads(threads)
            self.engine = Engine.load(model, dtype=dtype, **(engine_options or {}))
            self.scheduler = Scheduler(self.engine, max_queue=config.max_queue).start()
            app = create_app(self.engine, config, self.scheduler)
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica",
                                            timeout=None)

        async def answer(self, method: str, path: str, query: str, headers: list[tuple[str, str]],
                         body: bytes) -> tuple[int, dict[str, str], bytes]:
            """The request, answered by this replica's own app: status, headers, body."""
            reply = await self.client.request(method, path, params=query, content=body, headers=headers)
            return reply.status_code, {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}, \
                reply.content

        def check_health(self) -> None:
            if not self.scheduler.alive:
                raise RuntimeError("the replica's translation worker stopped")

    @serve.deployment(name="PyengineIngress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=config.max_texts * 8 * replicas)
    class PyengineIngress:
        def __init__(self, replica):
            self.replica = replica

        async def __call__(self, request: Request) -> Response:
            import asyncio

            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
            body = await request.body()
            reason = ""
            for attempt in range(retries + 1):
                try:
                    status, reply_headers, content = await self.replica.answer.remote(
                        request.method, request.url.path, str(request.query_params), headers, body)
                    return Response(content, status_code=status, headers=reply_headers)
                except lost as exc:  # the replica died under the request: another one takes it
                    reason = f"{type(exc).__name__}"
                    await asyncio.sleep(0.2 * (attempt + 1))
            return JSONResponse({"error": f"the replicas serving this request died {retries + 1} times ({reason}); "
                                          "it was not translated: send it again"}, status_code=503,
                                headers={"Retry-After": "2"})

    return PyengineIngress.bind(PyengineReplica.bind())


def serve_on_ray(address: str = "auto", host: str = "127.0.0.1", port: int = 8000, replicas: int = 2,
                 model: str = "default", dtype: str = "float32", threads: int = 1,
                 config: ServerConfig = ServerConfig(), engine_options: dict[str, Any] | None = None) -> None:
    """Deploy on the cluster at `address` ("auto": start a local one) and serve until SIGINT/SIGTERM, then take
    the application down."""
    ray = require_ray()
    from ray import serve

    app = deployment(model, dtype, threads, replicas, config, engine_options)
    if not ray.is_initialized():
        ray.init(address=None if address == "auto" else address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    print(f"pyengine: serving on http://{host}:{port} with {replicas} replicas on Ray", flush=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.delete(APP_NAME)
        serve.shutdown()
