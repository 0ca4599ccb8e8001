"""The model worker: one thread owns the engine and feeds its running batches (continuous batching).

Callers `submit` texts from any thread (or from a front end in another process, through `pump`: worker_link.py) and
get a Future of their translations; input errors are raised by `submit`, before anything is queued. Between decode
steps the worker admits waiting sentences, oldest first within the token budget and memory cap, into a running batch
(a pyengine.decoding.Runtime, the loop `translate()` runs): one shared by every option set that can share it (each
cohort with its own beam width, lengths, penalties and processors), one per option set for attention weights or a
shortlist, one per request for sampling. A step that runs out of memory halves the rows admitted from then on and
evicts the newest cohorts back to the queue. One request's failure is its own: a cohort that fails to admit is retried
request by request, a failed step's requests run again each in a batch of its own, a failure while delivering fails
that request (each logged). A cancelled (timeout, disconnect) or failed request leaves the queue and the batch at the
next step, its cache rows freed; every path gives back what it counted (queue_depth, running).
"""
from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

import torch

from ..batching import is_out_of_memory
from ..decoding import Hypothesis, Runtime
from ..engine import Engine, Translation
from ..results import translation
from ..errors import BatchMemoryError
from .request import Plan, QueueFullError, Request, RequestTooLargeError, SchedulerStats, new_request, resolve, run_into

log = logging.getLogger("pyengine.serving")

ADMIT_WAIT_STEPS = 24  # steps a sentence waits at most for a busy batch to take a cohort worth encoding


class Scheduler:
    """Continuous-batching worker over one engine (one device). start() it, submit(), stop()."""

    def __init__(self, engine: Engine, max_queue: int = 4096,
                 on_step: Callable[[int], None] | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.on_step = on_step  # called with the number of decoder rows after each step
        self.stats = SchedulerStats()
        self._inbox: collections.deque[Request] = collections.deque()
        self._cancelled: list[Request] = []  # requests whose callers gave up, for the worker to take out
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # other model work for the worker's thread
        # sentences waiting for a batch: a FIFO per batch key (admission costs what it admits, and one option
        # set's backlog never holds another's batch back)
        self._waiting: dict[Hashable, collections.deque[tuple[Request, int]]] = {}
        self._batches: dict[Hashable, Runtime] = {}
        self._queued = 0  # sentences submitted and not yet admitted
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.row_limit: int | None = None  # decoder rows a batch may hold, learned from allocation failures
        # a front end in another process: pump(timeout) takes its messages (waiting up to timeout when the worker is
        # idle) and sends the answers ready; called between rounds by the worker's own thread (worker_link.py)
        self.pump: Callable[[float], None] | None = None

    # -- caller side ---------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Sentences waiting to enter a batch."""
        return self._queued

    @property
    def alive(self) -> bool:
        """The worker runs and takes requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def running(self) -> int:
        """Sentences decoding now."""
        return sum(b.sentences for b in list(self._batches.values()))

    def submit(self, texts: Sequence[str], source_lang: str | None = None, target_lang: str | None = None,
               target_prefix: Sequence[str | None] | None = None, **options: Any) -> tuple[Request, Future]:
        """Queue `texts` for translation (the arguments of Engine.translate_batch); input and option errors are
        raised here. Returns the request (to cancel it) and a Future of one Translation per text."""
        future: Future = Future()
        request = new_request(self.engine, texts, source_lang, target_lang, target_prefix, options, future)
        if request.opts.return_alternatives:  # a few short searches per sentence: translate_batch's, between steps
            request.future = self.call(lambda: self.engine.translate_batch(texts, source_lang, target_lang,
                                                                           target_prefix, **options))
            return request, request.future
        n = sum(x is not None for x in request.ids)
        if n > self.max_queue:
            raise RequestTooLargeError(f"{n} sentences can never fit in the queue of {self.max_queue}; "
                                       "send them in smaller requests")
        with self._lock:
            if self._stopping:
                raise QueueFullError("the worker is shutting down")
            if self._queued + n > self.max_queue:
                raise QueueFullError(f"{self._queued} sentences are waiting (limit {self.max_queue})")
            request.queued = n
            self._queued += n
            self._inbox.append(request)
            self._wake.notify()
        return request, future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` (other work on the model, such as scoring) in the worker's thread between two decoder steps:
        the model's work stays in one thread (see run). Returns a Future of its result or error."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                raise QueueFullError("the worker is shutting down")
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def score(self, sources: Sequence[str], targets: Sequence[str], **args: Any) -> Future:
        """Engine.score_batch in the worker's thread (see call)."""
        return self.call(lambda: self.engine.score_batch(sources, targets, **args))

    def state(self) -> Future:
        """A Future (here already resolved) of what /health and /metrics read, "workers": this one's own counts."""
        queue_depth, running, sentences, future = self.queue_depth, self.running, self.stats.sentences, Future()
        future.set_result({"alive": self.alive, "queue_depth": queue_depth, "running": running, "stats": self.stats,
                           "workers": [{"sentences": sentences, "queue_depth": queue_depth, "running": running}]})
        return future

    def cancel(self, request: Request) -> None:
        """The caller gave up (timeout, disconnect): the worker takes the request's sentences out of the queue and
        the running batch before its next step and cancels its future."""
        with self._lock:
            if not request.cancelled:
                request.cancelled = True
                self._cancelled.append(request)
                self._wake.notify()

    def start(self) -> "Scheduler":
        """Run the worker in a background thread (in-process use: tests, an app embedding pyengine)."""
        self._thread = threading.Thread(target=self._loop, name="pyengine-worker", daemon=True)
        self._thread.start()
        return self

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run the worker in the calling thread until stop() is called or, when idle, `until()` is true.

        The model's work should run in the thread that loaded it: OpenMP keeps a team per thread that starts parallel
        work, and a second team on the same cores makes every parallel region wait on a futex (libgomp throttles its
        spin): a decode loop in a new thread ran ~1.5x slower. `pyengine serve` runs this in its main thread."""
        self._thread = threading.current_thread()
        self._loop(until)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued and running one, then end the worker."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- worker side ---------------------------------------------------------------------------
    def _loop(self, until: Callable[[], bool] | None = None) -> None:
        with torch.inference_mode():
            while True:
                if self.pump is not None:
                    self.pump(0.0)
                with self._lock:
                    while not (self._inbox or self._cancelled or self._waiting or self._batches or self._stopping
                               or self._calls):
                        if until is not None and until():
                            return
                        if self.pump is None:
                            self._wake.wait(None if until is None else 0.2)
                            continue
                        self._lock.release()  # the pump submits (which takes the lock)
                        try:
                            self.pump(0.2)
                        finally:
                            self._lock.acquire()
                    if self._stopping and not (self._inbox or self._waiting or self._batches):
                        return
                    inbox, self._inbox = self._inbox, collections.deque()
                    cancelled, self._cancelled = self._cancelled, []
                    calls, self._calls = self._calls, []
                for fn, future in calls:  # other model work (scoring), between two steps of the batch
                    run_into(future, fn)
                self._round(inbox, cancelled)
                del inbox, cancelled  # nothing of a finished round stays referenced while the worker waits

    def _round(self, inbox: collections.deque[Request], cancelled: list[Request]) -> None:
        """Take in new requests, take out cancelled ones, admit waiting sentences, step every batch once."""
        try:
            for request in inbox:
                self._accept(request)
            if cancelled:
                self.stats.cancelled += self._remove(cancelled)
                for request in cancelled:
                    request.future.cancel()
            self._admit()
            for key, batch in list(self._batches.items()):
                if self._batches.get(key) is batch:  # a failure while delivering may have emptied it
                    self._step(key, batch)
        except Exception as exc:  # noqa: BLE001 - a bug fails what is in flight, not the worker
            log.exception("worker error; failing every request in flight")
            requests = list(inbox) + [r for q in self._waiting.values() for r, _ in q] \
                + [r for b in self._batches.values() for c in b.cohorts for r, _ in c.tags]
            self._batches.clear()  # their state is unknown
            self._fail(requests, exc)

    def _accept(self, request: Request) -> None:
        """Blank texts are answered at once; the others wait for a batch."""
        try:
            request.results = [Translation.blank(request.opts) if ids is None else None for ids in request.ids]
        except Exception as exc:  # noqa: BLE001 - this request's error, no one else's
            self._fail([request], exc, "accepting")
            return
        request.arrived = self.stats.steps
        self.stats.requests += 1
        for i, ids in enumerate(request.ids):
            if ids is not None:
                request.pending += 1
                self._waiting.setdefault(request.keys[i], collections.deque()).append((request, i))
        if request.pending == 0:
            resolve(request.future, request.results)

    def _admit(self) -> None:
        """Move waiting sentences into their batch, oldest first, while the budget allows."""
        ec = self.engine.engine_config
        # a busy batch (a chunk or more running) takes newcomers a quarter of its size at a time, or, when few wait,
        # once the oldest has waited ADMIT_WAIT_STEPS: each cohort is encoded apart and costs every step its own search
        # bookkeeping, so admitting sentences one by one as room frees or requests trickle in costs more than waiting
        chunk = max(1, ec.max_batch_size // 4)
        for key, queue in list(self._waiting.items()):
            batch = self._batches.get(key)
            plan, group = Plan.of(batch), []
            while queue:
                request, i = queue[0]
                if not plan.admits(request, i, self.engine, self.row_limit):
                    break
                group.append(queue.popleft())
            busy = batch is not None and batch.sentences >= chunk
            # room for less than a chunk while more wait: wait for room; all that wait fit but they are few: wait
            # (a bounded number of steps) for more to arrive
            if busy and group and len(group) < chunk and \
                    (queue or self.stats.steps - group[0][0].arrived < ADMIT_WAIT_STEPS):
                queue.extendleft(reversed(group))
                group = []
            if not queue:
                del self._waiting[key]
            if group:
                self._dequeued(group)
                self._admit_group(key, group)

    def _dequeued(self, tags: list[tuple[Request, int]]) -> None:
        """These sentences left the queue (admitted, dropped)."""
        for request, _ in tags:
            request.queued -= 1
        with self._lock:
            self._queued -= len(tags)

    def _admit_group(self, key: Hashable, group: list[tuple[Request, int]]) -> None:
        """Encode these sentences into the running batch of `key`: a cohort per target prefix length. A cohort that
        fails to encode is retried request by request: the failing request alone gets the error."""
        ec, cfg = self.engine.engine_config, self.engine.config
        batch = self._batches.get(key)
        if batch is None:
            try:
                batch = Runtime(self.engine.model, self.engine.rules, group[0][0].options(group[0][1]), ec.device,
                                cfg.decoder_start_id, cfg.eos_id, self.engine.shortlist, self.stats,
                                capacity=ec.max_batch_size)
            except Exception as exc:  # noqa: BLE001 - these requests' options cannot run
                self._fail([r for r, _ in group], exc, "starting a batch")
                return
            self._batches[key] = batch
        # a cohort per (target prefix length, options): a cohort decodes in lockstep under one strategy
        kinds = dict.fromkeys((len(r.prefixes[i]), r.options(i)) for r, i in group)
        for length, opts in sorted(kinds, key=lambda kind: kind[0]):
            cohort = [(r, i) for r, i in group if len(r.prefixes[i]) == length and r.options(i) == opts
                      and not r.future.done()]
            requests = list(dict.fromkeys(r for r, _ in cohort))
            if cohort and not self._admit_cohort(batch, cohort, length, alone=len(requests) == 1):
                for request in requests:
                    self._admit_cohort(batch, [t for t in cohort if t[0] is request], length, alone=True)
        self._retire_if_empty(key, batch)

    def _admit_cohort(self, batch: Runtime, cohort: list[tuple[Request, int]], length: int, alone: bool) -> bool:
        """Admit one cohort; False when it failed with more than one request in it (then each is tried alone)."""
        ids = [r.ids[i] for r, i in cohort]
        prefix = torch.tensor([r.prefixes[i] for r, i in cohort], device=self.engine.engine_config.device) \
            if length else None
        try:
            if len(cohort) == 1 and not batch.cohorts:
                self.engine.check_memory(1, len(ids[0]), cohort[0][0].opts, length)
            batch.admit(ids, cohort, prefix, cohort[0][0].generator, opts=cohort[0][0].options(cohort[0][1]))
        except Exception as exc:  # noqa: BLE001 - the requests of this cohort get the error
            if not alone:
                log.warning("admitting a cohort of several requests failed (%s: %s); admitting each alone",
                            type(exc).__name__, exc)
                return False
            self._fail([cohort[0][0]], exc, "admitting")
            return True
        self.stats.sentences += len(cohort)
        self.stats.source_tokens += sum(len(x) for x in ids)
        return True

    def _step(self, key: Hashable, batch: Runtime) -> None:
        rows = batch.rows
        try:
            finished = batch.step()
        except Exception as exc:  # noqa: BLE001 - a failing batch must not take the worker down
            if is_out_of_memory(exc) and batch.sentences > 1:
                self.row_limit = max(batch.opts.beam_size, rows // 2)
                while batch.cohorts and (batch.rows > self.row_limit or batch.rows == rows):
                    self._requeue(batch.evict_newest())
                if not batch.cohorts:
                    del self._batches[key]
                self.stats.evictions += 1
                return
            del self._batches[key]  # its state is unknown after a failed step: its sentences start again or fail
            requests = list(dict.fromkeys(r for c in batch.cohorts for r, _ in c.tags))
            if len(requests) == 1 or all(r.isolated for r in requests):
                self._fail(requests, exc, "decoding")
                return
            log.warning("a decode step of %d requests failed (%s: %s); each runs again in a batch of its own",
                        len(requests), type(exc).__name__, exc)
            tags = [t for c in batch.cohorts for t in (c.tags[i] for i in c.strategy.live)]
            waiting = self._take_waiting(set(requests))
            for request in requests:
                request.isolate()
            self._requeue(tags)
            for request, i in waiting:  # still counted as queued
                self._waiting.setdefault(request.keys[i], collections.deque()).append((request, i))
            return
        self.stats.rows_per_step.append(rows)
        if self.on_step is not None:
            self.on_step(rows)
        for (request, i), hyps in finished:
            self._deliver(request, i, hyps)
        self._retire_if_empty(key, batch)

    def _retire_if_empty(self, key: Hashable, batch: Runtime) -> None:
        """An emptied batch leaves; its buffers go to the model's pool for the next batch."""
        if not batch.cohorts and self._batches.get(key) is batch:
            del self._batches[key]
            batch.release()

    def _deliver(self, request: Request, i: int, hyps: list[Hypothesis]) -> None:
        if request.future.done():  # failed or cancelled meanwhile
            return
        try:
            request.results[i] = translation(hyps, self.engine.tokenizer, request.opts, request.texts[i])
        except Exception as exc:  # noqa: BLE001 - this request's error, no one else's
            self._fail([request], exc, "delivering")
            return
        self.stats.target_tokens += len(hyps[0].tokens) + 1  # EOS included
        request.pending -= 1
        if request.pending == 0:
            resolve(request.future, request.results)

    def _requeue(self, tags: list[tuple[Request, int]]) -> None:
        """Evicted sentences wait again, ahead of the others (they were admitted first)."""
        for request, i in reversed(tags):
            self._waiting.setdefault(request.keys[i], collections.deque()).appendleft((request, i))
            request.queued += 1
        with self._lock:
            self._queued += len(tags)

    def _fail(self, requests: list[Request], exc: BaseException, during: str | None = None) -> None:
        """These requests get the error; their other sentences leave the queue and the running batches."""
        if is_out_of_memory(exc) and not isinstance(exc, BatchMemoryError):
            exc = BatchMemoryError(f"the sentence does not fit in memory: {exc}")
        requests = list(dict.fromkeys(requests))
        if during is not None and not isinstance(exc, BatchMemoryError):
            log.error("%s %d request(s) failed", during, len(requests), exc_info=exc)
        self.stats.failures += len(requests)
        for request in requests:
            resolve(request.future, error=exc)
        self._remove(requests)

    def _remove(self, requests: list[Request]) -> int:
        """Take these requests' sentences out of the queue and the running batches (cache rows freed): how many."""
        gone = set(requests)
        dropped = len(self._take_waiting(gone))
        for key, batch in list(self._batches.items()):
            tags = {t for c in batch.cohorts for t in c.tags if t[0] in gone}
            if tags:
                dropped += batch.drop(tags)
            self._retire_if_empty(key, batch)
        counted = sum(r.queued for r in gone)
        for request in gone:
            request.queued = 0
        with self._lock:
            self._queued -= counted
        return dropped

    def _take_waiting(self, requests: set[Request]) -> list[tuple[Request, int]]:
        """Take these requests' waiting sentences out of their queues (the queue depth is the caller's to fix)."""
        taken = [t for queue in self._waiting.values() for t in queue if t[0] in requests]
        for key, queue in list(self._waiting.items()):
            kept = collections.deque(t for t in queue if t[0] not in requests)
            if not kept:
                del self._waiting[key]
            elif len(kept) < len(queue):
                self._waiting[key] = kept
        return taken
