"""The worker in one process and the HTTP front end in another, joined by a pipe (`pyengine serve`).

Why two processes: the front end (HTTP parsing, JSON, validation, documents, the event loop) and the worker (the
decode loop's Python between its C++ calls) each hold the interpreter lock for a few hundred microseconds at a
time; in one process each waited for the other's (docs/server.md measured a second of a six-second round on two
cores, and sentencepiece's 4 µs Encode taking 172 µs inside a loaded server). vLLM splits its API server from its
engine core for the same reason.

`serve` (processes.py) loads the model, then forks: the child is the front end (the engine object is there,
copy-on-write, for tokenizer-side work: options, documents, languages; it never runs the model), the parent keeps
the model's OpenMP threads and runs the worker. Each request crosses the pipe as a pickled message: the front end's
`WorkerClient` stands in for the Scheduler the app calls (submit, cancel, score, the counters), the worker's
`WorkerBridge` hands them to the real Scheduler between rounds and sends the answers back; with several workers, a
`WorkerPool` of clients spreads the requests.
"""
from __future__ import annotations

import collections
import copy
import itertools
import logging
import os
import pickle
import socket
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

from .request import QueueFullError, SchedulerStats, resolve
from .scheduler import Scheduler

log = logging.getLogger("pyengine.serving")


def _dumps(message: tuple) -> bytes:
    """Plain pickle (not multiprocessing's, which would send tensors through shared memory and file descriptors)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class WorkerGoneError(QueueFullError):
    """The worker process is gone: nothing can be translated (the server answers 503)."""


class WorkerClient:
    """The front end's stand-in for the Scheduler in the worker process: the same calls, over the pipe. submit and
    score return a Future that an error of the worker's submit (input, options, a full queue) also resolves."""

    def __init__(self, conn: Connection, on_lost: Callable[[], None] | None = None):
        self._conn, self.on_lost = conn, on_lost
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lost = False
        self.on_step: Callable[[int], None] | None = None  # fed the worker's rows per step at each state()
        self._reader = threading.Thread(target=self._read, name="pyengine-worker-link", daemon=True)
        self._reader.start()

    def submit(self, texts: Sequence[str], source_lang: str | None = None, target_lang: str | None = None,
               target_prefix: Sequence[str | None] | None = None, **options: Any) -> tuple[int, Future]:
        # as given: the worker's submit checks them (and names what is wrong) as in one process
        return self._ask("submit", (texts, source_lang, target_lang, target_prefix, options))

    def score(self, sources: Sequence[str], targets: Sequence[str], **args: Any) -> Future:
        return self._ask("score", (sources, targets, args))[1]

    def cancel(self, request: int) -> None:
        if self._pending.pop(request, None) is not None:
            self._send(("cancel", request, None))

    def state(self) -> Future:
        """A Future of the worker's counters (answered between two of its rounds); the rows of its steps since the
        last one go to on_step (the front end's histogram)."""
        future = self._ask("state", None)[1]

        def feed(done: Future) -> None:
            if self.on_step is not None and not done.exception():
                for rows in done.result().pop("rows"):
                    self.on_step(rows)
        future.add_done_callback(feed)
        return future

    def close(self) -> None:
        """End the link from this side: the worker sees its front end gone (and winds down when idle). The socket is
        shut down, not just closed: a close would not end the reader thread's recv, which keeps the socket open."""
        self.on_lost = None
        try:
            with socket.socket(fileno=os.dup(self._conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass
        self._reader.join()
        self._conn.close()

    def _ask(self, kind: str, args: Any) -> tuple[int, Future]:
        rid, future = next(self._ids), Future()
        self._pending[rid] = future
        if self._lost or not self._send((kind, rid, args)):
            self._pending.pop(rid, None)
            resolve(future, error=WorkerGoneError("the worker process is gone"))
        return rid, future

    def _send(self, message: tuple) -> bool:
        data = _dumps(message)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
            return True
        except OSError:
            return False

    def _read(self) -> None:
        while True:
            try:
                parts = pickle.loads(self._conn.recv_bytes())  # a round's answers
            except (EOFError, OSError):
                break
            for part in parts:
                rid, result, error = pickle.loads(part)
                future = self._pending.pop(rid, None)
                if future is not None:
                    resolve(future, result, error)
        self._lost = True
        for rid in list(self._pending):
            future = self._pending.pop(rid, None)
            if future is not None:
                resolve(future, error=WorkerGoneError("the worker process exited"))
        if self.on_lost is not None:
            self.on_lost()


class WorkerBridge:
    """In the worker process, run by the worker's own thread between rounds (Scheduler.pump): takes the front end's
    messages to the Scheduler and sends the answers that completed, all of a round's in one message. No thread of
    its own: a thread woken by every message took the interpreter lock and a core from the decode loop each time."""

    def __init__(self, scheduler: Scheduler, conn: Connection):
        self.scheduler, self._conn = scheduler, conn
        self._requests: dict[int, Any] = {}  # request id -> the Scheduler's Request (to cancel it)
        self._outbox: list[tuple[int, Any, BaseException | None]] = []
        self._rows: collections.deque[int] = collections.deque(maxlen=100_000)  # rows per step since last state
        self.closed = False  # the front end closed its end
        scheduler.on_step = self._rows.append
        scheduler.pump = self.pump

    def pump(self, timeout: float) -> None:
        """Handle the messages waiting (waiting up to `timeout` for the first), then send the answers ready."""
        if self.closed:
            time.sleep(timeout)
            return
        try:
            ready = self._conn.poll(timeout)
            while ready:
                kind, rid, args = pickle.loads(self._conn.recv_bytes())
                try:
                    self._handle(kind, rid, args)
                except Exception as exc:  # noqa: BLE001 - a refused submission: the caller's error
                    self._reply(rid, error=exc)
                ready = self._conn.poll(0)
            self._flush()
        except (EOFError, OSError):  # the front end is gone; the worker winds down when it is idle
            self.closed = True

    def _handle(self, kind: str, rid: int, args: Any) -> None:
        if kind == "submit":
            texts, source_lang, target_lang, target_prefix, options = args
            request, future = self.scheduler.submit(texts, source_lang, target_lang, target_prefix, **options)
            self._requests[rid] = request
            future.add_done_callback(lambda f, rid=rid: self._done(rid, f))
        elif kind == "score":
            sources, targets, options = args
            self.scheduler.score(sources, targets, **options).add_done_callback(lambda f, rid=rid: self._done(rid, f))
        elif kind == "cancel":
            request = self._requests.pop(rid, None)
            if request is not None:
                self.scheduler.cancel(request)
        elif kind == "state":
            self._reply(rid, self._state())
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _state(self) -> dict[str, Any]:
        """Scheduler.state, its counters copied (not the rows-per-step window), and the rows of the steps since."""
        state = self.scheduler.state().result()
        stats = copy.copy(state["stats"])
        stats.decoder_steps, stats.outputs = collections.Counter(stats.decoder_steps), collections.Counter(stats.outputs)
        stats.seconds, stats.rows_per_step = collections.Counter(stats.seconds), collections.deque()
        rows = [self._rows.popleft() for _ in range(len(self._rows))]
        return {**state, "stats": stats, "rows": rows}

    def _done(self, rid: int, future: Future) -> None:
        self._requests.pop(rid, None)
        if future.cancelled():  # the front end gave up on it
            return
        error = future.exception()
        self._reply(rid, None if error is not None else future.result(), error)

    def _reply(self, rid: int, result: Any = None, error: BaseException | None = None) -> None:
        self._outbox.append((rid, result, error))

    def _flush(self) -> None:
        if not self._outbox:
            return
        parts = [self._encode(reply) for reply in self._outbox]
        self._outbox.clear()
        self._conn.send_bytes(_dumps(parts))

    @staticmethod
    def _encode(reply: tuple[int, Any, BaseException | None]) -> bytes:
        try:
            return _dumps(reply)
        except Exception as exc:  # noqa: BLE001 - an answer that cannot be pickled fails its request, named
            rid, result, error = reply
            return _dumps((rid, None, RuntimeError(f"the worker's answer could not be sent: {type(exc).__name__}: "
                                                   f"{exc} (answer: {type(error or result).__name__})")))


class WorkerPool:
    """The front end's stand-in for several worker processes (`serve --workers N`, CTranslate2's inter_threads): each
    request goes whole to the worker with the fewest sentences in flight; state() adds their counters up. Workers
    decode apart, so one worker's thread preempted by the front end or a client stalls that worker alone, not a
    parallel region that spans every core."""

    def __init__(self, clients: Sequence[WorkerClient]):
        self.clients = list(clients)
        self._load = [0] * len(self.clients)  # sentences in flight per worker
        self._owner: dict[int, tuple[int, int]] = {}  # the pool's request id -> (worker, the worker's request id)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submissions on the event loop, completions on the clients' reader threads

    @property
    def on_step(self) -> Callable[[int], None] | None:
        return self.clients[0].on_step

    @on_step.setter
    def on_step(self, fn: Callable[[int], None] | None) -> None:
        for client in self.clients:
            client.on_step = fn

    def submit(self, texts: Sequence[str], *args: Any, **options: Any) -> tuple[int, Future]:
        return self._route(len(texts), lambda client: client.submit(texts, *args, **options))

    def score(self, sources: Sequence[str], targets: Sequence[str], **args: Any) -> Future:
        return self._route(len(sources), lambda client: (None, client.score(sources, targets, **args)))[1]

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def cancel(self, request: int) -> None:
        with self._lock:
            owner = self._owner.pop(request, None)
        if owner is not None:
            self.clients[owner[0]].cancel(owner[1])

    def state(self) -> Future:
        """A Future of the workers' states added up: alive when every worker is, queue and counters summed."""
        parts, merged = [client.state() for client in self.clients], Future()
        left = [len(parts)]

        def one_done(_: Future) -> None:
            with self._lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                states = [part.result() for part in parts]
                resolve(merged, {"alive": all(s["alive"] for s in states),
                                 "queue_depth": sum(s["queue_depth"] for s in states),
                                 "running": sum(s["running"] for s in states),
                                 "stats": SchedulerStats.total([s["stats"] for s in states]),
                                 "workers": [w for s in states for w in s["workers"]]})
            except Exception as exc:  # noqa: BLE001 - a worker gone: the caller's error
                resolve(merged, error=exc)
        for part in parts:
            part.add_done_callback(one_done)
        return merged

    def _route(self, sentences: int, ask: Callable[[WorkerClient], tuple[int | None, Future]]) -> tuple[int, Future]:
        with self._lock:
            k = min(range(len(self.clients)), key=self._load.__getitem__)
            self._load[k] += sentences
        local, future = ask(self.clients[k])
        rid = next(self._ids)
        if local is not None:
            with self._lock:
                self._owner[rid] = (k, local)

        def finished(_: Future) -> None:
            with self._lock:
                self._load[k] -= sentences
                self._owner.pop(rid, None)
        future.add_done_callback(finished)
        return rid, future
