"""Continuous batching: sentences admitted into a running batch at different steps decode exactly as
they do alone (tokens, scores, attention), with every decoding option whose rules depend on the step and in
every dtype, through the same decoder step and output layer as translate(); the worker (Scheduler) returns each
caller its own results; memory caps split batches instead of failing."""
from __future__ import annotations

import random
import time

import pytest
import torch

import pyengine
from conftest import random_sources, sample_lines
from pyengine.decoding import Runtime
from pyengine.errors import BatchMemoryError
from pyengine.serving import Scheduler

OPTION_SETS = {
    "greedy": dict(beam_size=1, max_decoding_length=20),
    "greedy-repetition-penalty": dict(beam_size=1, repetition_penalty=1.6, max_decoding_length=20),
    "beam3-length-penalty": dict(beam_size=3, num_hypotheses=3, length_penalty=0.6, max_decoding_length=20),
    "beam2-ngram-min-length": dict(beam_size=2, no_repeat_ngram_size=2, min_decoding_length=4,
                                   max_decoding_length=20),
    "beam2-early-stopping-attention": dict(beam_size=2, num_hypotheses=2, early_stopping=True,
                                           return_attention=True, max_decoding_length=20),
}


def decode_staggered(engine, sources: list[list[int]], opts, seed: int, every: int = 2, stats=None):
    """Admit the sources in cohorts of 1-4, a cohort every `every` steps, until all finish: their n-best
    and the most positions that shared a step (cohorts, or runs of one cohort's search state: Beam.absorb)."""
    rng = random.Random(seed)
    cfg = engine.config
    batch = Runtime(engine.model, engine.rules, opts, torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id,
                    stats=stats)
    waiting = list(range(len(sources)))
    results, step, cohorts_at_once = {}, 0, 0
    with torch.inference_mode():
        while waiting or batch.cohorts:
            if waiting and step % every == 0:
                n = rng.randint(1, 4)
                take, waiting = waiting[:n], waiting[n:]
                batch.admit([sources[i] for i in take], take)
            cohorts_at_once = max(cohorts_at_once, sum(len(c.strategy.spans(0)) for c in batch.cohorts))
            results.update(batch.step())
            step += 1
    return [results[i] for i in range(len(sources))], cohorts_at_once


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_staggered_admission_decodes_as_alone(marian_dir, name):
    engine = pyengine.Engine.load(marian_dir)
    sources = random_sources(14, engine.config.src_vocab_size, seed=len(name))
    opts = engine.options(**OPTION_SETS[name])
    got, overlap = decode_staggered(engine, sources, opts, seed=3, every=1)
    assert overlap >= 2, "cohorts of different steps must share the batch for the test to mean anything"
    for src, hyps in zip(sources, got):
        alone = engine.generate([src], **OPTION_SETS[name])[0]
        assert [h.tokens for h in hyps] == alone.tokens
        torch.testing.assert_close(torch.tensor([h.score for h in hyps]), torch.tensor(alone.scores),
                                   rtol=0, atol=1e-5)
        if opts.return_attention:
            for h, att in zip(hyps, alone.attention):
                expected = torch.tensor(att, dtype=torch.float32).reshape(len(h.tokens), len(src))
                torch.testing.assert_close(h.attention[:, : len(src)], expected, rtol=0, atol=1e-5)


def test_default_model_real_text_staggered(default_engine):
    texts = sample_lines()[:30]
    ids, opts = default_engine.prepare(texts, beam_size=4, max_decoding_length=64)
    got, overlap = decode_staggered(default_engine, ids, opts, seed=5, every=3)
    assert overlap >= 3
    alone = [default_engine.translate_batch([t], beam_size=4, max_decoding_length=64)[0] for t in texts]
    assert [h[0].tokens for h in got] == [a.tokens[0] for a in alone]


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_joined_cohorts_reach_the_length_limit_at_their_own_steps(dtype):
    """Cohorts joined into one search state (fused output layer, HF rules) with a length limit every sentence hits:
    a run takes HF's forced EOS at its own last step and ends there while the runs admitted later go on; each
    sentence's tokens and scores are those of translating it alone."""
    engine = pyengine.Engine.load("default", dtype=dtype)
    if not engine.model.output.fuses_topk:
        pytest.skip(f"cohorts join where the output layer is fused; this CPU runs the library {dtype} GEMMs")
    texts = sample_lines()[60:80]
    options = dict(beam_size=3, num_hypotheses=2, max_decoding_length=5, length_penalty=0.7)
    ids, opts = engine.prepare(texts, **options)
    assert opts.forced_eos
    stats = pyengine.decoding.RuntimeStats()
    got, runs = decode_staggered(engine, ids, opts, seed=11, every=1, stats=stats)
    assert runs >= 3 and stats.joined >= 4
    for text, hyps in zip(texts, got):
        alone = engine.translate_batch([text], **options)[0]
        assert [h.tokens for h in hyps] == alone.tokens
        torch.testing.assert_close(torch.tensor([h.score for h in hyps]), torch.tensor(alone.scores), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def default_engine():
    return pyengine.Engine.load("default")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("beam", [1, 4])
def test_every_dtype_staggered_as_alone_on_the_same_path(dtype, beam):
    """Real text, cohorts admitted at staggered steps: each sentence's tokens and scores are those of translating
    it alone, and the batch's steps ran the decoder step and output path translate() runs (public stats)."""
    engine = pyengine.Engine.load("default", dtype=dtype)
    skip_library_int8(engine, dtype)
    texts = sample_lines()[40:58]
    ids, opts = engine.prepare(texts, beam_size=beam, num_hypotheses=beam, max_decoding_length=48)
    stats = pyengine.decoding.RuntimeStats()
    got, overlap = decode_staggered(engine, ids, opts, seed=7, every=2, stats=stats)
    assert overlap >= 3
    engine.stats = pyengine.decoding.RuntimeStats()
    alone = [engine.translate_batch([t], beam_size=beam, num_hypotheses=beam, max_decoding_length=48)[0]
             for t in texts]
    # alone, a beam cohort's first step ran on beam 0's rows (fused output layer); staggered, the joined cohorts'
    # first steps ran every row: the tokens and scores below are the same either way
    fused_beam = beam > 1 and engine.backends["output_layer"] == "fused-topk"
    assert (engine.stats.lead_steps == len(texts)) == fused_beam and stats.lead_steps <= 1
    for hyps, a in zip(got, alone):
        assert [h.tokens for h in hyps] == a.tokens
        torch.testing.assert_close(torch.tensor([h.score for h in hyps]), torch.tensor(a.scores), rtol=0, atol=1e-5)
    assert set(stats.decoder_steps) == set(engine.stats.decoder_steps) == {engine.backends["decoder_step"]}
    # beam cohorts joined one search state where the output layer is fused (Runtime._host_for), else stayed apart
    assert (stats.joined > 0) == (beam > 1 and engine.backends["output_layer"] == "fused-topk")
    assert set(stats.outputs) - {"none"} == set(engine.stats.outputs) - {"none"}
    want = {"int8": ("cpp-int8", "fused-topk"), "bfloat16": ("cpp-bf16", "fused-topk"),
            "float32": ("cpp-f32", "fused-topk")}[dtype]
    if not engine.model.output.fuses_topk:  # CPUs without AVX-512: PyTorch's float32 linears, called from C++
        want = ("cpp-float32", "logits")  # (bf16 too: float32 on its rounded weights)
    assert (engine.backends["decoder_step"], engine.backends["output_layer"]) == want
    assert want[1] in stats.outputs  # ("none" too at a forced-EOS last step: the model's generation config)


def skip_library_int8(engine: pyengine.Engine, dtype: str) -> None:
    """int8 on the libraries' GEMMs (CPUs without AVX512-VNNI) quantizes a GEMM's activations per tensor, so a
    sentence's result depends on its batch (docs/api.md): no "as alone" to check there."""
    if dtype == "int8" and not engine.model.output.fuses_topk:
        pytest.skip(f"int8 on the library GEMMs here ({engine.backends['linear']}): per-tensor activation scales")


MIXED = [dict(beam_size=4, max_decoding_length=48), dict(beam_size=2, max_decoding_length=40, length_penalty=0.6),
         dict(beam_size=1, max_decoding_length=48), dict(beam_size=3, num_hypotheses=2, max_decoding_length=48)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_option_sets_of_different_beams_share_one_batch_as_alone(dtype):
    """Cohorts of four option sets (beams 4, 2, 1, 3; lengths and penalties differ) admitted at staggered steps into
    one running batch, as the server's shared batch runs them: the cross-attention reads a row per decoder row
    (Memory.spread) and each sentence gets the tokens and scores of translating it alone with its options."""
    engine = pyengine.Engine.load("default", dtype=dtype)
    skip_library_int8(engine, dtype)
    texts = sample_lines()[60:76]
    cfg = engine.config
    prepared = [engine.prepare(texts[i::4], **MIXED[i]) for i in range(4)]
    batch = Runtime(engine.model, engine.rules, prepared[0][1], torch.device("cpu"), cfg.decoder_start_id, cfg.eos_id)
    results, spread = {}, False
    with torch.inference_mode():
        for step in range(400):
            if step % 2 == 0 and step // 2 < 4:
                ids, opts = prepared[step // 2]
                batch.admit(ids, [(step // 2, j) for j in range(len(ids))], opts=opts)
            if not batch.cohorts:
                break
            spread |= len({c.rows // c.sentences for c in batch.cohorts}) > 1
            results.update(batch.step())
    assert spread, "cohorts of different beams must have shared steps"
    for i, options in enumerate(MIXED):
        for j, text in enumerate(texts[i::4]):
            alone = engine.translate_batch([text], **options)[0]
            assert [h.tokens for h in results[(i, j)]] == alone.tokens
            torch.testing.assert_close(torch.tensor([h.score for h in results[(i, j)]]), torch.tensor(alone.scores),
                                       rtol=0, atol=1e-5)


def test_batch_refuses_options_it_cannot_share(default_engine):
    ids, opts = default_engine.prepare(["Open the file."], beam_size=2)
    batch = Runtime(default_engine.model, default_engine.rules, opts, torch.device("cpu"),
                    default_engine.config.decoder_start_id, default_engine.config.eos_id)
    _, with_attention = default_engine.prepare(["Open the file."], beam_size=2, return_attention=True)
    with pytest.raises(ValueError, match="batch of their own"):
        batch.admit(ids, [0], opts=with_attention)


def submit_all(scheduler, groups, texts, **options):
    futures = [scheduler.submit([texts[i] for i in g], **options)[1] for g in groups]
    return [f.result(timeout=300) for f in futures]


def test_scheduler_returns_each_caller_its_own_results(default_engine):
    texts = sample_lines()[:40]
    rng = random.Random(0)
    groups = [rng.sample(range(len(texts)), rng.randint(1, 6)) for _ in range(16)]
    alone = {i: default_engine.translate_batch([texts[i]], beam_size=2, max_decoding_length=64)[0].tokens
             for g in groups for i in g}
    scheduler = Scheduler(default_engine).start()
    try:
        results = submit_all(scheduler, groups, texts, beam_size=2, max_decoding_length=64)
    finally:
        scheduler.stop()
    for g, res in zip(groups, results):
        assert [r.tokens for r in res] == [alone[i] for i in g]
    assert max(scheduler.stats.rows_per_step) > 2 * 6, "requests must have shared a batch"
    assert not scheduler.alive


def test_scheduler_steps_option_sets_together(default_engine):
    """Requests with beam 2 and beam 4 (the server's two APIs' defaults differ so) decode in one shared batch: one
    decoder step serves both, so the worker steps as often as the longer set alone needs, not as often as both
    in turn; each caller still gets its own options' translations."""
    texts = sample_lines()[80:92]
    options = [dict(beam_size=2, max_decoding_length=48), dict(beam_size=4, max_decoding_length=48)]
    alone_steps = []
    for opts in options:
        scheduler = Scheduler(default_engine)
        futures = [scheduler.submit(texts[i:i + 3], **opts)[1] for i in range(0, len(texts), 3)]
        scheduler.run(until=lambda: all(f.done() for f in futures))
        alone_steps.append(scheduler.stats.steps)
    scheduler = Scheduler(default_engine)
    futures = [(opts, i, scheduler.submit(texts[i:i + 3], **opts)[1]) for opts in options
               for i in range(0, len(texts), 3)]
    scheduler.run(until=lambda: all(f.done() for _, _, f in futures))
    assert scheduler.stats.steps <= max(alone_steps) + 2 < sum(alone_steps), (scheduler.stats.steps, alone_steps)
    for opts, i, future in futures:
        want = [t.tokens for t in default_engine.translate_batch(texts[i:i + 3], **opts)]
        assert [r.tokens for r in future.result()] == want



def test_scheduler_serves_every_translate_option(default_engine):
    """Options that are not one search per sentence (return_alternatives) and biased prefixes reach the worker like
    the others and give translate_batch's results, beside ordinary requests in the running batch."""
    texts = sample_lines()[100:106]
    special = [dict(return_alternatives=True, num_hypotheses=3, max_decoding_length=32),
               dict(target_prefix=["Die"] * len(texts), prefix_bias_beta=0.4, max_decoding_length=32)]
    scheduler = Scheduler(default_engine)
    plain = scheduler.submit(texts, beam_size=2, max_decoding_length=32)[1]
    futures = [(opts, scheduler.submit(texts, **opts)[1]) for opts in special]
    scheduler.run(until=lambda: plain.done() and all(f.done() for _, f in futures))
    for opts, future in futures:
        want = default_engine.translate_batch(texts, **opts)
        assert [(r.tokens, r.scores) for r in future.result()] == [(t.tokens, t.scores) for t in want]
    assert any(len(r.tokens) == 3 for r in futures[0][1].result())
    assert [r.tokens for r in plain.result()] == [t.tokens for t in default_engine.translate_batch(
        texts, beam_size=2, max_decoding_length=32)]

def test_memory_cap_splits_batches_with_identical_results(text_model_dir):
    """An engine whose memory cap fits a few sentences per batch translates as an uncapped one."""
    texts = sample_lines()[:48]
    free = pyengine.Engine.load(text_model_dir)
    unit = pyengine.batching.decode_memory_bytes(free.config, 8, 60, 2, 24, torch.float32, torch.float32) / 2 ** 20
    capped = pyengine.Engine.load(text_model_dir, max_memory_mb=unit)
    assert capped.translate(texts, beam_size=2) == free.translate(texts, beam_size=2)
    assert capped.splits > 0
    tiny = pyengine.Engine.load(text_model_dir, max_memory_mb=0.001)
    with pytest.raises(BatchMemoryError, match="max_memory_mb"):
        tiny.translate([texts[0]])
    assert free.translate(texts[:2]) == capped.translate(texts[:2])  # still usable after the error


def test_scheduler_under_memory_cap_and_out_of_memory_steps(text_model_dir, monkeypatch):
    """Admission keeps the running batch under the cap; a step whose allocation fails evicts the newest
    cohort and retries, and every caller still gets the offline translation."""
    texts = sample_lines()[:40]
    free = pyengine.Engine.load(text_model_dir)
    alone = [free.translate_batch([t], beam_size=2)[0].tokens for t in texts]
    unit = pyengine.batching.decode_memory_bytes(free.config, 6, 80, 2, 24, torch.float32, torch.float32) / 2 ** 20
    capped = pyengine.Engine.load(text_model_dir, max_memory_mb=unit)
    decode, failures = capped.model.decoder_hidden, []

    def flaky_decode(tokens, *args, **kwargs):  # the allocator fails on every 5th step with > 4 rows
        if tokens.shape[0] > 4 and len(failures) < 6 and capped.model._calls % 5 == 4:
            failures.append(tokens.shape[0])
            capped.model._calls += 1
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        capped.model._calls += 1
        return decode(tokens, *args, **kwargs)

    capped.model._calls = 0
    monkeypatch.setattr(capped.model, "decoder_hidden", flaky_decode)
    scheduler = Scheduler(capped).start()
    try:
        groups = [[i] for i in range(len(texts))]
        results = submit_all(scheduler, groups, texts, beam_size=2)
    finally:
        scheduler.stop()
    assert [r[0].tokens for r in results] == alone
    assert failures and scheduler.stats.evictions == len(failures)
    assert max(scheduler.stats.rows_per_step) <= 2 * 6


def test_short_request_is_not_held_behind_a_long_one(default_engine):
    """A short request that arrives while a long batch decodes joins it at the next step and finishes
    first (continuous batching; a static batcher would answer it after the long batch)."""
    long_texts = sorted(sample_lines(), key=len)[-12:]
    scheduler = Scheduler(default_engine).start()
    try:
        _, long_future = scheduler.submit(long_texts, beam_size=4, max_decoding_length=160)
        while scheduler.stats.steps < 3:  # the long batch is decoding
            time.sleep(0.001)
        _, short_future = scheduler.submit(["Open the file"], beam_size=4, max_decoding_length=160)
        short = short_future.result(timeout=300)
        assert not long_future.done(), "the short request must finish while the long batch still runs"
        steps_at_short = scheduler.stats.steps
        long = long_future.result(timeout=300)
    finally:
        scheduler.stop()
    assert short[0].hypotheses[0] == default_engine.translate(["Open the file"], beam_size=4,
                                                             max_decoding_length=160)[0]
    assert scheduler.stats.steps > steps_at_short
    alone = default_engine.translate_batch(long_texts, beam_size=4, max_decoding_length=160)
    assert [r.tokens for r in long] == [a.tokens for a in alone]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_batch_reads_nothing_of_the_buffers_it_reuses(dtype):
    """A finished batch gives its KV cache, encoder memory and step buffers to the model's pool and the next batch
    starts on them (no fresh pages to fault in): with NaN in every pooled buffer the next call translates exactly as
    the first did (it reads only what it wrote), and it took and gave back the same tensors."""
    engine = pyengine.Engine.load("default", dtype=dtype)
    texts = sample_lines()[60:80]
    options = dict(beam_size=4, num_hypotheses=2, max_decoding_length=40)
    first = engine.translate_batch(texts, **options)
    pool = engine.model.buffer_pool
    held = {kind: pool.take(kind) for kind in ("kv-cache", "memory", "step-logits", "step-logp")}
    assert all(t is not None for t in held.values())
    with torch.inference_mode():  # (the engine made them under it)
        for kind, tensor in held.items():
            pool.give(kind, tensor.fill_(float("nan")))
    again = engine.translate_batch(texts, **options)
    assert [t.tokens for t in again] == [t.tokens for t in first]
    torch.testing.assert_close(torch.tensor([t.scores for t in again]), torch.tensor([t.scores for t in first]),
                               rtol=0, atol=0)
    assert all(pool.take(kind) is tensor for kind, tensor in held.items())
