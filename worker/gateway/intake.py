"""Requests arriving together become jobs together: one transaction, one publish.

Each HTTP request submits one job. Under a burst (hundreds of clients at once),
one transaction and one broker round trip per job would keep the database busy
and let the jobs trickle into the workers' engines; instead, while one batch is
being stored and published, the requests arriving meanwhile wait for the next
one. A lone request goes through at once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from itertools import groupby

from starlette.concurrency import run_in_threadpool

from worker.client import Client
from worker.job_rows import JobOwner
from worker.schemas import JobRequest


@dataclass(slots=True)
class _Pending:
    job: JobRequest
    owner: JobOwner
    future: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Intake:
    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, job: JobRequest, owner: JobOwner) -> str:
        """Store and publish one checked job (Client.parse); its id. Raises what
        Client.submit_many raises, for the whole batch it went with."""
        pending = _Pending(job, owner)
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="pagedq-intake")
        return await pending.future

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            for owner, group in groupby(sorted(batch, key=_by_owner), key=lambda p: p.owner):
                await self._store(owner, list(group))

    async def _store(self, owner: JobOwner, group: list[_Pending]) -> None:
        try:
            ids = await run_in_threadpool(self._client.submit_many, [p.job for p in group],
                                          owner)
        except Exception as exc:  # every job of the batch was left unsent: say so to each
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, job_id in zip(group, ids, strict=True):
            if not pending.future.done():
                pending.future.set_result(job_id)


def _by_owner(pending: _Pending) -> tuple[str, str, str]:
    owner = pending.owner
    return (owner.api_key_id or "", owner.batch_id or "",
            "" if owner.expires_at is None else owner.expires_at.isoformat())
