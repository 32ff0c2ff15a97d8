"""Status shows the exact ledger: the counters count nano-dollars (migration 0009), so costs
with up to nine decimals (batch-route lines at half price) add up in status exactly as in the
ledger, on SQLite and PostgreSQL, and an existing database is recounted on upgrade."""

from __future__ import annotations

from decimal import Decimal

from alembic import command
from sqlalchemy import MetaData, Table, func, insert, select, update

from pipeline.batch.status import batch_status, usd_text
from pipeline.db.models import Batch, Job, utcnow
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


def _batch_at_0008(db: Database) -> int:
    """The same batch written with the tables as they are at revision 0008 (reflected): the
    models have columns later revisions add."""
    meta = MetaData()
    batches = Table("batches", meta, autoload_with=db.engine)
    jobs = Table("jobs", meta, autoload_with=db.engine)
    now = utcnow()
    with db.engine.begin() as conn:
        batch_id = conn.execute(
            insert(batches)
            .values(
                name="b",
                manifest_uri="m",
                manifest_sha256="0" * 64,
                output_uri="o",
                created_at=now,
                state="running",
                reserved_usd=0,
                settings={},
            )
            .returning(batches.c.id)
        ).scalar_one()
        for row, cost in enumerate(COSTS, start=1):
            conn.execute(
                insert(jobs).values(
                    batch_id=batch_id,
                    row_number=row,
                    spec="{}",
                    state=JobState.QUEUED,
                    attempts=0,
                    attempt_base=0,
                    cost_usd=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.batch_id == batch_id, jobs.c.row_number == row)
                .values(cost_usd=cost)
            )
    return int(batch_id)


def test_upgrading_recounts_an_existing_database(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "0008")
    db = Database(database_url, migrate=False)
    try:
        batch_id = _batch_at_0008(db)
        command.upgrade(cfg, "head")
        with db.session() as s:
            assert batch_status(s, batch_id).cost_usd == Decimal("0.123457001")
        command.downgrade(cfg, "0008")  # back to micro-dollars: rounded per job again
        command.upgrade(cfg, "head")
        with db.session() as s:
            assert batch_status(s, batch_id).cost_usd == Decimal("0.123457001")
    finally:
        db.dispose()
