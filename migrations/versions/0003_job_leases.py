"""jobs.lease_id, jobs.lease_expires_at: claims hold renewable leases;
jobs.fingerprint: what an idempotency key was first used for

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_jobs_status_lease_expires_at"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("lease_id", sa.String(32), nullable=True))
    op.add_column("jobs", sa.Column("lease_expires_at", sa.DateTime(timezone=True),
                                    nullable=True))
    op.add_column("jobs", sa.Column("fingerprint", sa.String(64), nullable=True))
    # Jobs left running by an older worker hold no lease: the sweep takes them
    # back at once, as it does any running job whose lease has expired.
    op.create_index(INDEX, "jobs", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="jobs")
    # Plain DROP COLUMN (SQLite 3.35+), never a batch copy: see 0002.
    op.drop_column("jobs", "fingerprint")
    op.drop_column("jobs", "lease_expires_at")
    op.drop_column("jobs", "lease_id")
