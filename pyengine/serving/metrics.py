"""Prometheus metrics of one app: request counts and latencies, and the worker's counters read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .request import SchedulerStats
from .scheduler import Scheduler

CONTENT_TYPE_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


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
        self.worker = _WorkerCollector()
        self.registry.register(self.worker)

    def render(self, state: dict) -> bytes:
        """The metrics with the worker's `state` (Scheduler.state's; a worker in another process fed batch_rows the
        rows of its steps with it)."""
        self.worker.state = state
        return generate_latest(self.registry)


class _WorkerCollector:
    state = {"stats": SchedulerStats(), "queue_depth": 0, "running": 0, "workers": []}  # set by Metrics.render

    def collect(self):
        s, queue_depth, running = self.state["stats"], self.state["queue_depth"], self.state["running"]
        for name, doc, value in (("sentences", "Sentences admitted to a batch", s.sentences),
                                 ("source_tokens", "Source tokens admitted (EOS included)", s.source_tokens),
                                 ("target_tokens", "Target tokens generated (best hypothesis, EOS included)",
                                  s.target_tokens),
                                 ("decode_steps", "Decoder steps run", s.steps),
                                 ("cohorts", "Cohorts admitted (sentences encoded together)", s.cohorts),
                                 ("joined_cohorts", "Cohorts admitted into a running cohort's search state",
                                  s.joined),
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
        per_worker = CounterMetricFamily("pyengine_worker_sentences", "Sentences admitted, per worker process "
                                         "(serve --workers)", labels=["worker"])
        for k, worker in enumerate(self.state["workers"]):
            per_worker.add_metric([str(k)], worker["sentences"])
        yield per_worker
        yield GaugeMetricFamily("pyengine_queue_depth", "Sentences waiting for a batch",
                                value=queue_depth)
        yield GaugeMetricFamily("pyengine_running_sentences", "Sentences decoding now", value=running)
