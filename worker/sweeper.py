"""Publish again the jobs whose message or whose worker may be gone.

Redis' acknowledgements are emulated: a worker killed after popping a message
but before recording it in the unacked hash loses it for good, and a worker
killed while running jobs leaves their messages unacked until the visibility
timeout (an hour by default). The row in SQL is the truth, so every worker
periodically takes the jobs still queued long after their last publish, and
the running jobs whose lease has expired, and publishes them again.

The extra message this makes when the first one was not lost after all (it sat
in a long backlog) is safe: a delivery for a job that a live lease holds, or
that has finished, is dropped without running anything, and the lease that
fences each result keeps one set of outputs per job.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from worker.celery_app import PagedqCelery
from worker.client import BrokerUnavailable, publish
from worker.db import is_transient
from worker.schemas import QueueKind
from worker.store import JobStore

log = logging.getLogger(__name__)

# Jobs per sweep: a backlog older than the threshold is published again a
# batch per interval and per worker rather than all at once.
SWEEP_BATCH = 500


class Sweeper:
    def __init__(self, store: JobStore, app: PagedqCelery) -> None:
        self.store = store
        self.app = app
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pagedq-sweep")
        self._running: Future[None] | None = None

    def sweep(self) -> list[str]:
        """Publish again one batch of jobs that are due; returns the ids sent.

        A dead worker's jobs go to the resumed queues, drained first: they had
        waited their turn. A job whose message went missing goes back to its own
        queue: it cannot be told from one still waiting in a long backlog."""
        threshold = self.app.settings.republish_after_s
        due = self.store.claim_republish(threshold, SWEEP_BATCH)
        orphans = [(d.job_id, d.queue) for d in due if d.orphaned]
        lost = [(d.job_id, d.queue) for d in due if not d.orphaned]
        return (self._publish(orphans, True, "its worker was lost running it")
                + self._publish(lost, False, f"still queued {threshold:g} s after its "
                                             "last publish, its message may be lost"))

    def _publish(self, jobs: list[tuple[str, QueueKind]], resumed: bool, why: str) -> list[str]:
        unsent: set[str] = set()
        try:
            publish(self.app, jobs, resumed)
        except BrokerUnavailable as exc:
            unsent = set(exc.unsent)
            # Their message is still missing: the next sweep tries again.
            self.store.release_republish(unsent)
            log.warning("%s; the next sweep tries again", exc)
        sent = [job_id for job_id, _ in jobs if job_id not in unsent]
        for job_id in sent:
            log.info("job %s re-published: %s", job_id, why)
        return sent

    def sweep_in_background(self) -> None:
        """Start a sweep in this sweeper's thread, unless one is still running.

        For the worker's timer, which fires in the consumer's event loop: that
        loop must never wait on SQL or Redis."""
        if self._running is None or self._running.done():
            self._running = self._thread.submit(self._sweep_logged)

    def _sweep_logged(self) -> None:
        try:
            self.sweep()
        except Exception as exc:
            # A future keeps its exception to itself; the next sweep tries again.
            log.warning("sweep for lost job messages failed: %r", exc,
                        exc_info=not is_transient(exc))

    def close(self) -> None:
        """Wait for a sweep in progress, then let go of the database."""
        self._thread.shutdown(wait=True)
        self.store.close()
