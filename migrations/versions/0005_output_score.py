"""outputs.score (a beam's length-penalised score), outputs.logprobs (per token) and
jobs.prompt_logprobs (per prompt token)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 20:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outputs", sa.Column("score", sa.Float(), nullable=True))
    op.add_column("outputs", sa.Column("logprobs", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("prompt_logprobs", sa.JSON(), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), never a batch copy.
    op.drop_column("jobs", "prompt_logprobs")
    op.drop_column("outputs", "logprobs")
    op.drop_column("outputs", "score")
