"""Benchmark: `editbatch status BATCH` on a batch of 1,000,000 jobs, on SQLite and PostgreSQL.

    python bench/status.py [--jobs 1000000 --db sqlite postgresql --proposed]

Fills a fresh database in seconds with `INSERT ... SELECT` over a recursive CTE (SQLite) or
`generate_series` (PostgreSQL): one batch of `--jobs` jobs in a realistic mix of states (90%
succeeded, 2% failed, 1% rejected, 4% queued, 1% running, 1% retrying, 1% cancelled; 1% reused
from a twin), one attempt per started job plus a 429 retry on every 20th, and one output per
succeeded job. Then times `pipeline.status.batch_status` (cold: first call after the fill;
warm: best of 5), each SQL statement it runs, and the real CLI `editbatch status BATCH` in a
fresh process (with the interpreter's import time shown apart).

`--proposed` adds the indexes proposed in docs/performance.md and times it all again.
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

from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.status import batch_status
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
INSERT INTO jobs (batch_id, row_number, external_key, fingerprint, spec, state, attempts,
                  attempt_base, last_error_code, last_error_message, cost_usd, estimated_usd,
                  reused_from_job_id, created_at, updated_at, finished_at)
SELECT :batch, n, 'SKU-' || n, NULL, :spec, {STATE_SQL},
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

# What docs/performance.md proposes (a migration); --proposed measures them.
PROPOSED_INDEXES = (
    "CREATE INDEX ix_jobs_batch_state_cost ON jobs (batch_id, state, cost_usd)",
    "CREATE INDEX ix_attempts_job_outcome ON attempts (job_id, outcome, priced, cost_estimated)",
    "CREATE INDEX ix_outputs_job_collected ON outputs (job_id, collected_at, drift)",
    "CREATE INDEX ix_jobs_batch_reused ON jobs (batch_id, reused_from_job_id)",
)


# -- the proposal: per-batch counters kept by triggers, so status reads a few rows -----------


def _b(expr: str, pg: bool) -> str:
    """A boolean as 0/1 (SQLite already is; PostgreSQL needs the cast)."""
    return f"({expr})::int" if pg else f"({expr})"


def _job_delta(row: str, plus: bool, pg: bool) -> str:
    if plus:
        return f"""INSERT INTO batch_job_counts VALUES ({row}.batch_id, {row}.state, 1,
  coalesce({row}.cost_usd, 0), coalesce({row}.estimated_usd, 0),
  {_b(f"{row}.estimated_usd IS NULL", pg)}, {_b(f"{row}.reused_from_job_id IS NOT NULL", pg)})
ON CONFLICT (batch_id, state) DO UPDATE SET jobs = batch_job_counts.jobs + 1,
  cost_usd = batch_job_counts.cost_usd + excluded.cost_usd,
  estimated_usd = batch_job_counts.estimated_usd + excluded.estimated_usd,
  unestimated = batch_job_counts.unestimated + excluded.unestimated,
  reused = batch_job_counts.reused + excluded.reused;"""
    return f"""UPDATE batch_job_counts SET jobs = jobs - 1,
  cost_usd = cost_usd - coalesce({row}.cost_usd, 0),
  estimated_usd = estimated_usd - coalesce({row}.estimated_usd, 0),
  unestimated = unestimated - {_b(f"{row}.estimated_usd IS NULL", pg)},
  reused = reused - {_b(f"{row}.reused_from_job_id IS NOT NULL", pg)}
WHERE batch_id = {row}.batch_id AND state = {row}.state;"""


def _attempt_delta(row: str, plus: bool, pg: bool) -> str:
    batch = f"(SELECT batch_id FROM jobs WHERE id = {row}.job_id)"
    unpriced = _b(f"{row}.priced IS FALSE", pg)
    estimated = _b(f"{row}.cost_estimated IS TRUE", pg)
    if plus:
        return f"""INSERT INTO batch_attempt_counts VALUES ({batch}, {row}.outcome, 1, {unpriced},
  {estimated})
ON CONFLICT (batch_id, outcome) DO UPDATE SET attempts = batch_attempt_counts.attempts + 1,
  unpriced = batch_attempt_counts.unpriced + excluded.unpriced,
  estimated = batch_attempt_counts.estimated + excluded.estimated;"""
    return f"""UPDATE batch_attempt_counts SET attempts = attempts - 1,
  unpriced = unpriced - {unpriced}, estimated = estimated - {estimated}
WHERE batch_id = {batch} AND outcome = {row}.outcome;"""


def _output_delta(row: str, plus: bool, pg: bool) -> str:
    batch = f"(SELECT batch_id FROM jobs WHERE id = {row}.job_id)"
    uncollected = _b(f"{row}.collected_at IS NULL", pg)
    drifted = _b(f"{row}.drift IS NOT NULL", pg)
    if plus:
        # max() of two values in SQLite, GREATEST in PostgreSQL; the max never comes down.
        top = (
            "GREATEST(batch_output_counts.drift_max, excluded.drift_max)"
            if pg
            else "max(coalesce(batch_output_counts.drift_max, excluded.drift_max), "
            "coalesce(excluded.drift_max, batch_output_counts.drift_max))"
        )
        return f"""INSERT INTO batch_output_counts VALUES ({batch}, 1, {uncollected}, {drifted},
  coalesce({row}.drift, 0), {row}.drift)
ON CONFLICT (batch_id) DO UPDATE SET outputs = batch_output_counts.outputs + 1,
  uncollected = batch_output_counts.uncollected + excluded.uncollected,
  drift_n = batch_output_counts.drift_n + excluded.drift_n,
  drift_sum = batch_output_counts.drift_sum + excluded.drift_sum, drift_max = {top};"""
    return f"""UPDATE batch_output_counts SET outputs = outputs - 1,
  uncollected = uncollected - {uncollected}, drift_n = drift_n - {drifted},
  drift_sum = drift_sum - coalesce({row}.drift, 0)
WHERE batch_id = {batch};"""


COUNTER_TABLES = (
    """CREATE TABLE batch_job_counts (
  batch_id INTEGER NOT NULL, state VARCHAR(16) NOT NULL, jobs INTEGER NOT NULL,
  cost_usd NUMERIC(18, 6) NOT NULL, estimated_usd NUMERIC(18, 6) NOT NULL,
  unestimated INTEGER NOT NULL, reused INTEGER NOT NULL, PRIMARY KEY (batch_id, state))""",
    """CREATE TABLE batch_attempt_counts (
  batch_id INTEGER NOT NULL, outcome VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL,
  unpriced INTEGER NOT NULL, estimated INTEGER NOT NULL, PRIMARY KEY (batch_id, outcome))""",
    """CREATE TABLE batch_output_counts (
  batch_id INTEGER PRIMARY KEY, outputs INTEGER NOT NULL, uncollected INTEGER NOT NULL,
  drift_n INTEGER NOT NULL, drift_sum FLOAT NOT NULL, drift_max FLOAT)""",
    # Jobs reused from a twin are few: index just them for `saved_usd`.
    "CREATE INDEX ix_jobs_reused ON jobs (batch_id, reused_from_job_id) "
    "WHERE reused_from_job_id IS NOT NULL",
)

# (table, key column for lock ordering or None, watched columns, delta builder)
COUNTED = (
    ("jobs", "state", ("state", "cost_usd", "estimated_usd", "reused_from_job_id"), _job_delta),
    ("attempts", "outcome", ("outcome", "priced", "cost_estimated"), _attempt_delta),
    ("outputs", None, ("collected_at", "drift"), _output_delta),
)


# PostgreSQL: statement-level triggers over transition tables. A row-level trigger that
# upserts the same counter row once per inserted job makes a new row version each time, and a
# 100,000-row submit then crawls (measured: 75 s); per statement there is one upsert per group.
PG_COUNTED = {
    "jobs": (
        "batch_job_counts",
        "batch_id, state",
        "r.batch_id, r.state, {d} AS d, r.cost_usd, r.estimated_usd, r.reused_from_job_id "
        "FROM {rows} r",
        {
            "jobs": "sum(d)",
            "cost_usd": "sum(d * coalesce(cost_usd, 0))",
            "estimated_usd": "sum(d * coalesce(estimated_usd, 0))",
            "unestimated": "sum(d * (estimated_usd IS NULL)::int)",
            "reused": "sum(d * (reused_from_job_id IS NOT NULL)::int)",
        },
    ),
    "attempts": (
        "batch_attempt_counts",
        "batch_id, outcome",
        "j.batch_id, r.outcome, {d} AS d, r.priced, r.cost_estimated "
        "FROM {rows} r JOIN jobs j ON j.id = r.job_id",
        {
            "attempts": "sum(d)",
            "unpriced": "sum(d * (priced IS FALSE)::int)",
            "estimated": "sum(d * (cost_estimated IS TRUE)::int)",
        },
    ),
    "outputs": (
        "batch_output_counts",
        "batch_id",
        "j.batch_id, {d} AS d, r.collected_at, r.drift "
        "FROM {rows} r JOIN jobs j ON j.id = r.job_id",
        {
            "outputs": "sum(d)",
            "uncollected": "sum(d * (collected_at IS NULL)::int)",
            "drift_n": "sum(d * (drift IS NOT NULL)::int)",
            "drift_sum": "sum(d * coalesce(drift, 0))",
            "drift_max": "max(CASE WHEN d = 1 THEN drift END)",  # never comes down
        },
    ),
}


def _pg_counter_ddl() -> list[str]:
    ddl = []
    for table, (counts, key, select, sums) in PG_COUNTED.items():
        ops = {
            "ins": ("INSERT", "NEW TABLE AS new_rows", [("1", "new_rows")]),
            "upd": (
                "UPDATE",
                "OLD TABLE AS old_rows NEW TABLE AS new_rows",
                [("-1", "old_rows"), ("1", "new_rows")],
            ),
        }
        if table == "jobs":  # attempts/outputs go with their job (cascade)
            ops["del"] = ("DELETE", "OLD TABLE AS old_rows", [("-1", "old_rows")])
        columns = ", ".join(sums)
        aggregates = ", ".join(sums.values())
        # An update that changes no counted column nets to zero: write nothing then.
        changed = " OR ".join(f"{e} <> 0" for c, e in sums.items() if c != "drift_max")
        merge = ", ".join(
            f"{c} = GREATEST(t.{c}, excluded.{c})"
            if c == "drift_max"
            else f"{c} = t.{c} + excluded.{c}"
            for c in sums
        )
        for op, (event_, referencing, sources) in ops.items():
            union = " UNION ALL ".join(
                "SELECT " + select.format(d=d, rows=rows) for d, rows in sources
            )
            ddl.append(
                f"""CREATE FUNCTION {table}_count_{op}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {counts} AS t ({key}, {columns})
  SELECT {key}, {aggregates} FROM ({union}) ch
  GROUP BY {key} HAVING {changed}
  ORDER BY {key}  -- counter rows locked in key order: no deadlock between two workers
  ON CONFLICT ({key}) DO UPDATE SET {merge};
  RETURN NULL;
END $$"""
            )
            ddl.append(
                f"CREATE TRIGGER {table}_count_{op} AFTER {event_} ON {table} "
                f"REFERENCING {referencing} FOR EACH STATEMENT "
                f"EXECUTE FUNCTION {table}_count_{op}()"
            )
    return ddl


def counter_ddl(pg: bool) -> list[str]:
    """Tables and triggers (and for PostgreSQL the trigger functions) keeping the counters."""
    ddl = list(COUNTER_TABLES)
    if pg:
        return ddl + _pg_counter_ddl()
    # SQLite: row-level triggers (SQLite updates the counter row in place: cheap in bulk too).
    for table, _key, columns, delta in COUNTED:
        changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in columns)
        watched = ", ".join(columns)
        minus, plus = delta("OLD", False, pg), delta("NEW", True, pg)
        ddl += [
            f"CREATE TRIGGER {table}_count_ins AFTER INSERT ON {table} BEGIN {plus} END",
            f"CREATE TRIGGER {table}_count_upd AFTER UPDATE OF {watched} ON {table} "
            f"WHEN {changed} BEGIN {minus} {plus} END",
        ]
        if table == "jobs":  # attempts/outputs go with their job (cascade)
            ddl.append(
                f"CREATE TRIGGER {table}_count_del AFTER DELETE ON {table} BEGIN {minus} END"
            )
    return ddl


# Counters for what is already in the tables (what the migration would run once).
COUNTER_BACKFILL = (
    """INSERT INTO batch_job_counts
SELECT batch_id, state, count(*), coalesce(sum(cost_usd), 0), coalesce(sum(estimated_usd), 0),
       count(*) - count(estimated_usd), count(reused_from_job_id)
FROM jobs GROUP BY batch_id, state""",
    """INSERT INTO batch_attempt_counts
SELECT jobs.batch_id, attempts.outcome, count(*),
       sum(CASE WHEN attempts.priced IS FALSE THEN 1 ELSE 0 END),
       sum(CASE WHEN attempts.cost_estimated IS TRUE THEN 1 ELSE 0 END)
FROM attempts JOIN jobs ON jobs.id = attempts.job_id GROUP BY jobs.batch_id, attempts.outcome""",
    """INSERT INTO batch_output_counts
SELECT jobs.batch_id, count(*), count(*) - count(outputs.collected_at), count(outputs.drift),
       coalesce(sum(outputs.drift), 0), max(outputs.drift)
FROM outputs JOIN jobs ON jobs.id = outputs.job_id GROUP BY jobs.batch_id""",
)

ACTIVE = ("queued", "running", "retrying", "held")


def counter_status(db: Database, batch_id: int) -> dict[str, Any]:
    """What batch_status() aggregates over ~3M rows, read from the counters (a few rows)."""
    with db.engine.connect() as conn:
        b = {"b": batch_id}
        jobs = conn.execute(
            text(
                "SELECT state, jobs, cost_usd, estimated_usd, unestimated, reused "
                "FROM batch_job_counts WHERE batch_id = :b"
            ),
            b,
        ).all()
        attempts = conn.execute(
            text(
                "SELECT outcome, attempts, unpriced, estimated FROM batch_attempt_counts "
                "WHERE batch_id = :b"
            ),
            b,
        ).all()
        out = conn.execute(
            text(
                "SELECT outputs, uncollected, drift_n, drift_sum, drift_max "
                "FROM batch_output_counts WHERE batch_id = :b"
            ),
            b,
        ).one()
        saved = conn.execute(
            text(
                "SELECT coalesce(sum(donor.cost_usd), 0) FROM jobs "
                "JOIN jobs AS donor ON donor.id = jobs.reused_from_job_id "
                "WHERE jobs.batch_id = :b AND jobs.reused_from_job_id IS NOT NULL"
            ),
            b,
        ).scalar()
    priced = [r for r in jobs if r.state != "rejected"]
    return {
        "counts": {r.state: int(r.jobs) for r in jobs if r.jobs},
        "cost_usd": round(Decimal(str(sum(Decimal(str(r.cost_usd)) for r in jobs))), 6),
        "attempts_by_outcome": {r.outcome: int(r.attempts) for r in attempts if r.attempts},
        "unpriced_attempts": sum(int(r.unpriced) for r in attempts),
        "estimated_cost_attempts": sum(int(r.estimated) for r in attempts),
        "outputs": int(out.outputs),
        "outputs_uncollected": int(out.uncollected),
        "drift_outputs": int(out.drift_n),
        "drift_max": out.drift_max,
        "estimated_usd": round(Decimal(str(sum(Decimal(str(r.estimated_usd)) for r in priced))), 6),
        "estimated_remaining_usd": round(
            Decimal(str(sum(Decimal(str(r.estimated_usd)) for r in jobs if r.state in ACTIVE))), 6
        ),
        "unpriced_jobs": sum(int(r.unestimated) for r in priced),
        "reused": sum(int(r.reused) for r in jobs),
        "saved_usd": round(Decimal(str(saved)), 6),
    }


def from_batch_status(db: Database, batch_id: int) -> dict[str, Any]:
    with db.session() as s:
        st = batch_status(s, batch_id)
    return {
        "counts": {k: v for k, v in st.counts.items() if v},
        "cost_usd": round(st.cost_usd, 6),
        "attempts_by_outcome": st.attempts_by_outcome,
        "unpriced_attempts": st.unpriced_attempts,
        "estimated_cost_attempts": st.estimated_cost_attempts,
        "outputs": st.outputs,
        "outputs_uncollected": st.outputs_uncollected,
        "drift_outputs": st.drift_outputs,
        "drift_max": st.drift_max,
        "estimated_usd": round(st.estimated_usd, 6),
        "estimated_remaining_usd": round(st.estimated_remaining_usd, 6),
        "unpriced_jobs": st.unpriced_jobs,
        "reused": st.reused,
        "saved_usd": round(st.saved_usd, 6),
    }


def transitions(db: Database, batch_id: int, count: int) -> float:
    """Seconds per job state change, each its own transaction (as a worker makes them)."""
    with db.engine.connect() as conn:
        ids = list(
            conn.execute(
                text("SELECT id FROM jobs WHERE batch_id = :b AND state = 'queued' LIMIT :n"),
                {"b": batch_id, "n": count},
            ).scalars()
        )
    with Timer() as t:
        for job_id in ids:
            with db.engine.begin() as conn:
                conn.execute(
                    text(
                        "UPDATE jobs SET state = 'running', attempts = attempts + 1 WHERE id = :id"
                    ),
                    {"id": job_id},
                )
            with db.engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO attempts (job_id, number, started_at, outcome, cost_usd, "
                        "cost_estimated, priced) VALUES (:id, 9, CURRENT_TIMESTAMP, "
                        "'in_flight', 0, FALSE, TRUE)"
                    ),
                    {"id": job_id},
                )
    return t.seconds / max(len(ids), 1)


def counters(db: Database, batch_id: int, jobs: int) -> None:
    """Build the counters, check they agree with batch_status(), time reads and writes."""
    pg = not db.is_sqlite
    with db.engine.connect() as conn:
        queued = conn.execute(
            text("SELECT count(*) FROM jobs WHERE batch_id = :b AND state = 'queued'"),
            {"b": batch_id},
        ).scalar_one()
    sample = min(1000, queued // 2)  # half before, half after the triggers exist
    before = transitions(db, batch_id, sample)
    with Timer() as build, db.engine.begin() as conn:
        for ddl in counter_ddl(pg):
            conn.execute(text(ddl))
        for sql in COUNTER_BACKFILL:
            conn.execute(text(sql))
    after = transitions(db, batch_id, sample)
    with Timer() as insert, db.engine.begin() as conn:
        extra = jobs // 10
        sql = JOBS_SELECT.format(
            ts="TIMESTAMPTZ '2026-11-21 10:00:00+00'" if pg else f"'{STAMP}'",
            seq="generate_series(1, :count) AS n" if pg else "seq",
        )
        if not pg:
            sql = (
                "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq "
                "WHERE n < :count)" + sql
            )
        other = conn.execute(
            text(
                "INSERT INTO batches (name, created_at, manifest_uri, "
                "manifest_sha256, output_uri, state, reserved_usd, settings) "
                "VALUES ('other', CURRENT_TIMESTAMP, '', '', '', 'running', 0, "
                "'{}') RETURNING id"
            )
        ).scalar()
        conn.execute(text(sql), {"batch": other, "count": extra, "spec": SPEC})
    reads = []
    for _ in range(5):
        with Timer() as t:
            fast = counter_status(db, batch_id)
        reads.append(t.seconds)
    exact = from_batch_status(db, batch_id)
    diff = {k: (fast[k], exact[k]) for k in exact if fast[k] != exact[k]}
    print(
        f"  + counters kept by triggers (tables + backfill {build.seconds:.1f} s): status read "
        f"{min(reads) * 1000:.1f} ms (target < {TARGET_S} s: "
        f"{'met' if min(reads) < TARGET_S else 'MISSED'}); agrees with batch_status(): "
        f"{diff or 'yes'}"
    )
    print(
        f"    cost on writes: a state change + an attempt insert {before * 1000:.2f} ms -> "
        f"{after * 1000:.2f} ms per job; INSERT ... SELECT of {extra:,} jobs (another batch) "
        f"{insert.seconds:.1f} s with the triggers"
    )


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
    seq = "generate_series(1, :count) AS n" if pg else "seq"
    jobs_sql = JOBS_SELECT.format(ts=ts, seq=seq)
    if not pg:
        jobs_sql = (
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq "
            "WHERE n < :count)" + jobs_sql
        )
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
            ("jobs", jobs_sql),
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


def explain(db: Database, batch_id: int) -> list[str]:
    """The plans of the two aggregates that join attempts and outputs to jobs."""
    lines = []
    prefix = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN (COSTS OFF) "
    queries = {
        "attempts by outcome": "SELECT attempts.outcome, count(*) FROM attempts JOIN jobs "
        "ON jobs.id = attempts.job_id WHERE jobs.batch_id = :b GROUP BY attempts.outcome",
        "jobs by state": "SELECT state, count(*), coalesce(sum(cost_usd), 0) FROM jobs "
        "WHERE batch_id = :b GROUP BY state",
    }
    with db.engine.connect() as conn:
        for label, sql in queries.items():
            rows = conn.execute(text(prefix + sql), {"b": batch_id}).all()
            plan = "; ".join(str(r[-1]).strip() for r in rows)
            lines.append(f"    {label}: {plan}")
    return lines


def report(label: str, db: Database, batch_id: int, home: Path, cli: bool) -> None:
    cold, warm, per_statement = time_status(db, batch_id)
    verdict = "met" if warm < TARGET_S else "MISSED"
    print(
        f"  batch_status(): cold {cold:.3f} s, warm {warm:.3f} s "
        f"(target < {TARGET_S} s: {verdict})  [{label}]"
    )
    for key, seconds in sorted(per_statement.items(), key=lambda kv: -kv[1]):
        print(f"    {seconds:7.3f} s  {key}")
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
    parser.add_argument("--proposed", action="store_true", help="also time proposed indexes")
    parser.add_argument(
        "--counters", action="store_true", help="also time counters kept by triggers"
    )
    parser.add_argument("--no-cli", dest="cli", action="store_false")
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
                print(f"{kind}: filled {args.jobs:,} jobs in {t.seconds:.1f} s ({counts})")
                report("schema as is", db, batch_id, tmp / "home", args.cli)
                if args.proposed:
                    with Timer() as t, db.engine.begin() as conn:
                        for ddl in PROPOSED_INDEXES:
                            conn.execute(text(ddl))
                        conn.execute(text("ANALYZE"))
                    print(f"  + proposed indexes ({t.seconds:.1f} s to build)")
                    report("with proposed indexes", db, batch_id, tmp / "home", args.cli)
                if args.counters:
                    counters(db, batch_id, args.jobs)
                db.dispose()
            finally:
                if pg is not None:
                    pg.stop()
            print()


if __name__ == "__main__":
    main()
