"""Status shows the exact ledger: the counters count nano-dollars (migration 0009), so costs
with up to nine decimals (batch-route lines at half price) add up in status exactly as in the
ledger, on SQLite and PostgreSQL, and an existing database is recounted on upgrade."""

from __future__ import annotations

from decimal import Decimal

from alembic import command
from sqlalchemy import func, select, update

from pipeline.batch.status import batch_status, usd_text
from pipeline.db.models import Batch, Job
from pipeline.db.session import Database, alembic_config
from pipeline.states import JobState

COSTS = [Decimal("0.1234565"), Decimal("0.0000005"), Decimal("0.000000001")]


def _batch_with_costs(db: Database) -> int:
    with db.session() as s:
        batch = Batch(name="b", manifest_uri="m", manifest_sha256="0" * 64, output_uri="o")
        s.add(batch)
        s.flush()
        for row in range(1, len(COSTS) + 1):
            s.add(Job(batch_id=batch.id, row_number=row, spec="{}", state=JobState.QUEUED))
        s.flush()
        ids = s.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.id)).all()
        for job_id, cost in zip(ids, COSTS, strict=True):
            s.execute(update(Job).where(Job.id == job_id).values(cost_usd=cost))
        s.commit()
        return batch.id


def test_status_cost_is_the_exact_sum_of_job_costs(database_url: str) -> None:
    db = Database(database_url)
    try:
        batch_id = _batch_with_costs(db)
        with db.session() as s:
            status = batch_status(s, batch_id)
            exact = s.scalar(select(func.sum(Job.cost_usd)).where(Job.batch_id == batch_id))
        assert status.cost_usd == sum(COSTS) == Decimal("0.123457001")
        assert Decimal(str(exact)).quantize(Decimal("1e-9")) == status.cost_usd
        assert status.to_json()["cost_usd"] == "0.123457001"
        # Micro-dollar counters said 0.123458: each job rounded before the sum.
        assert usd_text(Decimal("0.0000005")) == "0.0000005"
    finally:
        db.dispose()


def test_upgrading_recounts_an_existing_database(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "0008")
    db = Database(database_url, migrate=False)
    try:
        batch_id = _batch_with_costs(db)
        command.upgrade(cfg, "head")
        with db.session() as s:
            assert batch_status(s, batch_id).cost_usd == Decimal("0.123457001")
        command.downgrade(cfg, "0008")  # back to micro-dollars: rounded per job again
        command.upgrade(cfg, "head")
        with db.session() as s:
            assert batch_status(s, batch_id).cost_usd == Decimal("0.123457001")
    finally:
        db.dispose()
