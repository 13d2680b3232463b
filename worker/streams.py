"""Token streaming through the queue: each job's new text on a Redis Stream of its own.

The worker appends what every step generated (tagged with the attempt that made
it, and where in that attempt's output it starts) and, once the job's SQL row is
final, an end entry. Readers reconcile the entries with that row: Redis is a hint
that may lose entries, the row decides, so the deltas a reader yields always
concatenate to the stored outputs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis

from worker.models import JobStatus
from worker.records import JobRecord, logprobs_from_json, logprobs_to_json

if TYPE_CHECKING:
    from engine import CompletionOutput, Logprob

log = logging.getLogger(__name__)

KEY_PREFIX = "pagedq:stream:"
# Under a stalled Redis the writer keeps at most this many entries, then drops.
MAX_PENDING = 10_000
IO_TIMEOUT_S = 5.0
WARN_EVERY_S = 30.0
CLOSE_TIMEOUT_S = 10.0
# A reader asks SQL this often besides the end entry that wakes it (a job cancelled
# while queued gets none, nor does one whose worker died): hundreds of readers must
# not keep the database busy.
POLL_S = 5.0


def stream_key(job_id: str) -> str:
    return f"{KEY_PREFIX}{job_id}"


@dataclass(slots=True)
class StreamDelta:
    index: int  # which completion (n > 1)
    text: str  # new text
    token_ids: list[int]  # new tokens
    logprobs: list[dict[int, Logprob]] | None = None  # per new token, when the job asked


class StreamDiverged(RuntimeError):
    """A retried attempt produced other output than was already sent."""


# -- worker side ------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    job_id: str
    attempt: str
    outputs: Sequence[CompletionOutput] = ()
    starts: Sequence[tuple[int, int]] = ()
    status: JobStatus | None = None  # set: the end entry

    def fields(self) -> dict[str, str]:
        if self.status is not None:
            return {"attempt": self.attempt, "status": self.status.value}
        return {"attempt": self.attempt, "deltas": json.dumps([
            {"index": o.index, "at": list(start), "text": o.text, "token_ids": o.token_ids,
             "logprobs": logprobs_to_json(o.logprobs)}
            for o, start in zip(self.outputs, self.starts, strict=True)
        ])}


class StreamWriter:
    """Appends to the jobs' streams from one background thread, so that the engine
    loop only ever appends to a list. Each wake-up sends everything pending in one
    pipelined round trip. Redis away: entries are dropped with a warning now and
    then; the job's SQL row still holds its result."""

    def __init__(self, url: str, maxlen: int, ttl_s: float,
                 max_pending: int = MAX_PENDING) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=IO_TIMEOUT_S,
                                           socket_connect_timeout=IO_TIMEOUT_S)
        self._maxlen = maxlen
        self._ttl_ms = math.ceil(ttl_s * 1000)
        self._max_pending = max_pending
        self._pending: list[_Entry] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="pagedq-streams", daemon=True)
        self.dropped = 0  # entries lost: queue full, or Redis refused them
        self._reported_drops = 0
        self._warned_at = -math.inf

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is pending (for up to `timeout`), then stop."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        self._redis.close()

    def delta(self, job_id: str, attempt: str, outputs: Sequence[CompletionOutput],
              starts: Sequence[tuple[int, int]]) -> None:
        """A step's new outputs of one attempt; `starts`: for each output, how many
        characters and tokens this attempt had generated before it."""
        if any(o.text or o.token_ids for o in outputs):
            self._put(_Entry(job_id, attempt, outputs, starts))

    def end(self, job_id: str, attempt: str, status: JobStatus) -> None:
        """The job's row is final; the stream expires stream_ttl_s from now."""
        self._put(_Entry(job_id, attempt, status=status))

    def _put(self, entry: _Entry) -> None:
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self.dropped += 1
                return
            self._pending.append(entry)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Read before taking the batch: what close() followed is in this one.
            closing = self._closing
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                self._send(batch)
            self._warn_drops()
            if closing:
                return

    def _send(self, batch: list[_Entry]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        keys = set()
        for entry in batch:
            key = stream_key(entry.job_id)
            pipe.xadd(key, entry.fields(), maxlen=self._maxlen, approximate=True)
            keys.add(key)
        # Every write renews the expiry, so that a job whose worker died midway
        # leaves no stream behind either.
        for key in keys:
            pipe.pexpire(key, self._ttl_ms)
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self.dropped += len(batch)
            self._warn_drops(exc)

    def _warn_drops(self, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        if self.dropped == self._reported_drops or now - self._warned_at < WARN_EVERY_S:
            return
        log.warning("token streams: %d entries dropped (%d in all)%s; readers take the "
                    "text from SQL", self.dropped - self._reported_drops, self.dropped,
                    f": {exc!r}" if exc is not None else "")
        self._reported_drops, self._warned_at = self.dropped, now


# -- reader side ------------------------------------------------------------


class AsyncStreamReader(Protocol):
    """What `follow` reads with: redis.asyncio.Redis, or a hub sharing one connection."""

    async def xread(self, streams: dict[str, Any], block: int | None = None) -> Any: ...


@dataclass(slots=True)
class _Sent:
    """What a reader has been sent of one completion."""

    pieces: list[str] = field(default_factory=list)  # joined only when a retry overlaps
    chars: int = 0
    token_ids: list[int] = field(default_factory=list)

    def text(self) -> str:
        joined = "".join(self.pieces)
        self.pieces = [joined]
        return joined

    def add(self, delta: StreamDelta) -> None:
        self.pieces.append(delta.text)
        self.chars += len(delta.text)
        self.token_ids += delta.token_ids


class _Reconciler:
    """What a reader has been sent, per completion, and what the stream or the row
    adds to it: the one place that decides which output a reader gets.

    An attempt's output is contiguous from its start and, once read past what was
    sent, becomes what is sent; so each delta starts at or before the end of what
    was sent, and only its overlap with that needs checking."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.sent: dict[int, _Sent] = {}
        self.attempt: str | None = None
        self.made: dict[int, list[int]] = {}  # by the attempt being read: [chars, tokens]
        self.gap = False  # entries of this attempt were lost: the row gives the rest
        self.ended = False

    def feed(self, fields: Mapping[str, str]) -> list[StreamDelta]:
        if "status" in fields:
            self.ended = True
            return []
        if fields["attempt"] != self.attempt:
            self.attempt, self.made, self.gap = fields["attempt"], {}, False
        out: list[StreamDelta] = []
        for piece in [] if self.gap else json.loads(fields["deltas"]):
            made = self.made.setdefault(piece["index"], [0, 0])
            if piece["at"] != made:
                self.gap = True  # trimmed, dropped or flushed entries
                break
            delta = StreamDelta(piece["index"], piece["text"], piece["token_ids"],
                                logprobs_from_json(piece["logprobs"]))
            out += self._deliver(delta, made[0], made[1], check_text=True)
            made[0] += len(delta.text)
            made[1] += len(delta.token_ids)
        return out

    def rest(self, record: JobRecord) -> list[StreamDelta]:
        """What the finished row holds beyond the deltas already sent."""
        # The store writes NUL characters as U+FFFD (same length): tokens decide here.
        return [d for c in record.outputs for d in self._deliver(
            StreamDelta(c.index, c.text, list(c.token_ids), c.logprobs), 0, 0, check_text=False)]

    def _deliver(self, delta: StreamDelta, chars: int, tokens: int,
                 check_text: bool) -> list[StreamDelta]:
        """The part of `delta`, which starts `chars` characters and `tokens` tokens
        into its attempt's output, that the reader was not sent yet."""
        sent = self.sent.setdefault(delta.index, _Sent())
        seen_chars, seen_tokens = sent.chars - chars, len(sent.token_ids) - tokens
        agree = _starts_with(delta.token_ids, sent.token_ids[tokens:tokens + len(delta.token_ids)])
        if check_text and seen_chars > 0:
            agree = agree and _starts_with(delta.text,
                                           sent.text()[chars:chars + len(delta.text)])
        if not agree:
            raise StreamDiverged(
                f"job {self.job_id}: a retried attempt generated other output for completion "
                f"{delta.index} than the {len(sent.token_ids)} tokens already streamed "
                f"(sampling without a seed is not repeatable)")
        new = StreamDelta(delta.index, delta.text[max(seen_chars, 0):],
                          delta.token_ids[max(seen_tokens, 0):],
                          None if delta.logprobs is None else
                          delta.logprobs[max(seen_tokens, 0):])
        if not new.text and not new.token_ids:
            return []
        sent.add(new)
        return [new]


def _starts_with(items: Sequence[Any], prefix: Sequence[Any]) -> bool:
    """Whether `items` starts with `prefix`, or `prefix` with `items`."""
    n = min(len(items), len(prefix))
    return items[:n] == prefix[:n]


def _str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Follow:
    """A reader's state between reads, shared by the sync and the async loops:
    where it is in the stream, and when SQL is asked next."""

    def __init__(self, job_id: str, poll_s: float, timeout: float | None,
                 fresh: bool = False) -> None:
        self.job_id = job_id
        self.key = stream_key(job_id)
        self.poll_s = poll_s
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.reconciler = _Reconciler(job_id)
        self.last_id: str | bytes = "0-0"
        # The first look is at the row, which may be done already, unless the caller
        # has just submitted the job (`fresh`).
        self.next_fetch = time.monotonic() + poll_s if fresh else 0.0
        self.warned = False

    def fetch_due(self) -> bool:
        return self.reconciler.ended or time.monotonic() >= self.next_fetch

    def finished(self, record: JobRecord | None) -> bool:
        """Whether the row is final; if not, when to look again."""
        if record is None:
            raise KeyError(f"no job {self.job_id}")
        if record.finished:
            return True
        now = time.monotonic()
        if now >= self.deadline:
            raise TimeoutError(f"job {self.job_id} still {record.status.value} "
                               f"after {self.timeout} s")
        # An end entry for a row not yet final is not to be trusted: poll again.
        self.reconciler.ended = False
        self.next_fetch = min(now + self.poll_s, self.deadline)
        return False

    def block_ms(self) -> int:
        return max(1, math.ceil((self.next_fetch - time.monotonic()) * 1000))

    def last(self, reply: Any, record: JobRecord) -> list[StreamDelta]:
        """The entries not read yet (`reply`: all of them, or None if Redis failed),
        then the rest of the finished row."""
        return self.read(reply) + self.reconciler.rest(record)

    def read(self, reply: Any) -> list[StreamDelta]:
        out: list[StreamDelta] = []
        for _, entries in reply or ():
            for entry_id, fields in entries:
                self.last_id = entry_id
                out += self.reconciler.feed({_str(k): _str(v) for k, v in fields.items()})
        return out

    def redis_failed(self, exc: Exception) -> None:
        if not self.warned:
            log.warning("job %s: cannot read its token stream (%r); waiting on SQL",
                        self.job_id, exc)
            self.warned = True


def read_stream(client: redis.Redis, job_id: str, fetch: Callable[[], JobRecord | None], *,
                poll_s: float = POLL_S, timeout: float | None = None
                ) -> Iterator[StreamDelta | JobRecord]:
    """The sync twin of `follow`; TimeoutError once `timeout` seconds have passed."""
    follow = _Follow(job_id, poll_s, timeout)
    while True:
        if follow.fetch_due() and follow.finished(record := fetch()):
            assert record is not None
            try:
                reply = client.xread({follow.key: follow.last_id})
            except redis.RedisError:
                reply = None
            yield from follow.last(reply, record)
            yield record
            return
        try:
            reply = client.xread({follow.key: follow.last_id}, block=follow.block_ms())
        except redis.RedisError as exc:
            follow.redis_failed(exc)
            time.sleep(follow.block_ms() / 1000)
            continue
        yield from follow.read(reply)


async def follow(client: AsyncStreamReader, job_id: str,
                 fetch: Callable[[], Awaitable[JobRecord | None]], *, poll_s: float = POLL_S,
                 fresh: bool = False) -> AsyncIterator[StreamDelta | JobRecord]:
    """The job's deltas (stream jobs only), then a delta with whatever stored output
    they had not delivered, then its finished record. Waits on the job's stream and
    asks `fetch` (SQL) every `poll_s` seconds and at the end entry: Redis is a hint,
    SQL decides. KeyError if `fetch` returns None; StreamDiverged if a retried
    attempt generated other text than was sent. `fresh`: the job was just submitted,
    so SQL is first asked after `poll_s` (or at the end entry)."""
    state = _Follow(job_id, poll_s, None, fresh)
    while True:
        if state.fetch_due() and state.finished(record := await fetch()):
            assert record is not None
            try:
                reply = await client.xread({state.key: state.last_id})
            except redis.RedisError:
                reply = None
            for delta in state.last(reply, record):
                yield delta
            yield record
            return
        try:
            reply = await client.xread({state.key: state.last_id}, block=state.block_ms())
        except redis.RedisError as exc:
            state.redis_failed(exc)
            await asyncio.sleep(state.block_ms() / 1000)
            continue
        for delta in state.read(reply):
            yield delta
