"""The gateway's tables (api_keys, files, batches) and the job columns that tie jobs to
them (api_key_id, batch_id, custom_id), stream and expires_at; jobs may end expired.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 22:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
BATCH_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
               "cancelling_at", "cancelled_at")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("revoked_at", _TIME, nullable=True),
    )
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("api_key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=True,
                  index=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("api_key_id", sa.String(40), sa.ForeignKey("api_keys.id"), nullable=True,
                  index=True),
        # Plain strings, as jobs.status: no native enum to migrate for each new state.
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("line_errors", sa.JSON(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        *(sa.Column(name, _TIME, nullable=True) for name in BATCH_TIMES),
    )
    # SQLite cannot add a foreign key to an existing table without copying it; the batch
    # mode copies the jobs table once there, and is a plain ALTER TABLE on PostgreSQL.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stream", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("expires_at", _TIME, nullable=True))
        batch.add_column(sa.Column("api_key_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("batch_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("custom_id", sa.String(255), nullable=True))
        batch.create_foreign_key("fk_jobs_api_key_id_api_keys", "api_keys", ["api_key_id"],
                                 ["id"])
        batch.create_foreign_key("fk_jobs_batch_id_batches", "batches", ["batch_id"], ["id"],
                                 ondelete="CASCADE")
        batch.create_index("ix_jobs_api_key_id", ["api_key_id"])
        batch.create_index("ix_jobs_batch_id", ["batch_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_batch_id")
        batch.drop_index("ix_jobs_api_key_id")
        batch.drop_constraint("fk_jobs_batch_id_batches", type_="foreignkey")
        batch.drop_constraint("fk_jobs_api_key_id_api_keys", type_="foreignkey")
        for column in ("custom_id", "batch_id", "api_key_id", "expires_at", "stream"):
            batch.drop_column(column)
    op.drop_table("batches")
    op.drop_table("files")
    op.drop_table("api_keys")
