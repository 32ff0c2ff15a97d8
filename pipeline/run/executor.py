"""Run one job: claim -> (batch still running?) -> permit -> gateway -> record -> outcome.

This is the plain function behind both the Celery task (`worker.tasks.edit`) and the
in-process pool of `editbatch run`. Dependencies are built once per process and passed in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

from PIL import Image
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt

from pipeline.cost import budget
from pipeline.cost.estimate import estimate_cost, fallback_usage
from pipeline.cost.pricing import PriceTable
from pipeline.db import jobs
from pipeline.db.models import Attempt, Batch, Job, Output, utcnow
from pipeline.db.session import Database
from pipeline.errors import StorageError
from pipeline.observe import metrics
from pipeline.output import collector
from pipeline.run.gateway import CallOutcome, Gateway
from pipeline.run.ratelimit import Limiter, PermitTimeout
from pipeline.run.retry import wait_api
from pipeline.settings import Settings
from pipeline.spec import EditSpec

log = logging.getLogger("editbatch.executor")

DUPLICATE_WAIT_SECONDS = 10.0
# How long the record of a call already made is retried through database errors before the
# job is given back (and the edit possibly bought again).
DB_RETRY_SECONDS = 30.0
PERMIT_RETRY_SECONDS = 5.0


@dataclass
class Deps:
    """What a job needs, built once per worker process."""

    db: Database
    gateway: Gateway
    settings: Settings
    prices: PriceTable
    limiter: Limiter
    sleep: Callable[[float], None] = time.sleep
    on_batch_finished: Callable[[int], None] | None = None
    storages: collector.StorageCache = field(default_factory=collector.StorageCache)


@dataclass(frozen=True)
class JobResult:
    """Where one execution left the job: its state, or "skipped" when it was not ours to run."""

    job_id: int
    state: str
    detail: str = ""
    retry_in: float | None = None  # state "deferred": send the job again after this many seconds


class _Stop(Exception):
    """The batch stopped (held, paused, cancelled) between two attempts."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def process_job(job_id: int, deps: Deps) -> JobResult:
    """Execute job `job_id` once through to a resting state; safe to call twice for one job.

    A database error escapes (the caller retries shortly) after the claim is given back, so the
    retry can take the job at once instead of waiting for the lease to run out.
    """
    with deps.db.session() as session:
        token = jobs.claim(session, job_id, deps.settings.lease_seconds)
    if token is None:
        return JobResult(job_id, "skipped", "not claimable (finished or taken)")
    try:
        return _run_claimed(job_id, token, deps)
    except DBAPIError:
        with contextlib.suppress(DBAPIError), deps.db.session() as session:
            jobs.set_state(session, job_id, token, "queued")
            jobs.mark_interrupted(session, [job_id])
            session.commit()
        raise


def _run_claimed(job_id: int, token: str, deps: Deps) -> JobResult:
    settings = deps.settings
    with deps.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        batch_id = job.batch_id
        spec = EditSpec.from_json(job.spec)
        first_attempt = job.attempts - job.attempt_base + 1
        fingerprint = job.fingerprint
        batch = session.get(Batch, batch_id)
        assert batch is not None
        reuse = bool(batch.settings.get("reuse", True))
        # Reserve against a budget only when there is one: it costs two writes per call.
        budgeted = batch.budget_usd is not None or settings.daily_budget_usd is not None

    stop_state = _batch_stop_state(deps, batch_id)
    if stop_state:
        return _park(deps, job_id, token, stop_state)

    if reuse and fingerprint:
        donor, busy = _identical_jobs(deps, job_id, fingerprint)
        if donor is not None:
            return _reuse(deps, job_id, token, batch_id, donor)
        if busy:
            # The same edit is being bought right now by another job: wait for it, then reuse.
            return _defer(deps, job_id, token, DUPLICATE_WAIT_SECONDS, "identical job in flight")

    remaining = max(settings.max_attempts - first_attempt + 1, 1)
    pixels = _input_pixels(spec)
    estimate = estimate_cost(spec, pixels, deps.prices)

    def call_once() -> CallOutcome:
        state = _batch_stop_state(deps, batch_id)
        if state:
            raise _Stop(state)
        ledger = _Ledger(batch_id, pixels, utcnow().date(), Decimal(0), budgeted)
        if budgeted:
            with deps.db.session() as session:
                ledger.reserved, refusal = budget.reserve_call(
                    session, batch_id, estimate, settings.daily_budget_usd, ledger.today
                )
            if refusal:
                raise _Stop("held")  # the batch is held with the reason
        wait_started = time.monotonic()
        try:
            with deps.limiter.permit(spec.model, spec.n, max_wait=_max_permit_wait(settings)):
                metrics.observe_permit_wait(spec.model, time.monotonic() - wait_started)
                attempt_id = _start_attempt(deps, job_id)
                with metrics.in_flight(spec.model):
                    outcome = deps.gateway.edit(spec)
        except BaseException as exc:
            if isinstance(exc, PermitTimeout):
                waited = time.monotonic() - wait_started
                metrics.observe_permit_wait(spec.model, waited, timed_out=True)
            if budgeted:  # nothing was bought: give the reservation back
                with deps.db.session() as session:
                    budget.settle(session, batch_id, ledger.reserved, Decimal(0), ledger.today)
                    session.commit()
            raise
        if outcome.kind == "transient" and outcome.http_status == 429 and outcome.retry_after:
            deps.limiter.backoff(spec.model, outcome.retry_after)
        deps.limiter.observe(spec.model, outcome.headers)
        _persist(
            deps,
            f"job {job_id}: recording the attempt",
            lambda: _finish_attempt(deps, attempt_id, job_id, spec, outcome, ledger),
        )
        return outcome

    def before_sleep(retry_state: RetryCallState) -> None:
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        with deps.db.session() as session:
            jobs.set_state(
                session,
                job_id,
                token,
                "retrying",
                lease_seconds=settings.lease_seconds + wait,
                next_attempt_at=utcnow() + timedelta(seconds=wait),
            )
            session.commit()

    def back_to_running(retry_state: RetryCallState) -> None:
        if retry_state.attempt_number > 1:
            with deps.db.session() as session:
                jobs.set_state(
                    session, job_id, token, "running", lease_seconds=settings.lease_seconds
                )
                session.commit()

    retrying = Retrying(
        stop=stop_after_attempt(remaining),
        wait=wait_api(settings.backoff_base_seconds, settings.backoff_max_seconds),
        retry=retry_if_result(lambda o: o.kind == "transient"),
        retry_error_callback=lambda rs: rs.outcome.result() if rs.outcome else None,
        before=back_to_running,
        before_sleep=before_sleep,
        sleep=deps.sleep,
    )
    try:
        outcome: CallOutcome = retrying(call_once)
    except _Stop as stop:
        return _park(deps, job_id, token, stop.state)
    except PermitTimeout as exc:
        return _defer(deps, job_id, token, PERMIT_RETRY_SECONDS, str(exc))
    return _settle(deps, job_id, token, batch_id, spec, outcome)


def _batch_stop_state(deps: Deps, batch_id: int) -> str | None:
    """'held' or 'cancelled' if the batch no longer runs, else None."""
    with deps.db.session() as session:
        state = session.scalar(select(Batch.state).where(Batch.id == batch_id))
    if state in ("held", "paused"):
        return "held"
    if state == "cancelled":
        return "cancelled"
    return None


def _park(deps: Deps, job_id: int, token: str, state: str) -> JobResult:
    with deps.db.session() as session:
        jobs.set_state(session, job_id, token, state)
        session.commit()
    return JobResult(job_id, state, "batch is not running")


def _max_permit_wait(settings: Settings) -> float:
    """Wait for a rate permit at most a third of the lease, then hand the job back."""
    return max(settings.lease_seconds / 3.0, 1.0)


def _start_attempt(deps: Deps, job_id: int) -> int:
    """Record the attempt before the call, so a worker killed mid-call leaves a trace."""
    with deps.db.session() as session:
        number = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
        attempt = Attempt(
            job_id=job_id, number=number + 1, started_at=utcnow(), outcome="in_flight"
        )
        session.add(attempt)
        jobs.count_attempt(session, job_id, deps.settings.lease_seconds)
        session.commit()
        return attempt.id


@dataclass
class _Ledger:
    """What the budget needs to know about one call."""

    batch_id: int
    pixels: tuple[tuple[int, int], ...]
    today: date
    reserved: Decimal
    budgeted: bool


def _input_pixels(spec: EditSpec) -> tuple[tuple[int, int], ...]:
    """Each input image's size, from its header (for estimates); (0, 0) if unreadable."""
    sizes = []
    for path in spec.images:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except OSError:
            sizes.append((0, 0))
    return tuple(sizes)


def _finish_attempt(
    deps: Deps,
    attempt_id: int,
    job_id: int,
    spec: EditSpec,
    outcome: CallOutcome,
    ledger: _Ledger,
) -> None:
    usage = outcome.usage
    estimated = False
    if usage is None and outcome.http_status == 200:
        # Billed, but the API said nothing about tokens: estimate from the published tables.
        usage = fallback_usage(spec, len(outcome.images) or spec.n, ledger.pixels)
        estimated = True
    cost = deps.prices.cost(spec.model, usage) if usage is not None else None
    metrics.observe_attempt(
        spec.model, outcome.kind, outcome.http_status, outcome.latency_ms / 1000.0, cost
    )
    with deps.db.session() as session:
        attempt = session.get(Attempt, attempt_id)
        assert attempt is not None
        if attempt.outcome not in ("in_flight", "interrupted"):
            return  # an earlier try committed before its error reached us: count it once
        attempt.finished_at = utcnow()
        attempt.outcome = outcome.kind
        attempt.http_status = outcome.http_status
        attempt.request_id = outcome.request_id
        attempt.error_type = outcome.error_type
        attempt.error_code = outcome.error_code
        attempt.error_message = outcome.error_message
        attempt.latency_ms = round(outcome.latency_ms, 1)
        attempt.retry_after_s = outcome.retry_after
        if usage is not None:
            attempt.text_input_tokens = usage.text_input
            attempt.image_input_tokens = usage.image_input
            attempt.cached_input_tokens = usage.cached_text_input + usage.cached_image_input
            attempt.image_output_tokens = usage.image_output
            attempt.text_output_tokens = usage.text_output
        attempt.cost_usd = cost if cost is not None else Decimal(0)
        attempt.cost_estimated = estimated
        attempt.priced = usage is None or cost is not None
        jobs.add_cost(session, job_id, attempt.cost_usd)
        if ledger.budgeted:
            if cost is not None:
                actual = cost
            elif outcome.http_status is None or usage is not None:
                actual = ledger.reserved  # may have been billed (timeout, or no price): keep it
            else:
                actual = Decimal(0)
            budget.settle(session, ledger.batch_id, ledger.reserved, actual, ledger.today)
        session.commit()


def _identical_jobs(deps: Deps, job_id: int, fingerprint: str) -> tuple[int | None, bool]:
    """(a succeeded job with the same fingerprint whose outputs exist, is one in flight?)"""
    with deps.db.session() as session:
        donor = session.scalar(
            select(Job.id)
            .where(Job.fingerprint == fingerprint, Job.state == "succeeded", Job.id != job_id)
            .order_by(Job.id)
            .limit(1)
        )
        busy = session.scalar(
            select(Job.id)
            .where(
                Job.fingerprint == fingerprint,
                Job.state.in_(("running", "retrying")),
                Job.id != job_id,
            )
            .limit(1)
        )
    return donor, busy is not None


def _reuse(deps: Deps, job_id: int, token: str, batch_id: int, donor: int) -> JobResult:
    """Succeed with copies of an identical earlier job's outputs, at no cost."""
    try:
        copied = collector.copy_outputs(deps.db, donor, deps.storages)
    except (OSError, StorageError) as exc:  # the donor's files are gone: buy the edit again
        log.warning("job %s: cannot reuse job %s outputs (%s); calling the API", job_id, donor, exc)
        return _defer(deps, job_id, token, 0.0, "reuse failed", disable_reuse_for=job_id)
    paths = _spool(
        deps.settings.effective_spool_dir, batch_id, job_id, token, copied.ext, copied.data
    )
    with deps.db.session() as session:
        if not jobs.set_state(session, job_id, token, "succeeded"):
            session.rollback()
            return JobResult(job_id, "skipped", "lost the claim before finishing")
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(reused_from_job_id=donor)
            .execution_options(synchronize_session=False)
        )
        for index, (path, drift) in enumerate(zip(paths, copied.drift, strict=True), start=1):
            session.add(Output(job_id=job_id, index=index, spool_path=str(path), drift=drift))
        session.commit()
    collector.collect_job(deps.db, job_id, deps.storages)
    _maybe_finish(deps, batch_id)
    return JobResult(job_id, "succeeded", f"reused the outputs of job {donor}")


def _defer(
    deps: Deps,
    job_id: int,
    token: str,
    seconds: float,
    reason: str,
    disable_reuse_for: int | None = None,
) -> JobResult:
    """Give the job back (queued) to be sent again in `seconds`, without spending anything."""
    with deps.db.session() as session:
        jobs.set_state(session, job_id, token, "queued")
        if disable_reuse_for is not None:
            session.execute(
                update(Job)
                .where(Job.id == disable_reuse_for)
                .values(fingerprint=None)
                .execution_options(synchronize_session=False)
            )
        session.commit()
    return JobResult(job_id, "deferred", reason, retry_in=seconds)


def _settle(
    deps: Deps, job_id: int, token: str, batch_id: int, spec: EditSpec, outcome: CallOutcome
) -> JobResult:
    """Move the job to its resting state for the last outcome."""
    settings = deps.settings
    if outcome.kind == "ok":
        paths = _spool(
            settings.effective_spool_dir, batch_id, job_id, token, spec.ext, outcome.images
        )
        recorded = _persist(
            deps,
            f"job {job_id}: recording the outputs",
            lambda: _record_outputs(deps, job_id, token, paths),
        )
        if not recorded:
            for p in paths:
                p.unlink(missing_ok=True)
            return JobResult(job_id, "skipped", "lost the claim before finishing")
        _persist(
            deps,
            f"job {job_id}: collecting the outputs",
            lambda: collector.collect_job(deps.db, job_id, deps.storages),
        )
        _maybe_finish(deps, batch_id)
        return JobResult(job_id, "succeeded")
    message = outcome.error_message or outcome.error_code or "unknown error"
    code = outcome.error_code or outcome.error_type
    if outcome.kind == "hold":
        reason = f"{outcome.http_status} {code}: {message}"
        with deps.db.session() as session:
            jobs.hold_batch(session, batch_id, reason)
            jobs.set_state(session, job_id, token, "held", error_code=code, error_message=message)
            session.commit()
        log.warning("batch %s held: %s", batch_id, reason)
        return JobResult(job_id, "held", reason)
    if outcome.kind == "transient":
        message = f"gave up after {settings.max_attempts} attempts; last: {message}"
    with deps.db.session() as session:
        jobs.set_state(session, job_id, token, "failed", error_code=code, error_message=message)
        session.commit()
    _maybe_finish(deps, batch_id)
    return JobResult(job_id, "failed", message)


def _record_outputs(deps: Deps, job_id: int, token: str, paths: list[Path]) -> bool:
    """The job succeeded with these spooled outputs, if it is still ours; True once recorded."""
    with deps.db.session() as session:
        if jobs.set_state(session, job_id, token, "succeeded"):
            for index, path in enumerate(paths, start=1):
                session.add(Output(job_id=job_id, index=index, spool_path=str(path)))
            session.commit()
            return True
        session.rollback()
        # Already recorded: an earlier try committed before its error reached us. The files
        # are referenced then, and must not be deleted.
        mine = session.scalar(
            select(func.count())
            .select_from(Output)
            .where(Output.job_id == job_id, Output.spool_path.in_([str(p) for p in paths]))
        )
        return bool(mine)


_T = TypeVar("_T")


def _persist(deps: Deps, what: str, write: Callable[[], _T]) -> _T:
    """Run `write` (safe to run twice) again after a database error, for DB_RETRY_SECONDS.

    It records a call already made: its outcome exists only in this process, so giving up
    would drop its cost from the ledger and buy the edit a second time.
    """
    delay = 0.1
    deadline = time.monotonic() + DB_RETRY_SECONDS
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database error, trying again in %.1f s: %s", what, delay, exc.orig)
            deps.sleep(delay)
            delay = min(delay * 2, 5.0)


def _maybe_finish(deps: Deps, batch_id: int) -> None:
    finish_if_done(deps, batch_id)


def finish_if_done(deps: Deps, batch_id: int) -> bool:
    """Finish the batch if no job is left: collect any output a dead worker left in the spool,
    then report (once, by whoever wins the finish). True if this call finished it."""
    with deps.db.session() as session:
        finished = jobs.finish_batch_if_done(session, batch_id)
    if not finished:
        return False
    collector.collect_batch(deps.db, batch_id, deps.storages)
    if deps.on_batch_finished is not None:
        deps.on_batch_finished(batch_id)
    return True


def _spool(
    spool_dir: Path, batch_id: int, job_id: int, token: str, ext: str, images: tuple[bytes, ...]
) -> list[Path]:
    """Write raw outputs to the local spool atomically; they wait there until collected.

    The claim token is part of the path, so a worker whose lease lapsed never touches the files
    of the worker that took the job over.
    """
    folder = spool_dir / str(batch_id) / str(job_id) / token
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, data in enumerate(images, start=1):
        target = folder / f"{index}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        paths.append(target)
    return paths
