"""The database hiccups while real workers run a batch: the batch still completes, exactly once.

SQLite: many writers on one file, and a person holding the write lock for 2 s ("database is
locked" for everyone else) - writers wait their turn, nothing fails. PostgreSQL: every
connection of the workers is killed a few times mid-batch - pooled connections are replaced,
and a statement cut off in a transaction is retried.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from pipeline.sandbox import SandboxConfig
from tests.factories import write_manifest
from tests.integration.test_crash_safety import (
    audit,
    shortest_lease,
    small_rows,
    stack,
    wait_for,
)
from tests.servers import PostgresServer

JOBS = 100
LOCK_SECONDS = 2.0


def _succeeded(path: str, batch_id: int) -> int:
    # A plain reader: in WAL mode it reads while another connection holds the write lock.
    with closing(sqlite3.connect(path, timeout=0)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE batch_id = ? AND state = 'succeeded'", (batch_id,)
        ).fetchone()
    return int(row[0])


def test_sqlite_locked_by_another_writer_is_waited_out_not_fatal(
    tmp_path: Path, redis_url: str
) -> None:
    db_file = tmp_path / "editbatch.db"
    manifest = write_manifest(tmp_path / "in" / "m.csv", small_rows(tmp_path / "in", JOBS))
    with stack(tmp_path, redis_url, f"sqlite:///{db_file}", SandboxConfig(latency_ms=20)) as st:
        st.worker("w1", concurrency=16)
        st.worker("w2", concurrency=16)
        batch_id = st.submit(manifest)
        wait_for(lambda: _succeeded(str(db_file), batch_id) >= 20, 60, "20 jobs done")

        holder = sqlite3.connect(str(db_file), timeout=30, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        before = _succeeded(str(db_file), batch_id)
        time.sleep(LOCK_SECONDS)
        during = _succeeded(str(db_file), batch_id)
        holder.execute("COMMIT")
        holder.close()

        assert before < JOBS, "the batch ended before the lock: nothing was tested"
        assert during == before, "a worker wrote while the lock was held: it was not held"
        st.wait_finished(batch_id, 120)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        result.assert_clean()
        assert (result.succeeded, result.failed) == (JOBS, 0)
        assert result.billed_calls == JOBS  # nobody gave up a paid call and paid again
        assert {a.outcome for a in result.attempts} == {"ok"}
        logs = "".join(w.log.read_text(errors="replace") for w in st.workers)
        assert "Traceback" not in logs, logs[-4000:]


def _terminate_backends(admin: psycopg.Connection, database: str) -> int:
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def test_postgresql_connections_killed_mid_batch_are_survived(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> None:
    database_url = postgres_server.create_database()
    url = make_url(database_url)
    manifest = write_manifest(tmp_path / "in" / "m.csv", small_rows(tmp_path / "in", JOBS))
    with stack(
        tmp_path,
        redis_url,
        database_url,
        SandboxConfig(latency_ms=100),
        EDITBATCH_LEASE_SECONDS=str(shortest_lease(10)),
    ) as st:
        st.worker("w1", concurrency=8)
        st.worker("w2", concurrency=8)
        batch_id = st.submit(manifest)
        killed = []
        with psycopg.connect(
            host=url.host, port=url.port, user=url.username, dbname="postgres", autocommit=True
        ) as admin:
            for threshold in (15, 40, 65):
                wait_for(lambda t=threshold: st.done(batch_id) >= t, 60, f"{threshold} jobs done")
                killed.append(_terminate_backends(admin, str(url.database)))
        assert all(killed), f"no connection to kill at some point: {killed}"
        assert st.done(batch_id) < JOBS, "the batch ended before the last kill"
        # A job whose claim was committed but whose worker never heard back (the connection
        # died with the answer) waits for its lease to run out; the reaper then requeues it.
        with st.beat(every=3.0):
            st.wait_finished(batch_id, 120)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        assert not result.lost, result.lost
        assert not result.duplicates, result.duplicates
        assert result.in_flight == 0
        assert (result.succeeded, result.failed) == (JOBS, 0)
        result.assert_clean()
