"""Never pay twice: identical jobs reuse earlier outputs at zero cost, unless told not to."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from sqlalchemy import select

from pipeline.batch.status import batch_status
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Job, Output
from pipeline.db.session import Database
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxServer
from pipeline.settings import Settings
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch


def run_batch(
    tmp_path: Path, db: Database, settings: Settings, manifest: Path, out: str, reuse: bool = True
) -> int:
    result = new_batch(db, manifest, str(tmp_path / out), reuse=reuse)
    deps = build_deps(settings, LocalLimiter(None, None), db)
    for ids in queued_job_ids(db, result.batch_id):
        for job_id in ids:
            assert process_job(job_id, deps).state == "succeeded"
    return result.batch_id


def calls(sandbox: SandboxServer) -> int:
    url = sandbox.base_url.removesuffix("/v1") + "/sandbox/stats"
    return int(httpx.get(url).json()["requests"])


def test_second_identical_batch_costs_nothing_and_no_reuse_pays(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 5))
    first = run_batch(tmp_path, db, settings, manifest, "out1")
    assert calls(sandbox) == 5
    second = run_batch(tmp_path, db, settings, manifest, "out2")
    assert calls(sandbox) == 5  # no API call at all
    with db.session() as s:
        st1, st2 = batch_status(s, first), batch_status(s, second)
    assert st2.cost_usd == 0 and st2.reused == 5
    assert st2.saved_usd == st1.cost_usd > 0
    for a, b in zip(
        sorted((tmp_path / "out1").glob("*.png")),
        sorted((tmp_path / "out2").glob("*.png")),
        strict=True,
    ):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    third = run_batch(tmp_path, db, settings, manifest, "out3", reuse=False)
    assert calls(sandbox) == 10
    with db.session() as s:
        assert batch_status(s, third).cost_usd == st1.cost_usd
        assert batch_status(s, third).reused == 0


def test_identical_rows_in_one_batch_are_bought_once(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    rows = product_rows(tmp_path / "in", 1)
    rows.append({**rows[0], "id": "COPY"})
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    batch = run_batch(tmp_path, db, settings, manifest, "out")
    assert calls(sandbox) == 1
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.batch_id == batch).order_by(Job.id)).all()
        assert jobs[1].reused_from_job_id == jobs[0].id and jobs[1].cost_usd == 0
        outs = s.scalars(select(Output).order_by(Output.job_id)).all()
        assert len(outs) == 2 and outs[0].uri != outs[1].uri
        for o in outs:
            assert hashlib.sha256(Path(str(o.uri)).read_bytes()).hexdigest() == o.sha256


def test_reuse_falls_back_to_buying_when_donor_files_are_gone(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 1))
    run_batch(tmp_path, db, settings, manifest, "out1")
    for f in (tmp_path / "out1").glob("*.png"):
        f.unlink()
    result = new_batch(db, manifest, str(tmp_path / "out2"))
    deps = build_deps(settings, LocalLimiter(None, None), db)
    (job_id,) = next(queued_job_ids(db, result.batch_id))
    assert process_job(job_id, deps).state == "deferred"
    assert process_job(job_id, deps).state == "succeeded"
    assert calls(sandbox) == 2
