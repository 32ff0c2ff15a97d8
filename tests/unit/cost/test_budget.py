"""pipeline.cost.budget: atomic reservations across threads and processes, daily cap, overshoot.

Each test runs on a SQLite file; the race tests run on PostgreSQL too (marked integration: they
start a throwaway cluster, like the integration suite).
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select

from pipeline.cost.budget import daily_spent, reconcile, reserve, reserve_call, settle
from pipeline.cost.estimate import estimate_cost
from pipeline.cost.pricing import load_prices
from pipeline.db.models import Base, Batch, DailySpend, Job
from pipeline.db.session import Database, alembic_config, make_engine
from pipeline.errors import NotFoundError
from pipeline.spec import EditSpec
from tests.servers import PostgresServer

TODAY = date(2026, 11, 22)
THREADS = 8


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'x.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def db(url: str) -> Iterator[Database]:
    database = Database(url)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    yield database
    database.dispose()


def make_batch(db: Database, budget: str | None) -> int:
    with db.session() as session:
        batch = Batch(
            name="b",
            manifest_uri="m.csv",
            manifest_sha256="0" * 64,
            output_uri="out/",
            budget_usd=None if budget is None else Decimal(budget),
            reserved_usd=Decimal(0),
            settings={},
        )
        session.add(batch)
        session.commit()
        return batch.id


def reserved(db: Database, batch_id: int) -> Decimal:
    with db.session() as session:
        value = session.scalar(select(Batch.reserved_usd).where(Batch.id == batch_id))
    assert value is not None
    return Decimal(value)


def batch_state(db: Database, batch_id: int) -> tuple[str, str | None]:
    with db.session() as session:
        row = session.execute(
            select(Batch.state, Batch.hold_reason).where(Batch.id == batch_id)
        ).one()
    return row[0], row[1]


def day_total(db: Database, day: date = TODAY) -> Decimal:
    with db.session() as session:
        return daily_spent(session, day)


def race(n: int, body: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # surface a thread's failure in the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


# -- single process -----------------------------------------------------------------------------


def test_reserve_then_settle_swaps_reservation_for_cost(db: Database) -> None:
    batch = make_batch(db, "1.00")
    with db.session() as session:
        assert reserve(session, batch, Decimal("0.04"), None, TODAY) is None
    assert reserved(db, batch) == Decimal("0.04")
    assert day_total(db) == Decimal("0.04")
    with db.session() as session:
        settle(session, batch, Decimal("0.04"), Decimal("0.031234"), TODAY)
        session.commit()
    assert reserved(db, batch) == Decimal("0.031234")
    assert day_total(db) == Decimal("0.031234")
    with db.session() as session:  # a call that failed bills nothing
        assert reserve(session, batch, Decimal("0.04"), None, TODAY) is None
        settle(session, batch, Decimal("0.04"), Decimal(0), TODAY)
        session.commit()
    assert reserved(db, batch) == Decimal("0.031234")


def test_refusal_holds_the_batch_and_reserves_nothing(db: Database) -> None:
    batch = make_batch(db, "0.10")
    with db.session() as session:
        assert reserve(session, batch, Decimal("0.06"), None, TODAY) is None
        reason = reserve(session, batch, Decimal("0.06"), None, TODAY)
    assert reason is not None
    assert reason.startswith("budget: batch budget $0.100000 reached ($0.060000 committed+reserved")
    assert f"editbatch resume {batch} --budget" in reason
    assert batch_state(db, batch) == ("held", reason)
    assert reserved(db, batch) == Decimal("0.06")
    assert day_total(db) == Decimal("0.06")
    with db.session() as session:  # exactly reaching the budget is allowed
        assert reserve(session, batch, Decimal("0.04"), None, TODAY) is None
    assert reserved(db, batch) == Decimal("0.10")


def test_no_budget_never_refuses_and_bad_input_raises(db: Database) -> None:
    batch = make_batch(db, None)
    with db.session() as session:
        for _ in range(20):
            assert reserve(session, batch, Decimal("1.5"), None, TODAY) is None
        with pytest.raises(ValueError, match="negative"):
            reserve(session, batch, Decimal("-1"), None, TODAY)
        with pytest.raises(NotFoundError, match="no batch 999"):
            reserve(session, 999, Decimal("0.01"), None, TODAY)
    assert reserved(db, batch) == Decimal("30")


def test_micro_dollar_sums_stay_exact(db: Database) -> None:
    """100 reservations of $0.000001 and of $0.1 add up exactly (SQLite keeps NUMERIC as float)."""
    batch = make_batch(db, "10.1001")
    with db.session() as session:
        for _ in range(100):
            assert reserve(session, batch, Decimal("0.100001"), None, TODAY) is None
    assert reserved(db, batch) == Decimal("10.0001")
    with db.session() as session:
        assert reserve(session, batch, Decimal("0.1"), None, TODAY) is None  # to the micro-dollar
        assert reserve(session, batch, Decimal("0.000001"), None, TODAY) is not None


def test_reserve_call_reserves_the_upper_bound_and_refuses_unpriced_under_a_budget(
    db: Database,
) -> None:
    priced = estimate_cost(
        EditSpec(row=1, key=None, images=("a.png",), prompt="p", model="gpt-image-1.5"),
        [(1024, 1024)],
        load_prices(),
    )
    unpriced = estimate_cost(
        EditSpec(row=1, key=None, images=("a.png",), prompt="p", model="gpt-image-9"),
        [(1024, 1024)],
        load_prices(),
    )
    assert priced.high is not None and priced.expected is not None
    assert priced.high > priced.expected  # quality and size auto
    free, capped = make_batch(db, None), make_batch(db, "5")
    with db.session() as session:
        assert reserve_call(session, capped, priced, None, TODAY) == (priced.high, None)
        assert reserve_call(session, free, unpriced, None, TODAY) == (Decimal(0), None)
        amount, reason = reserve_call(session, free, unpriced, Decimal("10"), TODAY)
        assert amount == 0 and reason is not None and "'gpt-image-9' has no price" in reason
        amount, reason = reserve_call(session, capped, unpriced, None, TODAY)
        assert amount == 0 and reason is not None and reason.startswith("budget:")
    assert reserved(db, capped) == priced.high
    assert batch_state(db, capped) == ("held", reason)


# -- races --------------------------------------------------------------------------------------


def test_threads_racing_never_exceed_the_budget(db: Database) -> None:
    batch = make_batch(db, "1.00")
    wins: list[int] = []

    def worker(i: int) -> None:
        with db.session() as session:
            for _ in range(10):
                if reserve(session, batch, Decimal("0.04"), None, TODAY) is None:
                    wins.append(i)

    race(THREADS, worker)
    assert len(wins) == 25  # 25 x 0.04 = 1.00: none lost, none too many
    assert reserved(db, batch) == Decimal("1.00")
    assert batch_state(db, batch)[0] == "held"

    def settler(i: int) -> None:
        with db.session() as session:
            for _ in range(wins.count(i)):
                settle(session, batch, Decimal("0.04"), Decimal("0.03"), TODAY)
                session.commit()

    race(THREADS, settler)
    assert reserved(db, batch) == Decimal("0.75")
    assert day_total(db) == Decimal("0.75")


def _process_worker(url: str, batch_id: int, attempts: int) -> int:
    """One worker process: its own engine, reserving $0.04 `attempts` times; returns the wins."""
    database = Database(url, migrate=False)
    wins = 0
    try:
        with database.session() as session:
            for _ in range(attempts):
                if reserve(session, batch_id, Decimal("0.04"), None, TODAY) is None:
                    wins += 1
    finally:
        database.dispose()
    return wins


def test_processes_racing_never_exceed_the_budget(db: Database) -> None:
    batch = make_batch(db, "1.00")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        wins = pool.starmap(_process_worker, [(db.url, batch, 15)] * 4)
    assert sum(wins) == 25
    assert reserved(db, batch) == Decimal("1.00")


def test_daily_cap_across_batches(db: Database) -> None:
    batches = [make_batch(db, None), make_batch(db, None)]
    cap = Decimal("0.50")
    reasons: list[str] = []

    def worker(i: int) -> None:
        with db.session() as session:
            for _ in range(6):
                reason = reserve(session, batches[i % 2], Decimal("0.04"), cap, TODAY)
                if reason is not None:
                    reasons.append(reason)

    race(THREADS, worker)
    assert len(reasons) == THREADS * 6 - 12  # 12 x 0.04 = 0.48 <= 0.50 < 13 x 0.04
    assert day_total(db) == Decimal("0.48")
    assert reserved(db, batches[0]) + reserved(db, batches[1]) == Decimal("0.48")
    assert all(r.startswith("daily budget: $0.500000 for 2026-11-22 (UTC)") for r in reasons)
    for b in batches:
        assert batch_state(db, b)[0] == "held"
    tomorrow = TODAY + timedelta(days=1)
    with db.session() as session:
        assert reserve(session, batches[0], Decimal("0.04"), cap, tomorrow) is None
    assert day_total(db, tomorrow) == Decimal("0.04")


@pytest.mark.parametrize(
    ("reserve_each", "actual_each", "expected_spend"),
    [
        ("0.04", "0.10", "1.30"),  # reserve the expected value, calls cost more: overshoot
        ("0.10", "0.10", "1.00"),  # reserve the upper bound: no overshoot
    ],
)
def test_overshoot_is_within_the_bound(
    db: Database, reserve_each: str, actual_each: str, expected_spend: str
) -> None:
    """8 calls in flight; each round all reserve, then all that got a reservation settle.

    bound: spend <= budget + in flight x (actual - reserved) = 1.00 + 8 x (0.10 - 0.04) = 1.48.
    Measured: round 1 admits 8 (0.32) and settles them at 0.80; round 2 admits 5 (0.80 + 5 x
    0.04 = 1.00), which settle at 1.30; round 3 admits none.
    """
    budget, r, a = Decimal("1.00"), Decimal(reserve_each), Decimal(actual_each)
    batch = make_batch(db, str(budget))
    barrier = threading.Barrier(THREADS)

    def worker(_: int) -> None:
        with db.session() as session:
            for _round in range(4):
                barrier.wait()
                ok = reserve(session, batch, r, None, TODAY) is None
                barrier.wait()
                if ok:
                    settle(session, batch, r, a, TODAY)
                    session.commit()
                barrier.wait()

    race(THREADS, worker)
    spend = reserved(db, batch)
    bound = budget + THREADS * max(a - r, Decimal(0))
    print(f"\nreserve {r}, actual {a}: spend {spend}, budget {budget}, bound {bound}")
    assert spend == Decimal(expected_spend)
    assert spend <= bound


# -- leaks and schema ---------------------------------------------------------------------------


def test_reconcile_drops_leaked_reservations(sqlite_db: Database) -> None:
    db = sqlite_db
    batch = make_batch(db, "1.00")
    with db.session() as session:
        session.add(
            Job(
                batch_id=batch, row_number=1, spec="{}", state="succeeded", cost_usd=Decimal("0.03")
            )
        )
        running = Job(batch_id=batch, row_number=2, spec="{}", state="running")
        session.add(running)
        session.commit()
        assert reserve(session, batch, Decimal("0.04"), None, TODAY) is None  # worker dies
        assert reserve(session, batch, Decimal("0.03"), None, TODAY) is None
        assert not reconcile(session, batch)  # a job is running: leave the counter alone
        session.commit()
        running.state = "queued"  # its lease expired and it was requeued
        session.commit()
        assert reconcile(session, batch)
        session.commit()
    assert reserved(db, batch) == Decimal("0.03")


def test_migration_matches_the_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    Database(url).dispose()
    engine = make_engine(url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert "daily_spend" in inspect(conn).get_table_names()
    assert [d for d in diffs if "daily_spend" in repr(d)] == []
    command.downgrade(alembic_config(url), "0001")
    with engine.connect() as conn:
        assert "daily_spend" not in inspect(conn).get_table_names()
    command.upgrade(alembic_config(url), "head")
    with engine.connect() as conn:
        assert "daily_spend" in inspect(conn).get_table_names()
    engine.dispose()
    assert DailySpend.__tablename__ == "daily_spend"
