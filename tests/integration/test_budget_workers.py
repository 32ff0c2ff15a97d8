"""A budget holds across real worker processes, and resume pays only for what is left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import product_rows, write_manifest
from tests.servers import CeleryWorker, wait_until


def test_budget_holds_across_two_workers_and_resume_finishes(
    tmp_path: Path, redis_url: str
) -> None:
    db_url = f"sqlite:///{tmp_path / 'eb.db'}"
    rows = product_rows(tmp_path / "in", 200, quality="medium")
    for i, row in enumerate(rows):  # mixed costs: the largest job decides the overshoot bound
        row.pop("mask", None)
        row["n"] = 1 + (i % 3 == 0)
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), latency_ms=150)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": db_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        full_env = {**os.environ, **env}
        # one job costs (1 or 2 images) x medium 1024x1024 on gpt-image-2.5-sunburst
        est = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "estimate", str(manifest), "--json"],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        per_row = [Decimal(r["expected_usd"]) for r in json.loads(est.stdout)["rows"]]
        largest = max(per_row)
        budget = sum(per_row[:50], Decimal(0))  # covers about 50 of the 200 jobs
        workers = [
            CeleryWorker(env, tmp_path / f"w{i}.log", concurrency=4, name=f"w{i}") for i in range(2)
        ]
        db = Database(db_url)
        try:
            sub = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "submit",
                    str(manifest),
                    "--json",
                    "--output",
                    str(tmp_path / "out"),
                    "--budget",
                    str(budget),
                ],
                env=full_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert sub.returncode == 0, sub.stderr
            batch_id = json.loads(sub.stdout)["batch_id"]

            def in_flight() -> int:
                with db.session() as s:
                    return int(
                        s.scalar(
                            select(func.count())
                            .select_from(Attempt)
                            .where(Attempt.outcome == "in_flight")
                        )
                        or 0
                    )

            def state() -> str:
                with db.session() as s:
                    return str(s.scalar(select(Batch.state).where(Batch.id == batch_id)))

            wait_until(lambda: state() == "held" and in_flight() == 0, timeout=120)
            with db.session() as s:
                batch = s.get(Batch, batch_id)
                assert batch is not None and str(batch.hold_reason).startswith("budget")
                spent = Decimal(
                    str(s.scalar(select(func.sum(Job.cost_usd)).where(Job.batch_id == batch_id)))
                )
                done = s.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.batch_id == batch_id, Job.state == "succeeded")
                )
            max_in_flight = 2 * 4
            assert spent <= budget + max_in_flight * largest
            assert 30 <= int(done or 0) < 200
            billed_before, _ = billed_total(tmp_path / "billing.jsonl")
            assert billed_before == spent

            res = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "resume", str(batch_id), "--budget", "1000"],
                env=full_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert res.returncode == 0, res.stderr
            wait_until(lambda: state() == "finished", timeout=180)
        finally:
            for w in workers:
                w.stop()
    lines = (tmp_path / "billing.jsonl").read_text().splitlines()
    assert len(lines) == 200  # every job paid exactly once across hold and resume
    billed, _ = billed_total(tmp_path / "billing.jsonl")
    with db.session() as s:
        total = Decimal(
            str(s.scalar(select(func.sum(Job.cost_usd)).where(Job.batch_id == batch_id)))
        )
        assert (
            s.scalar(select(func.count()).select_from(Job).where(Job.state == "succeeded")) == 200
        )
    assert total == billed
    print(
        f"budget ${budget}: held at ${spent} after {done} jobs; "
        f"bound ${budget + max_in_flight * largest}"
    )
