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
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
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
                  attempt_base, last_error_code, last_error_message, cost_usd,
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
def statement_timer(engine: Engine) -> Iterator[dict[str, list[float]]]:
    """Seconds per SQL statement (keyed by its first line) while the block runs."""
    times: dict[str, list[float]] = defaultdict(list)

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        key = " ".join(statement.split())[:90]
        times[key].append(time.perf_counter() - conn.info.pop("bench_t0"))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    try:
        yield times
    finally:
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def time_status(db: Database, batch_id: int) -> tuple[float, float, dict[str, float]]:
    """(cold seconds, best warm seconds, warm median seconds per statement)."""
    with Timer() as cold, db.session() as s:
        batch_status(s, batch_id)
    warm = []
    per_statement: dict[str, list[float]] = defaultdict(list)
    for _ in range(5):
        with statement_timer(db.engine) as times, Timer() as t, db.session() as s:
            status = batch_status(s, batch_id)
        warm.append(t.seconds)
        for key, values in times.items():
            per_statement[key].append(sum(values))
    assert status.jobs_total > 0
    return cold.seconds, min(warm), {k: statistics.median(v) for k, v in per_statement.items()}


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
                db.dispose()
            finally:
                if pg is not None:
                    pg.stop()
            print()


if __name__ == "__main__":
    main()
