"""The batch a `pagedq batch` or `pagedq run` files its jobs under (jobs.batch_id), so that
`pagedq cancel --batch ID` reaches all of them.

A CLI batch is a `batches` row without an API key, hence invisible to every key of the
gateway, which never lists, finalizes or expires it. Its columns say what it is: the
endpoint is the command, there is no stored input file (input_file_id "", the paths are
in its metadata) and no completion window ("none"; expires_at, which may not be null,
is the end of time), and its jobs never expire with it. The command ends it: completed,
or cancelled once a cancel has stopped everything it ran.

A re-run on the same documents finds its jobs again by their idempotency keys; when
those belong to a CLI batch still in progress (the earlier run stopped before the end),
the re-run resumes that batch. An ended batch stays ended: the re-run opens a new one.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select, update

from worker.db import make_sessionmaker
from worker.documents import BadLine
from worker.models import Batch, BatchStatus, Job, JobStatus, utcnow

ENDPOINTS = ("pagedq batch", "pagedq run")
NO_WINDOW = "none"
NEVER = datetime(9999, 12, 31, tzinfo=UTC)
# Ids per SELECT ... IN: well under PostgreSQL's 65,535 bind parameters.
KEY_CHUNK = 10_000


@dataclass(slots=True, frozen=True)
class OpenBatch:
    id: str
    resumed: bool  # an earlier run's batch, in progress still


class BulkBatches:
    def __init__(self, engine: Engine) -> None:
        self._sessions = make_sessionmaker(engine)

    def open(self, endpoint: str, keys: Sequence[str], docs: Path, out: Path,
             bad_lines: Sequence[BadLine], total: int) -> OpenBatch:
        """The in-progress CLI batch holding jobs of these idempotency keys, or a new one
        for `total` input lines (the bad ones among them recorded)."""
        found = self.find_resumable(keys)
        if found is not None:
            return OpenBatch(found, resumed=True)
        now = utcnow()
        batch = Batch(
            id=f"batch_{secrets.token_hex(12)}", api_key_id=None,
            status=BatchStatus.IN_PROGRESS, endpoint=endpoint, input_file_id="",
            completion_window=NO_WINDOW,
            batch_metadata={"input": str(docs.resolve()), "output": str(out.resolve())},
            line_errors=[{"line": bad.line, "custom_id": None, "code": "invalid_line",
                          "message": bad.message} for bad in bad_lines],
            total=total, created_at=now, expires_at=NEVER, in_progress_at=now)
        with self._sessions() as session, session.begin():
            session.add(batch)
        return OpenBatch(batch.id, resumed=False)

    def find_resumable(self, keys: Sequence[str]) -> str | None:
        """The newest in-progress CLI batch that a job of these keys belongs to."""
        newest: tuple[datetime, str] | None = None
        with self._sessions() as session:
            for start in range(0, len(keys), KEY_CHUNK):
                row = session.execute(
                    select(Batch.created_at, Batch.id).join(Job, Job.batch_id == Batch.id)
                    .where(Job.idempotency_key.in_(keys[start:start + KEY_CHUNK]),
                           Batch.status == BatchStatus.IN_PROGRESS,
                           Batch.endpoint.in_(ENDPOINTS))
                    .order_by(Batch.created_at.desc()).limit(1)).first()
                if row is not None and (newest is None or row.created_at > newest[0]):
                    newest = (row.created_at, row.id)
        return None if newest is None else newest[1]

    def close(self, batch_id: str) -> BatchStatus | None:
        """End a CLI batch none of whose jobs is queued or running: an in-progress one
        completed, a cancelling one cancelled. A gateway batch is left to the gateway,
        which writes its result files. Returns the batch's status (None: no batch)."""
        now = utcnow()
        with self._sessions() as session, session.begin():
            busy = session.scalar(select(Job.id).where(
                Job.batch_id == batch_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).limit(1))
            if busy is None:
                for before, after in ((BatchStatus.IN_PROGRESS, BatchStatus.COMPLETED),
                                      (BatchStatus.CANCELLING, BatchStatus.CANCELLED)):
                    session.execute(
                        update(Batch).where(Batch.id == batch_id, Batch.status == before,
                                            Batch.endpoint.in_(ENDPOINTS))
                        .values(status=after, **{f"{after.value}_at": now})
                        .execution_options(synchronize_session=False))
            return session.scalar(select(Batch.status).where(Batch.id == batch_id))
