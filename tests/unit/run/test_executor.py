"""The executor against the sandbox in process (the real SDK on an httpx2.MockTransport): claims,
retries, error classes, ledger. The integration suite runs the same paths over real HTTP."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.batch.status import batch_status
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, Job, Output
from pipeline.db.session import Database
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxConfig
from pipeline.settings import Settings
from tests.conftest import billed_total, make_settings
from tests.factories import product_rows, write_manifest
from tests.fakes import InProcessAPI
from tests.unit.helpers import new_batch


@pytest.fixture
def api(tmp_path: Path) -> Iterator[InProcessAPI]:
    with InProcessAPI(SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"))) as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, api: InProcessAPI) -> Settings:
    return make_settings(tmp_path, api.base_url)


def _deps(settings: Settings, db: Database, api: InProcessAPI) -> Deps:
    deps = build_deps(settings, LocalLimiter(None, None), db, http_client=api.client())
    deps.sleep = lambda _s: None  # retries happen at once in tests; waits are tested elsewhere
    return deps


def _batch(tmp_path: Path, db: Database, rows: list[dict[str, object]]) -> tuple[int, list[int]]:
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    result = new_batch(db, manifest, str(tmp_path / "out"))
    ids = [i for chunk in queued_job_ids(db, result.batch_id) for i in chunk]
    return result.batch_id, ids


def test_success_records_attempt_cost_and_outputs(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    batch_id, (job_id,) = _batch(tmp_path, db, product_rows(tmp_path / "in", 1, n=2))
    result = process_job(job_id, _deps(settings, db, api))
    assert result.state == "succeeded"
    billed, per_request = billed_total(Path(str(api.config.billing_log)))
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        attempt = s.scalars(select(Attempt).where(Attempt.job_id == job_id)).one()
        outputs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
        assert job.cost_usd == billed == per_request[str(attempt.request_id)]
        assert attempt.http_status == 200 and attempt.image_output_tokens == 2 * 272
        assert len(outputs) == 2
        for out in outputs:
            assert out.uri and Path(out.uri).is_file() and out.width == 1024
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]


def test_same_message_twice_makes_one_call(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    _, (job_id,) = _batch(tmp_path, db, product_rows(tmp_path / "in", 1))
    deps = _deps(settings, db, api)
    assert process_job(job_id, deps).state == "succeeded"
    assert process_job(job_id, deps).state == "skipped"
    assert api.requests == 1
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Output)) == 1


def test_concurrent_duplicate_delivery_makes_one_call(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    _, (job_id,) = _batch(
        tmp_path, db, product_rows(tmp_path / "in", 1, prompt="slow #sandbox:latency=300")
    )
    deps = _deps(settings, db, api)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(process_job(job_id, deps).state))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["skipped", "skipped", "skipped", "succeeded"]
    assert api.requests == 1


def test_500_and_429_are_retried_and_every_attempt_recorded(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    rows = product_rows(tmp_path / "in", 2)
    rows[0]["prompt"] = "a #sandbox:500x2"
    rows[1]["prompt"] = "b #sandbox:429x1"
    _, (j500, j429) = _batch(tmp_path, db, rows)
    deps = _deps(settings, db, api)
    assert process_job(j500, deps).state == "succeeded"
    assert process_job(j429, deps).state == "succeeded"
    with db.session() as s:
        a500 = s.scalars(select(Attempt).where(Attempt.job_id == j500).order_by(Attempt.number))
        assert [(a.number, a.http_status, a.outcome) for a in a500] == [
            (1, 500, "transient"),
            (2, 500, "transient"),
            (3, 200, "ok"),
        ]
        a429 = list(
            s.scalars(select(Attempt).where(Attempt.job_id == j429).order_by(Attempt.number))
        )
        assert [(a.http_status, a.error_code) for a in a429] == [
            (429, "rate_limit_exceeded"),
            (200, None),
        ]
        assert a429[0].retry_after_s == 0.05
        assert a429[0].request_id and a429[0].latency_ms is not None
        assert s.get(Job, j500).attempts == 3  # type: ignore[union-attr]
    assert api.requests == 5


def test_transient_errors_exhaust_attempts_then_fail_with_reason(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    _, (job_id,) = _batch(tmp_path, db, product_rows(tmp_path / "in", 1, prompt="x #sandbox:500"))
    deps = _deps(settings.model_copy(update={"max_attempts": 3}), db, api)
    result = process_job(job_id, deps)
    assert result.state == "failed"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.attempts == 3
        assert job.last_error_code == "server_error"
        assert "gave up after 3 attempts" in str(job.last_error_message)


def test_400_and_moderation_fail_at_once_with_api_code(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    rows = product_rows(tmp_path / "in", 2)
    rows[0]["prompt"] = "a #sandbox:400"
    rows[1]["prompt"] = "b #sandbox:moderation"
    _, (j400, jmod) = _batch(tmp_path, db, rows)
    deps = _deps(settings, db, api)
    assert process_job(j400, deps).state == "failed"
    assert process_job(jmod, deps).state == "failed"
    assert api.requests == 2  # no retries
    with db.session() as s:
        bad = s.get(Job, j400)
        mod = s.get(Job, jmod)
        assert bad is not None and mod is not None
        assert bad.attempts == 1 and mod.attempts == 1
        assert mod.last_error_code == "moderation_blocked"
        assert mod.last_error_message
        assert bad.last_error_code and bad.last_error_message


def test_insufficient_quota_holds_batch_after_one_call(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    rows = product_rows(tmp_path / "in", 4)
    rows[0]["prompt"] = "a #sandbox:quota"
    batch_id, ids = _batch(tmp_path, db, rows)
    deps = _deps(settings, db, api)
    states = [process_job(i, deps).state for i in ids]
    assert states == ["held", "held", "held", "held"]
    assert api.requests == 1
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "held"
        assert "insufficient_quota" in str(batch.hold_reason)


def test_auth_error_holds_batch(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    batch_id, ids = _batch(tmp_path, db, product_rows(tmp_path / "in", 2, prompt="#sandbox:401"))
    deps = _deps(settings, db, api)
    assert [process_job(i, deps).state for i in ids] == ["held", "held"]
    assert api.requests == 1
    with db.session() as s:
        assert s.get(Batch, batch_id).state == "held"  # type: ignore[union-attr]


def test_unreadable_image_data_is_retried_and_cost_recorded(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    _, (job_id,) = _batch(
        tmp_path, db, product_rows(tmp_path / "in", 1, prompt="x #sandbox:badb64x1")
    )
    assert process_job(job_id, _deps(settings, db, api)).state == "succeeded"
    billed, _ = billed_total(Path(str(api.config.billing_log)))
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.attempts == 2
        assert job.cost_usd == billed  # the bad response was billed, and so recorded
        assert job.cost_usd > Decimal(0)
        first = s.scalar(
            select(Attempt.cost_usd).where(Attempt.job_id == job_id, Attempt.number == 1)
        )
        status = batch_status(s, job.batch_id)
    assert first and status.retry_waste_usd == first  # paid for, produced nothing kept
    assert status.cost_per_output_usd == job.cost_usd
    assert status.breakdown == [
        {
            "model": "gpt-image-2.5-sunburst",
            "quality": "low",
            "state": "succeeded",
            "jobs": 1,
            "cost_usd": str(job.cost_usd.quantize(Decimal("0.000001"))),
        }
    ]


def test_batch_whose_last_worker_died_before_finishing_is_finished_by_the_reaper(
    tmp_path: Path,
    db: Database,
    settings: Settings,
    api: InProcessAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.db import jobs as jobs_db
    from pipeline.run import executor

    batch_id, (job_id,) = _batch(tmp_path, db, product_rows(tmp_path / "in", 1))
    deps = _deps(settings, db, api)
    # The worker "dies" right after recording success: nothing collected, batch not finished.
    with monkeypatch.context() as m:
        m.setattr(executor.collector, "collect_job", lambda *a, **k: 0)
        m.setattr(executor, "finish_if_done", lambda *a, **k: False)
        assert process_job(job_id, deps).state == "succeeded"
    with db.session() as s:
        assert s.get(Batch, batch_id).state == "running"  # type: ignore[union-attr]
        assert s.scalar(select(Output.uri).where(Output.job_id == job_id)) is None
    assert jobs_db.idle_running_batches(db) == [batch_id]
    assert executor.finish_if_done(deps, batch_id)
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "finished" and batch.report_uri
        uri = s.scalar(select(Output.uri).where(Output.job_id == job_id))
        assert uri and Path(uri).is_file()
    assert jobs_db.idle_running_batches(db) == []


def test_svg_author_tokens_are_priced_or_the_attempt_is_flagged_unpriced(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """An SVG answer's `svg_usage` is billed at the author model's rates: priced when the
    table knows the author, else the attempt is unpriced (never silently short)."""
    from dataclasses import replace

    from pipeline.cost.pricing import Usage

    deps = _deps(settings, db, api)
    real_edit = deps.gateway.edit
    author_usage = Usage(text_input=1000, text_output=2000)

    def with_svg(author: str) -> object:
        def edit(spec: object, lane: object = None) -> object:
            outcome = real_edit(spec, lane)  # type: ignore[arg-type]
            return replace(outcome, svg_usage=author_usage, svg_author=author)

        return edit

    _, (priced_job, unknown_job) = _batch(tmp_path, db, product_rows(tmp_path / "in", 2))
    deps.gateway.edit = with_svg("gpt-image-2.5-sunburst")  # type: ignore[method-assign]
    assert process_job(priced_job, deps).state == "succeeded"
    deps.gateway.edit = with_svg("some-text-model")  # type: ignore[method-assign]
    assert process_job(unknown_job, deps).state == "succeeded"
    _, per_request = billed_total(Path(str(api.config.billing_log)))
    author_cost = deps.prices.cost("gpt-image-2.5-sunburst", author_usage)
    assert author_cost is not None and author_cost > 0
    with db.session() as s:
        a1 = s.scalars(select(Attempt).where(Attempt.job_id == priced_job)).one()
        a2 = s.scalars(select(Attempt).where(Attempt.job_id == unknown_job)).one()
    assert a1.priced and a1.cost_usd == per_request[str(a1.request_id)] + author_cost
    assert not a2.priced and a2.cost_usd == 0
