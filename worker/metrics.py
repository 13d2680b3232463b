"""A worker's Prometheus metrics: its engine's live state, read at scrape time, and
the latency of the jobs it finished.

The registry is the worker's own (not prometheus_client's global one), so that
nothing else in the process, and no second worker in a test, mixes into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.models import JobStatus
from worker.records import JobMetrics

log = logging.getLogger(__name__)

# Engine gauges: metric name, help, key of EngineService.stats().
GAUGES = [
    ("pagedq_requests_running", "Sequences being decoded (a request with n > 1 counts n).",
     "running"),
    ("pagedq_requests_waiting", "Requests waiting to be scheduled.", "waiting"),
    ("pagedq_requests_swapped", "Requests swapped out to host memory.", "swapped"),
    ("pagedq_jobs_in_engine", "Jobs whose request is in the engine.", "jobs_in_engine"),
    ("pagedq_kv_blocks_used", "KV cache blocks in use on the device.", "kv_blocks_used"),
    ("pagedq_kv_blocks_total", "KV cache blocks on the device.", "kv_blocks_total"),
    ("pagedq_swap_blocks_used", "KV cache blocks in use in host memory.", "swap_blocks_used"),
    ("pagedq_swap_blocks_total", "KV cache blocks in host memory.", "swap_blocks_total"),
    ("pagedq_prefix_cache_hit_ratio", "Share of prompt tokens found in the prefix cache.",
     "prefix_cache_hit_rate"),
]
# Engine counters (exposed with _total): metric name, help, key of EngineService.stats().
COUNTERS = [
    ("pagedq_preemptions", "Requests preempted for lack of KV blocks.", "preemptions"),
    ("pagedq_swapped_out_blocks", "KV blocks swapped out to host memory.",
     "swapped_out_blocks"),
    ("pagedq_swapped_in_blocks", "KV blocks swapped back in.", "swapped_in_blocks"),
    ("pagedq_prompt_tokens", "Prompt tokens prefilled.", "prompt_tokens"),
    ("pagedq_generation_tokens", "Tokens generated.", "generated_tokens"),
    ("pagedq_engine_steps", "Engine steps run.", "steps"),
]
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0, 600.0, 1800.0, 3600.0)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
                   1.0, 2.5)


class EngineCollector(Collector):
    """The engine's state as of its last step, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if not stats:  # the engine is not built yet
            return
        for name, help_text, key in GAUGES:
            yield GaugeMetricFamily(name, help_text, value=stats[key])
        for name, help_text, key in COUNTERS:
            yield CounterMetricFamily(name, help_text, value=stats[key])


class WorkerMetrics:
    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        """`stats`: the engine's live state (EngineService.stats)."""
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        r = self.registry
        # Times are since the job was submitted, as its client sees them.
        self.ttft = Histogram("pagedq_time_to_first_token_seconds",
                              "From submission to the first generated token.",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("pagedq_time_per_output_token_seconds",
                              "Between generated tokens, after the first.",
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("pagedq_e2e_request_latency_seconds",
                             "From submission to the end of the attempt.",
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_time = Histogram("pagedq_queue_time_seconds",
                                    "From submission to the first engine step of the attempt.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.finished = Counter("pagedq_jobs_finished", "Jobs this worker ended, by status.",
                                ["status"], registry=r)

    def observe(self, status: JobStatus, metrics: JobMetrics | None) -> None:
        """A job ended here; `metrics`: its attempt's, when it ran in the engine."""
        self.finished.labels(status.value).inc()
        if metrics is None:
            return
        for histogram, value in ((self.ttft, metrics.ttft_s), (self.tpot, metrics.tpot_s),
                                 (self.e2e, metrics.e2e_s),
                                 (self.queue_time, metrics.queue_time_s)):
            if value is not None:
                histogram.observe(value)

    def serve(self, port: int, address: str) -> WSGIServer | None:
        """Serve /metrics on a thread; None (and an error logged) if it cannot: the
        worker runs on without its metrics rather than not at all."""
        try:
            server, _ = start_http_server(port, address, self.registry)
        except OSError as exc:
            log.error("cannot serve the worker's metrics on %s:%d (%s); set "
                      "PAGEDQ_METRICS_PORT to a free port", address, port, exc)
            return None
        log.info("metrics on http://%s:%d/metrics", address, server.server_port)
        return server
