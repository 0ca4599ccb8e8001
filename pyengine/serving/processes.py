"""`pyengine serve`'s processes: the worker(s) that decode and the HTTP front end, forked after the model loads.

This process (the one that loaded the model) is worker 0 and runs its Scheduler in its main thread; the HTTP front
end is a forked child (worker_link.py says why); `--workers N` forks N-1 more workers, each with its own running
batch and `--threads` threads (CTranslate2's inter_threads x intra_threads): the model's weights are shared
copy-on-write, and one worker's thread preempted by the front end or a client stalls that worker alone instead of a
parallel region spanning every core (docs/server.md measures both layouts). The front end sends each request
whole to the worker with the fewest sentences in flight (WorkerPool).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection, Pipe

from ..config import ServerConfig
from ..errors import PyEngineError
from .scheduler import Scheduler
from .worker_link import WorkerBridge, WorkerClient, WorkerPool

log = logging.getLogger("pyengine.serving")

FRONT_END_NOT_STARTED = 3  # the front end's exit code when uvicorn could not start (port taken)
WORKER_LOST = 4  # the front end's exit code when a worker process died under it


def serve(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig = ServerConfig(),
          graceful_seconds: float = 30.0) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish first (up to graceful_seconds).

    A signal here is passed to the front end once, as SIGTERM (a second one forces it, as uvicorn does): it stops
    accepting, lets the requests in flight finish (the workers keep serving them), and exits; then the workers
    finish and this returns. A worker that dies (SIGKILL, the OOM killer) makes the front end fail what is in flight
    (503) and exit, so nothing keeps listening with a worker missing behind it."""
    if not hasattr(os, "fork"):
        raise PyEngineError("pyengine serve forks its HTTP front end (os.fork): Linux or macOS; on this platform embed "
                            "create_app(engine) in an ASGI server instead")
    if config.workers < 1:
        raise PyEngineError(f"workers must be at least 1, got {config.workers}")
    links = [Pipe() for _ in range(config.workers)]  # (worker's end, front end's end) per worker
    front = _fork(lambda: _run_front_end(engine, [f for _, f in links], host, port, config, graceful_seconds),
                  close=[w for w, _ in links])
    for _, f in links:
        f.close()
    helpers = [fork_worker(engine, config, links, k) for k in range(1, config.workers)]
    for w, _ in links[1:]:
        w.close()
    scheduler = Scheduler(engine, max_queue=config.max_queue)
    WorkerBridge(scheduler, links[0][0])
    status: list[int] = []

    def front_end_gone() -> bool:
        if not status:
            done, wait_status = os.waitpid(front, os.WNOHANG)
            if done:
                status.append(os.waitstatus_to_exitcode(wait_status))
        return bool(status)

    def forward(signum, frame) -> None:
        try:
            os.kill(front, signal.SIGTERM)
        except ProcessLookupError:
            pass
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        scheduler.run(until=front_end_gone)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not status:
            forward(signal.SIGTERM, None)
            status.append(os.waitstatus_to_exitcode(os.waitpid(front, 0)[1]))
        scheduler.stop()
        links[0][0].close()
        for pid in helpers:  # each ends once the front end's end of its pipe is closed and it is idle
            os.waitpid(pid, 0)
    if status[0] == FRONT_END_NOT_STARTED:
        raise PyEngineError(f"the HTTP server did not start on {host}:{port} (see the log above)")
    if status[0] == WORKER_LOST:
        raise PyEngineError("a worker process died (see the log above); the server stopped")


def _fork(run, close: list[Connection]) -> int:
    """Fork a child that closes the pipe ends in `close` (the others' ends), runs `run` (its exit code) and exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for conn in close:
            conn.close()
        code = run()
    except BaseException:  # noqa: BLE001 - logged; the parent sees the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fork_worker(engine, config: ServerConfig, links: list[tuple[Connection, Connection]], k: int) -> int:
    """A worker process (its pid) for links[k] (pipes as (worker's end, front end's end)): a Scheduler over the
    worker's end until the front end's is closed and it is idle. This process keeps its ends open."""
    own = links[k][0]
    return _fork(lambda: _run_worker(engine, config, own), close=[e for link in links for e in link if e is not own])


def _run_worker(engine, config: ServerConfig, conn: Connection) -> int:
    import torch

    # a terminal's Ctrl-C, or a service manager's SIGTERM to every process, reaches worker 0, which passes it on to
    # the front end; this worker ends when the front end has closed its pipe and its batch is done
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    threads = torch.get_num_threads()
    scheduler = Scheduler(engine, max_queue=config.max_queue)
    bridge = WorkerBridge(scheduler, conn)

    def run() -> None:
        torch.set_num_threads(threads)
        scheduler.run(until=lambda: bridge.closed)
    if threads == 1:
        run()
    else:  # the parent's OpenMP team did not survive the fork (its main thread's would hang): a new thread has none
        thread = threading.Thread(target=run, name="pyengine-worker")
        thread.start()
        thread.join()
    return 0


def _run_front_end(engine, conns: list[Connection], host: str, port: int, config: ServerConfig,
                   graceful_seconds: float) -> int:
    """The forked front end: uvicorn in its main thread (its own signal handling) over the workers' clients."""
    import torch
    import uvicorn

    from .app import create_app
    from .http import header_timeout_protocol

    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches worker 0 only, which passes it on once
    torch.set_num_threads(1)  # the parent's OpenMP team does not exist here: never start a parallel region
    server: uvicorn.Server | None = None
    gone: list[bool] = []

    def lost() -> None:  # a worker process died: stop taking requests
        log.error("a worker process is gone; the front end stops")
        gone.append(True)
        if server is not None:
            server.should_exit = True
    clients = [WorkerClient(conn, on_lost=lost) for conn in conns]
    workers = clients[0] if len(clients) == 1 else WorkerPool(clients)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config, workers), host=host, port=port,
                                           log_level="info", timeout_graceful_shutdown=graceful_seconds,
                                           http=header_timeout_protocol(config.read_timeout)))
    server.run()
    return WORKER_LOST if gone else 0 if server.started else FRONT_END_NOT_STARTED
