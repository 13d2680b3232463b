"""jobs.messages: a chat job's messages (OpenAI's shape), rendered by the worker

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 20:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("messages", sa.JSON(), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), never a batch copy:
    # dropping the old jobs table would cascade-delete every output and metric.
    op.drop_column("jobs", "messages")
