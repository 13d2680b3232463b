"""Cancelling jobs, by id (Client.cancel, `pagedq cancel ID`) or a batch at a time (the
gateway's batch cancel, `pagedq cancel --batch ID`): the one implementation of both.

A queued job ends cancelled at once and never runs; a running one is flagged
(cancel_requested: no retry will run it) and its worker is told to abort it; a finished
one is left as it is. Each unfinished job changes in ONE conditional UPDATE, so a job
that a worker claims or gives back meanwhile is cancelled or flagged, never missed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import ColumnElement, case, func, select, update
from sqlalchemy.orm import Session

from worker.celery_app import CANCEL_COMMAND, PagedqCelery
from worker.models import Batch, BatchStatus, Job, JobStatus, utcnow

log = logging.getLogger(__name__)

CANCELLED_WITH_BATCH = "cancelled with its batch"
CANCELLED_BY_REQUEST = "cancelled before it started"
_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(slots=True)
class CancelReport:
    cancelled: int = 0  # were queued: ended cancelled, never to run
    flagged: list[str] = field(default_factory=list)  # were running: their workers abort them
    finished: int = 0  # had ended already: untouched
    missing: list[str] = field(default_factory=list)  # ids that name no job
    unreached: bool = False  # the workers could not be told: the flagged jobs run on

    def __str__(self) -> str:
        running = ("flagged (the broker was not reached: they run to their end)"
                   if self.unreached else "told to stop")
        return (f"{self.cancelled} queued cancelled, {len(self.flagged)} running {running}, "
                f"{self.finished} already finished (untouched)")


@dataclass(slots=True)
class BatchCancel:
    status: BatchStatus  # the batch's status after the cancel
    report: CancelReport


def cancel_where(session: Session, where: ColumnElement[bool], why: str) -> CancelReport:
    """Cancel the jobs matching `where`, in the caller's transaction."""
    now = utcnow()
    queued = Job.status == JobStatus.QUEUED
    finished = session.scalar(select(func.count()).select_from(Job).where(
        where, Job.status.not_in(_UNFINISHED))) or 0
    # RETURNING gives the new status: cancelled (was queued) or running (now flagged).
    changed = session.execute(
        update(Job).where(where, Job.status.in_(_UNFINISHED))
        .values(status=case((queued, JobStatus.CANCELLED.value), else_=Job.status),
                error=case((queued, why), else_=Job.error),
                finished_at=case((queued, now), else_=Job.finished_at),
                cancel_requested=True, updated_at=now)
        .returning(Job.id, Job.status)
        .execution_options(synchronize_session=False)).all()
    return CancelReport(
        cancelled=sum(status is JobStatus.CANCELLED for _, status in changed),
        flagged=[job_id for job_id, status in changed if status is JobStatus.RUNNING],
        finished=finished)


def cancel_jobs(session: Session, job_ids: Iterable[str]) -> CancelReport:
    """Cancel these jobs, in the caller's transaction; `missing` names the unknown ids."""
    ids = list(dict.fromkeys(job_ids))
    known = set(session.scalars(select(Job.id).where(Job.id.in_(ids))))
    report = cancel_where(session, Job.id.in_(ids), CANCELLED_BY_REQUEST)
    report.missing = [job_id for job_id in ids if job_id not in known]
    return report


def cancel_batch(session: Session, batch_id: str,
                 *owned: ColumnElement[bool]) -> BatchCancel | None:
    """Move an in-progress batch to cancelling and cancel its unfinished jobs, in the
    caller's transaction. A cancelling batch has its jobs cancelled again (one given
    back to the queue meanwhile ends too); one in any other state is left as it is.
    `owned`: conditions on the batch (the gateway's: the caller's API key).
    None: no such batch (for these conditions)."""
    session.execute(
        update(Batch).where(Batch.id == batch_id, *owned,
                            Batch.status == BatchStatus.IN_PROGRESS)
        .values(status=BatchStatus.CANCELLING, cancelling_at=utcnow())
        .execution_options(synchronize_session=False))
    status = session.scalar(select(Batch.status).where(Batch.id == batch_id, *owned))
    if status is None:
        return None
    if status is not BatchStatus.CANCELLING:
        return BatchCancel(status, CancelReport())
    return BatchCancel(status, cancel_where(session, Job.batch_id == batch_id,
                                            CANCELLED_WITH_BATCH))


def tell_workers(app: PagedqCelery, job_ids: Iterable[str]) -> bool:
    """Ask the workers to abort these running jobs (each worker's engine drops those it
    holds); their rows must already say cancel_requested. False: the broker could not
    be reached, and the jobs run to their end, but no retry runs them again."""
    try:
        for job_id in job_ids:
            app.control.broadcast(CANCEL_COMMAND, arguments={"job_id": job_id})
    except (BrokerError, OSError) as exc:
        log.warning("could not tell the workers to stop running jobs: %s", exc)
        return False
    return True
