"""The gateway's StreamHub: hundreds of followers' blocking reads over one connection."""

import asyncio
import time
import uuid

import pytest
import redis
import redis.asyncio

from worker.gateway.stream_hub import StreamHub

FOLLOWERS = 300


def test_hundreds_of_followers_share_two_connections(redis_url):
    keys = [f"pagedq-test-hub:{uuid.uuid4().hex}:{i}" for i in range(FOLLOWERS)]
    writer = redis.Redis.from_url(redis_url)

    async def follow(hub: StreamHub, key: str) -> list[bytes]:
        got: list[bytes] = []
        last: str | bytes = "0-0"
        while len(got) < 3:
            for _, entries in await hub.xread({key: last}, block=5000):
                for entry_id, fields in entries:
                    got.append(fields[b"n"])
                    last = entry_id
        return got

    async def run() -> list[list[bytes]]:
        # A pool of two: one connection per follower would be refused.
        client = redis.asyncio.Redis.from_url(redis_url, max_connections=2)
        hub = StreamHub(client)
        try:
            readers = [asyncio.create_task(follow(hub, key)) for key in keys]
            writer.xadd(keys[0], {"n": 0})  # one stream has an entry before the others wait
            await asyncio.sleep(0.2)
            for n in range(3):
                for key in keys:
                    if (key, n) != (keys[0], 0):
                        writer.xadd(key, {"n": n})
                await asyncio.sleep(0.01)
            return await asyncio.wait_for(asyncio.gather(*readers), 30)
        finally:
            await client.aclose()

    try:
        results = asyncio.run(run())
    finally:
        writer.delete(*keys)
        writer.close()
    assert results == [[b"0", b"1", b"2"]] * FOLLOWERS


def test_a_read_without_entries_times_out_empty(redis_url):
    async def run() -> tuple[list, float]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            start = time.monotonic()
            reply = await StreamHub(client).xread({f"pagedq-test-hub:{uuid.uuid4().hex}": "0-0"},
                                                  block=300)
            return reply, time.monotonic() - start
        finally:
            await client.aclose()

    reply, waited = asyncio.run(run())
    assert reply == [] and 0.25 < waited < 2


def test_a_failed_read_reaches_every_waiting_follower():
    async def run() -> list[BaseException | list]:
        # Nothing listens there; redis-py retries a refused connection for about 4 s.
        client = redis.asyncio.Redis(port=1, socket_connect_timeout=1)
        hub = StreamHub(client)
        try:
            return await asyncio.gather(*[hub.xread({f"k{i}": "0-0"}, block=20_000)
                                          for i in range(3)], return_exceptions=True)
        finally:
            await client.aclose()

    results = asyncio.run(run())
    assert all(isinstance(r, redis.ConnectionError) for r in results), results


@pytest.mark.parametrize("entry_id", ["0-0", b"1700000000000-3"])
def test_a_read_without_block_is_a_plain_xread(redis_url, entry_id):
    key = f"pagedq-test-hub:{uuid.uuid4().hex}"
    writer = redis.Redis.from_url(redis_url)
    writer.xadd(key, {"n": 1}, id="1700000000000-4")

    async def run() -> list:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await StreamHub(client).xread({key: entry_id})
        finally:
            await client.aclose()

    try:
        [(_, entries)] = asyncio.run(run())
    finally:
        writer.delete(key)
        writer.close()
    assert [fields for _, fields in entries] == [{b"n": b"1"}]
