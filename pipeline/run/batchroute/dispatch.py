"""Queued jobs of a batch-route batch -> provider batches, each created exactly once.

    dispatch(ctx, batch_id)
      reuse     a queued job whose twin already succeeded copies its outputs, at $0
      cut       per model, at most `batch_max_lines` lines and `batch_max_bytes` bytes; a job
                whose twin is in flight (or earlier in the same cut) waits for it, queued
      reserve   the lines' high estimates at batch prices, as many lines as the budget holds
                (the batch is held, with the reason, for the rest)
      intent    one transaction: jobs queued -> submitted, an `in_flight` attempt per job (its
                custom_id names the job and the attempt), the provider batch `preparing`, with
                a random token and a lease
      prepare   upload the inputs (once per sha256), write and upload the JSONL, record that a
                create is starting, create the batch with the token in its metadata -> `open`

    prepare(ctx, pb)  is also how a `preparing` provider batch whose process died is finished
                (the tick takes its lapsed lease): if a create may have been sent, the token is
                looked for first (`batches.list`) and the batch found is adopted, so a crash
                between `batches.create` and the commit never makes a second provider batch.

A provider batch that cannot be created is `abandoned`: its attempts are deleted (nothing was
sent), its jobs queued again (or cancelled with their batch) and its reservation released; a
refusal (quota, auth, a 400) holds the batch with the provider's reason.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from decimal import Decimal
from pathlib import Path

from sqlalchemy import ColumnElement, delete, insert, or_, select, update

from pipeline.cost import budget
from pipeline.cost.estimate import estimate_cost
from pipeline.db import jobs
from pipeline.db.models import Attempt, Batch, Job, ProviderBatch, utcnow
from pipeline.errors import LeaseLost, ProviderError
from pipeline.files import image_sizes
from pipeline.run import executor
from pipeline.run.batchroute import lines, uploads
from pipeline.run.batchroute.api import BATCH_PURPOSE, RemoteBatch
from pipeline.run.batchroute.context import (
    RouteContext,
    keep_lease,
    release_lease,
    remote_values,
)
from pipeline.spec import EditSpec
from pipeline.states import (
    AttemptOutcome,
    BatchState,
    HoldCode,
    JobState,
    ProviderBatchState,
    Route,
)

log = logging.getLogger("editbatch.batchroute")

TOKEN_KEY = "editbatch_token"
IN_CHUNK = 900  # ids per IN (...) list: under SQLite's bound-parameter limit
# A create that may have been sent but is not listed yet is looked for again this long before
# it is sent a second time (the list could lag behind the create).
CREATE_SETTLE_SECONDS = 60.0
CLOCK_SKEW_SECONDS = 3600


@dataclass(frozen=True)
class _Line:
    job_id: int
    spec: EditSpec
    high: Decimal  # what its call may cost at most, at batch prices (reserved if budgeted)


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), IN_CHUNK):
        yield ids[i : i + IN_CHUNK]


def _on_route() -> ColumnElement[bool]:
    """Jobs that follow their batch's route (none of its own), or chose the batch route."""
    return or_(Job.route.is_(None), Job.route == Route.BATCH)


def dispatch(ctx: RouteContext, batch_id: int) -> list[int]:
    """Send the batch's queued jobs as provider batches; the ids of those created."""
    with ctx.deps.db.session() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.state != BatchState.RUNNING or batch.route != Route.BATCH:
            return []
        reuse = bool(batch.settings.get("reuse", True))
    if reuse:
        _reuse_done(ctx, batch_id)
    created: list[int] = []
    for model in _queued_models(ctx, batch_id):
        after = 0
        while True:
            cut, after, more = _cut(ctx, batch_id, model, after, reuse)
            if cut:
                fitted, short = _fit_budget(ctx, batch_id, cut)
                pb_id = _intent(ctx, batch_id, model, fitted) if fitted else None
                if pb_id is not None:
                    prepare(ctx, pb_id)
                    created.append(pb_id)
                if short is not None and _held_for(ctx, batch_id, short):
                    return created
            if not more:
                break
    return created


# -- choosing the lines ---------------------------------------------------------------------


def _reuse_done(ctx: RouteContext, batch_id: int) -> None:
    """Queued jobs whose identical twin already succeeded take copies of its outputs ($0)."""
    twin = Job.__table__.alias("twin")
    with ctx.deps.db.session() as session:
        ids = list(
            session.scalars(
                select(Job.id).where(
                    Job.batch_id == batch_id,
                    Job.state == JobState.QUEUED,
                    _on_route(),
                    Job.fingerprint.is_not(None),
                    select(twin.c.id)
                    .where(
                        twin.c.fingerprint == Job.fingerprint,
                        twin.c.state == JobState.SUCCEEDED,
                        twin.c.id != Job.id,
                    )
                    .exists(),
                )
            )
        )
    for job_id in ids:
        executor.reuse_if_done(job_id, ctx.deps)


def _queued_models(ctx: RouteContext, batch_id: int) -> list[str]:
    with ctx.deps.db.session() as session:
        return sorted(
            m
            for m in session.scalars(
                select(Job.model)
                .where(Job.batch_id == batch_id, Job.state == JobState.QUEUED, _on_route())
                .distinct()
            )
            if m is not None
        )


def _busy(ctx: RouteContext, fingerprints: set[str]) -> set[str]:
    """Fingerprints an identical job is being bought for right now (any batch, any route)."""
    found: set[str] = set()
    ordered = sorted(fingerprints)
    in_flight = (JobState.RUNNING, JobState.RETRYING, JobState.SUBMITTED)
    with ctx.deps.db.session() as session:
        for i in range(0, len(ordered), IN_CHUNK):
            found.update(
                f
                for f in session.scalars(
                    select(Job.fingerprint)
                    .where(Job.fingerprint.in_(ordered[i : i + IN_CHUNK]), Job.state.in_(in_flight))
                    .distinct()
                )
                if f is not None
            )
    return found


def _cut(
    ctx: RouteContext, batch_id: int, model: str, after: int, reuse: bool
) -> tuple[list[_Line], int, bool]:
    """The next provider batch's lines for `model` among queued jobs with id > `after`:
    (lines, the id to continue after, whether more jobs may follow)."""
    settings = ctx.deps.settings
    with ctx.deps.db.session() as session:
        rows = list(
            session.execute(
                select(Job.id, Job.spec, Job.fingerprint)
                .where(
                    Job.batch_id == batch_id,
                    Job.state == JobState.QUEUED,
                    Job.model == model,
                    _on_route(),
                    Job.id > after,
                )
                .order_by(Job.id)
                .limit(settings.batch_max_lines)
            )
        )
    if not rows:
        return [], after, False
    busy = _busy(ctx, {r.fingerprint for r in rows if r.fingerprint}) if reuse else set()
    seen: set[str] = set()
    cut: list[_Line] = []
    size = 0
    last = after
    prices = ctx.prices
    for row in rows:
        spec = EditSpec.from_json(row.spec)
        if reuse and row.fingerprint:
            if row.fingerprint in busy or row.fingerprint in seen:
                last = row.id  # waits, queued, for its twin; reused once that succeeds
                continue
            seen.add(row.fingerprint)
        bound = lines.line_size_bound(spec, lines.custom_id(batch_id, row.id, 999))
        if cut and size + bound > settings.batch_max_bytes:
            return cut, last, True
        size += bound
        est = estimate_cost(spec, image_sizes(spec.images), prices)
        cut.append(_Line(row.id, spec, est.high if est.high is not None else Decimal(-1)))
        last = row.id
    return cut, last, len(rows) == settings.batch_max_lines


def _fit_budget(
    ctx: RouteContext, batch_id: int, cut: list[_Line]
) -> tuple[list[_Line], Decimal | None]:
    """The lines the budget holds, their reservation made, and what the first line left out
    needs (None when all fit). Without a batch budget or a daily cap nothing is reserved."""
    cap = ctx.deps.settings.daily_budget_usd
    today = utcnow().date()
    with ctx.deps.db.session() as session:
        limit, reserved = session.execute(
            select(Batch.budget_usd, Batch.reserved_usd).where(Batch.id == batch_id)
        ).one()
        if limit is None and cap is None:
            return [_Line(x.job_id, x.spec, Decimal(0)) for x in cut], None
        if any(x.high < 0 for x in cut):  # a model with no price: no budget can be enforced
            unpriced = next(x for x in cut if x.high < 0)
            est = estimate_cost(unpriced.spec, (), ctx.prices)
            budget.reserve_call(session, batch_id, est, cap, today)  # refused: held
            return [], None
        room = None if limit is None else Decimal(limit) - Decimal(reserved or 0)
        if cap is not None:
            day_room = Decimal(cap) - budget.daily_spent(session, today)
            room = day_room if room is None else min(room, day_room)
        fitted: list[_Line] = []
        total = Decimal(0)
        for line in cut:
            if room is not None and total + line.high > room:
                break
            fitted.append(line)
            total += line.high
        if fitted and budget.reserve(session, batch_id, total, cap, today) is not None:
            return [], None  # refused after all (another process spent the room): held
    return fitted, (cut[len(fitted)].high if len(fitted) < len(cut) else None)


def _held_for(ctx: RouteContext, batch_id: int, amount: Decimal) -> bool:
    """Hold the batch for the budget, with the reason a person reads (what the next line
    needs), unless the room came back meanwhile; True if held."""
    cap = ctx.deps.settings.daily_budget_usd
    today = utcnow().date()
    with ctx.deps.db.session() as session:
        if budget.reserve(session, batch_id, amount, cap, today) is not None:
            return True
        budget.settle(session, batch_id, amount, Decimal(0), today)
        session.commit()
    return False


# -- the intent -----------------------------------------------------------------------------


def _intent(ctx: RouteContext, batch_id: int, model: str, cut: list[_Line]) -> int | None:
    """Record the provider batch before any call: jobs submitted, attempts in flight, the row
    `preparing` with its token and our lease. None if the batch stopped or another process
    took some of the jobs first (the reservation is given back)."""
    ids = [x.job_id for x in cut]
    highs = {x.job_id: x.high for x in cut}
    total = sum(highs.values(), Decimal(0))
    today = utcnow().date()
    budgeted = any(h > 0 for h in highs.values())
    with ctx.deps.db.session() as session:
        state = session.scalar(select(Batch.state).where(Batch.id == batch_id).with_for_update())
        moved = 0
        if state == BatchState.RUNNING:
            for chunk in _chunks(ids):
                moved += jobs.move_jobs(
                    session, JobState.SUBMITTED, Job.id.in_(chunk), sources=[JobState.QUEUED]
                )
        if moved != len(ids):
            session.rollback()
            if budgeted:
                budget.settle(session, batch_id, total, Decimal(0), today)
                session.commit()
            return None
        pb = ProviderBatch(
            batch_id=batch_id,
            token=secrets.token_hex(16),
            model=model,
            state=ProviderBatchState.PREPARING,
            lines=len(ids),
            reserved_usd=total,
            reserved_on=today if budgeted else None,
            lease_until=ctx.lease(),
            lease_token=ctx.holder,
        )
        session.add(pb)
        session.flush()
        now = utcnow()
        rows = []
        for chunk in _chunks(ids):
            for job_id, done in session.execute(
                select(Job.id, Job.attempts).where(Job.id.in_(chunk))
            ):
                rows.append(
                    {
                        "job_id": job_id,
                        "number": done + 1,
                        "started_at": now,
                        "outcome": AttemptOutcome.IN_FLIGHT,
                        "provider_batch_id": pb.id,
                        "reserved_usd": highs[job_id] if budgeted else None,
                        "cost_usd": Decimal(0),
                        "cost_estimated": False,
                        "priced": True,
                    }
                )
            session.execute(
                update(Job)
                .where(Job.id.in_(chunk))
                .values(attempts=Job.attempts + 1, updated_at=now)
                .execution_options(synchronize_session=False)
            )
        session.execute(insert(Attempt), rows)
        session.commit()
        log.info(
            "batch %s: provider batch %s prepared, %s lines of %s", batch_id, pb.id, len(ids), model
        )
        return pb.id


# -- preparing: uploads, the JSONL, the create ----------------------------------------------


def prepare(ctx: RouteContext, pb_id: int) -> None:
    """Bring a `preparing` provider batch (whose lease we hold) to `open`, or abandon it."""
    with ctx.deps.db.session() as session:
        pb = session.get(ProviderBatch, pb_id)
        if pb is None or pb.state != ProviderBatchState.PREPARING:
            return
        session.expunge(pb)
        batch_state = session.scalar(select(Batch.state).where(Batch.id == pb.batch_id))
    try:
        if pb.create_started_at is not None:
            found = ctx.api.find(TOKEN_KEY, pb.token, _since(pb))
            if found is not None:
                _adopt(ctx, pb, found)
                return
            started = pb.create_started_at
            started = started if started.tzinfo else started.replace(tzinfo=UTC)
            if utcnow() - started < timedelta(seconds=CREATE_SETTLE_SECONDS):
                release_lease(ctx, pb.id)  # not listed yet: look again on a later tick
                return
        if batch_state != BatchState.RUNNING:
            _abandon(ctx, pb, f"batch {pb.batch_id} is {batch_state}: nothing was sent")
            return
        if pb.input_file_id is None:
            _upload_input(ctx, pb)
        _create(ctx, pb)
    except LeaseLost:
        log.info("provider batch %s: taken over by another process", pb.id)
    except OSError as exc:  # an input deleted or moved since preflight
        reason = f"an input file cannot be read ({exc}): restore it, then editbatch resume"
        _abandon(ctx, pb, f"{reason} {pb.batch_id}", hold=HoldCode.INPUT_UNREADABLE)
    except ProviderError as exc:
        if exc.kind == AttemptOutcome.TRANSIENT:
            log.warning("provider batch %s: %s; trying again on the next tick", pb.id, exc)
            release_lease(ctx, pb.id)
            return
        code = HoldCode.PROVIDER_REFUSED
        if exc.kind == AttemptOutcome.HOLD:
            code = HoldCode.QUOTA if exc.status == 429 else HoldCode.AUTH
        _abandon(ctx, pb, str(exc), hold=code)


def _since(pb: ProviderBatch) -> int:
    started = pb.create_started_at or pb.created_at
    started = started if started.tzinfo else started.replace(tzinfo=UTC)
    return int(started.timestamp()) - CLOCK_SKEW_SECONDS


def _members(ctx: RouteContext, pb_id: int) -> Iterator[tuple[int, int, int, EditSpec]]:
    """(attempt id, job id, attempt number, spec) of every line, in job order, streamed."""
    last = 0
    while True:
        with ctx.deps.db.session() as session:
            rows = list(
                session.execute(
                    select(Attempt.id, Attempt.job_id, Attempt.number, Job.spec, Job.batch_id)
                    .join(Job, Job.id == Attempt.job_id)
                    .where(Attempt.provider_batch_id == pb_id, Attempt.id > last)
                    .order_by(Attempt.id)
                    .limit(1000)
                )
            )
        if not rows:
            return
        for r in rows:
            yield r.id, r.job_id, r.number, EditSpec.from_json(r.spec)
        last = rows[-1].id


def _upload_input(ctx: RouteContext, pb: ProviderBatch) -> None:
    """Upload the inputs, then the JSONL of every line; record the input file (lease held)."""
    paths = (p for *_, spec in _members(ctx, pb.id) for p in lines.input_paths(spec))
    file_ids = uploads.upload_inputs(ctx, pb.id, paths, lambda: keep_lease(ctx, pb.id))
    folder = ctx.deps.settings.effective_spool_dir / "provider"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{pb.token}.jsonl"
    try:
        with path.open("wb") as out:
            for _attempt_id, job_id, number, spec in _members(ctx, pb.id):
                out.write(
                    lines.request_line(lines.custom_id(pb.batch_id, job_id, number), spec, file_ids)
                )
        keep_lease(ctx, pb.id)
        file_id, size = ctx.api.upload(path, BATCH_PURPOSE, f"editbatch-{pb.token}.jsonl")
    finally:
        Path(path).unlink(missing_ok=True)
    with ctx.deps.db.session() as session:
        result = session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb.id, ProviderBatch.lease_token == ctx.holder)
            .values(input_file_id=file_id, input_bytes=size, lease_until=ctx.lease())
            .execution_options(synchronize_session=False)
        )
        session.commit()
    if jobs.rowcount(result) != 1:
        ctx.api.delete_file(file_id)
        raise LeaseLost(f"provider batch {pb.id} was taken over while its input was uploaded")
    pb.input_file_id, pb.input_bytes = file_id, size


def _create(ctx: RouteContext, pb: ProviderBatch) -> None:
    """Say a create is starting (so a crash after it looks for the token), then create."""
    assert pb.input_file_id is not None
    now = utcnow()
    with ctx.deps.db.session() as session:
        result = session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb.id, ProviderBatch.lease_token == ctx.holder)
            .values(create_started_at=now, lease_until=ctx.lease())
            .execution_options(synchronize_session=False)
        )
        session.commit()
    if jobs.rowcount(result) != 1:
        raise LeaseLost(f"provider batch {pb.id} was taken over before its create")
    pb.create_started_at = now
    metadata = {
        TOKEN_KEY: pb.token,
        "editbatch_batch": str(pb.batch_id),
        "editbatch_provider_batch": str(pb.id),
    }
    remote = ctx.api.create(pb.input_file_id, metadata)
    _adopt(ctx, pb, remote)


def _adopt(ctx: RouteContext, pb: ProviderBatch, remote: RemoteBatch) -> None:
    """Record the provider's batch on our row: `preparing` -> `open` (once)."""
    values = {**remote_values(remote), "lease_until": None, "lease_token": None}
    with ctx.deps.db.session() as session:
        moved = jobs.move_provider_batch(
            session,
            ProviderBatchState.OPEN,
            ProviderBatch.id == pb.id,
            sources=[ProviderBatchState.PREPARING],
            values=values,
        )
        session.commit()
    if moved:
        log.info(
            "batch %s: provider batch %s is %s (%s lines)",
            pb.batch_id,
            remote.id,
            remote.status,
            pb.lines,
        )


def _abandon(
    ctx: RouteContext, pb: ProviderBatch, reason: str, hold: HoldCode | None = None
) -> None:
    """Nothing of this provider batch was sent: delete its attempts, queue its jobs again (or
    cancel them with their batch), release its reservation, and hold the batch if `hold`."""
    with ctx.deps.db.session() as session:
        batch_state = session.scalar(
            select(Batch.state).where(Batch.id == pb.batch_id).with_for_update()
        )
        moved = jobs.move_provider_batch(
            session,
            ProviderBatchState.ABANDONED,
            ProviderBatch.id == pb.id,
            sources=[ProviderBatchState.PREPARING],
            values={"error": reason[:4000]},
        )
        if not moved:
            session.rollback()
            return
        attempts = list(
            session.execute(
                select(Attempt.id, Attempt.job_id).where(
                    Attempt.provider_batch_id == pb.id,
                    Attempt.outcome == AttemptOutcome.IN_FLIGHT,
                )
            )
        )
        target = JobState.CANCELLED if batch_state == BatchState.CANCELLED else JobState.QUEUED
        for chunk in _chunks([a.id for a in attempts]):
            session.execute(delete(Attempt).where(Attempt.id.in_(chunk)))
        for chunk in _chunks([a.job_id for a in attempts]):
            session.execute(
                update(Job)
                .where(Job.id.in_(chunk))
                .values(attempts=Job.attempts - 1)
                .execution_options(synchronize_session=False)
            )
            jobs.move_jobs(session, target, Job.id.in_(chunk), sources=[JobState.SUBMITTED])
        if pb.reserved_on is not None and pb.reserved_usd:
            budget.settle(
                session, pb.batch_id, Decimal(pb.reserved_usd), Decimal(0), pb.reserved_on
            )
        if hold is not None:
            jobs.hold_batch(session, pb.batch_id, hold, reason)
        session.commit()
    log.warning("batch %s: provider batch %s abandoned: %s", pb.batch_id, pb.id, reason)
    if pb.input_file_id:
        uploads.delete_quietly(ctx, pb.input_file_id)
