"""A caller's request as the worker holds it (its sentences, options, batch keys and counts), the errors a
submission can get, and the counters the server exports. The worker that moves them is scheduler.py."""
from __future__ import annotations

import collections
import concurrent.futures
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import torch

from ..config import DecodeOptions
from ..decoding import RuntimeStats
from ..decoding.runtime import shares_batch
from ..decoding.prompt import prompt_options, prompt_prefix
from ..engine import Translation
from ..errors import BatchMemoryError, PyEngineError

if TYPE_CHECKING:
    from ..decoding import Runtime


def resolve(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (a caller may have cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def run_into(future: Future, fn: Callable[[], Any]) -> None:
    """fn's result or error into the future, unless its caller cancelled it first."""
    if future.set_running_or_notify_cancel():
        try:
            resolve(future, fn())
        except Exception as exc:  # noqa: BLE001 - the caller's error, handed to the caller
            resolve(future, error=exc)


class QueueFullError(PyEngineError):
    """The worker's queue holds its maximum of waiting sentences; retry later."""


class RequestTooLargeError(PyEngineError):
    """A request with more sentences than the queue holds: it can never be taken; split it."""


SHARED_BATCH = "shared"  # the batch key of every request whose options can share one running batch


@dataclass(eq=False)
class Request:
    """One caller's texts; `results` fill in as sentences finish, in the caller's order. prefixes: each text's
    forced target tokens (empty for none)."""

    ids: list[list[int] | None]
    opts: DecodeOptions
    future: Future
    prefixes: list[list[int]]
    texts: list[str] = field(default_factory=list)  # the caller's texts (replace_unknowns reads their pieces)
    sampled: bool = False  # a seeded stream per request: its sentences get a batch of their own options
    shared: bool = False  # its options can share the batch of other option sets (Runtime.shares)
    generator: torch.Generator | None = None
    results: list[Translation | None] = field(default_factory=list)
    pending: int = 0  # sentences not answered yet
    queued: int = 0  # sentences counted in the scheduler's queue depth (submitted, not admitted)
    cancelled: bool = False
    isolated: bool = False  # a step of a batch it was in failed: it runs in a batch of its own
    submitted: float = field(default_factory=time.monotonic)
    arrived: int = 0  # the worker's step count when it took the request in
    keys: list[Hashable] = field(default_factory=list)  # per text, the running batch it joins

    def __post_init__(self) -> None:
        # the running batch each text joins: the one all shareable option sets decode in (each cohort with its own
        # options), else one per option set (per request when sampling); computed once: hashing options is not free
        if self.shared:
            self.keys = [SHARED_BATCH] * len(self.prefixes)
            return
        options = {n: prompt_options(self.opts, n) for n in {len(p) for p in self.prefixes}}
        self.keys = [(options[len(p)], id(self)) if self.sampled else options[len(p)] for p in self.prefixes]

    def isolate(self) -> None:
        """From now on its sentences join a batch of this request alone."""
        self.isolated = True
        self.keys = [(key, "isolated", id(self)) for key in self.keys]

    def options(self, i: int) -> DecodeOptions:
        """Text i's decoding options (a target prefix moves a forced first token into the prompt)."""
        return prompt_options(self.opts, len(self.prefixes[i]))


@dataclass
class SchedulerStats(RuntimeStats):
    """Counters the server exports; written by the worker thread only. The runtime's own (decoder step
    implementation and output path per step) say that the server runs what translate() runs."""

    requests: int = 0
    sentences: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    evictions: int = 0
    cancelled: int = 0  # sentences taken out of the queue or the batch because their caller gave up
    failures: int = 0  # requests failed by an error in the worker
    # decoder rows of the latest steps (a window: a server runs for months)
    rows_per_step: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=100_000))

    @classmethod
    def total(cls, parts: Sequence["SchedulerStats"]) -> "SchedulerStats":
        """Several workers' counters added up (serve --workers)."""
        out = cls()
        for part in parts:
            for f in fields(cls):
                mine, theirs = getattr(out, f.name), getattr(part, f.name)
                if isinstance(mine, collections.Counter):
                    mine.update(theirs)
                elif isinstance(mine, collections.deque):
                    mine.extend(theirs)
                else:
                    setattr(out, f.name, mine + theirs)
        return out


@dataclass
class Plan:
    """Admission of one step into one batch: its size with the sentences planned so far."""

    sentences: int
    tokens: int  # source tokens held (the encoder memory is not padded: each sentence has its own slot)
    width: int  # the widest source (the memory cap's estimate)

    @classmethod
    def of(cls, batch: Runtime | None) -> "Plan":
        if batch is None or not batch.cohorts:
            return cls(0, 0, 0)
        return cls(batch.sentences, int(batch.memory.lengths.sum()), batch.memory.width)

    def admits(self, request: Request, i: int, engine, row_limit: int | None) -> bool:
        """Whether sentence i of the request fits in the planned batch (then it is planned in): the engine's token
        budget, batch size and memory cap, and the rows the worker learned it can hold. A sentence alone always gets
        a batch (the budget bounds batches, not input)."""
        ec = engine.engine_config
        length = len(request.ids[i])
        sentences, tokens, width = self.sentences + 1, self.tokens + length, max(self.width, length)
        beam = request.opts.beam_size
        fits = sentences <= ec.max_batch_size and tokens * beam <= ec.max_batch_tokens \
            and (row_limit is None or sentences * beam <= row_limit)
        if fits and ec.max_memory_mb is not None:
            try:
                engine.check_memory(sentences, width, request.opts, len(request.prefixes[i]))
            except BatchMemoryError:
                fits = False
        if fits or sentences == 1:
            self.sentences, self.tokens, self.width = sentences, tokens, width
            return True
        return False


def shareable(opts: DecodeOptions, shortlist) -> bool:
    """Whether a request with these options decodes in the one batch all option sets share (different beam widths,
    lengths and penalties step together: one decoder step for all, not one per option set in turn): what the runtime
    shares (decoding.runtime.shares_batch), except sampling, which keeps a batch per request (its seeded stream)."""
    return not opts.sampling and shares_batch(opts, shortlist)


def new_request(engine, texts: Sequence[str], source_lang: str | None, target_lang: str | None,
                target_prefix: Sequence[str | None] | None, options: dict, future: Future) -> Request:
    """A caller's texts as the worker queues them (Engine.translate_batch's arguments): tokenized, the options resolved
    and the prefixes encoded (input and option errors are raised here), the batch each sentence joins, and a seeded
    stream of its own when it samples (its draws do not depend on its batch mates)."""
    ids, opts = engine.prepare(texts, source_lang, target_lang, **options)
    encoded = engine.encode_prefixes(target_prefix, ids)
    it = iter(encoded or [])
    prefixes = [[] if x is None or encoded is None else prompt_prefix(opts, next(it)) for x in ids]
    request = Request(ids, opts, future, prefixes, list(texts), sampled=opts.sampling,
                      shared=shareable(opts, engine.shortlist))
    if opts.sampling:
        request.generator = torch.Generator(device=engine.engine_config.device)
        request.generator.manual_seed(opts.seed if opts.seed is not None else torch.seed())
    return request
