"""What every request handler of the gateway shares: one per process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import redis.asyncio as aioredis
from fastapi import Depends, Request
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from worker.client import Client
from worker.gateway.errors import APIError, not_found
from worker.gateway.intake import Intake
from worker.gateway.stream_hub import StreamHub
from worker.keys import KeyInfo, KeyStore
from worker.models import Job, JobStatus
from worker.settings import Settings

# A revoked key stops working within this many seconds on every replica.
KEY_CACHE_S = 5.0
# PAGEDQ_MAX_QUEUED_JOBS is checked against a count at most this old: one query a
# second per replica, however many requests arrive.
QUEUED_CACHE_S = 1.0


@dataclass
class Gateway:
    settings: Settings
    client: Client  # stores and publishes jobs, as any producer does
    keys: KeyStore
    redis: aioredis.Redis  # the broker: queue depths, and the workers' per-job streams
    streams: StreamHub  # every follower's stream reads over one connection
    intake: Intake  # submissions arriving together, stored and published together
    _known: dict[str, tuple[float, KeyInfo | None]] = field(default_factory=dict)
    _queued: tuple[float, int] = (-math.inf, 0)  # (when counted, queued jobs)

    @classmethod
    def open(cls, settings: Settings) -> Gateway:
        broker, client = aioredis.Redis.from_url(settings.broker_url), Client(settings)
        return cls(settings, client, KeyStore(settings.database_url), broker,
                   StreamHub(broker), Intake(client))

    async def close(self) -> None:
        await self.redis.aclose()
        self.keys.close()
        self.client.close()

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model

    async def key_for(self, key: str) -> KeyInfo | None:
        now = time.monotonic()
        cached = self._known.get(key)
        if cached is not None and now - cached[0] < KEY_CACHE_S:
            return cached[1]
        info = await run_in_threadpool(self.keys.verify, key)
        if len(self._known) > 10_000:  # a flood of made-up keys must not grow it forever
            self._known.clear()
        self._known[key] = (now, info)
        return info


    async def queued_jobs(self) -> int:
        """Jobs waiting in the queues, counted at most QUEUED_CACHE_S ago."""
        counted_at, count = self._queued
        if time.monotonic() - counted_at >= QUEUED_CACHE_S:
            count = await run_in_threadpool(self._count_queued)
            self._queued = (time.monotonic(), count)
        return count

    def _count_queued(self) -> int:
        with self.client.store.engine.connect() as db:
            query = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
            return db.execute(query).scalar_one()


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def api_key(request: Request) -> KeyInfo:
    """The caller's key from `Authorization: Bearer <key>`; 401 without a valid one."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>' "
                            "(make one with `pagedq keys create NAME`).",
                       code="missing_api_key")
    info = await gateway(request).key_for(key.strip())
    if info is None:
        raise APIError(401, "Incorrect or revoked API key.", code="invalid_api_key")
    return info


Keyed = Annotated[KeyInfo, Depends(api_key)]  # the caller's key (checked once per request)
T = TypeVar("T")


async def owned(what: str, ident: str, lookup: Callable[..., T | None], *args: Any) -> T:
    """`lookup(*args)` (SQL) in a worker thread; None, which is also what another key's
    object gives, is a 404 naming `what`."""
    found = await run_in_threadpool(lookup, *args)
    if found is None:
        raise not_found(what, ident)
    return found
