"""The ledger matches the bill: a mixed 200-job batch with retries, to the micro-dollar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.batch.status import batch_status
from pipeline.db.models import Attempt, Job
from pipeline.db.session import Database
from pipeline.run.deps import build_deps
from pipeline.run.localpool import LocalPool
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxServer
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import make_image, make_mask, write_manifest
from tests.unit.helpers import new_batch

MODELS = ["gpt-image-1.5", "gpt-image-1-mini", "gpt-image-2"]
SIZES = {
    "gpt-image-1.5": ["1024x1024", "1536x1024", "1024x1536"],
    "gpt-image-1-mini": ["1024x1024", "1024x1536"],
    "gpt-image-2": ["1024x1024", "768x512", "1280x720"],
}
QUALITIES = ["low", "medium", "high"]


def mixed_rows(folder: Path, count: int) -> list[dict[str, Any]]:
    sources = [
        make_image(folder / "sq.png", size=(256, 256)),
        make_image(folder / "wide.png", size=(384, 256), color=(20, 140, 90)),
        make_image(folder / "tall.jpg", size=(256, 384), color=(200, 30, 30)),
    ]
    mask = make_mask(folder / "sq-mask.png", size=(256, 256))
    rows = []
    for i in range(count):
        model = MODELS[i % 3]
        src = sources[(i // 3) % 3]
        row: dict[str, Any] = {
            "id": f"J{i:03d}",
            "image": src.name if i % 7 else [src.name, sources[0].name],
            "prompt": f"studio background {i}",
            "model": model,
            "size": SIZES[model][(i // 3) % len(SIZES[model])],
            "quality": QUALITIES[(i // 9) % 3],
            "n": 1 + (i % 5 == 0),
        }
        if src is sources[0] and i % 2:
            row["mask"] = mask.name
        if model == "gpt-image-1.5" and i % 4 == 0:
            row["input_fidelity"] = "high"
        if i % 10 == 3:
            row["prompt"] += " #sandbox:500x1"
        if i % 10 == 7:
            row["prompt"] += " #sandbox:429x2"
        rows.append(row)
    return rows


def test_mixed_batch_ledger_equals_bill_and_estimate_is_close(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    manifest = write_manifest(tmp_path / "in" / "m.jsonl", mixed_rows(tmp_path / "in", 200))
    result = new_batch(db, manifest, str(tmp_path / "out"), name="mixed")
    assert (result.accepted, result.rejected) == (200, 0), result.errors[:3]
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    LocalPool(deps, concurrency=8).run_batch(result.batch_id)

    billed, per_request = billed_total(Path(str(sandbox.config.billing_log)))
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == result.batch_id)).all()
        assert {j.state for j in jobs} == {"succeeded"}
        attempts = s.scalars(select(Attempt)).all()
        by_job: dict[int, Decimal] = defaultdict(Decimal)
        for a in attempts:
            if a.request_id in per_request:
                by_job[a.job_id] += per_request[str(a.request_id)]
        retried = [j for j in jobs if j.attempts > 1]
        assert len(retried) == 40  # 20 x 500 once, 20 x 429 twice
        assert sum(j.attempts for j in jobs) == 200 + 20 + 40
        for j in jobs:
            assert j.cost_usd == by_job[j.id], j.external_key  # per job, to the micro-dollar
        recorded = sum((j.cost_usd for j in jobs), Decimal(0))
        assert recorded == billed  # in total
        assert len(per_request) == 200  # failed attempts are not billed, and not recorded
        estimated = sum((j.estimated_usd or Decimal(0) for j in jobs), Decimal(0))
        status = batch_status(s, result.batch_id)
    assert abs(estimated - recorded) <= recorded * Decimal("0.15"), (estimated, recorded)
    assert status.cost_usd == recorded
    assert status.estimated_usd == estimated


def test_unpriced_model_is_flagged_at_submit_and_in_status(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    manifest = write_manifest(
        folder / "m.csv",
        [
            {"id": "P", "image": "a.png", "prompt": "p", "model": "gpt-image-1.5"},
            {
                "id": "U",
                "image": "a.png",
                "prompt": "p",
                "model": "gpt-image-2.6-flare",
                "size": "1024x1024",
            },
        ],
    )
    env = {
        **os.environ,
        "EDITBATCH_HOME": str(tmp_path / "home"),
        "OPENAI_BASE_URL": sandbox.base_url,
        "OPENAI_API_KEY": FAKE_KEY,
        "COLUMNS": "200",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    run = cli("run", str(manifest), "--output", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no price" in run.stderr and "gpt-image-2.6-flare" in run.stderr
    assert "unknown" in run.stdout  # the cost line says the unpriced attempt's cost is unknown
    status = json.loads(cli("status", "1", "--json").stdout)
    assert status["unpriced_jobs"] == 1
    assert status["unpriced_attempts"] == 1
    billed, _ = billed_total(Path(str(sandbox.config.billing_log)))
    assert Decimal(status["cost_usd"]) < billed  # the flare call is not silently counted as $0
