"""Token streaming through the queue: the writer's entries on real Redis, the readers'
reconciling with SQL, and stream jobs through a real worker."""

import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import redis

from worker.models import JobStatus
from worker.records import Completion, JobRecord
from worker.streams import (
    StreamDelta,
    StreamDiverged,
    StreamWriter,
    follow,
    read_stream,
    stream_key,
)

PROMPT = "Streams carry tokens"


def completion(index, text, token_ids, finish_reason=None):
    from engine import CompletionOutput

    return CompletionOutput(index, text, token_ids, None, None, finish_reason)


def finished_record(job_id, *outputs):
    now = datetime.now(UTC)
    return JobRecord(job_id, JobStatus.SUCCEEDED, "interactive", 0, 1, False, "w", None, now,
                     now, now, outputs=[Completion(i, text, tokens, "length")
                                        for i, (text, tokens) in enumerate(outputs)])


class Attempt:
    """Writes one attempt's deltas the way the engine service does: with their starts."""

    def __init__(self, writer, job_id, attempt):
        self.writer, self.job_id, self.attempt = writer, job_id, attempt
        self.chars = self.tokens = 0

    def delta(self, text, tokens):
        self.writer.delta(self.job_id, self.attempt, [completion(0, text, tokens)],
                          [(self.chars, self.tokens)])
        self.chars += len(text)
        self.tokens += len(tokens)


@pytest.fixture
def writer(redis_url):
    writer = StreamWriter(redis_url, maxlen=1000, ttl_s=30)
    writer.start()
    yield writer
    writer.close()


@pytest.fixture
def r(redis_url):
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        yield client


def read_all(r, job_id, record):
    items = list(read_stream(r, job_id, lambda: record, poll_s=0.05, timeout=10))
    assert items[-1] is record
    return items[:-1]


def wait_for_end(r, job_id):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = r.xrange(stream_key(job_id))
        if entries and "status" in entries[-1][1]:
            return entries
        time.sleep(0.01)
    raise AssertionError(f"no end entry for {job_id}")


def test_a_retried_attempt_with_the_same_text_repeats_nothing(writer, r):
    job_id = uuid.uuid4().hex
    first = Attempt(writer, job_id, "lease-1")
    first.delta("Hel", [1, 2])
    first.delta("lo", [3])
    second = Attempt(writer, job_id, "lease-2")
    second.delta("Hello", [1, 2, 3])
    second.delta(" world", [4])
    writer.end(job_id, "lease-2", JobStatus.SUCCEEDED)
    wait_for_end(r, job_id)
    deltas = read_all(r, job_id, finished_record(job_id, ("Hello world", [1, 2, 3, 4])))
    assert [d.text for d in deltas] == ["Hel", "lo", " world"]
    assert [t for d in deltas for t in d.token_ids] == [1, 2, 3, 4]


def test_a_retried_attempt_with_other_text_raises_stream_diverged(writer, r):
    job_id = uuid.uuid4().hex
    Attempt(writer, job_id, "lease-1").delta("Hello", [1, 2, 3])
    Attempt(writer, job_id, "lease-2").delta("Help", [1, 2, 9])
    writer.end(job_id, "lease-2", JobStatus.SUCCEEDED)
    wait_for_end(r, job_id)
    with pytest.raises(StreamDiverged, match="other output for completion 0"):
        read_all(r, job_id, finished_record(job_id, ("Help", [1, 2, 9])))


def test_a_trimmed_stream_ends_with_the_rest_from_sql(writer, r):
    job_id = uuid.uuid4().hex
    attempt = Attempt(writer, job_id, "lease-1")
    for text, token in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        attempt.delta(text, [token])
    writer.end(job_id, "lease-1", JobStatus.SUCCEEDED)
    entries = wait_for_end(r, job_id)
    r.xdel(stream_key(job_id), entries[1][0])  # "b" lost: "c" and "d" cannot follow "a"
    deltas = read_all(r, job_id, finished_record(job_id, ("abcde", [1, 2, 3, 4, 5])))
    assert [d.text for d in deltas] == ["a", "bcde"]
    assert [t for d in deltas for t in d.token_ids] == [1, 2, 3, 4, 5]


def test_a_stream_lost_midway_ends_from_sql(writer, r):
    job_id = uuid.uuid4().hex
    record = finished_record(job_id, ("abc", [1, 2, 3]))
    fetched = [replace(record, status=JobStatus.RUNNING, outputs=[])]
    Attempt(writer, job_id, "lease-1").delta("a", [1])
    reader = read_stream(r, job_id, lambda: fetched[-1], poll_s=0.05, timeout=10)
    assert next(reader) == StreamDelta(0, "a", [1], None)
    r.delete(stream_key(job_id))  # Redis flushed: the rest never comes through it
    fetched.append(record)
    assert list(reader) == [StreamDelta(0, "bc", [2, 3], None), record]


def test_follow_is_the_async_twin(writer, redis_url):
    import asyncio

    import redis.asyncio

    job_id = uuid.uuid4().hex
    first = Attempt(writer, job_id, "lease-1")
    first.delta("Hel", [1, 2])
    Attempt(writer, job_id, "lease-2").delta("Hello!", [1, 2, 3, 4])
    writer.end(job_id, "lease-2", JobStatus.SUCCEEDED)
    record = finished_record(job_id, ("Hello!", [1, 2, 3, 4]))

    async def fetch():
        return record

    async def read():
        client = redis.asyncio.Redis.from_url(redis_url)  # bytes, not str, come back
        try:
            while not await client.xrange(stream_key(job_id), "-", "+"):
                await asyncio.sleep(0.01)
            return [item async for item in follow(client, job_id, fetch, poll_s=0.05)]
        finally:
            await client.aclose()

    items = asyncio.run(read())
    assert items == [StreamDelta(0, "Hel", [1, 2], None), StreamDelta(0, "lo!", [3, 4], None),
                     record]


def test_the_stream_expires_after_its_end(writer, r):
    job_id = uuid.uuid4().hex
    Attempt(writer, job_id, "lease-1").delta("a", [1])
    writer.end(job_id, "lease-1", JobStatus.SUCCEEDED)
    wait_for_end(r, job_id)
    assert 0 < r.pttl(stream_key(job_id)) <= 30_000


def test_the_writer_against_a_dead_redis_never_blocks_nor_raises():
    writer = StreamWriter("redis://127.0.0.1:1/0", maxlen=100, ttl_s=30, max_pending=50)
    writer.start()
    started = time.monotonic()
    for i in range(1000):
        writer.delta("job", "lease", [completion(0, "x", [i])], [(i, i)])
    writer.end("job", "lease", JobStatus.SUCCEEDED)
    assert time.monotonic() - started < 0.5
    writer.close(timeout=10)
    assert time.monotonic() - started < 10
    assert writer.dropped == 1001  # refused by Redis or past the bound: none kept


def test_a_stalled_writer_keeps_a_bounded_queue():
    writer = StreamWriter("redis://127.0.0.1:1/0", maxlen=100, ttl_s=30, max_pending=50)
    for i in range(1000):  # never started: nothing leaves the queue
        writer.delta("job", "lease", [completion(0, "x", [i])], [(i, i)])
    assert writer.dropped == 950


# -- through a worker -------------------------------------------------------


def submit(client, params, stream=True, prompt=PROMPT):
    return client.submit(prompt, params, stream=stream)


def by_index(deltas):
    texts, tokens, logprobs = {}, {}, {}
    for d in deltas:
        texts[d.index] = texts.get(d.index, "") + d.text
        tokens[d.index] = tokens.get(d.index, []) + d.token_ids
        if d.logprobs is not None:
            logprobs[d.index] = logprobs.get(d.index, []) + d.logprobs
    return texts, tokens, logprobs


def test_a_greedy_stream_job_streams_what_it_stores(pg_stack):
    client = pg_stack.client
    job_id = submit(client, {"temperature": 0, "max_tokens": 120, "ignore_eos": True,
                             "logprobs": 2})
    deltas = list(client.stream(job_id, timeout=120))
    record = client.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert len(deltas) > 5  # in pieces as it was generated, not whole at the end
    texts, tokens, logprobs = by_index(deltas)
    stored = record.outputs[0]
    assert texts == {0: stored.text} and tokens == {0: stored.token_ids}
    assert len(stored.token_ids) == 120
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert logprobs[0] == stored.logprobs


def test_a_stream_job_stores_what_a_plain_job_stores(pg_stack):
    client = pg_stack.client
    params = {"temperature": 0, "max_tokens": 40, "ignore_eos": True, "logprobs": 1,
              "stop": ["zzzz"]}
    streamed, plain = submit(client, params), submit(client, params, stream=False)
    list(client.stream(streamed, timeout=120))
    a, b = client.wait(streamed, timeout=120), client.wait(plain, timeout=120)
    assert a.status is b.status is JobStatus.SUCCEEDED
    # Exact but for float noise: the two ran at other places in the engine's batches.
    assert [replace(o, cumulative_logprob=None, logprobs=None) for o in a.outputs] == \
        [replace(o, cumulative_logprob=None, logprobs=None) for o in b.outputs]
    x, y = a.outputs[0], b.outputs[0]
    assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, rel=1e-5)
    assert [[(t, p.rank, p.decoded_token) for t, p in position.items()]
            for position in x.logprobs] == \
        [[(t, p.rank, p.decoded_token) for t, p in position.items()] for position in y.logprobs]
    assert [p.logprob for position in x.logprobs for p in position.values()] == \
        pytest.approx([p.logprob for position in y.logprobs for p in position.values()],
                      abs=1e-4)
    assert a.metrics.generated_tokens == b.metrics.generated_tokens == 40


def test_n_2_streams_each_completion(pg_stack):
    client = pg_stack.client
    job_id = submit(client, {"temperature": 0.9, "seed": 7, "n": 2, "max_tokens": 60,
                             "ignore_eos": True})
    deltas = list(client.stream(job_id, timeout=120))
    record = client.get(job_id)
    texts, tokens, _ = by_index(deltas)
    assert texts == {o.index: o.text for o in record.outputs}
    assert tokens == {o.index: o.token_ids for o in record.outputs}
    assert len(texts) == 2 and sum(1 for d in deltas if d.index == 1) > 1


def test_a_plain_job_arrives_whole_from_sql(pg_stack, redis_url):
    client = pg_stack.client
    job_id = submit(client, {"temperature": 0, "max_tokens": 8}, stream=False)
    record = client.wait(job_id, timeout=120)
    assert list(client.stream(job_id, timeout=30)) == \
        [StreamDelta(0, record.text, record.outputs[0].token_ids, None)]
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        entries = wait_for_end(r, job_id)  # its end is announced all the same
        assert len(entries) == 1 and entries[0][1]["status"] == "succeeded"
        assert r.pttl(stream_key(job_id)) > 0


def test_a_beam_search_job_streams_only_its_end(pg_stack):
    client = pg_stack.client
    job_id = submit(client, {"beam_width": 2, "max_tokens": 8})
    deltas = list(client.stream(job_id, timeout=120))
    record = client.get(job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert [(d.index, d.text) for d in deltas] == [(o.index, o.text) for o in record.outputs]


def test_streaming_an_unknown_job_is_a_key_error(pg_stack):
    with pytest.raises(KeyError):
        list(pg_stack.client.stream("no-such-job", timeout=5))
