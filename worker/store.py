"""Every SQL statement on jobs: the database is the source of truth, the queue only a hint."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from worker.db import make_engine, make_sessionmaker
from worker.models import Job, JobStatus, Metrics, Output, utcnow
from worker.records import Claim, ClaimOutcome, Completion, JobMetrics, JobRecord, JobSpec
from worker.schemas import JobRequest, QueueKind

# Rows per INSERT when a bulk job submits many documents at once.
INSERT_CHUNK = 500


@dataclass(slots=True)
class Submission:
    job_id: str
    created: bool  # False: an earlier job with the same idempotency key was returned


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = make_sessionmaker(engine)

    @classmethod
    def from_url(cls, url: str, pool_size: int = 8) -> JobStore:
        return cls(make_engine(url, pool_size=pool_size))

    def close(self) -> None:
        self.engine.dispose()

    def _session(self) -> Session:
        return self._sessions()

    # -- producer side ---------------------------------------------------

    def create(self, requests: Sequence[JobRequest], *, published: bool = True) -> list[Submission]:
        """Insert one queued row per request; a live or succeeded job with the
        same idempotency key is returned instead of a new one.

        `published`: the caller sends each new job's message right after, so the
        row says it went out now; a producer that dies in between leaves a job
        that the sweep publishes later. False: the caller runs the jobs itself."""
        submissions: list[Submission] = []
        for start in range(0, len(requests), INSERT_CHUNK):
            submissions += self._create_chunk(requests[start:start + INSERT_CHUNK], published)
        return submissions

    def _create_chunk(self, requests: Sequence[JobRequest], published: bool) -> list[Submission]:
        now = utcnow()
        rows = [_new_row(request, now, published) for request in requests]
        keys = [row["idempotency_key"] for row in rows if row["idempotency_key"]]
        with self._session() as session, session.begin():
            if keys:
                # A failed or cancelled job gives its key up, so that resubmitting
                # the same work (a re-run of a bulk job) tries it again.
                session.execute(
                    update(Job)
                    .where(Job.idempotency_key.in_(keys),
                           Job.status.in_([JobStatus.FAILED, JobStatus.CANCELLED]))
                    .values(idempotency_key=None)
                    .execution_options(synchronize_session=False)
                )
            postgres = self.engine.dialect.name == "postgresql"
            insert = postgresql.insert if postgres else sqlite.insert
            inserted = set(session.scalars(
                insert(Job).values(rows).on_conflict_do_nothing().returning(Job.id)
            ))
            existing: dict[str, str] = {}
            lost = [row["idempotency_key"] for row in rows if row["id"] not in inserted]
            if lost:
                existing = {key: job_id for key, job_id in session.execute(
                    select(Job.idempotency_key, Job.id).where(Job.idempotency_key.in_(lost))
                )}
        return [
            Submission(row["id"], True) if row["id"] in inserted
            else Submission(existing[row["idempotency_key"]], False)
            for row in rows
        ]

    def discard_unpublished(self, job_ids: Iterable[str]) -> None:
        """Remove rows whose message never reached the broker, so none waits forever."""
        with self._session() as session, session.begin():
            session.execute(delete(Job).where(Job.id.in_(list(job_ids)),
                                              Job.status == JobStatus.QUEUED))

    def get(self, job_id: str) -> JobRecord | None:
        records = self.get_many([job_id])
        return records[0] if records else None

    def get_many(self, job_ids: Iterable[str], finished_only: bool = False) -> list[JobRecord]:
        query = (select(Job).where(Job.id.in_(list(job_ids)))
                 .options(selectinload(Job.outputs), selectinload(Job.metrics)))
        if finished_only:
            query = query.where(Job.status.in_(
                [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]))
        with self._session() as session, session.begin():
            return [JobRecord.from_row(job) for job in session.scalars(query)]

    def request_cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a queued job at once; flag a running one for its worker to abort.

        Returns the status the job had before (None: no such job)."""
        now = utcnow()
        with self._session() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return None
            before = job.status
            if before is JobStatus.QUEUED:
                job.status = JobStatus.CANCELLED
                job.finished_at = now
            elif before is JobStatus.RUNNING:
                job.cancel_requested = True
            return before

    # -- worker side -----------------------------------------------------

    def claim(self, job_id: str, worker: str, max_attempts: int) -> Claim:
        """Take a job for one attempt. The conditional update lets exactly one of
        several deliveries of the same message win; a job left running by a dead
        worker is claimed again, with the attempt counter as the fencing token."""
        now = utcnow()
        with self._session() as session, session.begin():
            attempt = session.scalar(
                update(Job)
                .where(Job.id == job_id,
                       Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                       Job.cancel_requested.is_(False),
                       Job.attempts < max_attempts)
                .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker=worker,
                        started_at=now, updated_at=now)
                .returning(Job.attempts)
                .execution_options(synchronize_session=False)
            )
            job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
            if job is None:
                return Claim(ClaimOutcome.MISSING)
            if attempt is not None:
                prompt = job.prompt_text if job.prompt_text is not None else job.prompt_token_ids
                assert prompt is not None
                return Claim(ClaimOutcome.CLAIMED, JobSpec(
                    job.id, attempt, prompt, dict(job.params), job.priority, job.chat,
                    job.deadline_s, job.created_at))
            if job.status.finished:
                return Claim(ClaimOutcome.FINISHED)
            job.finished_at = now
            if job.cancel_requested:
                job.status = JobStatus.CANCELLED
                return Claim(ClaimOutcome.CANCELLED)
            job.status = JobStatus.FAILED
            job.error = f"gave up after {job.attempts} attempts"
            return Claim(ClaimOutcome.EXHAUSTED)

    def finish(self, job_id: str, attempt: int, status: JobStatus, *, error: str | None = None,
               outputs: Sequence[Completion] = (), metrics: JobMetrics | None = None) -> bool:
        """Record the end of an attempt in one transaction: the status, every
        output and the metrics, or nothing at all when another attempt has taken
        the job over since (returns False then)."""
        now = utcnow()
        with self._session() as session, session.begin():
            won = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.attempts == attempt)
                .values(status=status, error=error, finished_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if won != 1:
                return False
            session.add_all(
                Output(job_id=job_id, index=o.index, text=_storable(o.text),
                       token_ids=o.token_ids, finish_reason=o.finish_reason,
                       stop_reason=None if o.stop_reason is None else _storable(o.stop_reason),
                       cumulative_logprob=o.cumulative_logprob)
                for o in outputs
            )
            if metrics is not None:
                session.add(Metrics(
                    job_id=job_id, attempt=attempt, worker=metrics.worker,
                    queue_time_s=metrics.queue_time_s, ttft_s=metrics.ttft_s,
                    tpot_s=metrics.tpot_s, e2e_s=metrics.e2e_s,
                    prompt_tokens=metrics.prompt_tokens,
                    generated_tokens=metrics.generated_tokens,
                    cached_tokens=metrics.cached_tokens, preemptions=metrics.preemptions,
                    swapped_out_blocks=metrics.swapped_out_blocks,
                    swapped_in_blocks=metrics.swapped_in_blocks,
                ))
        return True

    # -- sweep for lost messages -------------------------------------------

    def claim_republish(self, older_than_s: float, limit: int) -> list[tuple[str, QueueKind]]:
        """Take up to `limit` queued jobs whose message went out over `older_than_s`
        ago, oldest first, and mark them published now: concurrent sweeps never
        both take a job, and a job is taken again only once `older_than_s` has
        passed anew. Returns each job's id and queue, for the caller to publish."""
        now = utcnow()
        due = (
            select(Job.id, Job.queue)
            .where(Job.status == JobStatus.QUEUED,
                   Job.published_at < now - timedelta(seconds=older_than_s))
            .order_by(Job.published_at)
            .limit(limit)
            # PostgreSQL: rows that another sweep holds are its own to publish.
            # SQLite has no row locks; its BEGIN IMMEDIATE serialises the sweeps.
            .with_for_update(skip_locked=True)
        )
        with self._session() as session, session.begin():
            jobs = [(job_id, QueueKind(queue)) for job_id, queue in session.execute(due)]
            if jobs:
                session.execute(
                    update(Job).where(Job.id.in_([job_id for job_id, _ in jobs]))
                    .values(published_at=now)
                    .execution_options(synchronize_session=False)
                )
        return jobs

    def release_republish(self, job_ids: Iterable[str]) -> None:
        """Make jobs whose re-publish failed due again at the next sweep: their
        created_at is no later than the publish time that made them due."""
        with self._session() as session, session.begin():
            session.execute(
                update(Job).where(Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED)
                .values(published_at=Job.created_at)
                .execution_options(synchronize_session=False)
            )


def _storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL, which a model can generate; the exact
    # output stays in token_ids.
    return text.replace("\x00", "\ufffd")


def _new_row(request: JobRequest, now: datetime, published: bool) -> dict[str, Any]:
    text_prompt = isinstance(request.prompt, str)
    return {
        "id": str(uuid.uuid4()),
        "status": JobStatus.QUEUED,
        "queue": request.queue.value,
        "priority": request.priority,
        "prompt_text": request.prompt if text_prompt else None,
        "prompt_token_ids": None if text_prompt else list(request.prompt),
        "params": request.params.model_dump(),
        "chat": request.chat,
        "deadline_s": request.deadline_s,
        "idempotency_key": request.idempotency_key,
        "attempts": 0,
        "cancel_requested": False,
        "created_at": now,
        "updated_at": now,
        "published_at": now if published else None,
    }
