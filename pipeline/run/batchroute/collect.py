"""A finished provider batch's output and error files, read as streams, each line booked once.

    collect(ctx, pb_id)     takes the provider batch (a lease: `open` with a final provider
                            status -> `collecting`, or `collecting` whose collector died)
      read                  the output file, then the error file, from the byte offset already
                            booked (an HTTP Range request), line by line: never whole
      book one line         its images spooled, then ONE transaction: the attempt (usage and
                            its exact cost at batch prices, request id), the job's move, its
                            outputs, the job's cost, the reservation swapped for the cost, the
                            file offset past the line and the lease renewed. Only an attempt
                            still `in_flight` is booked, so a line read twice counts once.
      not run               attempts no file answered (a cancelled or failed provider batch)
      close                 `collected`; its JSONL, output and error files deleted (unless
                            kept); jobs moved to the sync route sent there; the batch finished
                            if done (and then the inputs it uploaded deleted)

Where a line's job goes, by the class of its answer (as on the sync route):

    ok          succeeded (outputs collected to their final names)
    failed      failed with the API's code and message (invalid request, moderation)
    hold        held, and the batch held (quota: 429 insufficient_quota; auth: 401, 403)
    transient   (5xx, batch_expired, unreadable images, an input file gone) queued again for
                a later provider batch while it has attempts left, else failed; with
                `--fallback sync`, an expired line's job goes to the sync route instead;
                in a cancelled batch: cancelled
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update

from pipeline.cost import budget
from pipeline.cost.estimate import fallback_usage
from pipeline.db import jobs
from pipeline.db.models import Attempt, Batch, Job, Output, ProviderBatch, utcnow
from pipeline.errors import LeaseLost, ProviderError
from pipeline.files import image_sizes
from pipeline.output import collector, spool
from pipeline.run import executor
from pipeline.run.batchroute import lines, uploads
from pipeline.run.batchroute.context import (
    RouteContext,
    keep_lease,
    release_lease,
    take_lease,
)
from pipeline.run.retry import persist
from pipeline.spec import EditSpec
from pipeline.states import (
    PROVIDER_FINAL,
    AttemptOutcome,
    BatchState,
    HoldCode,
    JobState,
    ProviderBatchState,
    Route,
)

log = logging.getLogger("editbatch.batchroute")

IN_CHUNK = 900
FALLBACK_SYNC = "sync"


@dataclass
class Collected:
    """What one collection did."""

    booked: int = 0
    skipped: int = 0  # lines already booked (a collection that started again)
    not_run: int = 0
    to_sync: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Batch:
    id: int
    state: str
    fallback_sync: bool
    keep_files: bool


def collect(ctx: RouteContext, pb_id: int) -> Collected | None:
    """Collect provider batch `pb_id` if it is finished at the provider and nobody else is
    collecting it; what was done, or None. Safe to run again after a crash at any line."""
    pb = take_lease(ctx, pb_id, (ProviderBatchState.OPEN, ProviderBatchState.COLLECTING))
    if pb is None:
        return None
    if pb.state == ProviderBatchState.OPEN:
        if pb.provider_status not in PROVIDER_FINAL:
            release_lease(ctx, pb_id)
            return None
        with ctx.deps.db.session() as session:
            moved = jobs.move_provider_batch(
                session,
                ProviderBatchState.COLLECTING,
                ProviderBatch.id == pb_id,
                ProviderBatch.lease_token == ctx.holder,
                sources=[ProviderBatchState.OPEN],
            )
            session.commit()
        if not moved:
            return None
    batch = _batch(ctx, pb.batch_id)
    done = Collected()
    try:
        for which in ("output", "error"):
            file_id = pb.output_file_id if which == "output" else pb.error_file_id
            if file_id:
                _read(ctx, pb, batch, which, file_id, done)
        _not_run(ctx, pb, batch, done)
        with ctx.deps.db.session() as session:
            closed = jobs.move_provider_batch(
                session,
                ProviderBatchState.COLLECTED,
                ProviderBatch.id == pb_id,
                ProviderBatch.lease_token == ctx.holder,
                sources=[ProviderBatchState.COLLECTING],
            )
            session.commit()
    except LeaseLost:
        log.info("provider batch %s: another process took over its collection", pb_id)
        return None
    except ProviderError as exc:
        # The download broke (or the files are not readable yet): the offsets keep what was
        # booked; the next tick reads on from there.
        log.warning("provider batch %s: collection stopped: %s", pb_id, exc)
        if exc.status == 404:
            _gone(ctx, pb, str(exc))
        release_lease(ctx, pb_id)
        return None
    if not closed:
        return None
    log.info(
        "batch %s: provider batch %s collected: %s lines booked, %s not run",
        pb.batch_id,
        pb.provider_id,
        done.booked,
        done.not_run,
    )
    if not batch.keep_files:
        uploads.clean_up(ctx, pb)
    if done.to_sync and ctx.send_sync is not None:
        ctx.send_sync(done.to_sync)
    if executor.finish_if_done(ctx.deps, pb.batch_id) and not batch.keep_files:
        uploads.clean_inputs(ctx, pb.batch_id)
    return done


def _gone(ctx: RouteContext, pb: ProviderBatch, error: str) -> None:
    """The provider no longer has a file of this provider batch (deleted 30 days after the
    batch, or by hand): its answers were billed and cannot be read. Hold the batch and say so;
    the lines stay submitted until a person decides (nothing is guessed)."""
    reason = (
        f"provider batch {pb.provider_id}: a file of its answers is gone at the provider "
        f"({error}); the lines it holds were billed and cannot be collected"
    )
    with ctx.deps.db.session() as session:
        session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb.id)
            .values(error=reason[:4000])
            .execution_options(synchronize_session=False)
        )
        jobs.hold_batch(session, pb.batch_id, HoldCode.PROVIDER_REFUSED, reason)
        session.commit()


def _batch(ctx: RouteContext, batch_id: int) -> _Batch:
    with ctx.deps.db.session() as session:
        row = session.get(Batch, batch_id)
        assert row is not None
        return _Batch(
            batch_id,
            row.state,
            row.settings.get("fallback") == FALLBACK_SYNC,
            bool(row.settings.get("keep_provider_files", False)),
        )


def _read(
    ctx: RouteContext, pb: ProviderBatch, batch: _Batch, which: str, file_id: str, done: Collected
) -> None:
    offset = pb.output_offset if which == "output" else pb.error_offset
    with ctx.api.content(file_id, offset) as chunks:
        for raw, end in lines.split_lines(chunks, offset):
            _book(ctx, pb, batch, which, raw, end, done)


@dataclass(frozen=True)
class _Line:
    attempt_id: int
    job_id: int
    number: int
    spec: EditSpec
    reserved: Decimal | None
    attempts: int
    attempt_base: int


def _line_of(ctx: RouteContext, pb: ProviderBatch, answer: lines.Answer) -> _Line | None:
    """The attempt an answer books, if it is one of this provider batch's and not booked."""
    parsed = lines.parse_custom_id(answer.custom_id)
    if parsed is None or parsed[0] != pb.batch_id:
        return None
    _, job_id, number = parsed
    with ctx.deps.db.session() as session:
        row = session.execute(
            select(
                Attempt.id,
                Attempt.outcome,
                Attempt.reserved_usd,
                Job.spec,
                Job.attempts,
                Job.attempt_base,
            )
            .join(Job, Job.id == Attempt.job_id)
            .where(
                Attempt.job_id == job_id,
                Attempt.number == number,
                Attempt.provider_batch_id == pb.id,
            )
        ).one_or_none()
    if row is None or row.outcome != AttemptOutcome.IN_FLIGHT:
        return None
    reserved = None if row.reserved_usd is None else Decimal(row.reserved_usd)
    spec = EditSpec.from_json(row.spec)
    return _Line(row.id, job_id, number, spec, reserved, row.attempts, row.attempt_base)


def _book(
    ctx: RouteContext,
    pb: ProviderBatch,
    batch: _Batch,
    which: str,
    raw: bytes,
    end: int,
    done: Collected,
) -> None:
    try:
        answer = lines.read_answer(raw)
    except ValueError as exc:  # not an answer line: nothing to book
        log.warning("provider batch %s: %s line skipped: %s", pb.id, which, exc)
        return
    line = _line_of(ctx, pb, answer)
    if line is None:
        done.skipped += 1
        return
    if answer.file_gone:
        uploads.forget_file(ctx, answer.file_gone)
    paths = []
    if answer.kind == AttemptOutcome.OK:
        token = f"pb{pb.id}a{line.attempt_id}"
        paths = spool.write(
            ctx.deps.settings.effective_spool_dir,
            pb.batch_id,
            line.job_id,
            token,
            line.spec.ext,
            answer.images,
        )
    recorded = persist(
        f"job {line.job_id}: booking its batch line",
        lambda: _record(ctx, pb, batch, which, end, line, answer, paths, done),
        ctx.deps.sleep,
    )
    if not recorded:
        spool.discard(paths)
        return
    done.booked += 1
    if paths:
        persist(
            f"job {line.job_id}: collecting the outputs",
            lambda: collector.collect_job(ctx.deps.db, line.job_id, ctx.deps.storages),
            ctx.deps.sleep,
        )


def _cost(ctx: RouteContext, spec: EditSpec, answer: lines.Answer) -> tuple[Any, Decimal, bool]:
    """(usage, exact cost at batch prices, estimated?) of an answered line; no usage: 0."""
    usage = answer.usage
    estimated = False
    if usage is None and answer.status == 200:
        # Billed, but the answer carries no token counts: estimate from the published tables.
        usage = fallback_usage(spec, len(answer.images) or spec.n, image_sizes(spec.images))
        estimated = True
    if usage is None:
        return None, Decimal(0), False
    cost = ctx.prices.exact_cost(spec.model, usage)
    return usage, (cost if cost is not None else Decimal(0)), estimated or cost is None


def _record(
    ctx: RouteContext,
    pb: ProviderBatch,
    batch: _Batch,
    which: str,
    end: int,
    line: _Line,
    answer: lines.Answer,
    paths: list[Any],
    done: Collected,
) -> bool:
    """Book one line in one transaction; False if it was booked already (nothing changed)."""
    usage, cost, estimated = _cost(ctx, line.spec, answer)
    priced = usage is None or ctx.prices.get(line.spec.model) is not None
    with ctx.deps.db.session() as session:
        values: dict[str, Any] = {
            "finished_at": utcnow(),
            "outcome": answer.kind,
            "http_status": answer.status,
            "request_id": answer.request_id,
            "error_type": answer.error_type,
            "error_code": answer.error_code,
            "error_message": answer.error_message,
            "cost_usd": cost,
            "cost_estimated": estimated,
            "priced": priced,
        }
        if usage is not None:
            values.update(
                text_input_tokens=usage.text_input,
                image_input_tokens=usage.image_input,
                cached_input_tokens=usage.cached_text_input + usage.cached_image_input,
                image_output_tokens=usage.image_output,
                text_output_tokens=usage.text_output,
            )
        booked = session.execute(
            update(Attempt)
            .where(Attempt.id == line.attempt_id, Attempt.outcome == AttemptOutcome.IN_FLIGHT)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if jobs.rowcount(booked) != 1:
            session.rollback()
            return False
        jobs.add_cost(session, line.job_id, cost)
        if line.reserved is not None and pb.reserved_on is not None:
            budget.settle(session, pb.batch_id, line.reserved, cost, pb.reserved_on)
        state = session.scalar(select(Batch.state).where(Batch.id == pb.batch_id))
        _move_job(ctx, session, line, answer, state, batch, done, paths)
        offset = "output_offset" if which == "output" else "error_offset"
        kept = session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb.id, ProviderBatch.lease_token == ctx.holder)
            .values(
                {
                    offset: end,
                    "booked": ProviderBatch.booked + 1,
                    "cost_usd": ProviderBatch.cost_usd + cost,
                    "lease_until": ctx.lease(),
                }
            )
            .execution_options(synchronize_session=False)
        )
        if jobs.rowcount(kept) != 1:
            session.rollback()
            raise LeaseLost(f"provider batch {pb.id} was taken over during its collection")
        session.commit()
    return True


def _move_job(
    ctx: RouteContext,
    session: Any,
    line: _Line,
    answer: lines.Answer,
    batch_state: str | None,
    batch: _Batch,
    done: Collected,
    paths: list[Any],
) -> None:
    """Where the line's job goes (see the module docstring). Part of the booking transaction."""
    job = Job.id == line.job_id
    submitted = [JobState.SUBMITTED]
    code = answer.error_code or answer.error_type
    message = answer.error_message or code or "unknown error"
    if answer.kind == AttemptOutcome.OK:
        moved = jobs.move_jobs(
            session,
            JobState.SUCCEEDED,
            job,
            sources=submitted,
            values={"last_error_code": None, "last_error_message": None},
        )
        if moved:
            for index, path in enumerate(paths, start=1):
                session.add(Output(job_id=line.job_id, index=index, spool_path=str(path)))
        else:
            paths.clear()  # not ours to record: the spooled copies go
        return
    errors = {"last_error_code": code, "last_error_message": message}
    if batch_state == BatchState.CANCELLED:
        jobs.move_jobs(session, JobState.CANCELLED, job, sources=submitted, values=errors)
        return
    if answer.kind == AttemptOutcome.FAILED:
        jobs.move_jobs(session, JobState.FAILED, job, sources=submitted, values=errors)
        return
    if answer.kind == AttemptOutcome.HOLD:
        reason = f"{answer.status} {code}: {message}"
        hold = HoldCode.QUOTA if answer.status == 429 else HoldCode.AUTH
        jobs.hold_batch(session, batch.id, hold, reason)
        jobs.move_jobs(session, JobState.HELD, job, sources=submitted, values=errors)
        return
    if line.attempts - line.attempt_base >= ctx.deps.settings.max_attempts:
        errors["last_error_message"] = (
            f"gave up after {ctx.deps.settings.max_attempts} attempts; last: {message}"
        )
        jobs.move_jobs(session, JobState.FAILED, job, sources=submitted, values=errors)
        return
    if batch.fallback_sync and answer.error_code == lines.EXPIRED:
        moved = jobs.move_jobs(
            session, JobState.QUEUED, job, sources=submitted, values={**errors, "route": Route.SYNC}
        )
        if moved:
            done.to_sync.append(line.job_id)
        return
    jobs.move_jobs(session, JobState.QUEUED, job, sources=submitted, values=errors)


def _not_run(ctx: RouteContext, pb: ProviderBatch, batch: _Batch, done: Collected) -> None:
    """Lines no file answered: the provider batch was cancelled (or failed) before they ran.
    Nothing was made or billed; their jobs are queued again, or cancelled with their batch.
    A provider batch that failed as a whole holds the batch with the provider's reason."""
    with ctx.deps.db.session() as session:
        status = session.scalar(
            select(ProviderBatch.provider_status).where(ProviderBatch.id == pb.id)
        )
        error = session.scalar(select(ProviderBatch.error).where(ProviderBatch.id == pb.id))
    if status == "cancelled":
        code, message = "batch_cancelled", "the provider batch was cancelled before this line ran"
    elif status == "failed":
        code = "provider_batch_failed"
        message = f"the provider refused the whole provider batch: {error or 'no reason given'}"
    else:
        code, message = "not_answered", "the provider's files have no answer for this line"
    while True:
        keep_lease(ctx, pb.id)
        with ctx.deps.db.session() as session:
            rows = list(
                session.execute(
                    select(Attempt.id, Attempt.job_id, Attempt.reserved_usd)
                    .where(
                        Attempt.provider_batch_id == pb.id,
                        Attempt.outcome == AttemptOutcome.IN_FLIGHT,
                    )
                    .limit(IN_CHUNK)
                )
            )
            if not rows:
                return
            state = session.scalar(select(Batch.state).where(Batch.id == pb.batch_id))
            target = JobState.CANCELLED if state == BatchState.CANCELLED else JobState.QUEUED
            session.execute(
                update(Attempt)
                .where(
                    Attempt.id.in_([r.id for r in rows]),
                    Attempt.outcome == AttemptOutcome.IN_FLIGHT,
                )
                .values(
                    outcome=AttemptOutcome.TRANSIENT,
                    finished_at=utcnow(),
                    error_type="not_run",
                    error_code=code,
                    error_message=message,
                    cost_usd=Decimal(0),
                )
                .execution_options(synchronize_session=False)
            )
            jobs.move_jobs(
                session,
                target,
                Job.id.in_([r.job_id for r in rows]),
                sources=[JobState.SUBMITTED],
                values={"last_error_code": code, "last_error_message": message},
            )
            reserved = sum((Decimal(r.reserved_usd or 0) for r in rows), Decimal(0))
            if reserved and pb.reserved_on is not None:
                budget.settle(session, pb.batch_id, reserved, Decimal(0), pb.reserved_on)
            if status == "failed":
                jobs.hold_batch(session, pb.batch_id, HoldCode.PROVIDER_REFUSED, message)
            session.commit()
        done.not_run += len(rows)
