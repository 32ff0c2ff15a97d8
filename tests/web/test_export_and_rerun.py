"""`editbatch export BATCH --approved DEST` (local folder and S3 through moto), and re-runs
keeping the trigger-kept counters right on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from sqlalchemy import select

from pipeline.batch import controls, review
from pipeline.batch.status import batch_status
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Job, Output
from pipeline.db.session import Database
from pipeline.output.export import export_approved
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxServer
from pipeline.settings import Settings
from tests.conftest import make_settings
from tests.factories import product_rows, write_manifest
from tests.integration.conftest import database_url  # noqa: F401
from tests.integration.status_reference import reference_status
from tests.integration.test_s3 import MotoS3, moto_s3  # noqa: F401
from tests.servers import REPO
from tests.unit.helpers import new_batch


def run(db: Database, settings: Settings, batch_id: int) -> None:
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    for ids in queued_job_ids(db, batch_id):
        for job_id in ids:
            process_job(job_id, deps)


def reviewed_batch(tmp_path: Path, db: Database, settings: Settings, output: str) -> int:
    """4 rows (row 2 with n=2): outputs 1, 3 approved, 2 rejected, the rest unreviewed."""
    rows = product_rows(tmp_path / "in", 4)
    rows[1]["n"] = 2
    batch_id = new_batch(db, write_manifest(tmp_path / "in" / "m.csv", rows), output).batch_id
    run(db, settings, batch_id)
    outs = outputs(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [outs[0].id, outs[2].id], "approved")
        review.decide(s, batch_id, [outs[1].id], "rejected")
    return batch_id


def outputs(db: Database, batch_id: int) -> list[Output]:
    with db.session() as s:
        return list(
            s.scalars(
                select(Output)
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Job.id, Output.index)
            )
        )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_env(settings: Settings) -> dict[str, str]:
    return {
        "EDITBATCH_DATABASE_URL": settings.effective_database_url,
        "EDITBATCH_HOME": str(settings.home),
    }


def test_export_to_a_folder_copies_exactly_the_approved_outputs(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    """The command copies the approved outputs and nothing else, each byte-identical (sha256)
    to what was collected; without --approved it says what to write."""
    batch_id = reviewed_batch(tmp_path, db, settings, str(tmp_path / "out"))
    outs = outputs(db, batch_id)
    dest = tmp_path / "shop"
    proc = cli(cli_env(settings), "export", str(batch_id), "--approved", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "exported 2 approved outputs" in proc.stdout
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == ["SKU0000_1.png", "SKU0001_2.png"]
    for name, out in (("SKU0000_1.png", outs[0]), ("SKU0001_2.png", outs[2])):
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == out.sha256
    missing = cli(cli_env(settings), "export", str(batch_id), str(dest))
    assert missing.returncode == 2 and "--approved" in missing.stderr
    unknown = cli(cli_env(settings), "export", "999", "--approved", str(dest))
    assert unknown.returncode == 2 and "no batch 999" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_export_from_and_to_s3(
    tmp_path: Path,
    db: Database,
    settings: Settings,
    moto_s3: MotoS3,  # noqa: F811
) -> None:
    """Outputs in S3 are exported to another S3 prefix by the command (same objects, same
    sha256, no temporary objects) and to a local folder by the function."""
    bucket = moto_s3.bucket()
    batch_id = reviewed_batch(tmp_path, db, settings, f"s3://{bucket}/outputs")
    outs = outputs(db, batch_id)
    env = {**cli_env(settings), **moto_s3.env}
    proc = cli(env, "export", str(batch_id), "--approved", f"s3://{bucket}/shop/today")
    assert proc.returncode == 0, proc.stderr
    s3 = fsspec.filesystem("s3")
    names = sorted(p.rsplit("/", 1)[1] for p in s3.find(f"{bucket}/shop/today"))
    assert names == ["SKU0000_1.png", "SKU0001_2.png"]
    for name, out in (("SKU0000_1.png", outs[0]), ("SKU0001_2.png", outs[2])):
        data = s3.cat_file(f"{bucket}/shop/today/{name}")
        assert hashlib.sha256(data).hexdigest() == out.sha256
    result = export_approved(db, batch_id, str(tmp_path / "local"))
    assert [Path(u).name for u in result.copied] == ["SKU0000_1.png", "SKU0001_2.png"]


@pytest.fixture
def any_db(database_url: str, sandbox: SandboxServer, tmp_path: Path) -> tuple[Database, Settings]:  # noqa: F811
    settings = make_settings(tmp_path, sandbox.base_url)
    return Database(database_url), settings.model_copy(update={"database_url": database_url})


def test_rerun_keeps_the_counters_right(tmp_path: Path, any_db: tuple[Database, Settings]) -> None:
    """Inserting re-run jobs (and running them) keeps the per-batch counters equal to the
    aggregates over the jobs, on SQLite and on PostgreSQL; metadata is searchable for them."""
    db, settings = any_db
    rows = product_rows(tmp_path / "in", 5, category="shoes")
    rows[4]["prompt"] = "no #sandbox:400"
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    batch_id = new_batch(db, manifest, str(tmp_path / "o")).batch_id
    run(db, settings, batch_id)
    outs = outputs(db, batch_id)
    with db.session() as s:
        review.decide(s, batch_id, [o.id for o in outs[:3]], "rejected")
        new = controls.rerun_rejected(s, batch_id, amend="sharper")
    assert len(new) == 3

    def same() -> None:
        with db.session() as s:
            fast = dataclasses.asdict(batch_status(s, batch_id))
            slow = dataclasses.asdict(reference_status(s, batch_id))
        for key in ("counts", "jobs_total", "breakdown", "outputs", "attempts_by_outcome"):
            assert fast[key] == slow[key], key
        for key in ("cost_usd", "estimated_usd", "estimated_remaining_usd"):
            assert fast[key] == round(slow[key], 6), key

    same()
    run(db, settings, batch_id)
    same()
    with db.session() as s:
        assert batch_status(s, batch_id).counts["succeeded"] == 7
        from pipeline.web.queries import JobFilters, jobs_page

        page = jobs_page(s, batch_id, JobFilters(meta="category", value="shoes"))
        assert [r[0] for r in page.rows][-3:] == new
    db.dispose()


def test_review_counters_follow_every_change(
    tmp_path: Path, any_db: tuple[Database, Settings]
) -> None:
    """The per-batch review counters (kept by triggers) equal a count of the decisions after
    decisions, changes, clears, a direct SQL insert and a deleted batch, on both databases."""
    from sqlalchemy import delete, func, insert, literal

    from pipeline.batch.status import review_counts
    from pipeline.db.models import Batch, Review

    db, settings = any_db
    ids = []
    for name in ("a", "b"):
        rows = product_rows(tmp_path / name, 3)
        manifest = write_manifest(tmp_path / name / "m.csv", rows)
        ids.append(new_batch(db, manifest, str(tmp_path / name / "o")).batch_id)
        run(db, settings, ids[-1])
    first, second = ids

    a, b = outputs(db, first), outputs(db, second)
    made = {first: len(a), second: len(b)}

    def check() -> None:
        with db.session() as s:
            for batch_id in ids:
                counted = {
                    str(d): int(n)
                    for d, n in s.execute(
                        select(Review.decision, func.count())
                        .where(Review.batch_id == batch_id)
                        .group_by(Review.decision)
                    )
                }
                outputs_n = made[batch_id]
                assert review_counts(s, batch_id, outputs_n) == {
                    "approved": counted.get("approved", 0),
                    "rejected": counted.get("rejected", 0),
                    "unreviewed": outputs_n - sum(counted.values()),
                }

    with db.session() as s:
        review.decide(s, first, [o.id for o in a], "approved")
    check()
    with db.session() as s:
        review.decide(s, first, [a[0].id], "rejected", "dark")
        review.decide(s, first, [a[1].id], None)
        review.decide(s, second, [b[0].id], "rejected")
    check()
    with db.session() as s:
        s.execute(
            insert(Review).from_select(
                ["output_id", "batch_id", "job_id", "decision", "decided_at"],
                select(
                    Output.id, Job.batch_id, Job.id, literal("approved"), func.current_timestamp()
                )
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == second, Output.id != b[0].id),
            )
        )
        s.commit()
    check()
    with db.session() as s:
        s.execute(delete(Batch).where(Batch.id == first))
        s.commit()
        assert review_counts(s, first, 0) == {"approved": 0, "rejected": 0, "unreviewed": 0}
    ids.remove(first)
    check()
    db.dispose()
