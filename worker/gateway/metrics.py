"""The gateway's Prometheus metrics: its requests (by route template and status, and
their latency), and the queue as every replica sees it (jobs by status and queue from
SQL, queue depth from Redis), read when scraped."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.gateway.state import Gateway, gateway
from worker.models import Job

log = logging.getLogger(__name__)
router = APIRouter()
# Requests that matched no route share one label, so made-up paths add no series.
UNMATCHED = "unmatched"
# Up to minutes: a non-streaming answer lasts as long as its generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(slots=True)
class GatewayMetrics:
    """One app's own registry: several apps in one process never share series."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    requests: Counter = field(init=False)
    latency: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "pagedq_gateway_requests", "HTTP requests answered, by route and status "
            "(a streamed answer counts when it starts).", ["endpoint", "method", "status"],
            registry=self.registry)
        self.latency = Histogram(
            "pagedq_gateway_request_duration_seconds", "Time from a request to the end of "
            "its answer (a streamed one's last event).", ["endpoint", "method"],
            buckets=LATENCY_BUCKETS, registry=self.registry)


class _Counting:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would buffer streamed answers
    and hide the client's disconnect from them)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, counted = time.perf_counter(), False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                self._count(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not counted:  # failed before answering: the server answers 500
                self._count(scope, 500)
            self.metrics.latency.labels(_endpoint(scope), scope["method"]).observe(
                time.perf_counter() - started)

    def _count(self, scope: Scope, status: int) -> None:
        self.metrics.requests.labels(_endpoint(scope), scope["method"], str(status)).inc()


def _endpoint(scope: Scope) -> str:
    """The route's template ("/v1/batches/{batch_id}"), set once the router matched."""
    route = scope.get("route")
    return getattr(route, "path_format", None) or UNMATCHED


def install(app: FastAPI) -> None:
    metrics = GatewayMetrics()
    app.state.metrics = metrics
    app.add_middleware(_Counting, metrics=metrics)


@dataclass(slots=True)
class QueueSnapshot:
    jobs: dict[tuple[str, str], int]  # (status, queue kind) -> jobs
    depth: dict[str, int]  # broker queue -> messages waiting


class _QueueCollector(Collector):
    """One scrape's reading of the queue, as Prometheus families."""

    def __init__(self, snapshot: QueueSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("pagedq_jobs", "Jobs in the database, by status and queue.",
                                 labels=["status", "queue"])
        for (status, queue), count in sorted(self.snapshot.jobs.items()):
            jobs.add_metric([status, queue], count)
        depth = GaugeMetricFamily("pagedq_queue_depth", "Messages waiting in each broker "
                                  "queue (not yet taken by a worker).", labels=["queue"])
        for queue, count in sorted(self.snapshot.depth.items()):
            depth.add_metric([queue], count)
        yield jobs
        yield depth


def _job_counts(gw: Gateway) -> dict[tuple[str, str], int]:
    query = select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)
    with gw.client.store.engine.connect() as db:
        return {(str(status), queue): count for status, queue, count in db.execute(query)}


async def _snapshot(gw: Gateway) -> QueueSnapshot | None:
    """None when the database or Redis cannot be read: the gateway's own series are
    still served."""
    try:
        jobs = await run_in_threadpool(_job_counts, gw)
        depth = {queue: int(await gw.redis.llen(queue))
                 for queue in gw.client.app.queue_names()}
    except Exception as exc:  # a scrape must not fail on an outage
        log.warning("gateway metrics: the queue could not be read: %r", exc)
        return None
    return QueueSnapshot(jobs, depth)


@router.get("/metrics", include_in_schema=False)
async def metrics_text(request: Request) -> Response:
    gw, metrics = gateway(request), request.app.state.metrics
    text = generate_latest(metrics.registry)
    snapshot = await _snapshot(gw)
    if snapshot is not None:
        scrape = CollectorRegistry()  # this scrape's reading alone: no shared state
        scrape.register(_QueueCollector(snapshot))
        text += generate_latest(scrape)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
