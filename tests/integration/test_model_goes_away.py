"""A night that survives a model going away: the sandbox stops serving the batch's model in the
middle of a 200-job batch on real Celery workers. The batch is held once (reason
model_unavailable, naming the model, the replacement and the fix), no job fails for it, and
`resume --model-map` finishes every job on the new model with the ledger equal to the bill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY, TEST_TODAY, billed_total
from tests.factories import product_rows, write_manifest
from tests.servers import CeleryWorker, wait_until

OLD, NEW = "gpt-image-1.5", "gpt-image-2.5-sunburst"
JOBS = 200
THREADS = 8


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize("style", ["404", "400"])
def test_model_gone_mid_batch_holds_once_then_model_map_finishes_it(
    tmp_path: Path, redis_url: str, style: str
) -> None:
    db_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    billing = tmp_path / "billing.jsonl"
    config = SandboxConfig(
        billing_log=str(billing), latency_ms=60, today=TEST_TODAY, unavailable_style=style
    )
    rows = product_rows(tmp_path / "in", JOBS, model=OLD)
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": db_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        worker = CeleryWorker(env, tmp_path / "worker.log", concurrency=THREADS)
        db = Database(db_url)
        try:
            sub = cli(env, "submit", str(manifest), "--json", "--output", str(tmp_path / "out"))
            assert sub.returncode == 0, sub.stderr
            batch_id = int(json.loads(sub.stdout)["batch_id"])
            # Submitting on 2026-11-30 warns that the model shuts down tomorrow.
            assert "2026-12-01" in sub.stderr and f"--model-map {OLD}={NEW}" in sub.stderr

            def succeeded() -> int:
                with db.session() as s:
                    return len(
                        s.scalars(
                            select(Job.id).where(Job.batch_id == batch_id, Job.state == "succeeded")
                        ).all()
                    )

            wait_until(lambda: succeeded() >= 40, timeout=120)
            # The provider shuts the model down in the middle of the night.
            admin = sandbox.base_url.removesuffix("/v1") + "/sandbox/config"
            httpx.post(admin, json={"unavailable_models": [OLD]}).raise_for_status()

            def batch() -> Batch:
                with db.session() as s:
                    row = s.get(Batch, batch_id)
                    assert row is not None
                    return row

            wait_until(lambda: batch().state == "held", timeout=60)
            # Calls already in flight may come back refused too, but no more than that.
            wait_until(lambda: _in_flight(db, batch_id) == 0, timeout=60)
            with db.session() as s:
                refused = s.scalars(
                    select(Attempt)
                    .join(Job, Job.id == Attempt.job_id)
                    .where(Job.batch_id == batch_id, Attempt.outcome == "hold")
                ).all()
                states = s.scalars(select(Job.state).where(Job.batch_id == batch_id)).all()
            assert 1 <= len(refused) <= THREADS
            assert "failed" not in states
            held = batch()
            assert held.hold_code == "model_unavailable"
            assert OLD in str(held.hold_reason) and NEW in str(held.hold_reason)
            assert f"editbatch resume {batch_id} --model-map {OLD}={NEW}" in str(held.hold_reason)
            shown = cli(env, "status", str(batch_id))
            assert "model_unavailable" in shown.stdout or "not available" in shown.stdout
            assert f"--model-map {OLD}={NEW}" in shown.stdout.replace("\n", "")

            resumed = cli(env, "resume", str(batch_id), "--model-map", f"{OLD}={NEW}")
            assert resumed.returncode == 0, resumed.stderr
            assert "moved" in resumed.stdout and "estimate for the moved jobs" in resumed.stdout
            wait_until(lambda: batch().state == "finished", timeout=180)
        finally:
            worker.stop()
    billed, per_request = billed_total(billing)
    lines = [json.loads(x) for x in billing.read_text().splitlines()]
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        assert [j.state for j in jobs] == ["succeeded"] * JOBS
        moved = [j for j in jobs if j.model == NEW]
        assert moved and all(NEW in j.spec for j in moved)
        assert sum((j.cost_usd for j in jobs), start=billed * 0) == billed
    # Every answer after the shutdown was made by the new model; none was paid twice.
    assert {line["model"] for line in lines} == {OLD, NEW}
    assert len(per_request) == len(lines) == JOBS


def _in_flight(db: Database, batch_id: int) -> int:
    with db.session() as s:
        return len(
            s.scalars(
                select(Job.id).where(
                    Job.batch_id == batch_id, Job.state.in_(("running", "retrying"))
                )
            ).all()
        )
