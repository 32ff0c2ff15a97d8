"""pause / resume / cancel / retry --failed, through the executor and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.batch import controls
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.errors import EditbatchError
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch


def setup(
    tmp_path: Path, db: Database, settings: Settings, rows: list[dict[str, object]]
) -> tuple[int, Deps]:
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    result = new_batch(db, manifest, str(tmp_path / "out"))
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    return result.batch_id, deps


def run_all(db: Database, batch_id: int, deps: Deps) -> list[str]:
    return [process_job(i, deps).state for ids in queued_job_ids(db, batch_id) for i in ids]


def states(db: Database, batch_id: int) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Job.state).where(Job.batch_id == batch_id).order_by(Job.id)))


def test_pause_parks_jobs_and_resume_finishes(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    batch_id, deps = setup(tmp_path, db, settings, product_rows(tmp_path / "in", 3))
    with db.session() as s:
        controls.pause(s, batch_id)
    assert run_all(db, batch_id, deps) == ["held"] * 3
    with db.session() as s:
        controls.resume(s, batch_id)
    assert run_all(db, batch_id, deps) == ["succeeded"] * 3
    with db.session() as s:
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
        with pytest.raises(EditbatchError, match="nothing to resume"):
            controls.resume(s, batch_id)


def test_cancel_stops_unstarted_jobs(tmp_path: Path, db: Database, settings: Settings) -> None:
    batch_id, deps = setup(tmp_path, db, settings, product_rows(tmp_path / "in", 3))
    first = next(queued_job_ids(db, batch_id))[0]
    assert process_job(first, deps).state == "succeeded"
    with db.session() as s:
        assert controls.cancel(s, batch_id) == 2
    assert states(db, batch_id) == ["succeeded", "cancelled", "cancelled"]
    assert run_all(db, batch_id, deps) == []


def test_retry_failed_keeps_successes_and_records_new_attempts(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    rows = product_rows(tmp_path / "in", 3)
    rows[1]["prompt"] = "bad #sandbox:400"
    batch_id, deps = setup(tmp_path, db, settings, rows)
    assert run_all(db, batch_id, deps) == ["succeeded", "failed", "succeeded"]
    with db.session() as s:
        assert controls.retry_failed(s, batch_id, prompt="a better prompt") == 1
        failed_id = s.scalar(select(Job.id).where(Job.batch_id == batch_id, Job.state == "queued"))
    assert failed_id is not None
    assert run_all(db, batch_id, deps) == ["succeeded"]
    assert states(db, batch_id) == ["succeeded"] * 3
    with db.session() as s:
        attempts = s.scalars(
            select(Attempt).where(Attempt.job_id == failed_id).order_by(Attempt.number)
        ).all()
        assert [(a.number, a.http_status) for a in attempts] == [(1, 400), (2, 200)]
        job = s.get(Job, failed_id)
        assert job is not None and "a better prompt" in job.spec
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
