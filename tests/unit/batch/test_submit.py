"""Rejected rows are stored with their reason and never enqueued; --strict refuses it all."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.batch.submit import send
from pipeline.db.models import Batch, Job
from pipeline.db.session import Database
from pipeline.errors import StrictRefusal
from tests.factories import make_image, make_mask, write_manifest
from tests.unit.helpers import new_batch


def bad_manifest(folder: Path) -> Path:
    make_image(folder / "ok.png", size=(256, 256))
    make_mask(folder / "mask.png", size=(256, 256))
    make_mask(folder / "small.png", size=(64, 64))
    (folder / "zero.png").write_bytes(b"")
    rows = [
        {"id": "good1", "image": "ok.png", "prompt": "fine"},
        {"id": "zero", "image": "zero.png", "prompt": "x"},
        {"id": "mask", "image": "ok.png", "mask": "small.png", "prompt": "x"},
        {"id": "retired", "image": "ok.png", "prompt": "x", "model": "gpt-image-1"},
        {"id": "size", "image": "ok.png", "prompt": "x", "size": "999x999"},
        {"id": "good2", "image": "ok.png", "mask": "mask.png", "prompt": "fine too"},
        {"id": "escape", "image": "../outside.png", "prompt": "x"},
        {"id": "good1", "image": "ok.png", "prompt": "duplicate id"},
    ]
    return write_manifest(folder / "m.csv", rows)


def test_rejected_rows_stored_with_reason_and_never_enqueued(tmp_path: Path, db: Database) -> None:
    manifest = bad_manifest(tmp_path / "in")
    make_image(tmp_path / "outside.png")
    result = new_batch(db, manifest, str(tmp_path / "out"))
    assert (result.accepted, result.rejected) == (2, 6)
    assert {(e.row, e.field) for e in result.errors} >= {
        (2, "image"),
        (3, "mask"),
        (4, "model"),
        (5, "size"),
        (7, "image"),
        (8, "id"),
    }
    sent: list[int] = []
    assert send(db, result.batch_id, sent.extend) == 2
    with db.session() as s:
        jobs = {j.row_number: j for j in s.scalars(select(Job)).all()}
    assert sorted(sent) == sorted(jobs[r].id for r in (1, 6))
    assert jobs[4].state == "rejected" and "2026-10-23" in str(jobs[4].last_error_message)
    assert jobs[7].last_error_code == "invalid_image"
    assert all(jobs[r].state == "rejected" for r in (2, 3, 4, 5, 7, 8))


def test_strict_refuses_whole_manifest(tmp_path: Path, db: Database) -> None:
    manifest = bad_manifest(tmp_path / "in")
    with pytest.raises(StrictRefusal, match="--strict refuses"):
        new_batch(db, manifest, str(tmp_path / "out"), strict=True)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 0
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_output_name_collisions_are_row_errors(tmp_path: Path, db: Database) -> None:
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    rows = [
        {"id": "A", "image": "a.png", "prompt": "p", "output": "same.png"},
        {"id": "B", "image": "a.png", "prompt": "q", "output": "same.png"},
        {"id": "C", "image": "a.png", "prompt": "q", "output": "../up.png"},
    ]
    manifest = write_manifest(folder / "m.csv", rows)
    result = new_batch(db, manifest, str(tmp_path / "out"))
    assert [(e.row, e.field) for e in result.errors] == [(2, "output"), (3, "output")]
    assert "also produced by row 1" in result.errors[0].reason


def test_the_batch_route_refuses_rows_of_another_provider(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's Batch API runs on provider openai only: on `--route batch`, a row sent to Azure
    (by its column) is rejected by row and field, the OpenAI rows are stored as usual."""
    from pipeline.intake.catalog import load_catalog
    from pipeline.intake.preflight import Preflight, PreflightOptions
    from pipeline.providers import providers_of
    from pipeline.settings import Settings

    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://east.openai.azure.com")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-0001")
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-04-01-preview")
    monkeypatch.setenv("EDITBATCH_AZURE_DEPLOYMENTS", "gpt-image-2=img2")
    make_image(tmp_path / "in" / "a.png")
    rows = [
        {"id": "o", "image": "a.png", "prompt": "p", "model": "gpt-image-2"},
        {"id": "z", "image": "a.png", "prompt": "q", "model": "gpt-image-2", "provider": "azure"},
    ]
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    preflight = Preflight(
        PreflightOptions(
            allowed_roots=(manifest.parent.resolve(),),
            catalog=load_catalog(),
            work_dir=tmp_path / "work",
            providers=providers_of(Settings()),
        )
    )
    result = new_batch(db, manifest, str(tmp_path / "out"), preflight=preflight, route="batch")
    assert (result.accepted, result.rejected) == (1, 1)
    [error] = result.errors
    assert (error.row, error.key, error.field) == (2, "z", "provider")
    assert error.reason.startswith("provider azure has no batch route")
