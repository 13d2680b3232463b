"""OpenAI's Files and Batch APIs on the job table: files are rows of `files`, and a batch
is a `batches` row plus one bulk job per valid line of its input file (jobs.batch_id).

Nothing runs in the background. A batch moves on when somebody looks at it (retrieve or
list; OpenAI's clients poll): its progress is counted from its jobs in one GROUP BY, its
queued jobs expire once its window has closed, and when none is queued or running the
replica that looked writes its output and error files and ends it. A batch nobody looks
at keeps its finished jobs in SQL and is finalized at the next look; its unstarted jobs
still expire without running, as a worker's claim refuses a job past its expires_at;
so the workers' sweep has no need to finalize batches, and does not.
Every transition is a conditional UPDATE, so any number of gateway replicas may look at
once: one claims the finalization (finalizing_at), and a claim whose replica died is
taken over after FINALIZE_STALE_S.
"""

from __future__ import annotations

import secrets
from collections import Counter
from datetime import datetime, timedelta
from io import BytesIO
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session, defer, selectinload

from worker.cancel import CANCELLED_WITH_BATCH, cancel_where
from worker.client import BrokerUnavailable, Client, publish
from worker.db import make_sessionmaker
from worker.gateway.batch_lines import bad_line, error_line, jsonl, output_line, parse_input
from worker.gateway.errors import APIError
from worker.gateway.protocol import Endpoint
from worker.job_rows import JobOwner
from worker.models import Batch, BatchStatus, Job, JobStatus, StoredFile, utcnow
from worker.records import JobRecord
from worker.schemas import QueueKind

# A finalization claimed this long ago and not done: its replica died, another takes it.
FINALIZE_STALE_S = 120.0
ACTIVE = (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)
_NOT_DONE = (JobStatus.SUCCEEDED, JobStatus.QUEUED, JobStatus.RUNNING)
_FILE_FIELDS = defer(StoredFile.content)  # listings never load the bytes


def _unix(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def file_object(row: StoredFile) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes,
            "created_at": _unix(row.created_at), "filename": row.filename,
            "purpose": row.purpose, "status": "processed", "expires_at": None}


def _list(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


class BatchStore:
    """Files and batches of the gateway's API keys, in the jobs' database; a key's
    objects are invisible to every other key (None, as for a missing one)."""

    def __init__(self, client: Client, model: str) -> None:
        self.client = client  # its JobStore inserts the jobs, its app publishes them
        self.model = model  # the served model name, which batch lines must ask for
        self._sessions = make_sessionmaker(client.store.engine)

    # -- files -------------------------------------------------------------

    def create_file(self, api_key_id: str | None, purpose: str, filename: str,
                    content: bytes) -> dict[str, Any]:
        row = StoredFile(id=f"file-{secrets.token_hex(12)}", api_key_id=api_key_id,
                         purpose=purpose, filename=filename[:255], bytes=len(content),
                         content=content, created_at=utcnow())
        with self._sessions() as session, session.begin():
            session.add(row)
        return file_object(row)

    def get_file(self, api_key_id: str | None, file_id: str) -> dict[str, Any] | None:
        with self._sessions() as session:
            row = session.scalar(select(StoredFile).options(_FILE_FIELDS)
                                 .where(StoredFile.id == file_id,
                                        StoredFile.api_key_id == api_key_id))
            return None if row is None else file_object(row)

    def file_content(self, api_key_id: str | None, file_id: str) -> bytes | None:
        with self._sessions() as session:
            return session.scalar(select(StoredFile.content).where(
                StoredFile.id == file_id, StoredFile.api_key_id == api_key_id))

    def delete_file(self, api_key_id: str | None, file_id: str) -> bool:
        with self._sessions() as session, session.begin():
            return session.execute(delete(StoredFile).where(
                StoredFile.id == file_id, StoredFile.api_key_id == api_key_id)).rowcount == 1

    def list_files(self, api_key_id: str | None, purpose: str | None, limit: int,
                   after: str | None) -> dict[str, Any] | None:
        """Newest first; None when `after` names no file of this key."""
        where = [StoredFile.api_key_id == api_key_id]
        if purpose is not None:
            where.append(StoredFile.purpose == purpose)
        with self._sessions() as session:
            page = _page(session, StoredFile, where, limit, after)
            if page is None:
                return None
            rows, more = page
            return _list([file_object(row) for row in rows], more)

    # -- batches -----------------------------------------------------------

    def create_batch(self, api_key_id: str | None, input_file_id: str, endpoint: Endpoint,
                     completion_window: str, metadata: dict[str, str] | None,
                     window_s: float) -> dict[str, Any] | None:
        """Validate the input file, then store the batch and its jobs in one transaction
        and publish them; None when the key has no such file. Validation is done by the
        time this returns, so a batch is never seen `validating`."""
        with self._sessions() as session:
            source = session.execute(select(StoredFile.purpose, StoredFile.content).where(
                StoredFile.id == input_file_id, StoredFile.api_key_id == api_key_id)).first()
        if source is None:
            return None
        if source.purpose != "batch":
            raise APIError(400, f"input_file_id: file {input_file_id} has purpose "
                                f"{source.purpose!r}; a batch reads a file uploaded with "
                                "purpose 'batch'", param="input_file_id")
        parsed = parse_input(source.content, endpoint, self.model, self.client.parse)
        now = utcnow()
        batch = Batch(id=f"batch_{secrets.token_hex(12)}", api_key_id=api_key_id,
                      endpoint=endpoint.value, input_file_id=input_file_id,
                      completion_window=completion_window, batch_metadata=metadata,
                      line_errors=parsed.errors, total=parsed.total, created_at=now,
                      expires_at=now + timedelta(seconds=window_s))
        failure = parsed.failure()
        if failure is None:
            batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, now
        else:
            batch.status, batch.failed_at, batch.errors = BatchStatus.FAILED, now, failure
        with self._sessions() as session, session.begin():
            session.add(batch)
            session.flush()  # the jobs' foreign key needs the row
            owner = JobOwner(api_key_id, batch.id, batch.expires_at)
            submissions = [] if failure else self.client.store.create_in(
                session, parsed.requests, now, published=True, owner=owner)
        try:
            publish(self.client.app, [(s.job_id, QueueKind.BULK) for s in submissions])
        except BrokerUnavailable as exc:
            self._fail(batch.id, "broker_unavailable", str(exc))
        return self.get_batch(api_key_id, batch.id)

    def _fail(self, batch_id: str, code: str, message: str) -> None:
        """End a batch whose jobs could not all be published. Its queued jobs go, rather
        than wait for the workers' sweep (an hour by default) on a batch whose creator
        was never told: the batch says failed and why, and may be created again. A job
        whose message did go out finds no row and is dropped; one already claimed has
        its result ignored."""
        now = utcnow()
        with self._sessions() as session, session.begin():
            session.execute(delete(Job).where(Job.batch_id == batch_id,
                                              Job.status == JobStatus.QUEUED))
            session.execute(update(Batch).where(Batch.id == batch_id).values(
                status=BatchStatus.FAILED, failed_at=now,
                errors=[{"code": code, "message": message, "param": None, "line": None}])
                .execution_options(synchronize_session=False))

    def get_batch(self, api_key_id: str | None, batch_id: str) -> dict[str, Any] | None:
        with self._sessions() as session:
            batch = session.scalar(select(Batch).where(Batch.id == batch_id,
                                                       Batch.api_key_id == api_key_id))
        return None if batch is None else self._look(batch)

    def list_batches(self, api_key_id: str | None, limit: int,
                     after: str | None) -> dict[str, Any] | None:
        """Newest first, each brought up to date; None when `after` names no batch of
        this key."""
        with self._sessions() as session:
            page = _page(session, Batch, [Batch.api_key_id == api_key_id], limit, after)
        if page is None:
            return None
        rows, more = page
        return _list([self._look(batch) for batch in rows], more)

    def cancel_batch(self, api_key_id: str | None, batch_id: str) -> dict[str, Any] | None:
        """Cancel an in-progress batch: its queued jobs at once, its running ones aborted
        by their workers; its finished ones are kept for its output file. A batch in any
        other state is answered as it is. Should the workers not be told, the running
        jobs finish and are kept as any finished request is (no retry runs them)."""
        self.client.cancel_batch(batch_id, Batch.api_key_id == api_key_id)
        return self.get_batch(api_key_id, batch_id)

    # -- progression -----------------------------------------------------------

    def _look(self, batch: Batch) -> dict[str, Any]:
        """The batch object, after moving the batch on as far as its jobs allow."""
        counts = self._counts(batch)
        if batch.status in ACTIVE and not counts[JobStatus.QUEUED] \
                and not counts[JobStatus.RUNNING]:
            self._finalize(batch, counts)
            # Re-read even when another replica won: it may be finalizing or done.
            with self._sessions() as session:
                batch = session.get_one(Batch, batch.id)
        return _batch_object(batch, counts)

    def _counts(self, batch: Batch) -> Counter[JobStatus]:
        """Its jobs by status; first its queued jobs end if it is cancelling, or past its
        window (conditional on queued: a job a worker claims meanwhile runs instead)."""
        now = utcnow()
        with self._sessions() as session, session.begin():
            if batch.status is BatchStatus.CANCELLING:
                cancel_where(session, Job.batch_id == batch.id, CANCELLED_WITH_BATCH)
            elif batch.status is BatchStatus.IN_PROGRESS and batch.expires_at < now:
                _end_queued(session, batch.id, JobStatus.EXPIRED,
                            "expired before it started: its batch's window closed")
            return Counter(dict(session.execute(
                select(Job.status, func.count()).where(Job.batch_id == batch.id)
                .group_by(Job.status)).all()))

    def _finalize(self, batch: Batch, counts: Counter[JobStatus]) -> None:
        """Write the result files and end the batch, if this replica wins the claim."""
        mine = utcnow()
        stale = mine - timedelta(seconds=FINALIZE_STALE_S)
        cancelling = batch.status is BatchStatus.CANCELLING
        with self._sessions() as session, session.begin():
            claimed = session.execute(update(Batch).where(
                Batch.id == batch.id, Batch.status == batch.status,
                or_(Batch.finalizing_at.is_(None), Batch.finalizing_at < stale),
            ).values(finalizing_at=mine, status=BatchStatus.CANCELLING if cancelling
                     else BatchStatus.FINALIZING)
                .execution_options(synchronize_session=False)).rowcount
        if not claimed:
            return
        end = (BatchStatus.CANCELLED if cancelling else
               BatchStatus.EXPIRED if counts[JobStatus.EXPIRED] else BatchStatus.COMPLETED)
        files = self._result_files(batch)
        with self._sessions() as session, session.begin():
            won = session.execute(update(Batch).where(
                Batch.id == batch.id, Batch.finalizing_at == mine,
            ).values(status=end, **{f"{end.value}_at": utcnow()},
                     output_file_id=files[0].id if files[0] else None,
                     error_file_id=files[1].id if files[1] else None)
                .execution_options(synchronize_session=False)).rowcount
            # Lost: another replica took the claim over as stale, and its files stand.
            if won:
                session.add_all(f for f in files if f is not None)

    def _result_files(self, batch: Batch) -> tuple[StoredFile | None, StoredFile | None]:
        """The output file (succeeded requests) and the error file (bad lines, and the
        requests that failed, expired or were cancelled), by custom_id; None: no line.
        OpenAI does not keep the input's order either: lines are matched by custom_id."""
        endpoint = Endpoint(batch.endpoint)
        output, errors = BytesIO(), BytesIO()
        errors.write(jsonl(bad_line(batch.id, e) for e in batch.line_errors))
        with self._sessions() as session:
            rows = session.scalars(
                select(Job).where(Job.batch_id == batch.id).order_by(Job.custom_id)
                .options(selectinload(Job.outputs), selectinload(Job.metrics))
                .execution_options(yield_per=500))
            for row in rows:
                record = JobRecord.from_row(row)
                if record.status is JobStatus.SUCCEEDED:
                    output.write(jsonl([output_line(endpoint, record, self.model)]))
                else:
                    errors.write(jsonl([error_line(record)]))
        return (self._result_file(batch, "output", output.getvalue()),
                self._result_file(batch, "error", errors.getvalue()))

    def _result_file(self, batch: Batch, kind: str, content: bytes) -> StoredFile | None:
        if not content:
            return None
        return StoredFile(id=f"file-{secrets.token_hex(12)}", api_key_id=batch.api_key_id,
                          purpose="batch_output", filename=f"{batch.id}_{kind}.jsonl",
                          bytes=len(content), content=content, created_at=utcnow())


def _end_queued(session: Session, batch_id: str, status: JobStatus, why: str) -> None:
    now = utcnow()
    session.execute(
        update(Job).where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED)
        .values(status=status, error=why, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False))


def _page(session: Session, entity: type[Batch] | type[StoredFile], where: list[Any],
          limit: int, after: str | None) -> tuple[list[Any], bool] | None:
    """Up to `limit` rows newest first, after the row `after` (None: no such row)."""
    if after is not None:
        mark = session.execute(select(entity.created_at, entity.id)
                               .where(entity.id == after, *where)).first()
        if mark is None:
            return None
        where = [*where, or_(entity.created_at < mark.created_at,
                             and_(entity.created_at == mark.created_at, entity.id < mark.id))]
    query = select(entity).where(*where).order_by(entity.created_at.desc(), entity.id.desc())
    if entity is StoredFile:
        query = query.options(_FILE_FIELDS)
    rows = list(session.scalars(query.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _batch_object(batch: Batch, counts: Counter[JobStatus]) -> dict[str, Any]:
    if batch.status is BatchStatus.FAILED:
        completed, failed = 0, batch.total  # none of it ran
    else:
        completed = counts[JobStatus.SUCCEEDED]
        failed = len(batch.line_errors) + sum(n for status, n in counts.items()
                                              if status not in _NOT_DONE)
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint,
        "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
        "status": batch.status.value, "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        **{name: _unix(getattr(batch, name)) for name in (
            "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
            "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
        "request_counts": {"total": batch.total, "completed": completed, "failed": failed},
        "metadata": batch.batch_metadata,
    }
