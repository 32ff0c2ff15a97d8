"""Review decisions, re-runs of rejected rows and the export of approved outputs.

Through the real submit, executor (against the sandbox), collector and report, on SQLite.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.batch import controls, review
from pipeline.batch.status import batch_status
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Batch, Job, Output
from pipeline.db.session import Database
from pipeline.errors import EditbatchError, NotFoundError, StorageError
from pipeline.output.export import export_approved
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from tests.factories import product_rows, write_manifest
from tests.integration.status_reference import reference_status
from tests.unit.helpers import new_batch


def run_batch(tmp_path: Path, db: Database, settings: Settings, count: int) -> tuple[int, Deps]:
    rows = product_rows(tmp_path / "in", count)
    rows[1]["n"] = 2
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    run_queued(db, batch_id, deps)
    return batch_id, deps


def run_queued(db: Database, batch_id: int, deps: Deps) -> list[str]:
    return [process_job(i, deps).state for ids in queued_job_ids(db, batch_id) for i in ids]


def outputs_of(db: Database, batch_id: int) -> list[Output]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Output)
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Job.id, Output.index)
            )
        )


def same_counts(db: Database, batch_id: int) -> None:
    """The trigger-kept counters equal the aggregates over the jobs (migration 0005's promise)."""
    with db.session() as s:
        fast = dataclasses.asdict(batch_status(s, batch_id))
        slow = dataclasses.asdict(reference_status(s, batch_id))
    for key in ("counts", "jobs_total", "breakdown", "outputs", "attempts_by_outcome"):
        assert fast[key] == slow[key], key
    for key in ("cost_usd", "estimated_usd", "estimated_remaining_usd"):
        assert fast[key] == round(slow[key], 6), key


def test_decisions_are_stored_replaced_and_counted(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """A decision per output, replaced by the next one; status counts them (approved,
    rejected, unreviewed)."""
    batch_id, _ = run_batch(tmp_path, db, settings, 3)
    outs = outputs_of(db, batch_id)
    assert len(outs) == 4
    with db.session() as s:
        assert review.decide(s, batch_id, [outs[0].id, outs[1].id], "approved") == 2
        review.decide(s, batch_id, [outs[1].id], "rejected", note="  logo is blurred ")
        review.decide(s, batch_id, [outs[2].id], "rejected")
        review.decide(s, batch_id, [outs[2].id], None)  # back to unreviewed
        status = batch_status(s, batch_id, with_reviews=True)
    assert status.reviews == {"approved": 1, "rejected": 1, "unreviewed": 2}
    assert status.to_json()["reviews"] == status.reviews
    with db.session() as s:
        assert "reviews" not in batch_status(s, batch_id).to_json()


def test_decisions_refuse_other_batches_outputs_and_unknown_words(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """An output id of another batch changes nothing and is named in the error."""
    first, _ = run_batch(tmp_path / "a", db, settings, 2)
    second, _ = run_batch(tmp_path / "b", db, settings, 2)
    theirs = outputs_of(db, second)[0].id
    mine = outputs_of(db, first)[0].id
    with db.session() as s:
        with pytest.raises(NotFoundError, match=str(theirs)):
            review.decide(s, first, [mine, theirs], "approved")
        with pytest.raises(EditbatchError, match="approved or rejected"):
            review.decide(s, first, [mine], "maybe")
        assert batch_status(s, first, with_reviews=True).reviews == {
            "approved": 0,
            "rejected": 0,
            "unreviewed": 3,
        }


def test_rerun_rejected_makes_linked_jobs_with_the_amended_prompt(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """Rejected rows get new queued jobs (per-row prompt, or one amendment for all) linked to
    their originals, on fresh row numbers, with the counters right; they run, and their
    outputs land under rerun1/ without touching the originals; a second click adds nothing."""
    batch_id, deps = run_batch(tmp_path, db, settings, 3)
    outs = outputs_of(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [outs[0].id], "rejected", "too dark")
        review.decide(s, batch_id, [outs[3].id], "rejected")
        review.decide(s, batch_id, [outs[1].id, outs[2].id], "approved")
        first_job, third_job = outs[0].job_id, outs[3].job_id
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
        new_ids = controls.rerun_rejected(
            s, batch_id, prompts={first_job: "brighter studio light"}, amend="keep the logo"
        )
    assert len(new_ids) == 2
    same_counts(db, batch_id)
    with db.session() as s:
        assert s.get(Batch, batch_id).state == "running"  # type: ignore[union-attr]
        new = {j.rerun_of_job_id: j for j in s.scalars(select(Job).where(Job.id.in_(new_ids)))}
        originals = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(new)))}
        assert set(new) == {first_job, third_job}
        one, three = (
            EditSpec.from_json(new[first_job].spec),
            EditSpec.from_json(new[third_job].spec),
        )
        assert one.prompt == "brighter studio light keep the logo"
        third_prompt = EditSpec.from_json(originals[third_job].spec).prompt
        assert three.prompt == f"{third_prompt} keep the logo"
        assert one.output == "rerun1/{id}_{index}.{ext}"
        assert [j.row_number for j in new.values()] == [4, 5]
        assert new[first_job].external_key == originals[first_job].external_key
        assert one.row == EditSpec.from_json(originals[first_job].spec).row
        assert all(j.state == "queued" and j.fingerprint is None for j in new.values())
        # The same click again: nothing more (each job is re-run once).
        assert controls.rerun_rejected(s, batch_id, amend="again") == []
    before = {o.id: (o.uri, o.sha256) for o in outs}
    assert run_queued(db, batch_id, deps) == ["succeeded", "succeeded"]
    same_counts(db, batch_id)
    after = outputs_of(db, batch_id)
    assert {o.id: (o.uri, o.sha256) for o in after if o.id in before} == before
    rerun_uris = [str(o.uri) for o in after if o.id not in before]
    assert rerun_uris == [
        str(tmp_path / "out" / "rerun1" / "SKU0000_1.png"),
        str(tmp_path / "out" / "rerun1" / "SKU0002_1.png"),
    ]
    for o in after:
        assert hashlib.sha256(Path(str(o.uri)).read_bytes()).hexdigest() == o.sha256
    with db.session() as s:
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
        report = s.get(Batch, batch_id).report_uri  # type: ignore[union-attr]
    with Path(str(report)).open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["row"], r["review"], r["rerun_of_row"]) for r in rows] == [
        ("1", "rejected", ""),
        ("2", "approved|approved", ""),
        ("3", "rejected", ""),
        ("4", "unreviewed", "1"),
        ("5", "unreviewed", "3"),
    ]
    assert rows[0]["review_note"] == "too dark"
    # A rejected re-run is re-run again, into rerun2/.
    rerun_out = next(o for o in after if o.id not in before)
    with db.session() as s:
        review.decide(s, batch_id, [rerun_out.id], "rejected")
        (again,) = controls.rerun_rejected(s, batch_id)
        spec = EditSpec.from_json(s.get(Job, again).spec)  # type: ignore[union-attr]
    assert spec.output == "rerun2/{id}_{index}.{ext}"
    assert spec.prompt == "brighter studio light keep the logo"
    same_counts(db, batch_id)


def test_rerun_refuses_rows_that_are_not_rejected_and_bad_prompts(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """A prompt for a row that is not rejected, or an empty prompt, adds no job."""
    batch_id, _ = run_batch(tmp_path, db, settings, 2)
    outs = outputs_of(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [outs[0].id], "rejected")
        with pytest.raises(EditbatchError, match="no rejected output"):
            controls.rerun_rejected(s, batch_id, prompts={outs[1].job_id: "x"})
        with pytest.raises(EditbatchError, match="1 to 32,000 characters"):
            controls.rerun_rejected(s, batch_id, prompts={outs[0].job_id: "   "})
    with db.session() as s:
        assert s.scalar(select(Job.id).where(Job.rerun_of_job_id.is_not(None))) is None


def test_export_copies_exactly_the_approved_outputs(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """Approved outputs only, under their names (a re-run's without rerun<N>/, replacing its
    original), each verified by sha256; a source changed since collection is refused."""
    batch_id, deps = run_batch(tmp_path, db, settings, 3)
    outs = outputs_of(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [outs[1].id, outs[2].id], "approved")
        review.decide(s, batch_id, [outs[0].id, outs[3].id], "rejected")
        controls.rerun_rejected(s, batch_id, job_ids=[outs[0].job_id])
    run_queued(db, batch_id, deps)
    rerun = outputs_of(db, batch_id)[-1]
    with db.session() as s:
        review.decide(s, batch_id, [rerun.id, outs[0].id], "approved")
    result = export_approved(db, batch_id, str(tmp_path / "shop"))
    shop = tmp_path / "shop"
    assert sorted(p.name for p in shop.rglob("*") if p.is_file()) == [
        "SKU0000_1.png",
        "SKU0001_1.png",
        "SKU0001_2.png",
    ]
    assert result.superseded == ["SKU0000_1.png"]
    assert (shop / "SKU0000_1.png").read_bytes() == Path(str(rerun.uri)).read_bytes()
    for name, out in (("SKU0001_1.png", outs[1]), ("SKU0001_2.png", outs[2])):
        assert hashlib.sha256((shop / name).read_bytes()).hexdigest() == out.sha256
    assert result.bytes == sum(
        (shop / n).stat().st_size for n in ("SKU0000_1.png", "SKU0001_1.png", "SKU0001_2.png")
    )
    Path(str(outs[1].uri)).write_bytes(b"changed")
    with pytest.raises(StorageError, match="sha256 differs"):
        export_approved(db, batch_id, str(tmp_path / "shop2"))


def test_rerun_in_a_paused_batch_resumes_it_and_a_cancelled_batch_refuses(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """A re-run is new work, handled like `retry --failed`: a paused batch is resumed (not left
    paused with a queued job nobody sends); a cancelled batch refuses and gets no job."""
    from pipeline.db import jobs

    batch_id, _ = run_batch(tmp_path, db, settings, 2)
    outs = outputs_of(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [outs[0].id, outs[1].id], "rejected")
        assert jobs.reopen_batch(s, batch_id)
        s.commit()
        controls.pause(s, batch_id)
        (new,) = controls.rerun_rejected(s, batch_id, job_ids=[outs[0].job_id])
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "running" and batch.hold_code is None
        assert s.get(Job, new).state == "queued"  # type: ignore[union-attr]
        controls.cancel(s, batch_id)
        with pytest.raises(EditbatchError, match="cancelled"):
            controls.rerun_rejected(s, batch_id)
    with db.session() as s:
        assert s.scalar(select(Job.id).where(Job.rerun_of_job_id == outs[1].job_id)) is None
