"""A call lost in flight is still paid for: an attempt a dead worker left `in_flight` is booked
at its job's estimated cost, flagged, and shown as a lost answer in status and the report."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from sqlalchemy import select

from pipeline.batch.status import batch_status
from pipeline.db import jobs
from pipeline.db.models import Attempt, Job, utcnow
from pipeline.db.session import Database
from pipeline.output.collector import StorageCache
from pipeline.output.report import write_report
from pipeline.states import AttemptOutcome
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch


def test_an_interrupted_call_is_booked_at_its_estimate_and_listed(
    tmp_path: Path, db: Database
) -> None:
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 2))
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)).first()
        assert job is not None and job.estimated_usd
        estimate, job_id = Decimal(job.estimated_usd), job.id
        assert jobs.claim(s, job_id, lease_seconds=-1)  # a worker that dies at once
        s.add(Attempt(job_id=job_id, number=1, started_at=utcnow(), outcome="in_flight"))
        jobs.count_attempt(s, job_id, lease_seconds=-1)
        s.commit()
        assert jobs.requeue_expired(s, batch_id) == [job_id]
    with db.session() as s:
        attempt = s.scalars(select(Attempt).where(Attempt.job_id == job_id)).one()
        assert attempt.outcome == AttemptOutcome.INTERRUPTED
        assert (attempt.cost_usd, attempt.cost_estimated) == (estimate, True)
        assert attempt.error_code == jobs.ANSWER_LOST
        job = s.get(Job, job_id)
        assert job is not None and job.cost_usd == estimate and job.state == "queued"
        status = batch_status(s, batch_id)
    assert (status.lost_answers, status.lost_answers_usd) == (1, estimate)
    assert status.cost_usd == estimate and status.estimated_cost_attempts == 1
    _, json_uri = write_report(db, batch_id, StorageCache())
    summary = json.loads(Path(json_uri).read_text())["summary"]
    assert summary["lost_answers"]["attempts"] == 1
    assert summary["lost_answers"]["list"] == [
        {"row": 1, "id": "SKU0000", "attempt": 1, "estimated_usd": str(estimate)}
    ]
    # Marking again books nothing twice.
    with db.session() as s:
        assert jobs.mark_interrupted(s, [job_id]) == 0
        s.commit()
        assert s.get(Job, job_id).cost_usd == estimate  # type: ignore[union-attr]
