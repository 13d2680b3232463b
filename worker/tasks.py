"""The one Celery task: run a job by id; everything about it is in SQL."""

from __future__ import annotations

import logging

from celery import Task
from celery.exceptions import Reject

from worker.celery_app import TASK_NAME, PagedqCelery
from worker.executor import is_retryable
from worker.models import JobStatus

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0


class JobFailed(Exception):
    """Raised after a failed job was recorded, so that Flower shows it as FAILURE."""


def register_tasks(app: PagedqCelery) -> None:
    # max_retries=None: while the database is away the job keeps waiting for it
    # rather than being dropped; the attempts counter bounds real reruns.
    @app.task(bind=True, name=TASK_NAME, max_retries=None)
    def generate(self: Task, job_id: str) -> str:
        if app.runner is None:
            raise RuntimeError(f"{TASK_NAME} runs only in `pagedq worker`, which owns the engine")
        try:
            outcome = app.runner.run(job_id, self.request.hostname or "worker")
        except Exception as exc:
            if not is_retryable(exc):
                raise
            countdown = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** self.request.retries)
            log.warning("job %s: %r; retrying in %.1f s", job_id, exc, countdown)
            try:
                raise self.retry(exc=exc, countdown=countdown) from exc
            except Reject:
                # The retry could not be published: Celery drops this message, so
                # make the job due at the next sweep instead of losing it.
                _due_for_sweep(app, job_id)
                raise
        if outcome.status is JobStatus.FAILED and outcome.recorded:
            raise JobFailed(outcome.error)
        return outcome.status.value if outcome.status else outcome.claim.value


def _due_for_sweep(app: PagedqCelery, job_id: str) -> None:
    assert app.runner is not None
    try:
        app.runner.store.release_republish([job_id])
    except Exception as exc:
        log.warning("job %s: could not mark it for the sweep (%r); it is published again "
                    "after PAGEDQ_REPUBLISH_AFTER_S", job_id, exc)
