"""The worker's two writes on job rows, for many jobs in one transaction: claiming
jobs for an attempt, and recording how attempts ended.

Each job in a batch gets exactly what a transaction of its own would give it:
the conditions are the same, checked per row, and every row is locked before
it is read or written. Rows are locked in job id order, so two batches that
share jobs (duplicate deliveries on two workers) wait for each other instead
of deadlocking. A batch names a job at most once (see GroupCommit).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from worker.job_rows import storable
from worker.models import Job, JobStatus, Metrics, Output, utcnow
from worker.records import (
    Claim,
    ClaimAsk,
    ClaimOutcome,
    FinishWrite,
    JobSpec,
    logprobs_to_json,
)

JOBS = Job.__table__


def claim_jobs(session: Session, asks: Sequence[ClaimAsk], max_attempts: int,
               lease_s: float) -> list[Claim]:
    """Take each job for one attempt under a fresh lease of its own (see JobStore.claim)."""
    now = utcnow()
    ordered = sorted(asks, key=lambda ask: ask.job_id)
    ids = _distinct([ask.job_id for ask in ordered])
    _lock(session, ids)
    leases = {job_id: uuid.uuid4().hex for job_id in ids}
    session.execute(
        update(JOBS)
        .where(JOBS.c.id == bindparam("job_id"), JOBS.c.cancel_requested.is_(False),
               JOBS.c.attempts < max_attempts, _takeable(now), _unexpired(now))
        .values(status=JobStatus.RUNNING, attempts=JOBS.c.attempts + 1,
                worker=bindparam("by"), started_at=now, updated_at=now,
                lease_id=bindparam("lease"), lease_expires_at=now + timedelta(seconds=lease_s)),
        [{"job_id": ask.job_id, "by": ask.worker, "lease": leases[ask.job_id]}
         for ask in ordered],
    )
    jobs = {job.id: job for job in session.scalars(
        select(Job).where(Job.id.in_(ids)).execution_options(populate_existing=True))}
    return [_outcome(jobs.get(ask.job_id), leases[ask.job_id], now) for ask in asks]


def _outcome(job: Job | None, lease_id: str, now: datetime) -> Claim:
    """What the claim did to a locked row: took it under `lease_id`, or why not."""
    if job is None:
        return Claim(ClaimOutcome.MISSING)
    if job.lease_id == lease_id:
        prompt = job.prompt_text if job.prompt_text is not None else job.prompt_token_ids
        return Claim(ClaimOutcome.CLAIMED, JobSpec(
            job.id, job.attempts, lease_id, prompt, dict(job.params), job.priority, job.chat,
            job.deadline_s, job.created_at, job.messages, job.stream, job.queue))
    if job.status.finished:
        return Claim(ClaimOutcome.FINISHED)
    if job.status is JobStatus.RUNNING and not expired(job.lease_expires_at, now):
        return Claim(ClaimOutcome.BUSY)
    job.finished_at = now
    job.lease_id = job.lease_expires_at = None
    if job.status is JobStatus.QUEUED and expired(job.expires_at, now, unset=False):
        job.status = JobStatus.EXPIRED
        job.error = "expired before it started"
        return Claim(ClaimOutcome.EXPIRED)
    if job.cancel_requested:
        job.status = JobStatus.CANCELLED
        return Claim(ClaimOutcome.CANCELLED)
    job.status = JobStatus.FAILED
    job.error = f"gave up after {job.attempts} attempts"
    return Claim(ClaimOutcome.EXHAUSTED)


def finish_jobs(session: Session, writes: Sequence[FinishWrite]) -> list[bool]:
    """Record the end of each attempt whose lease is still its job's: the status,
    every output and the metrics. False for an attempt whose lease was lost: it
    writes nothing, and the others in the batch are not affected."""
    now = utcnow()
    ordered = sorted(writes, key=lambda w: w.job_id)
    held = {job_id: lease_id for job_id, lease_id in session.execute(
        select(Job.id, Job.lease_id)
        .where(Job.id.in_(_distinct([w.job_id for w in ordered])),
               Job.status == JobStatus.RUNNING)
        .order_by(Job.id).with_for_update())}
    won = [w for w in ordered if held.get(w.job_id) == w.lease_id]
    if won:
        _record(session, won, now)
    return [held.get(w.job_id) == w.lease_id for w in writes]


def _record(session: Session, won: Sequence[FinishWrite], now: datetime) -> None:
    # The fence stays in the statement, though the rows are locked and checked.
    session.execute(
        update(JOBS)
        .where(JOBS.c.id == bindparam("job_id"), JOBS.c.lease_id == bindparam("lease"),
               JOBS.c.status == JobStatus.RUNNING)
        .values(status=bindparam("new_status"), error=bindparam("new_error"),
                prompt_logprobs=bindparam("new_prompt_logprobs"), finished_at=now,
                updated_at=now, lease_id=None, lease_expires_at=None),
        [{"job_id": w.job_id, "lease": w.lease_id, "new_status": w.status,
          "new_error": w.error, "new_prompt_logprobs": logprobs_to_json(w.prompt_logprobs)}
         for w in won],
    )
    outputs = [{"job_id": w.job_id, "index": o.index, "text": storable(o.text),
                "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                "stop_reason": None if o.stop_reason is None else storable(o.stop_reason),
                "cumulative_logprob": o.cumulative_logprob, "score": o.score,
                "logprobs": logprobs_to_json(o.logprobs)}
               for w in won for o in w.outputs]
    # Core executemany: the ORM's bulk insert would cost as much again in Python.
    connection = session.connection()
    if outputs:
        connection.execute(insert(Output.__table__), outputs)
    metrics = [{"job_id": w.job_id, **asdict(w.metrics)}
               for w in won if w.metrics is not None]
    if metrics:
        connection.execute(insert(Metrics.__table__), metrics)


def _distinct(job_ids: list[str]) -> list[str]:
    """A job named twice in one batch would see neither write's effect in the
    other: the two would both claim it, or both record its end."""
    if len(set(job_ids)) != len(job_ids):
        raise ValueError("a batch of job writes names a job twice")
    return job_ids


def _lock(session: Session, ordered_ids: Sequence[str]) -> None:
    session.execute(select(Job.id).where(Job.id.in_(ordered_ids)).order_by(Job.id)
                    .with_for_update())


def expired_lease(now: datetime) -> ColumnElement[bool]:
    """No lease (a running row from before leases existed), or one gone by."""
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)


def _takeable(now: datetime) -> ColumnElement[bool]:
    return or_(Job.status == JobStatus.QUEUED,
               and_(Job.status == JobStatus.RUNNING, expired_lease(now)))


def _unexpired(now: datetime) -> ColumnElement[bool]:
    """A queued job past its expires_at is not taken (a running one keeps going)."""
    return or_(Job.status == JobStatus.RUNNING, Job.expires_at.is_(None),
               Job.expires_at >= now)


def expired(expires_at: datetime | None, now: datetime, unset: bool = True) -> bool:
    """`unset`: what a missing time means (a lease without one is expired; a job
    without expires_at never expires)."""
    return unset if expires_at is None else expires_at < now
