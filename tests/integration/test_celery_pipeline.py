"""The distributed shape for real: redis-server, `celery -A worker.app worker`, the SDK over HTTP.

Runs on SQLite and on PostgreSQL (the `database_url` fixture is parametrised).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.db.models import Batch, Job, Output
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import product_rows, write_manifest
from tests.servers import CeleryWorker, wait_until


@pytest.fixture
def stack(
    tmp_path: Path, redis_url: str, database_url: str
) -> Iterator[tuple[dict[str, str], SandboxServer, Database]]:
    config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), latency_ms=50)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": database_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "EDITBATCH_BACKOFF_BASE_SECONDS": "0.05",
            "EDITBATCH_BACKOFF_MAX_SECONDS": "0.2",
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        db = Database(database_url)
        yield env, sandbox, db
        db.dispose()


def submit(env: dict[str, str], manifest: Path, output: Path) -> int:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "submit",
            str(manifest),
            "--json",
            "--output",
            str(output),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["batch_id"])


def batch_state(db: Database, batch_id: int) -> str:
    with db.session() as s:
        return str(s.scalar(select(Batch.state).where(Batch.id == batch_id)))


def test_submit_to_real_worker_end_to_end(
    tmp_path: Path, stack: tuple[dict[str, str], SandboxServer, Database]
) -> None:
    env, _sandbox, db = stack
    rows = product_rows(tmp_path / "in", 12)
    rows[3]["prompt"] = "retry me #sandbox:500x1"
    rows[5]["n"] = 2
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    worker = CeleryWorker(env, tmp_path / "worker.log", concurrency=4)
    try:
        batch_id = submit(env, manifest, tmp_path / "out")
        wait_until(lambda: batch_state(db, batch_id) == "finished", timeout=90)
    finally:
        worker.stop()
    billed, per_request = billed_total(tmp_path / "billing.jsonl")
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        assert [j.state for j in jobs] == ["succeeded"] * 12
        outputs = s.scalars(
            select(Output).join(Job, Job.id == Output.job_id).where(Job.batch_id == batch_id)
        ).all()
        assert len(outputs) == 13
        for out in outputs:
            data = Path(str(out.uri)).read_bytes()
            assert hashlib.sha256(data).hexdigest() == out.sha256
            assert len(data) == out.bytes
        assert sum((j.cost_usd for j in jobs), start=billed * 0) == billed
        assert len(per_request) == 12
        retried = next(j for j in jobs if j.row_number == 4)
        assert retried.attempts == 2
    report = tmp_path / "out" / f"report-{batch_id}.csv"
    assert report.is_file() and len(report.read_text().splitlines()) == 13
