"""The one Celery task: run a message's jobs by id; everything about them is in SQL."""

from __future__ import annotations

import logging
from collections import Counter

from celery import Task
from celery.exceptions import Reject

from worker.celery_app import TASK_NAME, PagedqCelery, job_ended
from worker.executor import Outcome, Report, is_retryable
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
    def generate(self: Task, job_ids: str | list[str]) -> str:
        """A message's jobs: one job id (the task is the job), or a list of them."""
        if app.runner is None:
            raise RuntimeError(f"{TASK_NAME} runs only in `pagedq worker`, which owns the engine")
        alone = isinstance(job_ids, str)
        ids = [job_ids] if alone else list(job_ids)
        hostname = self.request.hostname or "worker"
        # Celery's own events show a job that is its message's task; the jobs of a
        # many-job message are shown by events of their own.
        events = None if alone else app.job_events
        if events is not None:
            events.received(ids, parent_id=self.request.id)

        def ended(outcome: Outcome) -> None:
            if events is not None:
                events.ended(outcome)
            job_ended.send(sender=app, task_id=self.request.id)

        try:
            report = app.runner.run_many(ids, hostname, on_end=ended)
        except Exception as exc:
            if not is_retryable(exc):
                raise
            report = Report(retry=ids, error=exc)
        if report.retry:
            assert report.error is not None
            _retry(self, app, report.retry[0] if alone else report.retry, report.error)
        if alone:
            return _single(report.outcomes[0])
        return _summary(report.outcomes)


def _retry(task: Task, app: PagedqCelery, job_ids: str | list[str], exc: Exception) -> None:
    """Publish the jobs the machinery failed again, later, as this task's retry."""
    countdown = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** task.request.retries)
    log.warning("job(s) %s: %r; retrying in %.1f s", job_ids, exc, countdown)
    try:
        raise task.retry(args=[job_ids], exc=exc, countdown=countdown) from exc
    except Reject:
        # The retry could not be published: Celery drops this message, so make
        # the jobs due at the next sweep instead of losing them.
        _due_for_sweep(app, [job_ids] if isinstance(job_ids, str) else job_ids)
        raise


def _what(outcome: Outcome) -> str:
    """What this attempt recorded, or why it ran nothing."""
    return outcome.status.value if outcome.status else outcome.claim.value


def _single(outcome: Outcome) -> str:
    if outcome.status is JobStatus.FAILED and outcome.recorded:
        raise JobFailed(outcome.error)
    return _what(outcome)


def _summary(outcomes: list[Outcome]) -> str:
    """What a many-job message did, e.g. "32 jobs: 31 succeeded, 1 failed"."""
    counts = Counter(_what(o) for o in outcomes)
    return f"{len(outcomes)} jobs: " + ", ".join(f"{n} {what}" for what, n in counts.items())


def _due_for_sweep(app: PagedqCelery, job_ids: list[str]) -> None:
    assert app.runner is not None
    try:
        app.runner.store.release_republish(job_ids)
    except Exception as exc:
        log.warning("jobs %s: could not mark them for the sweep (%r); they are published "
                    "again after PAGEDQ_REPUBLISH_AFTER_S", job_ids, exc)
