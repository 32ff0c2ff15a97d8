"""Which provider and deployment: `jobs.provider`, `attempts.provider`, `attempts.deployment`,
`batch_events.provider`

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

A job names the provider it was sent to (pipeline/providers.py: openai, an Azure OpenAI
resource, a compatible gateway); each attempt names the provider and the deployment (lane) the
call took, so the ledger and the report say where every cent went. An outage event names the
provider whose breaker held the batch (`pipeline.run.breaker`: one breaker per provider), so
that provider's probe resumes it. Earlier rows stay NULL: they went to OpenAI, the only
provider there was.

The columns are added in place (ALTER TABLE ADD COLUMN), never by recreating the tables: on
SQLite a recreated `jobs` or `attempts` table would lose the status counters' triggers (0005).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("provider", sa.String(64), nullable=True))
    op.add_column("attempts", sa.Column("provider", sa.String(64), nullable=True))
    op.add_column("attempts", sa.Column("deployment", sa.String(128), nullable=True))
    op.add_column("batch_events", sa.Column("provider", sa.String(64), nullable=True))


def downgrade() -> None:
    # recreate="never": DROP COLUMN in place (SQLite >= 3.35), keeping the triggers.
    with op.batch_alter_table("batch_events", recreate="never") as batch:
        batch.drop_column("provider")
    with op.batch_alter_table("attempts", recreate="never") as batch:
        batch.drop_column("deployment")
        batch.drop_column("provider")
    with op.batch_alter_table("jobs", recreate="never") as batch:
        batch.drop_column("provider")
