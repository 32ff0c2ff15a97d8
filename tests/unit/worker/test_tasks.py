"""The worker's hook after a batch: a finished nightly batch is reconciled later (only nightly
batches, and after the report); what the broker check re-sends after Redis lost the queue."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

import worker.tasks as tasks
from pipeline.db import jobs
from pipeline.db.models import Job
from pipeline.db.session import Database
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch


@dataclass
class Sent:
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def apply_async(self, args: tuple[Any, ...] = (), countdown: float = 0) -> None:
        self.calls.append((args, countdown))


@dataclass
class FakeDeps:
    db: Database


def test_nightly_batches_are_reconciled_after_their_report(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 1))
    nightly = new_batch(db, manifest, str(tmp_path / "o1"), name="nightly-2026-11-30").batch_id
    other = new_batch(db, manifest, str(tmp_path / "o2"), name="adhoc").batch_id
    sent = Sent()
    reported: list[int] = []
    monkeypatch.setattr(tasks, "deps", lambda: FakeDeps(db))
    monkeypatch.setattr(tasks, "reconcile", sent)
    hook = tasks._then_reconcile(reported.append)
    hook(nightly)
    hook(other)
    assert reported == [nightly, other]  # the report (and webhook) first, for every batch
    assert sent.calls == [((nightly,), tasks.RECONCILE_DELAY_SECONDS)]


def test_a_lost_queue_is_sent_again_for_the_sync_route_only(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Redis lost the queue, the queued jobs of running sync batches are sent again, and
    the jobs of a batch-route batch sent back to the sync route; a batch-route job is not (it
    has no message: the tick finds it in the database), nor a job of a paused batch."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 3))
    sync = new_batch(db, manifest, str(tmp_path / "o1")).batch_id
    route = new_batch(db, manifest, str(tmp_path / "o2"), route="batch").batch_id
    paused = new_batch(db, manifest, str(tmp_path / "o3")).batch_id
    with db.session() as s:
        ids = {
            b: list(s.scalars(select(Job.id).where(Job.batch_id == b).order_by(Job.id)))
            for b in (sync, route, paused)
        }
        s.execute(update(Job).where(Job.id == ids[route][0]).values(route="sync"))
        s.commit()
    with db.session() as s:
        assert jobs.pause_batch(s, paused)
        s.commit()
    sent: list[int] = []
    monkeypatch.setattr(tasks, "deps", lambda: FakeDeps(db))
    monkeypatch.setattr(tasks, "celery_enqueue", sent.extend)
    assert tasks.resend_queued() == 4
    assert sorted(sent) == sorted([*ids[sync], ids[route][0]])
