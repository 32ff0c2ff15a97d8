"""Why a batch is held, as a code: `batches.hold_code` (a `pipeline.states.HoldCode`)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

`hold_reason` says it in words for a person; `hold_code` lets code act on it (resume a batch
held for an outage by itself, tell a budget hold from a quota hold) without parsing text.
Existing held and paused batches get the code their reason implies.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("hold_code", sa.String(32), nullable=True))
    op.execute(
        """UPDATE batches SET hold_code = CASE
  WHEN state = 'paused' THEN 'paused'
  WHEN hold_reason LIKE 'daily budget:%' THEN 'daily_budget'
  WHEN hold_reason LIKE 'budget:%' THEN 'budget'
  WHEN hold_reason LIKE '429%' THEN 'quota'
  WHEN hold_reason LIKE '401%' OR hold_reason LIKE '403%' THEN 'auth'
  END
WHERE state IN ('held', 'paused')"""
    )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("hold_code")
