"""`batch_status` from the trigger-kept counters equals the old aggregates, on both databases.

A random workload goes through the real code paths (producer, executor against the sandbox,
`pipeline.db.jobs` transitions, controls, reuse, the collector) and a few direct writes the
triggers must also follow; after every step every figure of `batch_status` is compared with
`status_reference.reference_status` (the aggregate queries it ran before migration 0005).
The migration is then downgraded and upgraded again with the data in place (backfill).
"""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text, update

from pipeline.batch import controls
from pipeline.batch.status import BatchStatus, batch_status, list_batches
from pipeline.db import jobs
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, Job, Output, utcnow
from pipeline.db.session import Database, alembic_config
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxServer
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY
from tests.factories import product_rows, write_manifest
from tests.integration.status_reference import reference_status
from tests.unit.helpers import new_batch

COUNTERS = {"batch_job_counts", "batch_attempt_counts", "batch_output_counts"}
MONEY = ("cost_usd", "reserved_usd", "estimated_usd", "estimated_remaining_usd")
MONEY += ("retry_waste_usd", "saved_usd")
FAULTS = ("", "", "", "#sandbox:500x1", "#sandbox:429x1", "#sandbox:400")
FAULTS += ("#sandbox:moderation", "#sandbox:badb64x1", "#sandbox:500")
MICRO = Decimal("0.000001")


def _normal(st: BatchStatus) -> dict[str, Any]:
    """Every field, money to the micro-dollar (SQLite's aggregates sum floats)."""
    d = dataclasses.asdict(st)
    for key in MONEY:
        d[key] = Decimal(str(d[key])).quantize(MICRO)
    d["counts"] = {k: v for k, v in d["counts"].items() if v}
    d["drift_mean"] = None if d["drift_mean"] is None else round(d["drift_mean"], 9)
    return d


def _json(st: BatchStatus) -> dict[str, Any]:
    out = st.to_json()
    for key, value in out.items():
        if key.endswith("_usd") and value is not None:
            out[key] = Decimal(value).quantize(MICRO)
    out["counts"] = {k: v for k, v in out["counts"].items() if v}
    out["mask_drift"]["mean"] = (
        None if out["mask_drift"]["mean"] is None else round(out["mask_drift"]["mean"], 9)
    )
    return out


def check(db: Database, *batch_ids: int) -> None:
    with db.session() as s:
        for batch_id in batch_ids:
            fast, slow = batch_status(s, batch_id), reference_status(s, batch_id)
            assert _normal(fast) == _normal(slow), f"batch {batch_id}"
            assert _json(fast) == _json(slow), f"batch {batch_id}"
            assert fast.cost_usd == fast.cost_usd.quantize(MICRO)
        listed = {b["batch_id"]: b for b in list_batches(s)}
        for batch_id in batch_ids:
            slow = reference_status(s, batch_id)
            assert listed[batch_id]["jobs_total"] == slow.jobs_total
            assert Decimal(listed[batch_id]["cost_usd"]) == slow.cost_usd.quantize(MICRO)


def _deps(settings: Settings, db: Database) -> Deps:
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    return deps


def _rows(folder: Path, rng: random.Random, count: int) -> list[dict[str, Any]]:
    rows = product_rows(folder, count)
    for row in rows:
        row["prompt"] = f"{row['prompt']} {rng.choice(FAULTS)}".strip()
        if rng.random() < 0.3:
            row["model"], row["quality"] = "gpt-image-2.5-flare", "low"
        else:
            row["quality"] = rng.choice(("low", "medium"))
    rows[-1]["image"] = "missing.png"  # rejected at submit
    return rows


def _ids(db: Database, batch_id: int) -> list[int]:
    with db.session() as s:
        return list(s.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)))


def _in_state(db: Database, batch_id: int, *states: str) -> list[int]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Job.id)
                .where(Job.batch_id == batch_id, Job.state.in_(states))
                .order_by(Job.id)
            )
        )


def _triggers(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
            else:
                sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
            return set(conn.execute(text(sql)).scalars())
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.parametrize("seed", [1, 2])
def test_counters_agree_with_aggregates_through_a_random_workload(
    tmp_path: Path, database_url: str, sandbox: SandboxServer, seed: int
) -> None:
    rng = random.Random(seed)
    sandbox.config.drift = 0.01
    settings = Settings(
        home=tmp_path / "home",
        database_url=database_url,
        openai_base_url=sandbox.base_url,
        openai_api_key=FAKE_KEY,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
        request_timeout_seconds=10,
        max_attempts=2,
    )
    db = Database(database_url)
    deps = _deps(settings, db)
    folder = tmp_path / "in"
    manifest = write_manifest(folder / "m.csv", _rows(folder, rng, 14))
    a = new_batch(db, manifest, str(tmp_path / "out-a"), reuse=True).batch_id
    check(db, a)

    # The executor against the sandbox: successes, retries, failures, bad responses.
    queued = [i for chunk in queued_job_ids(db, a) for i in chunk]
    for job_id in rng.sample(queued, k=len(queued) * 3 // 4):
        process_job(job_id, deps)
        if rng.random() < 0.5:
            check(db, a)
    check(db, a)

    # Transitions one by one, as workers make them.
    with db.session() as s:
        left = _in_state(db, a, "queued")
        if left:
            job_id = left[0]
            token = jobs.claim(s, job_id, lease_seconds=-1)  # a worker that dies at once
            assert token
            s.add(Attempt(job_id=job_id, number=1, started_at=utcnow(), outcome="in_flight"))
            jobs.count_attempt(s, job_id, lease_seconds=-1)
            s.commit()
    check(db, a)
    with db.session() as s:
        jobs.requeue_expired(s, a)  # back to queued; its attempt becomes `interrupted`
    check(db, a)
    with db.session() as s:
        left = _in_state(db, a, "queued")
        if len(left) >= 2:
            t1 = jobs.claim(s, left[0], lease_seconds=60)
            t2 = jobs.claim(s, left[1], lease_seconds=60)
            assert t1 and t2
            jobs.add_cost(s, left[0], Decimal("0.012345"))
            jobs.set_state(s, left[0], t1, "retrying", lease_seconds=60)
            jobs.set_state(s, left[1], t2, "held", error_code="x", error_message="held")
            s.commit()
            check(db, a)
            jobs.set_state(s, left[0], t1, "failed", error_code="y", error_message="gave up")
            jobs.release_held_jobs(s, a)
            s.commit()
    check(db, a)

    # Direct writes the triggers must follow too: unpriced and estimated attempts, a late
    # `ok` on a succeeded job, an outcome changed, a succeeded job moved out and back.
    succeeded = _in_state(db, a, "succeeded")
    with db.session() as s:
        some = _ids(db, a)[0]
        s.add(
            Attempt(
                job_id=some,
                number=9,
                started_at=utcnow(),
                outcome="ok",
                priced=False,
                cost_estimated=True,
                cost_usd=Decimal("0.0042"),
            )
        )
        if succeeded:
            late = Attempt(
                job_id=succeeded[0],
                number=8,
                started_at=utcnow(),
                outcome="ok",
                cost_usd=Decimal("0.031"),
            )
            s.add(late)
            s.commit()
            check(db, a)
            late.outcome, late.cost_usd = "transient", Decimal("0.02")
            s.commit()
            check(db, a)
            s.execute(update(Job).where(Job.id == succeeded[0]).values(state="failed"))
            s.commit()
            check(db, a)
            s.execute(update(Job).where(Job.id == succeeded[0]).values(state="succeeded"))
        s.commit()
    check(db, a)

    # A person retries the failed jobs on another model, and the workers run them.
    with db.session() as s:
        controls.retry_failed(s, a, model="gpt-image-2.5-flare")
    check(db, a)
    for job_id in _in_state(db, a, "queued"):
        if rng.random() < 0.7:
            process_job(job_id, deps)
    check(db, a)

    # The same manifest again: reuse (zero cost, `saved`), then pause, resume and cancel.
    b = new_batch(db, manifest, str(tmp_path / "out-b"), reuse=True).batch_id
    check(db, a, b)
    b_jobs = _in_state(db, b, "queued")
    for job_id in b_jobs[: len(b_jobs) // 2]:
        process_job(job_id, deps)
    check(db, a, b)
    with db.session() as s:
        controls.pause(s, b)
        controls.resume(s, b)
        controls.cancel(s, b)
    check(db, a, b)
    with db.session() as s:
        out = s.scalars(select(Output).join(Job).where(Job.batch_id == b)).first()
        if out is not None:
            out.collected_at, out.drift = None, 0.5  # an output to collect again
            s.commit()
    check(db, a, b)
    with db.session() as s:
        assert batch_status(s, b).reused == reference_status(s, b).reused
        final_a = _normal(batch_status(s, a))
    db.dispose()

    # The migration goes down and up with data present: counters rebuilt from the rows.
    cfg = alembic_config(database_url)
    command.downgrade(cfg, "0004")
    assert not (COUNTERS & _tables(database_url))
    assert not {t for t in _triggers(database_url) if "_count_" in t}
    command.upgrade(cfg, "head")
    assert _tables(database_url) >= COUNTERS
    db = Database(database_url)
    check(db, a, b)
    with db.session() as s:
        assert _normal(batch_status(s, a)) == final_a
    # ... and keeps counting afterwards.
    deps = _deps(settings, db)
    for job_id in _in_state(db, a, "queued"):
        process_job(job_id, deps)
    check(db, a, b)
    db.dispose()


def test_a_new_batch_of_many_jobs_is_counted_in_one_statement(database_url: str) -> None:
    """The producer inserts jobs in bulk; a deleted batch takes its counters with it."""
    db = Database(database_url)
    with db.session() as s:
        batch = Batch(name="bulk", manifest_uri="m", manifest_sha256="0" * 64, output_uri="o")
        s.add(batch)
        s.flush()
        rows = [
            {
                "batch_id": batch.id,
                "row_number": n,
                "spec": "{}",
                "state": "queued" if n % 7 else "rejected",
                "model": "gpt-image-2.5-flare" if n % 3 else None,
                "quality": "low",
                "estimated_usd": None if n % 11 == 0 else Decimal("0.011"),
                "cost_usd": Decimal(0),
            }
            for n in range(1, 3001)
        ]
        s.execute(Job.__table__.insert(), rows)
        s.commit()
        batch_id = batch.id
    check(db, batch_id)
    with db.session() as s:
        controls.cancel(s, batch_id)
    check(db, batch_id)
    with db.session() as s:
        s.execute(Job.__table__.delete().where(Job.batch_id == batch_id, Job.row_number < 100))
        s.commit()
    check(db, batch_id)
    with db.session() as s:
        s.execute(Batch.__table__.delete().where(Batch.id == batch_id))
        s.commit()
        for table in sorted(COUNTERS):
            left = s.execute(
                text(f"SELECT count(*) FROM {table} WHERE batch_id = :b"), {"b": batch_id}
            ).scalar_one()
            assert left == 0, table
    db.dispose()
