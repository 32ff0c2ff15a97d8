"""Events of a batch as a whole: `batch_events` (the outage breaker's trips and resumes)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

`status` shows when a batch was held because the API stopped answering, why, and when it
resumed; the hold itself is `batches.hold_code` (`api_unreachable`), which a resume clears, so
the history needs rows of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batch_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "batch_id",
            sa.Integer(),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
    )
    op.create_index("ix_batch_events_batch_id", "batch_events", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_batch_events_batch_id", table_name="batch_events")
    op.drop_table("batch_events")
