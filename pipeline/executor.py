"""Run one job: claim -> (batch still running?) -> permit -> gateway -> record -> outcome.

This is the plain function behind both the Celery task (`worker.tasks.edit`) and the
in-process pool of `editbatch run`. Dependencies are built once per process and passed in.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt

from pipeline import collector
from pipeline.backoff import wait_api
from pipeline.db import jobs
from pipeline.db.models import Attempt, Batch, Job, Output, utcnow
from pipeline.db.session import Database
from pipeline.gateway import CallOutcome, Gateway
from pipeline.pricing import PriceTable
from pipeline.ratelimit import Limiter
from pipeline.settings import Settings
from pipeline.spec import EditSpec

log = logging.getLogger("editbatch.executor")


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


class _Stop(Exception):
    """The batch stopped (held, paused, cancelled) between two attempts."""

    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.state = state


def process_job(job_id: int, deps: Deps) -> JobResult:
    """Execute job `job_id` once through to a resting state; safe to call twice for one job."""
    settings = deps.settings
    with deps.db.session() as session:
        token = jobs.claim(session, job_id, settings.lease_seconds)
        if token is None:
            return JobResult(job_id, "skipped", "not claimable (finished or taken)")
        job = session.get(Job, job_id)
        assert job is not None
        batch_id = job.batch_id
        spec = EditSpec.from_json(job.spec)
        first_attempt = job.attempts + 1

    stop_state = _batch_stop_state(deps, batch_id)
    if stop_state:
        return _park(deps, job_id, token, stop_state)

    remaining = max(settings.max_attempts - first_attempt + 1, 1)

    def call_once() -> CallOutcome:
        state = _batch_stop_state(deps, batch_id)
        if state:
            raise _Stop(state)
        with deps.limiter.permit(spec.model, spec.n):
            started = utcnow()
            outcome = deps.gateway.edit(spec)
        if outcome.kind == "transient" and outcome.http_status == 429 and outcome.retry_after:
            deps.limiter.backoff(spec.model, outcome.retry_after)
        _record_attempt(deps, job_id, spec, outcome, started)
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


def _record_attempt(
    deps: Deps, job_id: int, spec: EditSpec, outcome: CallOutcome, started: object
) -> None:
    usage = outcome.usage
    cost = deps.prices.cost(spec.model, usage) if usage is not None else None
    attempt = Attempt(
        job_id=job_id,
        started_at=started,
        finished_at=utcnow(),
        outcome=outcome.kind,
        http_status=outcome.http_status,
        request_id=outcome.request_id,
        error_type=outcome.error_type,
        error_code=outcome.error_code,
        error_message=outcome.error_message,
        latency_ms=round(outcome.latency_ms, 1),
        retry_after_s=outcome.retry_after,
        text_input_tokens=usage.text_input if usage else None,
        image_input_tokens=usage.image_input if usage else None,
        cached_input_tokens=(usage.cached_text_input + usage.cached_image_input) if usage else None,
        image_output_tokens=usage.image_output if usage else None,
        text_output_tokens=usage.text_output if usage else None,
        cost_usd=cost if cost is not None else 0,
        priced=usage is None or cost is not None,
    )
    with deps.db.session() as session:
        number = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
        attempt.number = number + 1
        jobs.add_attempt(session, attempt, job_id)
        session.commit()


def _settle(
    deps: Deps, job_id: int, token: str, batch_id: int, spec: EditSpec, outcome: CallOutcome
) -> JobResult:
    """Move the job to its resting state for the last outcome."""
    settings = deps.settings
    if outcome.kind == "ok":
        paths = _spool(settings.effective_spool_dir, batch_id, job_id, spec.ext, outcome.images)
        with deps.db.session() as session:
            if not jobs.set_state(session, job_id, token, "succeeded"):
                session.rollback()
                for p in paths:
                    p.unlink(missing_ok=True)
                return JobResult(job_id, "skipped", "lost the claim before finishing")
            for index, path in enumerate(paths, start=1):
                session.add(Output(job_id=job_id, index=index, spool_path=str(path)))
            session.commit()
        collector.collect_job(deps.db, job_id, deps.storages)
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


def _maybe_finish(deps: Deps, batch_id: int) -> None:
    with deps.db.session() as session:
        finished = jobs.finish_batch_if_done(session, batch_id)
    if finished and deps.on_batch_finished is not None:
        deps.on_batch_finished(batch_id)


def _spool(
    spool_dir: Path, batch_id: int, job_id: int, ext: str, images: tuple[bytes, ...]
) -> list[Path]:
    """Write raw outputs to the local spool atomically; they wait there until collected."""
    folder = spool_dir / str(batch_id) / str(job_id)
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
