"""One caller cannot hurt another: sentences dropped from a running batch (their caller gave up) free their cache
rows and memory slots and leave the others decoding as they would alone; the worker cancels a request's sentences
at the next step; a failure injected at admission, at a step or at delivery fails only the request it belongs to,
and the queue and running counts go back to zero on every path."""
from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

import pyengine
from conftest import random_sources, sample_lines
from pyengine.config import ServerConfig
from pyengine.decoding import Runtime
from pyengine.engine import Translation
from pyengine.serving import Scheduler, create_app
from pyengine.serving.request import Request

OPTS = dict(beam_size=2, max_decoding_length=40)


@pytest.fixture(scope="module")
def default_engine():
    return pyengine.Engine.load("default")


@pytest.mark.parametrize("options", [dict(beam_size=1, max_decoding_length=20),
                                     dict(beam_size=3, num_hypotheses=2, max_decoding_length=20),
                                     dict(beam_size=2, return_attention=True, max_decoding_length=20)],
                         ids=["greedy", "beam3", "beam2-attention"])
def test_dropped_sentences_free_their_rows_and_the_others_decode_as_alone(marian_dir, options):
    drop_while_decoding(pyengine.Engine.load(marian_dir), options)


def test_dropped_sentences_of_joined_cohorts_leave_the_others_as_alone():
    """The same with cohorts joined into one search state (int8: fused output layer): dropping sentences of
    several runs keeps each run's rows and steps right."""
    stats = drop_while_decoding(pyengine.Engine.load("default", dtype="int8"),
                                dict(beam_size=3, num_hypotheses=2, max_decoding_length=20))
    assert stats.joined >= 2


def drop_while_decoding(engine, options: dict):
    """Cohorts of 4 admitted every other step, the oldest and newest live sentence dropped every third step: the
    rows and slots freed, every other sentence decoded as alone; returns the runtime's stats."""
    sources = random_sources(16, engine.config.src_vocab_size, seed=5)
    opts, cfg = engine.options(**options), engine.config
    batch = Runtime(engine.model, engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id)
    waiting, results, dropped, step = list(range(len(sources))), {}, set(), 0
    with torch.inference_mode():
        while waiting or batch.cohorts:
            if waiting and step % 2 == 0:
                take, waiting = waiting[:4], waiting[4:]
                batch.admit([sources[i] for i in take], take)
            live = [t for c in batch.cohorts for t in (c.tags[i] for i in c.strategy.live)]
            if step % 3 == 2 and len(live) > 2:  # callers give up: some of the oldest and newest sentences
                gone = {live[0], live[-1]}
                assert batch.drop(gone) == 2
                dropped |= gone
                beams = opts.beam_size
                assert batch.memory.pool.in_use == batch.sentences == len(live) - 2
                assert batch.cache.slots.in_use == batch.sentences * beams == batch.rows
            results.update(batch.step())
            step += 1
    assert batch.cache.slots.in_use == 0 and batch.memory.pool.in_use == 0
    assert dropped and not dropped & set(results)
    assert set(results) | dropped == set(range(len(sources)))
    for i, hyps in results.items():
        alone = engine.generate([sources[i]], **options)[0]
        assert [h.tokens for h in hyps] == alone.tokens
    return batch.stats


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def test_cancel_takes_a_request_out_of_the_running_batch_at_the_next_step(default_engine):
    long_texts = sorted(sample_lines(), key=len)[-24:]
    scheduler = Scheduler(default_engine).start()
    try:
        # forced to 160 steps: no sentence of it can finish before the cancellation, however fast the machine
        request, future = scheduler.submit(long_texts, beam_size=4, max_decoding_length=160, min_decoding_length=160)
        wait_until(lambda: scheduler.running == len(long_texts) and scheduler.stats.steps >= 2)
        _, short = scheduler.submit(["Open the file."], **OPTS)
        steps = scheduler.stats.steps
        scheduler.cancel(request)
        wait_until(lambda: future.cancelled())
        assert scheduler.stats.steps <= steps + 2, "cancelled sentences must leave at the next step"
        wait_until(short.done)
        assert short.result()[0].hypotheses[0] == default_engine.translate(["Open the file."], **OPTS)[0]
        wait_until(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
        assert scheduler.stats.cancelled == len(long_texts)
        # a request cancelled while it still waits never runs
        blocker, _ = scheduler.submit(long_texts[:4], beam_size=4, max_decoding_length=160, min_decoding_length=160)
        waiting, waiting_future = scheduler.submit(long_texts[4:8], beam_size=3, max_decoding_length=160)
        scheduler.cancel(waiting)
        wait_until(lambda: waiting_future.cancelled())
        scheduler.cancel(blocker)
        wait_until(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)
    finally:
        scheduler.stop()


POISONED = "Poisoned sentence here."


@pytest.fixture
def poisoned(default_engine, monkeypatch):
    """Make one part of the worker raise for the poisoned sentence: admission (encoding its cohort), a decode step
    of a batch holding it, or delivery (detokenizing its result). Returns the list of failures raised."""
    source = default_engine.prepare([POISONED])[0][0]
    result = default_engine.translate_batch([POISONED], **OPTS)[0].tokens[0]
    raised: list[str] = []

    def check(found: bool, where: str) -> None:
        if found:
            raised.append(where)
            raise RuntimeError(f"injected failure at {where}")

    def install(where: str) -> list[str]:
        if where == "admission":
            admit = Runtime.admit

            def failing_admit(self, ids, *args, **kwargs):
                check(any(list(x) == source for x in ids), where)
                return admit(self, ids, *args, **kwargs)
            monkeypatch.setattr(Runtime, "admit", failing_admit)
        elif where == "step":
            step = Runtime.step

            def failing_step(self):
                check(any(list(r.ids[i]) == source for c in self.cohorts for r, i in c.tags), where)
                return step(self)
            monkeypatch.setattr(Runtime, "step", failing_step)
        else:
            of = Translation.of.__func__

            def failing_of(cls, hyps, decode):
                check(hyps[0].tokens == result, where)
                return of(cls, hyps, decode)
            monkeypatch.setattr(Translation, "of", classmethod(failing_of))
        return raised
    return install


@pytest.mark.parametrize("where", ["admission", "step", "delivery"])
def test_an_injected_failure_fails_its_request_only(default_engine, poisoned, where, caplog):
    """Good requests sent with the poisoned one, into the same batch, get exactly their offline translations; the
    poisoned request gets a 500 naming the error; /health shows zero queued and running; the traceback is logged."""
    texts = sample_lines()[:24]
    offline = default_engine.translate(texts, **OPTS)
    raised = poisoned(where)
    app = create_app(default_engine, ServerConfig())
    with TestClient(app) as client, caplog.at_level("ERROR", logger="pyengine.serving"):
        answers: dict[int, object] = {}

        def post(k: int, body: dict) -> None:
            answers[k] = client.post("/v1/translate", json=body)

        bodies = [{"texts": texts[i: i + 4], "options": OPTS} for i in range(0, len(texts), 4)]
        bodies.insert(3, {"texts": ["Open the file.", POISONED], "options": OPTS})
        threads = [threading.Thread(target=post, args=(k, b)) for k, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bad = answers.pop(3)
        assert bad.status_code == 500 and "injected failure" in bad.json()["error"]
        for k, r in answers.items():
            body = bodies[k]
            assert r.status_code == 200, r.text
            got = [t["translation"] for t in r.json()["translations"]]
            assert got == [offline[texts.index(t)] for t in body["texts"]]
        health = client.get("/health").json()
        assert (health["queue_depth"], health["running"]) == (0, 0)
        good = client.post("/v1/translate", json={"texts": texts[:2], "options": OPTS})
        assert good.status_code == 200 and [t["translation"] for t in good.json()["translations"]] == offline[:2]
    assert raised and set(raised) == {where}
    assert any("injected failure" in (r.exc_text or "") for r in caplog.records), "the traceback must be logged"


def test_the_worker_holds_nothing_once_requests_end(default_engine):
    """After answered, cancelled and failed requests, no Request and no running batch stays referenced (a leak
    per request would grow a server's memory forever; RSS in test_hostile is too coarse to see one)."""
    scheduler = Scheduler(default_engine).start()
    try:
        def mix() -> None:
            texts = sample_lines()[:16]
            answered = [scheduler.submit(texts[i: i + 4], **OPTS)[1] for i in range(0, 16, 4)]
            request, cancelled = scheduler.submit(sorted(texts, key=len)[-8:], beam_size=4, max_decoding_length=160)
            scheduler.cancel(request)
            with pytest.raises(pyengine.errors.OptionError):
                scheduler.submit(texts[:2], beam_size=2, suppress_tokens=[10 ** 9])
            for f in answered:
                f.result(timeout=120)
            wait_until(lambda: cancelled.done())
            wait_until(lambda: scheduler.running == 0 and scheduler.queue_depth == 0)

        mix()

        def alive() -> list:
            gc.collect()
            return [o for o in gc.get_objects() if type(o) in (Request, Runtime)]  # type(): no lazy proxies touched

        # `running` reads 0 once the last batch leaves the worker's table, while the worker may still be in that step
        # (its finished (request, i) tags are locals until the step returns): what it holds then is gone within the
        # step; a leak stays
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        left = alive()
        assert not left, f"{len(left)} Request/Runtime objects still referenced"
        assert not scheduler._waiting and not scheduler._batches and not scheduler._cancelled
    finally:
        scheduler.stop()
