"""One rate limit for every worker: 3 real celery worker processes against a sandbox enforcing R.

Each worker alone could send 4 calls every 0.3 s (~13/s); together they must keep to R = 120
images/min (2/s) — no faster, since the sandbox answers 429 above R, and no slower than 0.9 R.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY
from tests.factories import make_image, write_manifest
from tests.servers import start_workers, wait_until

pytestmark = pytest.mark.integration

RATE = 120  # images per minute: one call every 0.5 s
JOBS = 60  # ~30 s of work at RATE
WORKERS = 3
THREADS = 4
WINDOW = 10.0  # seconds; every window this long must hold at most RATE * WINDOW / 60 (+ slack)


def _seconds(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def test_three_workers_keep_one_global_rate(tmp_path: Path, redis_url: str) -> None:
    db_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    db = Database(db_url)  # migrate once, before three workers race to
    image = make_image(tmp_path / "in" / "product.png")
    manifest = write_manifest(
        tmp_path / "in" / "manifest.csv",
        [
            {
                "id": f"SKU{i:03d}",
                "image": image.name,
                # distinct prompts: identical jobs would be reused instead of called
                "prompt": f"white studio background, variant {i}",
                "model": "gpt-image-2.5-sunburst",
                "size": "1024x1024",
                "quality": "low",
            }
            for i in range(JOBS)
        ],
    )
    config = SandboxConfig(latency_ms=300, latency_sigma=0.2, rate_limit_per_minute=RATE)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": db_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "EDITBATCH_IMAGES_PER_MINUTE": str(RATE),
            "EDITBATCH_CONCURRENCY": str(THREADS),
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
        }
        workers = start_workers(env, tmp_path, WORKERS, THREADS, prefix="g")
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline.cli",
                    "submit",
                    str(manifest),
                    "--json",
                    "--output",
                    str(tmp_path / "out"),
                ],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
            batch_id = int(json.loads(proc.stdout)["batch_id"])

            def finished() -> bool:
                with db.session() as s:
                    state = s.scalar(select(Batch.state).where(Batch.id == batch_id))
                return state == "finished"

            wait_until(finished, timeout=JOBS * 60 / RATE + 30, interval=0.25)
            stats = sandbox.sandbox.stats.snapshot()
        finally:
            for worker in workers:
                worker.stop()

    with db.session() as s:
        states = s.scalars(select(Job.state).where(Job.batch_id == batch_id)).all()
        starts = sorted(
            _seconds(t)
            for t in s.scalars(
                select(Attempt.started_at)
                .join(Job, Job.id == Attempt.job_id)
                .where(Job.batch_id == batch_id)
            )
        )
    db.dispose()
    assert states == ["succeeded"] * JOBS

    # The sandbox, which enforces R, never had to refuse a call, and no call was wasted.
    assert stats["rate_limited"] == 0, stats
    assert stats["by_status"] == {"200": JOBS}, stats
    assert len(starts) == JOBS

    # The limit is global: every process did part of the work, yet together they kept to R.
    done = [w.log.read_text().count("succeeded in") for w in workers]
    assert all(n > 0 for n in done), f"jobs per worker: {done}"
    allowed = RATE * WINDOW / 60 + 2  # +1 for GCRA's burst of 1, +1 for timestamp jitter
    busiest = max(
        sum(1 for t in starts[i:] if t < start + WINDOW) for i, start in enumerate(starts)
    )
    assert busiest <= allowed, f"{busiest} calls started within {WINDOW} s (allowed {allowed})"

    # ... and did not waste it: calls went out at >= 90% of R from the first to the last.
    rate = (len(starts) - 1) / (starts[-1] - starts[0]) * 60
    assert rate >= 0.9 * RATE, f"{rate:.1f} calls/min, wanted >= {0.9 * RATE:.0f}"
    assert rate <= RATE * 1.02, f"{rate:.1f} calls/min, above the limit {RATE}"
