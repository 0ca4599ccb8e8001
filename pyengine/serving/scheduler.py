"""The model worker: one thread owns the engine and feeds its running batches (continuous batching).

Callers `submit` texts from any thread and get a concurrent.futures.Future of their translations.
Input errors are raised by `submit` itself, before anything is queued, so a bad request never reaches
the batch. The worker admits waiting sentences into the running batch of their decoding options
(a pyengine.decoding.Runtime: the loop `translate()` runs, so the same decoder step and output layer)
between decode steps, within the engine's token budget (max_batch_tokens, max_batch_size) and memory
cap (max_memory_mb), oldest first; it steps every running batch once per round. A step that runs out of
memory halves the rows the worker admits from then on, evicts the newest cohorts back to the queue until
the batch is under that, and is retried (split and retry); a sentence that fails alone fails its request.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch

from ..batching import is_out_of_memory
from ..config import DecodeOptions
from ..decoding import Hypothesis, Runtime, RuntimeStats
from ..decoding.strategies import prompt_options, prompt_prefix
from ..engine import Engine, Translation
from ..errors import BatchMemoryError, PyEngineError


def resolve(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (a caller may have cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class QueueFullError(PyEngineError):
    """The worker's queue holds its maximum of waiting sentences; retry later."""


@dataclass(eq=False)
class Request:
    """One caller's texts; `results` fill in as sentences finish, in the caller's order. prefixes: each text's
    forced target tokens (empty for none)."""

    ids: list[list[int] | None]
    opts: DecodeOptions
    future: Future
    prefixes: list[list[int]]
    sampled: bool = False  # a seeded stream per request: its sentences get a batch of their own options
    generator: torch.Generator | None = None
    results: list[Translation | None] = field(default_factory=list)
    pending: int = 0
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """The caller gave up (timeout, disconnect): its waiting sentences are not admitted."""
        self.cancelled = True

    def options(self, i: int) -> DecodeOptions:
        """Text i's decoding options (a target prefix moves a forced first token into the prompt)."""
        return prompt_options(self.opts, len(self.prefixes[i]))

    def key(self, i: int) -> Hashable:
        """The running batch text i joins: one per option set (per request when sampling)."""
        return (self.options(i), id(self)) if self.sampled else self.options(i)


@dataclass
class SchedulerStats(RuntimeStats):
    """Counters the server exports; written by the worker thread only. The runtime's own (decoder step
    implementation and output path per step) say that the server runs what translate() runs."""

    requests: int = 0
    sentences: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    evictions: int = 0
    rows_per_step: list[int] = field(default_factory=list)  # drained by the metrics reader


@dataclass
class _Plan:
    """Admission of one step into one batch: its size with the sentences planned so far."""

    sentences: int
    width: int  # the widest source
    group: list[tuple[Request, int]] = field(default_factory=list)  # the sentences to admit
    waiting: int = 0  # sentences of this batch's options waiting

    @classmethod
    def of(cls, batch: Runtime | None) -> "_Plan":
        if batch is None or not batch.cohorts:
            return cls(0, 0)
        return cls(batch.sentences, batch.memory.width)


class Scheduler:
    """Continuous-batching worker over one engine (one device). start() it, submit(), stop()."""

    def __init__(self, engine: Engine, max_queue: int = 4096,
                 on_step: Callable[[int], None] | None = None):
        self.engine, self.max_queue = engine, max_queue
        self.on_step = on_step  # called with the number of decoder rows after each step
        self.stats = SchedulerStats()
        self._inbox: collections.deque[Request] = collections.deque()
        self._waiting: collections.deque[tuple[Request, int]] = collections.deque()
        self._batches: dict[Hashable, Runtime] = {}
        self._queued = 0  # sentences submitted and not yet admitted
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.row_limit: int | None = None  # decoder rows a batch may hold, learned from allocation failures

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
        ids, opts = self.engine.prepare(texts, source_lang, target_lang, **options)
        encoded = self.engine.encode_prefixes(target_prefix, ids)
        it = iter(encoded or [])
        prefixes = [[] if x is None or encoded is None else prompt_prefix(opts, next(it)) for x in ids]
        future: Future = Future()
        n = sum(x is not None for x in ids)
        with self._lock:
            if self._stopping:
                raise QueueFullError("the worker is shutting down")
            if self._queued + n > self.max_queue:
                raise QueueFullError(f"{self._queued} sentences are waiting (limit {self.max_queue})")
            request = Request(ids, opts, future, prefixes, sampled=opts.sampling)
            if opts.sampling:  # a seeded stream per request: its draws do not depend on its batch mates
                request.generator = torch.Generator(device=self.engine.engine_config.device)
                request.generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
            self._queued += n
            self._inbox.append(request)
            self._wake.notify()
        return request, future

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="pyengine-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued and running one, then end the worker."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- worker side ---------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._inbox or self._waiting or self._batches or self._stopping):
                        self._wake.wait()
                    if self._stopping and not (self._inbox or self._waiting or self._batches):
                        return
                    inbox, self._inbox = self._inbox, collections.deque()
                try:
                    for request in inbox:
                        self._accept(request)
                    self._admit()
                    for key, batch in list(self._batches.items()):
                        self._step(key, batch)
                except Exception as exc:  # noqa: BLE001 - a bug fails what is in flight, not the worker
                    self._fail(list(inbox) + [r for r, _ in self._waiting]
                               + [r for b in self._batches.values() for c in b.cohorts for r, _ in c.tags], exc)
                    self._batches.clear()

    def _accept(self, request: Request) -> None:
        """Blank texts are answered at once; the others wait for a batch."""
        request.results = [None] * len(request.ids)
        self.stats.requests += 1
        for i, ids in enumerate(request.ids):
            if ids is None:
                request.results[i] = Translation.blank(request.opts)
            else:
                request.pending += 1
                self._waiting.append((request, i))
        if request.pending == 0:
            resolve(request.future, request.results)

    def _admit(self) -> None:
        """Move waiting sentences into their batch, oldest first, while the budget allows."""
        ec = self.engine.engine_config
        plans: dict[Hashable, _Plan] = {}
        dropped = 0
        for request, i in self._waiting:
            if request.cancelled:
                dropped += 1
                continue
            key = request.key(i)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = _Plan.of(self._batches.get(key))
            plan.waiting += 1
            sentences, width = plan.sentences + 1, max(plan.width, len(request.ids[i]))
            beam = request.opts.beam_size
            fits = sentences <= ec.max_batch_size and sentences * width * beam <= ec.max_batch_tokens \
                and (self.row_limit is None or sentences * beam <= self.row_limit)
            if fits and ec.max_memory_mb is not None:
                try:
                    self.engine.check_memory(sentences, width, request.opts, len(request.prefixes[i]))
                except BatchMemoryError:
                    fits = False
            if fits or sentences == 1:  # a sentence alone always gets a batch (the budget bounds padding)
                plan.group.append((request, i))
                plan.sentences, plan.width = sentences, width
        # a running batch takes newcomers once a quarter of it is free (or all that wait fit): each
        # admission encodes a cohort and re-pads the batch's encoder memory, so one-by-one admission under
        # load costs more than the few steps a sentence waits for its cohort
        chunk = max(1, ec.max_batch_size // 4)
        for key, plan in plans.items():
            if key in self._batches and len(plan.group) < min(plan.waiting, chunk):
                plan.group = []
        taken = {(id(r), i) for plan in plans.values() for r, i in plan.group}
        self._waiting = collections.deque((r, i) for r, i in self._waiting
                                          if not r.cancelled and (id(r), i) not in taken)
        taken = 0
        for key, plan in plans.items():
            if plan.group:
                taken += len(plan.group)
                self._admit_group(key, plan.group)
        with self._lock:
            self._queued -= taken + dropped

    def _admit_group(self, key: Hashable, group: list[tuple[Request, int]]) -> None:
        """Encode these sentences into the running batch of `key`: a cohort per target prefix length."""
        ec, cfg = self.engine.engine_config, self.engine.config
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = Runtime(self.engine.model, self.engine.rules, group[0][0].options(group[0][1]),
                                                 ec.device, cfg.decoder_start_id, cfg.eos_id, self.engine.shortlist,
                                                 self.stats)
        for length in sorted({len(r.prefixes[i]) for r, i in group}):
            cohort = [(r, i) for r, i in group if len(r.prefixes[i]) == length]
            ids = [r.ids[i] for r, i in cohort]
            prefix = torch.tensor([r.prefixes[i] for r, i in cohort], device=ec.device) if length else None
            try:
                if len(cohort) == 1 and not batch.cohorts:
                    self.engine.check_memory(1, len(ids[0]), cohort[0][0].opts, length)
                batch.admit(ids, cohort, prefix, cohort[0][0].generator)
            except Exception as exc:  # noqa: BLE001 - the requests of this cohort get the error
                self._fail([r for r, _ in cohort], exc)
                continue
            self.stats.sentences += len(cohort)
            self.stats.source_tokens += sum(len(x) for x in ids)
        if not batch.cohorts:
            del self._batches[key]

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
            self._fail([r for c in batch.cohorts for r, _ in c.tags], exc)
            del self._batches[key]
            return
        self.stats.rows_per_step.append(rows)
        if self.on_step is not None:
            self.on_step(rows)
        for (request, i), hyps in finished:
            self._deliver(request, i, hyps)
        if not batch.cohorts:
            del self._batches[key]

    def _deliver(self, request: Request, i: int, hyps: list[Hypothesis]) -> None:
        request.results[i] = Translation.of(hyps, self.engine.tokenizer.decode)
        self.stats.target_tokens += len(hyps[0].tokens) + 1  # EOS included
        request.pending -= 1
        if request.pending == 0:
            resolve(request.future, request.results)

    def _requeue(self, tags: list[tuple[Request, int]]) -> None:
        """Evicted sentences wait again, ahead of the others (they were admitted first)."""
        self._waiting.extendleft(reversed(tags))
        with self._lock:
            self._queued += len(tags)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        if is_out_of_memory(exc) and not isinstance(exc, BatchMemoryError):
            exc = BatchMemoryError(f"the sentence does not fit in memory: {exc}")
        for request in dict.fromkeys(requests):
            resolve(request.future, error=exc)
        failed = set(map(id, requests))
        kept = collections.deque((r, i) for r, i in self._waiting if id(r) not in failed)
        with self._lock:
            self._queued -= len(self._waiting) - len(kept)
        self._waiting = kept
