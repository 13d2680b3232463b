"""Every SQL statement on jobs: the database is the source of truth, the queue only a hint."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy import Engine, and_, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from engine.logprob import Logprob
from worker.db import make_engine, make_sessionmaker
from worker.job_rows import JobOwner, new_row
from worker.job_writes import claim_jobs, expired_lease, finish_jobs
from worker.models import Job, JobStatus, utcnow
from worker.records import (
    Claim,
    ClaimAsk,
    Completion,
    FinishWrite,
    JobMetrics,
    JobRecord,
)
from worker.schemas import IdempotencyConflict, JobRequest, QueueKind

# Rows per INSERT when a bulk job submits many documents at once.
INSERT_CHUNK = 500
# Ids per SELECT ... IN: well under PostgreSQL's 65,535 bind parameters.
SELECT_CHUNK = 10_000
FINISHED = [status for status in JobStatus if status.finished]


class Due(NamedTuple):
    """A job a sweep takes to publish again."""

    job_id: str
    queue: QueueKind
    orphaned: bool  # its worker died running it (not: its message was lost)


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

    def create(self, requests: Sequence[JobRequest], *, published: bool = True,
               owner: JobOwner | None = None) -> list[Submission]:
        """Insert one queued row per request, all or none; a live or succeeded job
        with the same idempotency key and the same work is returned instead of a
        new one, and one with other work raises IdempotencyConflict.

        `published`: the caller sends each new job's message right after, so the
        row says it went out now; a producer that dies in between leaves a job
        that the sweep publishes later. False: the caller runs the jobs itself.
        `owner`: the API key, batch and expiry the jobs belong to (the gateway's)."""
        now = utcnow()
        submissions: list[Submission] = []
        with self._session() as session, session.begin():
            submissions = self.create_in(session, requests, now, published, owner)
        return submissions

    def create_in(self, session: Session, requests: Sequence[JobRequest], now: datetime,
                  published: bool = True, owner: JobOwner | None = None) -> list[Submission]:
        """`create` inside the caller's transaction (a batch and its jobs go in together)."""
        submissions: list[Submission] = []
        for start in range(0, len(requests), INSERT_CHUNK):
            chunk = requests[start:start + INSERT_CHUNK]
            submissions += self._create_chunk(session, chunk, now, published,
                                              owner or JobOwner())
        return submissions

    def _create_chunk(self, session: Session, requests: Sequence[JobRequest], now: datetime,
                      published: bool, owner: JobOwner) -> list[Submission]:
        rows = [new_row(request, now, published, owner) for request in requests]
        keys = [row["idempotency_key"] for row in rows if row["idempotency_key"]]
        if keys:
            # A failed, cancelled or expired job gives its key up, so that
            # resubmitting the same work (a re-run of a bulk job) tries it again.
            session.execute(
                update(Job)
                .where(Job.idempotency_key.in_(keys),
                       Job.status.in_([JobStatus.FAILED, JobStatus.CANCELLED,
                                       JobStatus.EXPIRED]))
                .values(idempotency_key=None)
                .execution_options(synchronize_session=False)
            )
        postgres = self.engine.dialect.name == "postgresql"
        insert = postgresql.insert if postgres else sqlite.insert
        # Executemany, not one statement of many VALUES: that would be compiled anew
        # for every count of rows; this one is compiled once and cached.
        table = Job.__table__
        inserted = set(session.connection().scalars(
            insert(table).on_conflict_do_nothing().returning(table.c.id), rows
        ))
        lost = [row for row in rows if row["id"] not in inserted]
        existing: dict[str, tuple[str, str | None]] = {}
        if lost:
            existing = {key: (job_id, fingerprint) for key, job_id, fingerprint in session.execute(
                select(Job.idempotency_key, Job.id, Job.fingerprint)
                .where(Job.idempotency_key.in_([row["idempotency_key"] for row in lost]))
            )}
        for row in lost:
            _, fingerprint = existing[row["idempotency_key"]]
            if fingerprint is not None and fingerprint != row["fingerprint"]:
                raise IdempotencyConflict(
                    f"idempotency_key: {row['idempotency_key']!r} already names a job with "
                    "another prompt, params or chat flag")
        return [
            Submission(row["id"], True) if row["id"] in inserted
            else Submission(existing[row["idempotency_key"]][0], False)
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
        ids = list(job_ids)
        records: list[JobRecord] = []
        with self._session() as session, session.begin():
            # PostgreSQL takes at most 65,535 bind parameters in one statement.
            for start in range(0, len(ids), SELECT_CHUNK):
                query = (select(Job).where(Job.id.in_(ids[start:start + SELECT_CHUNK]))
                         .options(selectinload(Job.outputs), selectinload(Job.metrics)))
                if finished_only:
                    query = query.where(Job.status.in_(FINISHED))
                records += (JobRecord.from_row(job) for job in session.scalars(query))
        return records

    # -- worker side -----------------------------------------------------

    def claim(self, job_id: str, worker: str, max_attempts: int, lease_s: float) -> Claim:
        """Take a job for one attempt, under a fresh lease of `lease_s` seconds.

        A queued job, or a running one whose lease expired (its worker died or
        froze), is taken: exactly one of several deliveries wins the conditional
        update. A running job with a live lease is left alone (BUSY): the
        delivery is a duplicate and costs the job nothing."""
        return self.claim_many([ClaimAsk(job_id, worker)], max_attempts, lease_s)[0]

    def claim_many(self, asks: Sequence[ClaimAsk], max_attempts: int,
                   lease_s: float) -> list[Claim]:
        """`claim` for distinct jobs in one transaction; one Claim each, in order."""
        with self._session() as session, session.begin():
            return claim_jobs(session, asks, max_attempts, lease_s)

    def renew(self, lease_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend these leases by `lease_s` from now, in one transaction; returns the
        lease ids that are no longer held (their job was taken over or ended)."""
        if not lease_ids:
            return set()
        now = utcnow()
        mine = and_(Job.lease_id.in_(lease_ids), Job.status == JobStatus.RUNNING)
        with self._session() as session, session.begin():
            # Rows locked in id order first, as claim and finish batches lock theirs: an
            # update locking them in its own order could deadlock with a batch.
            session.execute(select(Job.id).where(mine).order_by(Job.id).with_for_update())
            held = set(session.scalars(
                update(Job)
                .where(mine)
                .values(lease_expires_at=now + timedelta(seconds=lease_s))
                .returning(Job.lease_id)
                .execution_options(synchronize_session=False)
            ))
        return set(lease_ids) - held

    def release(self, job_id: str, lease_id: str) -> bool:
        """Give a claimed job back to the queue without charging the attempt: it
        was cut short by the machinery (the engine, the database), not by itself.
        The caller publishes it again, or the sweep does. False: not held anymore."""
        now = utcnow()
        with self._session() as session, session.begin():
            return session.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_id == lease_id,
                       Job.status == JobStatus.RUNNING)
                .values(status=JobStatus.QUEUED, attempts=Job.attempts - 1, worker=None,
                        lease_id=None, lease_expires_at=None, updated_at=now,
                        published_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount == 1

    def finish(self, job_id: str, lease_id: str, status: JobStatus, *, error: str | None = None,
               outputs: Sequence[Completion] = (), metrics: JobMetrics | None = None,
               prompt_logprobs: list[dict[int, Logprob] | None] | None = None) -> bool:
        """Record the end of an attempt in one transaction: the status, every
        output and the metrics, or nothing at all when the attempt's lease is no
        longer the job's (returns False then): a worker that froze past its
        lease cannot write over the attempt that took the job over."""
        return self.finish_many([FinishWrite(job_id, lease_id, status, error, outputs, metrics,
                                             prompt_logprobs)])[0]

    def finish_many(self, writes: Sequence[FinishWrite]) -> list[bool]:
        """`finish` for attempts at distinct jobs in one transaction; each is fenced
        by its own lease, and one whose lease was lost alone writes nothing."""
        with self._session() as session, session.begin():
            return finish_jobs(session, writes)

    # -- sweep for lost messages -------------------------------------------

    def claim_republish(self, older_than_s: float, limit: int) -> list[Due]:
        """Take up to `limit` jobs whose message may be lost, oldest first: queued
        jobs whose message went out over `older_than_s` ago, and running jobs
        whose lease expired (their worker died). Each is marked queued and
        published now: concurrent sweeps never both take a job, and a job is
        taken again only once `older_than_s` has passed anew. Returns them for
        the caller to publish."""
        now = utcnow()
        lost_message = and_(Job.status == JobStatus.QUEUED,
                            Job.published_at < now - timedelta(seconds=older_than_s))
        lost_worker = and_(Job.status == JobStatus.RUNNING, expired_lease(now))
        due = (
            select(Job.id, Job.queue, Job.status)
            .where(or_(lost_message, lost_worker))
            .order_by(Job.published_at)
            .limit(limit)
            # PostgreSQL: rows that another sweep holds are its own to publish.
            # SQLite has no row locks; its BEGIN IMMEDIATE serialises the sweeps.
            .with_for_update(skip_locked=True)
        )
        with self._session() as session, session.begin():
            jobs = [Due(job_id, QueueKind(queue), status is JobStatus.RUNNING)
                    for job_id, queue, status in session.execute(due)]
            if jobs:
                # The attempt of a lost worker stays charged: a job that kills its
                # worker every time must not run forever.
                session.execute(
                    update(Job).where(Job.id.in_([job.job_id for job in jobs]))
                    .values(status=JobStatus.QUEUED, lease_id=None, lease_expires_at=None,
                            published_at=now)
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

