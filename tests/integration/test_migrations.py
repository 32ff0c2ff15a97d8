"""Migrations upgrade and downgrade cleanly, and claims are exclusive, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, inspect

from pipeline.db import jobs
from pipeline.db.models import Batch, Job
from pipeline.db.session import Database, alembic_config
from tests.servers import REPO


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "head")
    assert {"batches", "jobs", "attempts", "outputs", "daily_spend"} <= tables(database_url)
    command.downgrade(cfg, "base")
    assert tables(database_url) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert {"batches", "jobs", "attempts", "outputs", "daily_spend"} <= tables(database_url)


def test_one_claim_wins_among_many_concurrent_workers(database_url: str) -> None:
    db = Database(database_url)
    with db.session() as s:
        batch = Batch(name="b", manifest_uri="m", manifest_sha256="0" * 64, output_uri="o")
        s.add(batch)
        s.flush()
        ids = []
        for row in range(20):
            job = Job(batch_id=batch.id, row_number=row + 1, spec="{}", state="queued")
            s.add(job)
            s.flush()
            ids.append(job.id)
        s.commit()
    wins: dict[int, int] = {i: 0 for i in ids}
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        for job_id in ids:
            with db.session() as session:
                token = jobs.claim(session, job_id, lease_seconds=60)
            if token is not None:
                with lock:
                    wins[job_id] += 1

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db.dispose()
    assert set(wins.values()) == {1}  # every job claimed exactly once


def test_models_equal_migrations_alembic_check(database_url: str) -> None:
    """`alembic check` after `upgrade head` finds nothing to add or drop: every table, column
    and index the migrations make is declared in pipeline/db/models.py (and nothing more), so
    `alembic revision --autogenerate` never writes a migration that drops the counters."""
    env = {**os.environ, "EDITBATCH_DATABASE_URL": database_url}
    ini = str(REPO / "migrations" / "alembic.ini")
    for args in (["upgrade", "head"], ["check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", ini, *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No new upgrade operations detected" in proc.stdout + proc.stderr


def test_alembic_upgrade_head_from_the_repository_root_on_an_empty_sqlite_file(
    tmp_path: Path,
) -> None:
    """The plain `alembic upgrade head` (the root alembic.ini) builds an empty SQLite database
    to the newest revision, as `editbatch db upgrade` does."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        env={**os.environ, "EDITBATCH_DATABASE_URL": url},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"batches", "jobs", "attempts", "provider_batches", "batch_events"} <= tables(url)
