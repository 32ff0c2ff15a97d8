"""The batch route against the sandbox in process (the real SDK on an httpx2.MockTransport, the
sandbox's Files and Batches APIs, its batches run on the portal's event loop): dispatch, the
tick, collection, crashes at every step, expiry, cancel, budgets, reuse. The integration suite
runs the distributed shape (Celery worker and beat, PostgreSQL, HTTP)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from pipeline.batch import controls
from pipeline.batch.status import batch_status
from pipeline.db.models import Attempt, Batch, Job, Output, ProviderBatch, ProviderFile
from pipeline.db.session import Database
from pipeline.errors import LeaseLost
from pipeline.run.batchroute import collect, dispatch, poll
from pipeline.run.batchroute.context import RouteContext
from pipeline.run.deps import build_deps
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxConfig
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import make_image, write_manifest
from tests.fakes import InProcessAPI
from tests.unit.helpers import new_batch

MODEL = "gpt-image-2"
TERMINAL = ("succeeded", "failed", "cancelled", "rejected")


def fast_config(tmp_path: Path, **kw: Any) -> SandboxConfig:
    """Batches that take milliseconds: validating, each line and finalizing at 1/1000 pace."""
    return SandboxConfig(
        billing_log=str(tmp_path / "billing.jsonl"),
        batch_validating_seconds=0.01,
        batch_lines_per_second=2000,
        batch_finalizing_seconds=0.01,
        **kw,
    )


@pytest.fixture
def api(tmp_path: Path) -> Iterator[InProcessAPI]:
    with InProcessAPI(fast_config(tmp_path)) as fake:
        yield fake


@pytest.fixture
def settings(tmp_path: Path, api: InProcessAPI) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'editbatch.db'}",
        openai_base_url=api.base_url,
        openai_api_key=FAKE_KEY,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
        request_timeout_seconds=10,
        lease_seconds=60,
    )


def route(settings: Settings, db: Database, api: InProcessAPI) -> RouteContext:
    deps = build_deps(settings, LocalLimiter(None, None), db, http_client=api.client())
    deps.sleep = lambda _s: None
    return RouteContext.build(deps)


def rows(folder: Path, count: int, **overrides: Any) -> list[dict[str, Any]]:
    """`count` cheap rows over distinct 64x64 images (gpt-image-2, 256x256, low)."""
    out = []
    for i in range(count):
        img = make_image(folder / f"img{i:04d}.png", size=(64, 64), color=(i % 251, 7, 99))
        row: dict[str, Any] = {
            "id": f"SKU{i:04d}",
            "image": img.name,
            "prompt": f"white background {i}",
            "model": MODEL,
            "size": "256x256",
            "quality": "low",
        }
        row.update(overrides)
        out.append(row)
    return out


def submit(
    tmp_path: Path, db: Database, manifest_rows: list[dict[str, Any]], **options: Any
) -> int:
    manifest = write_manifest(tmp_path / "in" / f"m{time.monotonic_ns()}.csv", manifest_rows)
    options.setdefault("route", "batch")
    return new_batch(db, manifest, str(tmp_path / "out"), **options).batch_id


def run_until_done(ctx: RouteContext, batch_id: int, timeout: float = 30.0) -> None:
    """Tick the batch until nothing is left for it (what `editbatch run --route batch` does)."""
    deadline = time.monotonic() + timeout
    poll.run_local(ctx, batch_id, lambda: time.monotonic() > deadline, 0.02)
    assert time.monotonic() <= deadline, "the batch did not finish in time"


def jobs_by_state(db: Database, batch_id: int) -> dict[str, int]:
    with db.session() as s:
        return dict(
            s.execute(
                select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state)
            ).all()
        )


def ledger(db: Database, batch_id: int) -> Decimal:
    with db.session() as s:
        costs = s.scalars(
            select(Attempt.cost_usd)
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch_id)
        )
        return sum((Decimal(c) for c in costs), Decimal(0))


def bill(api: InProcessAPI) -> tuple[Decimal, dict[str, Decimal]]:
    return billed_total(Path(str(api.config.billing_log)))


def test_a_batch_runs_as_provider_batches_at_half_price_and_matches_the_bill(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """Two models make two provider batches; every job succeeds with its outputs under the
    chosen names; each distinct input is uploaded once (by its bytes, whatever its path); the
    ledger equals the sandbox's bill exactly (line costs kept to 9 decimal places); the
    provider's files are deleted afterwards."""
    more = rows(tmp_path / "in" / "b", 2, model="gpt-image-2.5-sunburst")  # same bytes as 0, 1
    for i, row in enumerate(more):
        row["id"], row["image"] = f"X{i}", f"b/{row['image']}"
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 6) + more)
    ctx = route(settings, db, api)
    run_until_done(ctx, batch_id)

    assert jobs_by_state(db, batch_id) == {"succeeded": 8}
    with db.session() as s:
        pbs = s.scalars(select(ProviderBatch).where(ProviderBatch.batch_id == batch_id)).all()
        assert sorted(pb.model for pb in pbs) == [MODEL, "gpt-image-2.5-sunburst"]
        assert all(pb.state == "collected" and pb.provider_status == "completed" for pb in pbs)
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
        outputs = s.scalars(select(Output).join(Job).where(Job.batch_id == batch_id)).all()
        assert len(outputs) == 8 and all(o.uri and Path(o.uri).is_file() for o in outputs)
        assert s.scalar(select(func.count()).select_from(ProviderFile)) == 6
        assert (
            s.scalar(
                select(func.count())
                .select_from(ProviderFile)
                .where(ProviderFile.deleted_at.is_(None))
            )
            == 0
        )
    stats = api.sandbox.snapshot()
    assert stats["uploads"]["count"] == 6 + 2  # 6 distinct images, 2 JSONL input files
    total, per_request = bill(api)
    assert len(per_request) == 8
    assert ledger(db, batch_id) == total
    # Every file the sandbox holds was deleted (inputs, JSONL inputs, outputs).
    assert api.sandbox.files.listed(None, True) == []


# -- crashes --------------------------------------------------------------------------------


def _expire_leases(db: Database) -> None:
    """Every lease has lapsed: the process that held it is gone."""
    with db.session() as s:
        s.execute(update(ProviderBatch).values(lease_until=None))
        s.commit()


def _remote_batches(api: InProcessAPI) -> list[Any]:
    return list(api.sandbox.batches.newest_first())


def test_a_crash_between_create_and_commit_leaves_exactly_one_provider_batch(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """The process dies after `batches.create` returned and before the commit: the provider
    batch exists, our row does not know its id. The next tick finds it by the token in its
    metadata and adopts it: one provider batch, every job billed once."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 3))
    ctx = route(settings, db, api)
    created = ctx.api.create

    def create_then_die(input_file_id: str, metadata: dict[str, str]) -> Any:
        created(input_file_id, metadata)
        raise SystemExit("killed between batches.create and the commit")

    ctx.api.create = create_then_die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        dispatch.dispatch(ctx, batch_id)
    with db.session() as s:
        pb = s.scalars(select(ProviderBatch)).one()
        assert (pb.state, pb.provider_id) == ("preparing", None) and pb.create_started_at
    assert len(_remote_batches(api)) == 1

    _expire_leases(db)
    survivor = route(settings, db, api)
    run_until_done(survivor, batch_id)
    remote = _remote_batches(api)
    assert len(remote) == 1  # adopted, never created twice
    with db.session() as s:
        pb = s.scalars(select(ProviderBatch)).one()
        assert pb.provider_id == remote[0].id and pb.state == "collected"
    assert jobs_by_state(db, batch_id) == {"succeeded": 3}
    total, per_request = bill(api)
    assert len(per_request) == 3 and ledger(db, batch_id) == total


def test_a_crash_before_the_create_is_sent_creates_it_once_later(
    tmp_path: Path,
    db: Database,
    settings: Settings,
    api: InProcessAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process dies after recording that a create is starting, before sending it: the
    token finds nothing, and (after the settle time) the batch is created, once."""
    monkeypatch.setattr(dispatch, "CREATE_SETTLE_SECONDS", 0.0)
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 2))
    ctx = route(settings, db, api)

    def die(input_file_id: str, metadata: dict[str, str]) -> Any:
        raise SystemExit("killed before the create was sent")

    ctx.api.create = die  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        dispatch.dispatch(ctx, batch_id)
    assert _remote_batches(api) == []
    _expire_leases(db)
    run_until_done(route(settings, db, api), batch_id)
    assert len(_remote_batches(api)) == 1
    assert jobs_by_state(db, batch_id) == {"succeeded": 2}


def _wait_provider_final(ctx: RouteContext, batch_id: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll.refresh(ctx, [batch_id])
        if poll.collectable(ctx, [batch_id]):
            return
        time.sleep(0.02)
    raise AssertionError("the provider batch did not finish")


def test_a_collection_killed_midway_starts_again_without_booking_a_line_twice(
    tmp_path: Path,
    db: Database,
    settings: Settings,
    api: InProcessAPI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The collector dies after booking 4 of 10 lines. Another picks up at the stored offset;
    and even read again from the start, a booked line is skipped: 10 bookings, one output set
    per job, the ledger equal to the bill."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 10))
    ctx = route(settings, db, api)
    dispatch.dispatch(ctx, batch_id)
    _wait_provider_final(ctx, batch_id)
    record = collect._record
    booked = {"n": 0}

    def record_then_die(*args: Any, **kwargs: Any) -> bool:
        if booked["n"] == 4:
            raise SystemExit("collector killed mid-file")
        booked["n"] += 1
        return record(*args, **kwargs)

    monkeypatch.setattr(collect, "_record", record_then_die)
    (pb_id,) = poll.collectable(ctx, [batch_id])
    with pytest.raises(SystemExit):
        collect.collect(ctx, pb_id)
    monkeypatch.setattr(collect, "_record", record)
    assert jobs_by_state(db, batch_id) == {"succeeded": 4, "submitted": 6}
    with db.session() as s:
        pb = s.get(ProviderBatch, pb_id)
        assert pb is not None and pb.state == "collecting" and pb.booked == 4
        assert pb.output_offset > 0
        s.execute(update(ProviderBatch).values(output_offset=0))  # read it all again
        s.commit()
    _expire_leases(db)
    done = collect.collect(route(settings, db, api), pb_id)
    assert done is not None and (done.booked, done.skipped) == (6, 4)
    assert jobs_by_state(db, batch_id) == {"succeeded": 10}
    with db.session() as s:
        outputs = s.scalar(select(func.count()).select_from(Output))
        assert outputs == 10
        assert s.get(Batch, batch_id).state == "finished"  # type: ignore[union-attr]
    total, per_request = bill(api)
    assert len(per_request) == 10 and ledger(db, batch_id) == total


def test_a_collector_whose_lease_was_taken_stops(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """Two collectors never book the same provider batch at once: the one that lost its lease
    stops at its next line."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 2))
    ctx = route(settings, db, api)
    dispatch.dispatch(ctx, batch_id)
    _wait_provider_final(ctx, batch_id)
    (pb_id,) = poll.collectable(ctx, [batch_id])
    other = route(settings, db, api)
    assert collect.collect(other, pb_id) is not None  # collected everything
    with pytest.raises(LeaseLost):
        from pipeline.run.batchroute.context import keep_lease

        keep_lease(ctx, pb_id)


# -- what comes back --------------------------------------------------------------------------


def test_failed_lines_take_the_sync_routes_classes(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """A moderation block fails its job with the API's code; a 500 twice is sent again in a
    later provider batch and succeeds; a 500 every time fails after the attempt budget."""
    manifest_rows = rows(tmp_path / "in", 4)
    manifest_rows[1]["prompt"] = "blocked #sandbox:moderation"
    manifest_rows[2]["prompt"] = "flaky #sandbox:500x2"
    manifest_rows[3]["prompt"] = "broken #sandbox:500"
    batch_id = submit(tmp_path, db, manifest_rows)
    run_until_done(route(settings.model_copy(update={"max_attempts": 3}), db, api), batch_id)
    with db.session() as s:
        got = {
            j.row_number: (j.state, j.attempts, j.last_error_code)
            for j in s.scalars(select(Job).where(Job.batch_id == batch_id))
        }
        pbs = s.scalar(select(func.count()).select_from(ProviderBatch))
    assert got[1] == ("succeeded", 1, None)
    assert got[2] == ("failed", 1, "moderation_blocked")
    assert got[3] == ("succeeded", 3, None)
    assert got[4][0:2] == ("failed", 3) and got[4][2] == "server_error"
    assert pbs == 3  # the first, then two more for what came back 500
    total, _ = bill(api)
    assert ledger(db, batch_id) == total
    status = _status(db, batch_id)
    assert status.counts["failed"] == 2 and status.state == "finished"


def _status(db: Database, batch_id: int) -> Any:
    with db.session() as s:
        return batch_status(s, batch_id)


def _slow(api: InProcessAPI, lines_per_second: float) -> None:
    api.config.batch_lines_per_second = lines_per_second


def _wait_lines_done(api: InProcessAPI, count: int, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for remote in _remote_batches(api):
            if remote.done_lines >= count:
                return str(remote.id)
        time.sleep(0.005)
    raise AssertionError(f"{count} lines not answered in time")


def _expire(api: InProcessAPI, remote_id: str) -> None:
    with api.client() as http:
        answer = http.post(f"http://sandbox.test/sandbox/batches/{remote_id}/expire")
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("fallback", [None, "sync"])
def test_an_expired_provider_batch_books_what_finished_and_sends_the_rest_again(
    tmp_path: Path,
    db: Database,
    settings: Settings,
    api: InProcessAPI,
    fallback: str | None,
) -> None:
    """The provider batch expires with about 30% of its lines unfinished: the finished lines
    are booked and collected, the expired ones complete in a later provider batch (or on the
    sync route with `--fallback sync`), and every job is billed exactly once."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 20), fallback=fallback)
    ctx = route(settings, db, api)
    if fallback:
        from pipeline.run.localpool import LocalPool

        ctx.send_sync = LocalPool(ctx.deps, 4).run_ids
    _slow(api, 40)
    dispatch.dispatch(ctx, batch_id)
    remote_id = _wait_lines_done(api, 14)
    _expire(api, remote_id)
    _slow(api, 2000)
    run_until_done(ctx, batch_id)

    assert jobs_by_state(db, batch_id) == {"succeeded": 20}
    with db.session() as s:
        first = s.scalars(select(ProviderBatch).order_by(ProviderBatch.id)).first()
        assert first is not None and first.provider_status == "expired"
        expired = s.scalars(select(Attempt).where(Attempt.error_code == "batch_expired")).all()
        assert 1 <= len(expired) <= 7 and all(a.cost_usd == 0 for a in expired)
        ok = s.scalars(select(Attempt).where(Attempt.outcome == "ok")).all()
        assert len(ok) == 20  # one paid answer per job
        second_try = {a.job_id for a in expired}
        late = [a for a in ok if a.job_id in second_try]
        if fallback:
            assert all(a.provider_batch_id is None for a in late)  # bought on the sync route
        else:
            assert all(a.provider_batch_id not in (None, first.id) for a in late)
    total, per_request = bill(api)
    assert len(per_request) == 20 and ledger(db, batch_id) == total
    lines = Path(str(api.config.billing_log)).read_text().splitlines()
    routes = {json.loads(line)["route"] for line in lines}
    assert routes == ({"batch", "sync"} if fallback else {"batch"})


def test_cancel_midway_books_what_the_provider_finished_and_cancels_the_rest(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """`cancel` while the provider batch runs: the lines it finished are billed, collected
    and booked; the others are cancelled; the ledger equals the bill."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 20))
    ctx = route(settings, db, api)
    _slow(api, 40)
    dispatch.dispatch(ctx, batch_id)
    _wait_lines_done(api, 8)
    with db.session() as s:
        controls.cancel(s, batch_id)
    assert poll.cancel_open(ctx, [batch_id])
    run_until_done(ctx, batch_id)

    counts = jobs_by_state(db, batch_id)
    assert set(counts) == {"succeeded", "cancelled"} and counts["succeeded"] >= 8
    total, per_request = bill(api)
    assert len(per_request) == counts["succeeded"] and ledger(db, batch_id) == total
    with db.session() as s:
        pb = s.scalars(select(ProviderBatch)).one()
        assert (pb.provider_status, pb.state) == ("cancelled", "collected")
        assert s.get(Batch, batch_id).state == "cancelled"  # type: ignore[union-attr]
        outputs = s.scalar(select(func.count()).select_from(Output).where(Output.uri.is_not(None)))
    assert outputs == counts["succeeded"]


def test_a_budget_for_half_the_batch_creates_no_provider_batch_past_it(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """The budget holds the high estimate of 5 of 10 lines: one provider batch of 5 lines is
    created, the batch is held with the budget's reason, nothing more is sent."""
    ctx = route(settings, db, api)
    from pipeline.cost.estimate import estimate_cost
    from pipeline.spec import EditSpec

    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 10), budget_usd=Decimal("1000"))
    with db.session() as s:
        first = s.scalars(select(Job.spec).where(Job.batch_id == batch_id)).first()
    assert first is not None
    spec = EditSpec.from_json(first)
    high = estimate_cost(spec, ((64, 64),), ctx.prices).high
    assert high is not None
    with db.session() as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(budget_usd=high * 5 + high / 2))
        s.commit()
    run_until_done(ctx, batch_id)
    with db.session() as s:
        pbs = s.scalars(select(ProviderBatch)).all()
        batch = s.get(Batch, batch_id)
        assert batch is not None
        assert [pb.lines for pb in pbs] == [5], (batch.state, batch.hold_reason, high)
        assert batch.state == "held" and batch.hold_code == "budget"
        assert "editbatch resume" in (batch.hold_reason or "")
        assert Decimal(batch.reserved_usd) <= batch.budget_usd  # type: ignore[operator]
    assert jobs_by_state(db, batch_id) == {"succeeded": 5, "queued": 5}
    total, per_request = bill(api)
    assert len(per_request) == 5 and ledger(db, batch_id) == total <= high * 5


def test_a_second_night_uploads_and_sends_only_what_changed(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """Night 2 repeats night 1 with 1 row of 10 changed (a new image): 9 jobs reuse night 1's
    outputs at $0, one line is sent, one image and one JSONL file are uploaded."""
    first = rows(tmp_path / "in", 10)
    night1 = submit(tmp_path, db, first)
    ctx = route(settings, db, api)
    run_until_done(ctx, night1)
    uploads_before = api.sandbox.snapshot()["uploads"]["count"]
    _, billed_before = bill(api)

    second = [dict(r) for r in first]
    new = make_image(tmp_path / "in" / "new.png", size=(64, 64), color=(1, 2, 3))
    second[3]["image"] = new.name
    night2 = submit(tmp_path, db, second)
    run_until_done(ctx, night2)

    assert jobs_by_state(db, night2) == {"succeeded": 10}
    assert api.sandbox.snapshot()["uploads"]["count"] - uploads_before == 2
    _, billed_after = bill(api)
    assert len(billed_after) - len(billed_before) == 1
    status = _status(db, night2)
    assert status.reused == 9 and status.saved_usd > 0
    with db.session() as s:
        (pb,) = s.scalars(select(ProviderBatch).where(ProviderBatch.batch_id == night2)).all()
        assert pb.lines == 1


def test_an_input_deleted_at_the_provider_is_uploaded_again(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """A file we recorded is gone at the provider (deleted elsewhere, expired): it is not
    reused but uploaded again before the line is sent."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 1), keep_provider_files=True)
    ctx = route(settings, db, api)
    run_until_done(ctx, batch_id)
    with db.session() as s:
        kept = s.scalars(select(ProviderFile)).one()
        assert kept.deleted_at is None
    assert ctx.api.delete_file(kept.file_id)
    again = rows(tmp_path / "in", 1, prompt="another edit")
    batch2 = submit(tmp_path, db, again)
    run_until_done(ctx, batch2)
    assert jobs_by_state(db, batch2) == {"succeeded": 1}
    with db.session() as s:
        files = s.scalars(select(ProviderFile).order_by(ProviderFile.id)).all()
        assert len(files) == 2 and files[0].deleted_at is not None


def test_a_paused_batch_sends_nothing_and_resume_sends_it(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 3))
    ctx = route(settings, db, api)
    with db.session() as s:
        controls.pause(s, batch_id)
    assert dispatch.dispatch(ctx, batch_id) == []
    assert _remote_batches(api) == []
    with db.session() as s:
        controls.resume(s, batch_id)
    run_until_done(ctx, batch_id)
    assert jobs_by_state(db, batch_id) == {"succeeded": 3}


def test_a_message_for_a_batch_route_job_does_not_buy_it_on_the_sync_route(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """A stale `editbatch.edit` message for a job of a batch-route batch leaves it queued."""
    from pipeline.run.executor import process_job

    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 1))
    ctx = route(settings, db, api)
    with db.session() as s:
        job_id = s.scalars(select(Job.id).where(Job.batch_id == batch_id)).one()
    result = process_job(job_id, ctx.deps)
    assert result.state == "queued"
    assert api.requests == 0
    assert jobs_by_state(db, batch_id) == {"queued": 1}


def test_an_auth_error_on_a_line_holds_the_batch_and_resume_sends_it_again(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """A 403 line (organization not verified) holds the batch with the API's reason; nothing
    more is sent; after `resume` the held job goes out in a new provider batch."""
    manifest_rows = rows(tmp_path / "in", 3)
    manifest_rows[0]["prompt"] = "needs verification #sandbox:403x1"
    batch_id = submit(tmp_path, db, manifest_rows)
    ctx = route(settings, db, api)
    run_until_done(ctx, batch_id)
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "held" and batch.hold_code == "auth"
        assert (batch.hold_reason or "").startswith("403")
    assert jobs_by_state(db, batch_id) == {"succeeded": 2, "held": 1}
    with db.session() as s:
        controls.resume(s, batch_id)
    run_until_done(ctx, batch_id)
    assert jobs_by_state(db, batch_id) == {"succeeded": 3}
    total, _ = bill(api)
    assert ledger(db, batch_id) == total


def test_retry_failed_sends_the_failed_jobs_in_a_new_provider_batch(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """`retry --failed --prompt P` on the batch route: the failed job goes out again with the
    new prompt, its earlier attempt stays in the ledger, successes are kept."""
    manifest_rows = rows(tmp_path / "in", 2)
    manifest_rows[1]["prompt"] = "blocked #sandbox:moderation"
    batch_id = submit(tmp_path, db, manifest_rows)
    ctx = route(settings, db, api)
    run_until_done(ctx, batch_id)
    assert jobs_by_state(db, batch_id) == {"succeeded": 1, "failed": 1}
    with db.session() as s:
        assert controls.retry_failed(s, batch_id, prompt="a kinder prompt").count == 1
    run_until_done(ctx, batch_id)
    assert jobs_by_state(db, batch_id) == {"succeeded": 2}
    with db.session() as s:
        job = s.scalars(select(Job).where(Job.batch_id == batch_id, Job.row_number == 2)).one()
        outcomes = s.scalars(
            select(Attempt.outcome).where(Attempt.job_id == job.id).order_by(Attempt.number)
        ).all()
        assert list(outcomes) == ["failed", "ok"] and job.attempt_base == 1
        assert s.scalar(select(func.count()).select_from(ProviderBatch)) == 2


def test_route_options_are_checked_with_the_option_named() -> None:
    from pipeline.batch.submit import BatchOptions
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--route 'night'"):
        BatchOptions(output_uri="o", route="night")
    with pytest.raises(ConfigError, match="--fallback"):
        BatchOptions(output_uri="o", route="batch", fallback="email")
    with pytest.raises(ConfigError, match="add --route batch"):
        BatchOptions(output_uri="o", fallback="sync")
    with pytest.raises(ConfigError, match="EDITBATCH_NIGHTLY_ROUTE='tonight': not a route"):
        Settings(nightly_route="tonight")
    assert Settings(nightly_route="Batch").nightly_route == "batch"


def test_an_input_gone_since_preflight_holds_the_batch_and_sends_nothing(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    manifest_rows = rows(tmp_path / "in", 2)
    batch_id = submit(tmp_path, db, manifest_rows)
    (tmp_path / "in" / manifest_rows[1]["image"]).unlink()
    run_until_done(route(settings, db, api), batch_id)
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.hold_code == "input_unreadable"
        assert f"editbatch resume {batch_id}" in (batch.hold_reason or "")
        pb = s.scalars(select(ProviderBatch)).one()
        assert pb.state == "abandoned"
        assert s.scalar(select(func.count()).select_from(Attempt)) == 0  # nothing was sent
    assert jobs_by_state(db, batch_id) == {"queued": 2}
    assert _remote_batches(api) == []


def test_an_output_file_gone_at_the_provider_holds_the_batch_and_says_why(
    tmp_path: Path, db: Database, settings: Settings, api: InProcessAPI
) -> None:
    """The provider deleted the output file before it was read (its 30-day retention): the
    answers were billed and cannot be collected. Nothing is guessed: the batch is held, the
    reason says so, the lines stay submitted."""
    batch_id = submit(tmp_path, db, rows(tmp_path / "in", 2))
    ctx = route(settings, db, api)
    dispatch.dispatch(ctx, batch_id)
    _wait_provider_final(ctx, batch_id)
    with db.session() as s:
        pb = s.scalars(select(ProviderBatch)).one()
    assert pb.output_file_id and ctx.api.delete_file(pb.output_file_id)
    assert collect.collect(ctx, pb.id) is None
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "held"
        assert batch.hold_code == "provider_refused" and "gone" in (batch.hold_reason or "")
    assert jobs_by_state(db, batch_id) == {"submitted": 2}
