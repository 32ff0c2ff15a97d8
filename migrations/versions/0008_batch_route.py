"""The batch route: provider batches, uploaded files, the route of a batch, exact line costs

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

    batches.route                 sync | batch (pipeline.states.Route); existing batches: sync
    jobs.route                    NULL (the batch's) or a job's own route (`--fallback sync`)
    attempts.provider_batch_id    the provider batch an attempt is a line of
    attempts.reserved_usd         the budget a line holds until it is booked
    provider_batches              one OpenAI Batch: state, provider status, counts, file ids,
                                  expiry, offsets read, the reservation, a lease
    provider_files                uploaded inputs by sha256 (one live row per sha256)
    provider_batch_files          which uploaded files a provider batch's lines use

`attempts.cost_usd` and `jobs.cost_usd` become NUMERIC(20, 9): a line at half price can cost
a fraction of a micro-dollar more than its rounded value, and the ledger keeps it exactly. On
SQLite a declared NUMERIC(p, s) is only a type affinity (values are stored as they come), so
nothing is altered there; migrations/env.py does not compare Numeric precision on SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY = sa.Numeric(18, 6)
EXACT = sa.Numeric(20, 9)
TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "batch_id", sa.Integer, sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("token", sa.String(32), nullable=False, unique=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider_id", sa.String(100), unique=True),
        sa.Column("provider_status", sa.String(20)),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("input_bytes", sa.BigInteger),
        sa.Column("input_file_id", sa.String(100)),
        sa.Column("output_file_id", sa.String(100)),
        sa.Column("error_file_id", sa.String(100)),
        sa.Column("completed", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("booked", sa.Integer, nullable=False),
        sa.Column("cost_usd", EXACT, nullable=False),
        sa.Column("reserved_usd", MONEY, nullable=False),
        sa.Column("reserved_on", sa.Date),
        sa.Column("output_offset", sa.BigInteger, nullable=False),
        sa.Column("error_offset", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("create_started_at", TZ),
        sa.Column("expires_at", TZ),
        sa.Column("finished_at", TZ),
        sa.Column("refreshed_at", TZ),
        sa.Column("lease_until", TZ),
        sa.Column("lease_token", sa.String(32)),
    )
    op.create_index("ix_provider_batches_batch_id", "provider_batches", ["batch_id"])
    op.create_index("ix_provider_batches_state", "provider_batches", ["state"])
    op.create_table(
        "provider_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("file_id", sa.String(100), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("deleted_at", TZ),
    )
    op.create_index("ix_provider_files_file_id", "provider_files", ["file_id"])
    op.create_index(
        "uq_provider_files_live_sha256",
        "provider_files",
        ["sha256"],
        unique=True,
        sqlite_where=sa.text("deleted_at IS NULL"),
        postgresql_where=sa.text("deleted_at IS NULL"),
    )
    op.create_table(
        "provider_batch_files",
        sa.Column(
            "provider_batch_id",
            sa.Integer,
            sa.ForeignKey("provider_batches.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "provider_file_id",
            sa.Integer,
            sa.ForeignKey("provider_files.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index(
        "ix_provider_batch_files_provider_file_id", "provider_batch_files", ["provider_file_id"]
    )
    # Plain ADD COLUMNs (no table copy on SQLite: the counter triggers of 0005 stay in place).
    op.add_column(
        "batches", sa.Column("route", sa.String(8), nullable=False, server_default="sync")
    )
    op.add_column("jobs", sa.Column("route", sa.String(8)))
    op.add_column("attempts", sa.Column("reserved_usd", MONEY))
    # No foreign key (like reused_from_job_id): SQLite could not drop the column in place.
    op.add_column("attempts", sa.Column("provider_batch_id", sa.Integer))
    if pg:
        op.execute("ALTER TABLE attempts ALTER COLUMN cost_usd TYPE NUMERIC(20, 9)")
        op.execute("ALTER TABLE jobs ALTER COLUMN cost_usd TYPE NUMERIC(20, 9)")
    op.create_index("ix_attempts_provider_batch_id", "attempts", ["provider_batch_id"])


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    op.drop_index("ix_attempts_provider_batch_id", "attempts")
    if pg:
        op.execute("ALTER TABLE jobs ALTER COLUMN cost_usd TYPE NUMERIC(18, 6)")
        op.execute("ALTER TABLE attempts ALTER COLUMN cost_usd TYPE NUMERIC(18, 6)")
    # SQLite >= 3.35 drops a plain column in place (no copy: the triggers stay).
    op.execute("ALTER TABLE attempts DROP COLUMN provider_batch_id")
    op.execute("ALTER TABLE attempts DROP COLUMN reserved_usd")
    op.execute("ALTER TABLE jobs DROP COLUMN route")
    op.execute("ALTER TABLE batches DROP COLUMN route")
    op.drop_table("provider_batch_files")
    op.drop_index("uq_provider_files_live_sha256", "provider_files")
    op.drop_index("ix_provider_files_file_id", "provider_files")
    op.drop_table("provider_files")
    op.drop_index("ix_provider_batches_state", "provider_batches")
    op.drop_index("ix_provider_batches_batch_id", "provider_batches")
    op.drop_table("provider_batches")
