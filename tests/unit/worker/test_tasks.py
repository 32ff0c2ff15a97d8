"""The worker's hook after a batch: a finished nightly batch is reconciled later (only nightly
batches, and after the report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import worker.tasks as tasks
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
