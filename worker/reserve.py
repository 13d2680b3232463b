"""The interactive reserve: threads of the worker pool that bulk jobs never hold.

With prefetch 1, each pool thread holds one message until its jobs end, so a
worker whose threads all held bulk messages would take no interactive message
until one of them ended. The worker therefore runs PAGEDQ_INTERACTIVE_RESERVE
threads more than its job slots, counts the bulk messages it holds and their jobs
(a message may carry several), and stops consuming the bulk queues while they
fill the slots or hold twice as many jobs: the spare threads can only take
interactive messages. The gate only decides when messages are taken, never
whether a job runs: a message stays in Redis (unacked, or not yet taken) until
its jobs end, and the claim in SQL still decides who runs them."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict, deque
from typing import Any

from celery import bootsteps, signals

from worker.celery_app import PagedqCelery, job_ended
from worker.schemas import QueueKind

log = logging.getLogger(__name__)

# Bulk jobs a worker holds, per slot: the running ones and as many waiting in its
# engine's queue, so that a slot freed is filled at once, not after a round trip
# to Redis.
LOOKAHEAD = 2


class BulkGate:
    """The bulk messages a worker holds and their jobs, by task id (a redelivered copy
    and a retry share their original's id), against the most it may hold: no more
    messages than slots, since each holds a thread until its jobs end, and no more
    jobs than LOOKAHEAD times the slots, so that the engine has the next jobs at hand
    as running ones end, while the rest stay in Redis for other workers."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.limit = LOOKAHEAD * slots  # jobs
        # Per task id, the jobs not yet ended of each of its messages, oldest first.
        self._held: defaultdict[str, deque[int]] = defaultdict(deque)
        # Read without the lock: an int is replaced, never torn.
        self._jobs = 0
        self._messages = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._jobs

    @property
    def messages(self) -> int:
        return self._messages

    @property
    def full(self) -> bool:
        return self._jobs >= self.limit or self._messages >= self.slots

    def take(self, task_id: str, jobs: int = 1) -> bool:
        """Count a bulk message of `jobs` jobs taken; True when the gate is full."""
        with self._lock:
            self._held[task_id].append(jobs)
            self._jobs += jobs
            self._messages += 1
            return self.full

    def job_ended(self, task_id: str) -> bool:
        """Count the end of one job of a message; True when that opens the gate."""
        with self._lock:
            copies = self._held.get(task_id, deque())
            for copy, jobs in enumerate(copies):
                if jobs:
                    was_full = self.full
                    copies[copy] -= 1
                    self._jobs -= 1
                    return was_full and not self.full
            return False

    def release(self, task_id: str) -> bool:
        """Count a message's end (its jobs not yet counted too); True when it was a
        bulk one and the gate is open now. Which copy of a task id ended is not
        known, but once all have, the counts are right again."""
        with self._lock:
            if task_id not in self._held:
                return False
            copies = self._held[task_id]
            self._jobs -= copies.popleft()
            self._messages -= 1
            if not copies:
                del self._held[task_id]
            return not self.full


class ReserveStep(bootsteps.StartStopStep):
    """A consumer bootstep that pauses the bulk queues while bulk jobs fill the slots.

    Pausing and resuming happen on the consumer's thread (kombu's consumer is not
    thread-safe): a message is counted there as it arrives, and a job thread that
    frees a slot hands the resume to it with `call_soon`."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        app: PagedqCelery = parent.app
        self.consumer = parent
        self.bulk_queues = tuple(app.queue_names([QueueKind.BULK]))
        # Threads less the reserve; the worker_init hook has added the reserve.
        self.gate = BulkGate(parent.controller.concurrency - app.settings.interactive_reserve)
        self.paused: list[str] = []
        # A weak reference would die with this step's bound methods.
        signals.task_received.connect(self._received, weak=False)
        signals.task_postrun.connect(self._ended, weak=False)
        job_ended.connect(self._job_ended, weak=False)
        signals.task_revoked.connect(self._revoked, weak=False)

    def start(self, parent: Any) -> None:
        # A restarted consumer (after a lost connection) consumes every queue again,
        # while the jobs it held before still run.
        self.paused = []
        log.info("bulk messages hold at most %d of %d threads (and %d jobs); %d threads "
                 "kept for interactive jobs", self.gate.slots, parent.controller.concurrency,
                 self.gate.limit, parent.app.settings.interactive_reserve)
        if self.gate.full:
            self._pause()

    def stop(self, parent: Any) -> None:
        # The consumer is cancelled: a resume queued by a job ending now must not
        # start it consuming again.
        self.paused = []

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        signals.task_received.disconnect(self._received)
        signals.task_postrun.disconnect(self._ended)
        job_ended.disconnect(self._job_ended)
        signals.task_revoked.disconnect(self._revoked)

    def info(self, parent: Any) -> dict[str, Any]:
        return {"intake": {"bulk_held": self.gate.held, "bulk_limit": self.gate.limit,
                           "bulk_messages": self.gate.messages,
                           "bulk_paused": bool(self.paused)}}

    # -- signal receivers ----------------------------------------------------

    def _received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """On the consumer's thread, as a message becomes a request."""
        if sender is not self.consumer or request is None:
            return
        if request.delivery_info.get("routing_key") in self.bulk_queues \
                and self.gate.take(request.id, _jobs(request.args)):
            self._pause()

    def _ended(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        """On the job's thread, once the task returned, raised or asked for a retry."""
        if task_id is not None and self.gate.release(task_id):
            self.consumer.call_soon(self._resume)

    def _job_ended(self, sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        """On the job's thread, as one job of a message ends."""
        if task_id is not None and self.gate.job_ended(task_id):
            self.consumer.call_soon(self._resume)

    def _revoked(self, sender: Any = None, request: Any = None, terminated: bool = False,
                 **_: Any) -> None:
        # A revoked request that never ran gets no postrun; one that ran does.
        if request is not None and not terminated:
            self._ended(task_id=request.id)

    # -- on the consumer's thread ------------------------------------------

    def _pause(self) -> None:
        tasks = self.consumer.task_consumer
        for name in self.bulk_queues:
            if tasks.consuming_from(name):
                # kombu delays a cancel that lands inside a read until the read is
                # over, and hands a message arriving for a cancelled queue back to
                # Redis: no message is dropped.
                tasks.cancel_by_queue(name)
                self.paused.append(name)

    def _resume(self) -> None:
        tasks = self.consumer.task_consumer
        if not self.paused or self.gate.full or tasks is None:
            return
        queues = self.consumer.app.amqp.queues
        # Added back in their order, after the interactive queues: these are still
        # drained first.
        for name in self.paused:
            tasks.add_queue(queues[name])
        self.paused = []
        tasks.consume()


def _jobs(args: Any) -> int:
    """The jobs a pagedq.generate message carries: one id, or a list of them."""
    first = args[0] if isinstance(args, list | tuple) and args else None
    return len(first) if isinstance(first, list) else 1


def add_reserve_threads(sender: Any = None, **_: Any) -> None:
    """worker_init: run `interactive_reserve` threads beyond the slots asked for."""
    app = sender.app
    if ReserveStep in app.steps["consumer"]:
        sender.concurrency += app.settings.interactive_reserve


def install_reserve(app: PagedqCelery) -> None:
    # Without a reserve, pausing the bulk queues when every thread is busy would
    # change nothing but the delay before the next message.
    if not app.settings.interactive_reserve:
        return
    app.steps["consumer"].add(ReserveStep)
    signals.worker_init.connect(add_reserve_threads, weak=False)
