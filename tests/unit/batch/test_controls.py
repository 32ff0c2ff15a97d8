"""pause / resume / cancel / retry --failed, through the executor and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from pipeline.batch import controls
from pipeline.cost.pricing import load_prices
from pipeline.db import jobs
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.errors import EditbatchError
from pipeline.intake.catalog import load_catalog
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxServer
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
        assert controls.retry_failed(s, batch_id, prompt="a better prompt").count == 1
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


def test_model_unavailable_holds_the_batch_once_and_fails_no_job(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    """The API refuses the model: the first refusal holds the batch (model_unavailable, naming
    the replacement and the fix); later jobs are parked, none fails."""
    rows = product_rows(tmp_path / "in", 4, model="gpt-image-1.5")
    batch_id, deps = setup(tmp_path, db, settings, rows)
    sandbox.config.unavailable_models = ["gpt-image-1.5"]
    assert run_all(db, batch_id, deps) == ["held"] * 4
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "held"
        assert batch.hold_code == "model_unavailable"
        assert "gpt-image-2.5-sunburst" in str(batch.hold_reason)
        assert f"editbatch resume {batch_id} --model-map gpt-image-1.5=" in str(batch.hold_reason)
        calls = s.scalars(select(Attempt.outcome)).all()
    assert calls == ["hold"]  # one refused call, then the batch stopped sending


def test_model_map_moves_unfinished_jobs_rechecks_rules_and_follows_fingerprints(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    """`resume --model-map OLD=NEW`: jobs that fit NEW move (new fingerprint: no reuse of an
    OLD output); a row whose size OLD takes and NEW does not fails by row and field, unsent."""
    rows = product_rows(tmp_path / "in", 3, model="gpt-image-2")
    rows[1]["size"] = "1536x864"  # any WxH on gpt-image-2; gpt-image-1.5 takes three sizes
    batch_id, deps = setup(tmp_path, db, settings, rows)
    with db.session() as s:
        controls.pause(s, batch_id)
        before = {j.row_number: j.fingerprint for j in s.scalars(select(Job))}
        catalog, prices = load_catalog(), load_prices()
        report = controls.resume(
            s,
            batch_id,
            remap=lambda: controls.remap_models(
                s, batch_id, {"gpt-image-2": "gpt-image-1.5"}, catalog, prices
            ),
        )
    assert report is not None and report.moved == 2
    assert [(e.row, e.field) for e in report.unfit] == [(2, "size")]
    assert "'1536x864' is not available on gpt-image-1.5" in report.unfit[0].reason
    assert report.estimate is not None and report.estimate.calls == 2
    with db.session() as s:
        jobs = {j.row_number: j for j in s.scalars(select(Job).where(Job.batch_id == batch_id))}
        assert s.get(Batch, batch_id).state == "running"  # type: ignore[union-attr]
    assert jobs[2].state == "failed" and jobs[2].last_error_code == "invalid_size"
    for row in (1, 3):
        assert jobs[row].model == "gpt-image-1.5" and '"model":"gpt-image-1.5"' in jobs[row].spec
        assert jobs[row].fingerprint and jobs[row].fingerprint != before[row]
    assert run_all(db, batch_id, deps) == ["succeeded", "succeeded"]  # the failed one not sent
    assert sandbox.sandbox.stats.snapshot()["requests"] == 2


def test_retry_with_a_new_model_rechecks_each_failed_row_against_its_rules(
    tmp_path: Path, db: Database, settings: Settings, sandbox: SandboxServer
) -> None:
    """`retry --failed --model NEW` checks each failed row against NEW's rules as `--model-map`
    does: a row whose size NEW does not take stays failed, naming the field, and is not sent;
    the rows that fit run on NEW. A model not in the catalogue is refused."""
    rows = product_rows(tmp_path / "in", 3, model="gpt-image-2")
    rows[0]["prompt"] = "bad #sandbox:400"
    rows[1]["prompt"] = "bad #sandbox:400"
    rows[1]["size"] = "1536x864"  # any WxH on gpt-image-2; gpt-image-1.5 takes three sizes
    batch_id, deps = setup(tmp_path, db, settings, rows)
    assert run_all(db, batch_id, deps) == ["failed", "failed", "succeeded"]
    with db.session() as s:
        with pytest.raises(EditbatchError, match="not in the catalogue"):
            controls.retry_failed(s, batch_id, model="gpt-image-9", catalog=load_catalog())
        retried = controls.retry_failed(
            s, batch_id, prompt="a better prompt", model="gpt-image-1.5", catalog=load_catalog()
        )
    assert retried.count == 1
    assert [(e.row, e.field) for e in retried.unfit] == [(2, "size")]
    with db.session() as s:
        jobs_ = {j.row_number: j for j in s.scalars(select(Job).where(Job.batch_id == batch_id))}
    assert (jobs_[2].state, jobs_[2].last_error_code) == ("failed", "invalid_size")
    assert str(jobs_[2].last_error_message).startswith("not retried: on gpt-image-1.5, size: ")
    assert jobs_[2].model == "gpt-image-2"  # unchanged: it was not moved
    assert jobs_[1].state == "queued" and jobs_[1].model == "gpt-image-1.5"
    sent = sandbox.sandbox.stats.snapshot()["requests"]
    assert run_all(db, batch_id, deps) == ["succeeded"]
    assert sandbox.sandbox.stats.snapshot()["requests"] == sent + 1  # row 2 was not sent


def test_model_map_is_refused_while_calls_to_the_old_model_are_in_flight(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    rows = product_rows(tmp_path / "in", 2, model="gpt-image-1.5")
    batch_id, _ = setup(tmp_path, db, settings, rows)
    with db.session() as s:
        jobs.claim(s, next(queued_job_ids(db, batch_id))[0], 900)
        with pytest.raises(EditbatchError, match="still in flight"):
            controls.remap_models(
                s, batch_id, {"gpt-image-1.5": "gpt-image-2.5-flare"}, load_catalog(), load_prices()
            )
        with pytest.raises(EditbatchError, match="not in the catalogue"):
            controls.remap_models(
                s, batch_id, {"gpt-image-1.5": "gpt-image-9"}, load_catalog(), load_prices()
            )


def test_model_map_refuses_a_model_the_jobs_provider_does_not_deploy(
    tmp_path: Path, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the providers, `--model-map` checks NEW against each job's provider: jobs on an
    Azure provider without a deployment of NEW fail unsent, naming the provider."""
    from pipeline.providers import providers_of

    for name, value in {
        "EDITBATCH_PROVIDER": "azure",
        "AZURE_OPENAI_ENDPOINT": "https://east.openai.azure.com",
        "AZURE_OPENAI_API_KEY": "azure-key-0001",
        "OPENAI_API_VERSION": "2025-04-01-preview",
        "EDITBATCH_AZURE_DEPLOYMENTS": "gpt-image-2=img2",
    }.items():
        monkeypatch.setenv(name, value)
    providers = providers_of(Settings())
    rows = product_rows(tmp_path / "in", 2, model="gpt-image-2")
    batch_id, _ = setup(tmp_path, db, settings, rows)
    with db.session() as s:
        report = controls.remap_models(
            s, batch_id, {"gpt-image-2": "gpt-image-1.5"}, load_catalog(), load_prices(), providers
        )
    assert report.moved == 0
    assert [(e.row, e.field) for e in report.unfit] == [(1, "model"), (2, "model")]
    assert report.unfit[0].reason.startswith("provider azure has no deployment of gpt-image-1.5")
