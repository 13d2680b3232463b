"""Group commit: the writes of many job threads, run by one thread in batches.

Job threads hand their request over and wait; the batch thread takes what has
queued up, waits a moment for the rest of a burst (the jobs that finished in
one engine step, the messages that arrived together), and runs them all in one
transaction. A batch names a job at most once, so that each job's write sees
the effect of the one before it, as it would in transactions of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from worker.db import is_transient

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Result = TypeVar("Result")

# After each arrival, wait this long for another before running the batch;
# never hold the first request longer than GATHER_MAX_S.
GATHER_GAP_S = 0.002
GATHER_MAX_S = 0.02
MAX_BATCH = 512  # well under PostgreSQL's 65,535 bind parameters per statement


@dataclass(slots=True)
class _Item(Generic[Request, Result]):
    request: Request
    future: Future[Result] = field(default_factory=Future)


class GroupCommit(Generic[Request, Result]):
    def __init__(self, name: str, run: Callable[[Sequence[Request]], Sequence[Result]],
                 key: Callable[[Request], str]) -> None:
        """`run(requests)`: one transaction for the batch, a result per request in
        order; `key(request)`: the job it writes."""
        self._run_batch = run
        self._key = key
        self._queue: deque[_Item[Request, Result]] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Result:
        """Run `request` in the next batch; raises what the batch's transaction raised."""
        return self.submit_later([request])[0].result()

    def submit_later(self, requests: Sequence[Request]) -> list[Future[Result]]:
        """Queue `requests` for the next batch without waiting for it."""
        items: list[_Item[Request, Result]] = [_Item(request) for request in requests]
        with self._changed:
            if not self._closed:
                self._queue.extend(items)
                self._changed.notify()
                return [item.future for item in items]
        # Closed: run them here, as a batch of their own.
        for item in items:
            self._execute([item])
        return [item.future for item in items]

    def close(self) -> None:
        """Run what is queued, then stop; later requests run in their caller's thread."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _next_batch(self) -> list[_Item[Request, Result]] | None:
        with self._changed:
            while not self._queue:
                if self._closed:
                    return None
                self._changed.wait()
            until = time.monotonic() + GATHER_MAX_S
            while len(self._queue) < MAX_BATCH and not self._closed:
                seen = len(self._queue)
                left = until - time.monotonic()
                if left <= 0 or not self._changed.wait(min(GATHER_GAP_S, left)) \
                        or len(self._queue) == seen:
                    break
            return self._take()

    def _take(self) -> list[_Item[Request, Result]]:
        """Up to MAX_BATCH queued items for distinct jobs, oldest first; a later
        request for a job already in the batch waits for the next one."""
        batch: list[_Item[Request, Result]] = []
        keys: set[str] = set()
        later: deque[_Item[Request, Result]] = deque()
        while self._queue and len(batch) < MAX_BATCH:
            item = self._queue.popleft()
            key = self._key(item.request)
            (later if key in keys else batch).append(item)
            keys.add(key)
        self._queue.extendleft(reversed(later))
        return batch

    def _execute(self, batch: list[_Item[Request, Result]]) -> None:
        try:
            results = self._run_batch([item.request for item in batch])
        except Exception as exc:
            if len(batch) > 1 and not is_transient(exc):
                # Not the database being away but something in one request: run
                # each alone, so that only that request fails.
                log.warning("a batch of %d writes failed (%r); running them one by one",
                            len(batch), exc)
                for item in batch:
                    self._execute([item])
                return
            for item in batch:
                item.future.set_exception(exc)
            return
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)
