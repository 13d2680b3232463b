"""Many followers' stream reads over one Redis connection.

Each streaming request follows its job's Redis Stream with a blocking XREAD. One
connection per follower would need hundreds of connections under load (and the
async client's pool refuses past its limit); instead the hub runs one XREAD over
the streams of every waiting follower and hands each its entries. A follower that
starts waiting while that XREAD is blocked joins the next one, at most BLOCK_MS
later; entries are never lost meanwhile, since each read starts after the last
entry its follower saw.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio

BLOCK_MS = 50


def _entry_id(value: str | bytes) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(slots=True)
class _Waiter:
    after: tuple[int, int]
    future: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class StreamHub:
    """A drop-in for `redis.asyncio.Redis.xread` of one stream at a time (what
    worker.streams.follow calls), sharing one blocking XREAD among all callers."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._waiters: dict[str, list[_Waiter]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def xread(self, streams: dict[str, str | bytes], block: int | None = None
                    ) -> list[Any]:
        """Entries after the given id of the one stream; without `block` at once,
        else waiting up to `block` ms for some ([] if none came)."""
        [(key, last_id)] = streams.items()
        if block is None:
            return await self._client.xread({key: last_id})
        waiter = _Waiter(_entry_id(last_id))
        self._waiters.setdefault(key, []).append(waiter)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="pagedq-stream-hub")
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), block / 1000)
        except TimeoutError:
            return []
        finally:
            self._forget(key, waiter)

    def _forget(self, key: str, waiter: _Waiter) -> None:
        waiters = self._waiters.get(key, [])
        if waiter in waiters:
            waiters.remove(waiter)
        if not waiters:
            self._waiters.pop(key, None)

    async def _read(self) -> None:
        """XREAD every waiting stream from its earliest awaited entry, until none waits."""
        while self._waiters:
            since = {key: "{}-{}".format(*min(w.after for w in waiters))
                     for key, waiters in self._waiters.items()}
            try:
                reply = await self._client.xread(since, block=BLOCK_MS)
            except Exception as exc:  # each follower decides what a failed read means
                for waiters in list(self._waiters.values()):
                    for waiter in waiters:
                        if not waiter.future.done():
                            waiter.future.set_exception(exc)
                self._waiters.clear()
                return
            for key, entries in reply or ():
                name = key.decode() if isinstance(key, bytes) else key
                for waiter in list(self._waiters.get(name, ())):
                    mine = [e for e in entries if _entry_id(e[0]) > waiter.after]
                    if mine and not waiter.future.done():
                        waiter.future.set_result([(key, mine)])
