"""A database error during a command (a deadlock, a lock it cannot get, a dropped connection) is
one line saying what the database said and what to do, never a traceback; and doing it (running
the command again) works. Real PostgreSQL: another session holds the batch's row while
`editbatch resume` may wait at most half a second for a lock (`lock_timeout`)."""

from __future__ import annotations

from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from tests.factories import write_manifest
from tests.integration.test_crash_safety import small_rows, stack
from tests.servers import PostgresServer


def test_a_database_error_during_resume_is_one_line_and_running_it_again_works(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> None:
    database_url = postgres_server.create_database()
    manifest = write_manifest(tmp_path / "in" / "m.csv", small_rows(tmp_path / "in", 3))
    plain = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    with stack(tmp_path, redis_url, database_url) as st:
        batch_id = st.submit(manifest)  # no worker: its jobs stay queued
        paused = st.cli("pause", str(batch_id))
        assert paused.returncode == 0, paused.stdout + paused.stderr
        with psycopg.connect(plain) as holder:
            # Another session (a worker's transaction, a person's psql) holds the batch's row.
            holder.execute("SELECT id FROM batches WHERE id = %s FOR UPDATE", (batch_id,))
            st.env["PGOPTIONS"] = "-c lock_timeout=500"
            failed = st.cli("resume", str(batch_id))
            holder.rollback()
        del st.env["PGOPTIONS"]
        again = st.cli("resume", str(batch_id))
        state = st.batch_state(batch_id)

    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith(
        "error: the database failed during this command (LockNotAvailable: canceling "
        "statement due to lock timeout)"
    ), lines[0]
    assert "run it again" in lines[0] and "EDITBATCH_DATABASE_URL" in lines[0]
    assert "SELECT" not in lines[0] and "UPDATE" not in lines[0]  # no SQL, no parameters
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"batch {batch_id}: 3 jobs sent to the workers" in again.stdout
    assert state == "running"
