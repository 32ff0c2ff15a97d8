"""Benchmark: `editbatch status BATCH` on a batch of 1,000,000 jobs, on SQLite and PostgreSQL.

    python bench/status.py [--jobs 1000000 --db sqlite postgresql --no-cli --no-writes]

Fills a fresh database in seconds with `INSERT ... SELECT` over a recursive CTE (SQLite) or
`generate_series` (PostgreSQL): one batch of `--jobs` jobs in a realistic mix of states (90%
succeeded, 2% failed, 1% rejected, 4% queued, 1% running, 1% retrying, 1% cancelled; 1% reused
from a twin), one attempt per started job plus a 429 retry on every 20th, and one output per
succeeded job. Then times `pipeline.batch.status.batch_status` (cold: first call after the fill;
warm: best of 5), each SQL statement it runs, and the real CLI `editbatch status BATCH` in a
fresh process (with the interpreter's import time shown apart).

`batch_status` reads the per-batch counters that migration 0005's triggers keep, so the fill
goes through the triggers too. Then (unless --no-writes) the cost of the triggers on writes: a
worker's four transactions per job and an `INSERT ... SELECT` of another batch of --jobs/10
jobs, with the triggers (head) and without them (downgraded to 0004), the time of the upgrade
(backfill) with the data present, and a check that every figure equals the old aggregates
(`tests/integration/status_reference.py`, timed too).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import REPO, Timer, env_with
from sqlalchemy import Engine, event, text

from pipeline.batch.status import batch_status
from pipeline.db.models import Batch
from pipeline.db.session import Database
from tests.servers import PostgresServer

TARGET_S = 0.5
STAMP = "2026-11-21 10:00:00.000000"
SPEC = (
    '{"images":["/data/catalogue/img/p00042.png"],"prompt":"Replace the background with a '
    'seamless white studio sweep","model":"gpt-image-1.5","size":"1024x1024","quality":"low",'
    '"n":1,"output_format":"png","output":"{id}_{index}.{ext}","mask_mode":"guide"}'
)

# n = 1..N; the batch is inserted first into a fresh database, so jobs.id == n.
STATE_SQL = """CASE
  WHEN n % 100 < 90 THEN 'succeeded' WHEN n % 100 < 92 THEN 'failed'
  WHEN n % 100 = 92 THEN 'rejected'  WHEN n % 100 < 97 THEN 'queued'
  WHEN n % 100 = 97 THEN 'running'   WHEN n % 100 = 98 THEN 'retrying'
  ELSE 'cancelled' END"""

JOBS_SELECT = f"""
INSERT INTO jobs (batch_id, row_number, external_key, fingerprint, spec, model, quality, state,
                  attempts,
                  attempt_base, last_error_code, last_error_message, cost_usd, estimated_usd,
                  reused_from_job_id, created_at, updated_at, finished_at)
SELECT :batch, n, 'SKU-' || n, NULL, :spec, 'gpt-image-1.5', 'low', {STATE_SQL},
       CASE WHEN n % 100 >= 92 AND n % 100 <= 96 OR n % 100 = 99 THEN 0
            WHEN n % 20 = 0 THEN 2 ELSE 1 END,
       0,
       CASE WHEN n % 100 IN (90, 91) THEN 'moderation_blocked'
            WHEN n % 100 = 92 THEN 'invalid_image' END,
       CASE WHEN n % 100 IN (90, 91) THEN 'Your request was rejected by the safety system.'
            WHEN n % 100 = 92 THEN 'image: file not found' END,
       CASE WHEN n % 100 < 90 AND n % 100 <> 5 THEN 0.011 ELSE 0 END,
       CASE WHEN n % 100 = 92 THEN NULL WHEN n % 1000 = 7 THEN NULL ELSE 0.011 END,
       CASE WHEN n % 100 = 5 THEN n - 1 END,
       {{ts}}, {{ts}}, CASE WHEN n % 100 < 93 OR n % 100 = 99 THEN {{ts}} END
FROM {{seq}}
"""

ATTEMPTS_SELECT = """
INSERT INTO attempts (job_id, number, started_at, finished_at, outcome, http_status,
                      request_id, latency_ms, cost_usd, cost_estimated, priced,
                      image_output_tokens)
SELECT id, {number}, {ts}, {ts},
       {outcome}, {status}, 'req_' || id, 21000.0, {cost}, FALSE, TRUE, 272
FROM jobs WHERE batch_id = :batch AND {where}
"""

OUTPUTS_SELECT = """
INSERT INTO outputs (job_id, "index", spool_path, uri, sha256, bytes, width, height, format,
                     drift, collected_at)
SELECT id, 1, NULL, '/data/out/SKU-' || id || '_1.png', :sha, 1456789, 1024, 1024, 'png',
       CASE WHEN id % 10 = 0 THEN 0.002 END, CASE WHEN id % 1000 <> 0 THEN {ts} END
FROM jobs WHERE batch_id = :batch AND state = 'succeeded'
"""


def fill(db: Database, jobs: int) -> tuple[int, dict[str, float]]:
    """One batch of `jobs` jobs with attempts and outputs; returns (batch id, seconds by table)."""
    pg = not db.is_sqlite
    with db.session() as s:
        batch = Batch(
            name="status-bench",
            manifest_uri="/data/manifest.csv",
            manifest_sha256="0" * 64,
            output_uri="/data/out",
            state="running",
            settings={"reuse": True},
        )
        s.add(batch)
        s.commit()
        batch_id = batch.id
    ts = "TIMESTAMPTZ '2026-11-21 10:00:00+00'" if pg else f"'{STAMP}'"
    first = ATTEMPTS_SELECT.format(
        number=1,
        ts=ts,
        outcome="CASE state WHEN 'succeeded' THEN 'ok' WHEN 'failed' THEN 'failed' "
        "WHEN 'running' THEN 'in_flight' ELSE 'transient' END",
        status="CASE state WHEN 'succeeded' THEN 200 WHEN 'failed' THEN 400 "
        "WHEN 'running' THEN NULL ELSE 500 END",
        cost="CASE state WHEN 'succeeded' THEN 0.011 ELSE 0 END",
        where="state IN ('succeeded', 'failed', 'running', 'retrying') "
        "AND reused_from_job_id IS NULL",
    )
    retry = ATTEMPTS_SELECT.format(
        number=2,
        ts=ts,
        outcome="'transient'",
        status="429",
        cost="0",
        where="state IN ('succeeded', 'failed') AND id % 20 = 0",
    )
    outputs = OUTPUTS_SELECT.format(ts=ts)
    seconds: dict[str, float] = {}
    params = {"batch": batch_id, "count": jobs, "spec": SPEC, "sha": "ab" * 32}
    with db.engine.begin() as conn:
        for label, sql in (
            ("jobs", jobs_sql(pg)),
            ("attempts", first),
            ("attempts", retry),
            ("outputs", outputs),
        ):
            with Timer() as t:
                conn.execute(text(sql), params)
            seconds[label] = seconds.get(label, 0.0) + t.seconds
    with Timer() as t, db.engine.begin() as conn:
        ids = conn.execute(text("SELECT min(id), max(id), count(*) FROM jobs")).one()
        assert tuple(ids) == (1, jobs, jobs), f"job ids are not 1..N: {tuple(ids)}"
        conn.execute(text("ANALYZE"))
    seconds["analyze"] = t.seconds
    return batch_id, seconds


@contextmanager
def captured_statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The (SQL, DBAPI parameters) of every statement run while the block runs."""
    seen: list[tuple[str, Any]] = []

    def after(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield seen
    finally:
        event.remove(engine, "after_cursor_execute", after)


def time_status(db: Database, batch_id: int) -> tuple[float, float, dict[str, float]]:
    """(cold seconds, best warm seconds, median seconds per statement).

    Each statement is timed again on its own, execute AND fetch: a driver may return the
    first row of a streaming query before the rest is computed.
    """
    with Timer() as cold, db.session() as s:
        batch_status(s, batch_id)
    warm = []
    for _ in range(5):
        with captured_statements(db.engine) as seen, Timer() as t, db.session() as s:
            status = batch_status(s, batch_id)
        warm.append(t.seconds)
    assert status.jobs_total > 0
    per_statement: dict[str, float] = {}
    with db.engine.connect() as conn:
        for statement, parameters in seen:
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            runs = []
            for _ in range(3):
                with Timer() as t:
                    conn.exec_driver_sql(statement, parameters).fetchall()
                runs.append(t.seconds)
            per_statement[" ".join(statement.split())[:90]] = statistics.median(runs)
    return cold.seconds, min(warm), per_statement


def time_cli(url: str, batch_id: int, home: Path) -> tuple[float, float]:
    """(seconds of `editbatch status BATCH --json` in a fresh process, of `import pipeline.cli`)."""
    env = env_with({"EDITBATCH_DATABASE_URL": url, "EDITBATCH_HOME": str(home)})
    runs = []
    for _ in range(3):
        with Timer() as t:
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "status", str(batch_id), "--json"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        runs.append(t.seconds)
    imports = []
    for _ in range(3):
        with Timer() as t:
            subprocess.run(
                [sys.executable, "-c", "import pipeline.cli"], cwd=REPO, env=env, check=True
            )
        imports.append(t.seconds)
    return min(runs), min(imports)


def jobs_sql(pg: bool) -> str:
    sql = JOBS_SELECT.format(
        ts="TIMESTAMPTZ '2026-11-21 10:00:00+00'" if pg else f"'{STAMP}'",
        seq="generate_series(1, :count) AS n" if pg else "seq",
    )
    if not pg:
        sql = (
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < :count)"
            + sql
        )
    return sql


def worker_writes(db: Database, batch_id: int, count: int) -> float:
    """Seconds per job of what a worker writes for one successful call, in its 4 transactions:
    claim; attempt in flight + attempts+1; attempt ok with its cost + job cost; succeeded +
    an output."""
    with db.engine.connect() as conn:
        ids = list(
            conn.execute(
                text("SELECT id FROM jobs WHERE batch_id = :b AND state = 'queued' LIMIT :n"),
                {"b": batch_id, "n": count},
            ).scalars()
        )
    steps = (
        ("UPDATE jobs SET state = 'running', claim_token = 'x' WHERE id = :id",),
        (
            "INSERT INTO attempts (job_id, number, started_at, outcome, cost_usd, "
            "cost_estimated, priced) VALUES (:id, 9, CURRENT_TIMESTAMP, 'in_flight', 0, FALSE, "
            "TRUE)",
            "UPDATE jobs SET attempts = attempts + 1 WHERE id = :id",
        ),
        (
            "UPDATE attempts SET outcome = 'ok', cost_usd = 0.011, http_status = 200 "
            "WHERE job_id = :id AND number = 9",
            "UPDATE jobs SET cost_usd = cost_usd + 0.011 WHERE id = :id",
        ),
        (
            "UPDATE jobs SET state = 'succeeded', claim_token = NULL WHERE id = :id",
            'INSERT INTO outputs (job_id, "index", uri, drift, collected_at) '
            "VALUES (:id, 1, 'x', 0.001, CURRENT_TIMESTAMP)",
        ),
    )
    with Timer() as t:
        for job_id in ids:
            for transaction in steps:
                with db.engine.begin() as conn:
                    for sql in transaction:
                        conn.execute(text(sql), {"id": job_id})
    return t.seconds / max(len(ids), 1)


def insert_batch(db: Database, count: int) -> tuple[int, float]:
    """(id, seconds) of another batch of `count` jobs inserted by one INSERT ... SELECT."""
    pg = not db.is_sqlite
    with Timer() as t, db.engine.begin() as conn:
        other = conn.execute(
            text(
                "INSERT INTO batches (name, created_at, manifest_uri, manifest_sha256, "
                "output_uri, state, reserved_usd, settings) VALUES ('other', "
                "CURRENT_TIMESTAMP, '', '', '', 'running', 0, '{}') RETURNING id"
            )
        ).scalar_one()
        conn.execute(text(jobs_sql(pg)), {"batch": other, "count": count, "spec": SPEC})
    return int(other), t.seconds


def writes(db: Database, batch_id: int, jobs: int) -> None:
    """The triggers' cost on writes, the upgrade's backfill, and agreement with the aggregates."""
    from alembic import command

    from pipeline.db.session import alembic_config
    from tests.integration.status_reference import reference_status

    sample = 500
    with_triggers = worker_writes(db, batch_id, sample)
    other, insert_with = insert_batch(db, jobs // 10)
    cfg = alembic_config(db.url)
    db.engine.dispose()
    command.downgrade(cfg, "0004")
    without = worker_writes(db, batch_id, sample)
    _, insert_without = insert_batch(db, jobs // 10)
    db.engine.dispose()
    with Timer() as up:
        command.upgrade(cfg, "head")
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    with_again = worker_writes(db, batch_id, sample)
    total = jobs + 2 * (jobs // 10)
    print(
        f"  writes, per job (4 transactions: claim; attempt in flight; attempt ok + cost; "
        f"succeeded + output): {without * 1000:.2f} ms without the triggers -> "
        f"{with_triggers * 1000:.2f} / {with_again * 1000:.2f} ms with them (before the "
        "downgrade / after the upgrade)"
    )
    print(
        f"  INSERT ... SELECT of {jobs // 10:,} jobs (another batch): {insert_without:.2f} s "
        f"without -> {insert_with:.2f} s with the triggers; `alembic upgrade` 0004 -> 0005 "
        f"(tables, triggers, backfill) over {total:,} jobs: {up.seconds:.1f} s"
    )
    with db.session() as s, Timer() as t:
        for b in (batch_id, other):
            fast, slow = batch_status(s, b), reference_status(s, b)
            money = ("cost_usd", "estimated_usd", "estimated_remaining_usd", "retry_waste_usd")
            diff = {
                k: (getattr(fast, k), getattr(slow, k))
                for k in (
                    "counts",
                    "attempts_by_outcome",
                    "unpriced_attempts",
                    "estimated_cost_attempts",
                    "outputs",
                    "outputs_uncollected",
                    "drift_outputs",
                    "drift_max",
                    "unpriced_jobs",
                    "reused",
                    "breakdown",
                    "failures",
                )
                if getattr(fast, k) != getattr(slow, k)
            }
            diff |= {
                k: (getattr(fast, k), getattr(slow, k))
                for k in (*money, "saved_usd")
                if getattr(fast, k) != Decimal(str(getattr(slow, k))).quantize(Decimal("1e-6"))
            }
            if (fast.drift_mean is None) != (slow.drift_mean is None) or (
                fast.drift_mean is not None and abs(fast.drift_mean - (slow.drift_mean or 0)) > 1e-9
            ):
                diff["drift_mean"] = (fast.drift_mean, slow.drift_mean)
            print(f"  batch {b}: counters agree with the old aggregates: {diff or 'yes'}")
    print(f"    (the old aggregates over both batches took {t.seconds:.2f} s)")


def explain(db: Database, batch_id: int) -> list[str]:
    """The plans of the statements that touch jobs: the failures list and the reuse join."""
    lines = []
    prefix = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN (COSTS OFF) "
    queries = {
        "failures (first 20 by row)": "SELECT row_number FROM jobs WHERE batch_id = :b AND "
        "state IN ('failed', 'rejected') ORDER BY row_number LIMIT 20",
        "reused + saved": "SELECT count(jobs.id), coalesce(sum(donor.cost_usd), 0) FROM jobs "
        "JOIN jobs AS donor ON donor.id = jobs.reused_from_job_id WHERE jobs.batch_id = :b "
        "AND jobs.reused_from_job_id IS NOT NULL",
    }
    with db.engine.connect() as conn:
        for label, sql in queries.items():
            rows = conn.execute(text(prefix + sql), {"b": batch_id}).all()
            plan = "; ".join(str(r[-1]).strip() for r in rows)
            lines.append(f"    {label}: {plan}")
    return lines


def report(db: Database, batch_id: int, home: Path, cli: bool) -> None:
    cold, warm, per_statement = time_status(db, batch_id)
    verdict = "met" if warm < TARGET_S else "MISSED"
    print(
        f"  batch_status() from the counters: cold {cold * 1000:.1f} ms, warm "
        f"{warm * 1000:.1f} ms (target < {TARGET_S} s: {verdict})"
    )
    for key, seconds in sorted(per_statement.items(), key=lambda kv: -kv[1]):
        print(f"    {seconds * 1000:7.2f} ms  {key}")
    if cli:
        run, imports = time_cli(db.url, batch_id, home)
        print(
            f"  editbatch status {batch_id} --json (fresh process): {run:.2f} s, of which "
            f"`import pipeline.cli` {imports:.2f} s -> {run - imports:.2f} s of work"
        )
    for line in explain(db, batch_id):
        print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument(
        "--db", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"]
    )
    parser.add_argument("--no-cli", dest="cli", action="store_false")
    parser.add_argument("--no-writes", dest="writes", action="store_false")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="editbatch-status-") as name:
        tmp = Path(name)
        for kind in args.db:
            pg = PostgresServer(tmp) if kind == "postgresql" else None
            try:
                url = pg.create_database() if pg else f"sqlite:///{tmp / 'status.db'}"
                db = Database(url)
                with Timer() as t:
                    batch_id, seconds = fill(db, args.jobs)
                counts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
                print(
                    f"{kind}: filled {args.jobs:,} jobs through the triggers in {t.seconds:.1f} s "
                    f"({counts})"
                )
                report(db, batch_id, tmp / "home", args.cli)
                if args.writes:
                    writes(db, batch_id, args.jobs)
                db.dispose()
            finally:
                if pg is not None:
                    pg.stop()
            print()


if __name__ == "__main__":
    main()
