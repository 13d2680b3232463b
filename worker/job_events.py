"""Celery task events for each job of a many-job message, so that Flower, which knows
work only as tasks, lists every job as a task of its own, as it lists a job sent alone.

Task threads only queue events; one thread publishes them, many to a message, on a
broker connection of its own. The events are for watching: while the broker is away
they are dropped, never waited for, and the jobs' rows in SQL stay the record.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from celery import Celery
from celery.events.dispatcher import EventDispatcher

from worker.executor import Outcome
from worker.models import JobStatus

log = logging.getLogger(__name__)

EVENTS_PER_MESSAGE = 100
# How long a job's end may wait for others to share its message.
FLUSH_INTERVAL_S = 0.25
# A broker outage is logged once a minute, not once a flush.
WARN_EVERY_S = 60.0
# How long a stopping worker waits for the last events to go out.
CLOSE_TIMEOUT_S = 5.0
# Receipt times kept for runtimes: a job retried on another worker never ends here.
MAX_TRACKED_JOBS = 100_000

Event = tuple[str, dict[str, Any]]


class JobEvents:
    """The task events of the jobs of many-job messages; every method is thread-safe
    and returns without waiting for the broker."""

    def __init__(self, app: Celery, hostname: str, task_name: str,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        """`hostname`: the worker's node name, which Flower files the tasks under;
        `task_name`: the name its tasks are listed by."""
        self.app = app
        self.hostname = hostname
        self.task_name = task_name
        self.flush_interval_s = flush_interval_s
        self.enabled = bool(app.conf.worker_send_task_events)
        self._lock = threading.Condition()
        # Under _lock: events for the publishing thread, and when jobs were received.
        self._queued: list[Event] = []
        self._received_at: dict[str, float] = {}
        self._urgent = False
        self._closing = False
        # Used by the publishing thread only: kombu's producers are not thread-safe.
        self._dispatcher: EventDispatcher | None = None
        self._dropped = 0
        self._last_warning = -math.inf
        self._thread = threading.Thread(target=self._publish_loop, name="pagedq-job-events",
                                        daemon=True)
        if self.enabled:
            self._thread.start()

    def received(self, job_ids: Sequence[str], *, parent_id: str | None = None) -> None:
        """The jobs of a message (task id `parent_id`) were taken: each shows as its
        own task, started on this worker at once, since they all run together."""
        if not self.enabled:
            return
        now = time.time()
        events: list[Event] = []
        for job_id in job_ids:
            # The args and root of a task that carries this job alone.
            events.append(("task-received", {
                "uuid": job_id, "timestamp": now, "name": self.task_name,
                "args": repr([job_id]), "kwargs": "{}",
                "parent_id": parent_id, "root_id": parent_id or job_id}))
            events.append(("task-started", {"uuid": job_id, "timestamp": now}))
        with self._lock:
            self._remember(job_ids, now)
        # Sent at once: the jobs' tasks must not show up only when they end.
        self._queue(events, urgent=True)

    def ended(self, outcome: Outcome) -> None:
        """A job's end is in SQL: its task ends as the job did."""
        if not self.enabled:
            return
        now = time.time()
        with self._lock:
            received_at = self._received_at.pop(outcome.job_id, None)
        if outcome.status is None or not outcome.recorded:
            # This attempt ended nothing. The job runs elsewhere, or a newer attempt
            # took it over: that attempt sends its end; or the job had already ended,
            # and the attempt that ended it sent that.
            return
        runtime = None if received_at is None else now - received_at
        self._queue([_end_event(outcome, now, runtime)], urgent=False)

    def close(self) -> None:
        """Send what is queued, waiting CLOSE_TIMEOUT_S at most, and stop."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self.enabled:
            self._thread.join(CLOSE_TIMEOUT_S)

    def _remember(self, job_ids: Sequence[str], now: float) -> None:
        for job_id in job_ids:
            # Taken out first so that a redelivered job counts as the newest.
            self._received_at.pop(job_id, None)
            self._received_at[job_id] = now
        while len(self._received_at) > MAX_TRACKED_JOBS:
            del self._received_at[next(iter(self._received_at))]

    def _queue(self, events: list[Event], urgent: bool) -> None:
        with self._lock:
            if self._closing:
                return
            self._queued.extend(events)
            if urgent or len(self._queued) >= EVENTS_PER_MESSAGE:
                self._urgent = True
            self._lock.notify()

    def _publish_loop(self) -> None:
        while True:
            batch, closing = self._next_batch()
            self._send(batch)
            if closing:
                self._disconnect()
                return

    def _next_batch(self) -> tuple[list[Event], bool]:
        with self._lock:
            self._lock.wait_for(lambda: self._queued or self._closing)
            self._lock.wait_for(lambda: self._urgent or self._closing,
                                timeout=self.flush_interval_s)
            batch, self._queued, self._urgent = self._queued, [], False
            return batch, self._closing

    def _send(self, batch: list[Event]) -> None:
        if not batch:
            return
        try:
            dispatcher = self._dispatcher or self._connect()
            for type_, fields in batch:
                # Buffered: the dispatcher publishes a full buffer as one message.
                dispatcher.send(type_, **fields)
            dispatcher.flush()
        except Exception as exc:
            self._dropped += len(batch)
            # The connection may be half broken: the next batch starts a new one.
            self._disconnect()
            self._warn(exc)

    def _connect(self) -> EventDispatcher:
        # One connection attempt per batch: kombu's default retries would hold
        # the batch, and all queued behind it, for seconds while the broker is down.
        connection = self.app.connection_for_write(transport_options={"max_retries": 0})
        self._dispatcher = self.app.events.Dispatcher(
            connection, hostname=self.hostname, buffer_group=["task"],
            buffer_limit=EVENTS_PER_MESSAGE, buffer_while_offline=False)
        return self._dispatcher

    def _disconnect(self) -> None:
        if self._dispatcher is None:
            return
        dispatcher, self._dispatcher = self._dispatcher, None
        dispatcher.close()
        # Closing a connection the broker dropped can fail too; it is gone either way.
        with suppress(Exception):
            dispatcher.connection.close()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning < WARN_EVERY_S:
            return
        log.warning("could not send the task events of jobs (%r); %d events dropped "
                    "since the last warning", exc, self._dropped)
        self._last_warning = now
        self._dropped = 0


def _end_event(outcome: Outcome, now: float, runtime: float | None) -> Event:
    if outcome.status is JobStatus.FAILED:
        return "task-failed", {"uuid": outcome.job_id, "timestamp": now,
                               "exception": outcome.error or "failed"}
    assert outcome.status is not None
    # Celery calls every end without an exception SUCCESS. A task that carries its
    # job alone returns the status's value, and Flower holds the repr of what a
    # task returned: worker/flower.py shows an expired or cancelled job by it.
    return "task-succeeded", {"uuid": outcome.job_id, "timestamp": now,
                              "result": repr(outcome.status.value), "runtime": runtime}
