"""jobs.published_at: when a job's message last went to the broker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
INDEX = "ix_jobs_status_published_at"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("published_at", TIMESTAMP, nullable=True))
    jobs = sa.table("jobs", sa.column("status", sa.String(16)),
                    sa.column("created_at", TIMESTAMP), sa.column("published_at", TIMESTAMP))
    # Until now the client published every job right after inserting it. Only
    # queued rows are ever swept, so the finished history is not rewritten.
    op.execute(jobs.update().where(jobs.c.status == "queued")
               .values(published_at=jobs.c.created_at))
    op.create_index(INDEX, "jobs", ["status", "published_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), never a batch copy:
    # dropping the old jobs table would cascade-delete every output and metric.
    op.drop_column("jobs", "published_at")
