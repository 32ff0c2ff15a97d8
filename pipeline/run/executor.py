"""Run one job to a resting state: claim -> reuse -> (reserve -> permit -> call -> record)* ->
spool -> settle.

This is the plain function behind both the Celery task (`worker.tasks.edit`) and the in-process
pool of `editbatch run`. Dependencies are built once per process and passed in (`Deps`).

    process_job        claim the row; on a database error give the claim back and re-raise
    _run_claimed       the orchestration below, one named step each
      _load              the job's spec, batch and attempt count
      _stop_state        the batch is held, paused or cancelled: park the job
      _reuse / _defer    an identical job already succeeded (copy it) or is in flight (wait)
      _hold              no lane for the job's provider and model: hold the batch, say why
      policy.run         retry.RetryPolicy: the loop of attempts, waits and limits
        _attempt           one call: batch still running? the provider's breaker closed? ->
                           reserve -> permit (any lane of the provider's deployments with
                           capacity) -> call -> record -> tell the provider's breaker (an
                           outage holds the batch)
      _settle            spool + record the outputs (ok), hold the batch, or fail the job

Calls an outage cost a job are given back when the outage breaker of its provider stops it
(`pipeline.run.breaker`), so an outage never fails a job; an outage of one provider stops only
the jobs sent to it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import NoReturn

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from pipeline.cost import budget
from pipeline.cost.estimate import Estimate, estimate_cost, fallback_usage
from pipeline.cost.pricing import PriceTable
from pipeline.db import jobs
from pipeline.db.models import Attempt, Batch, Job, Output, utcnow
from pipeline.db.session import Database
from pipeline.errors import ConfigError, EditbatchError, PermitTimeout, StorageError
from pipeline.files import image_sizes
from pipeline.intake.catalog import Catalog, load_catalog
from pipeline.observe import metrics
from pipeline.output import collector, spool
from pipeline.providers import Lane, ProviderSet
from pipeline.run.breaker import Breaker, Trip, hold_for_outage, is_outage
from pipeline.run.gateway import CallOutcome, Gateway
from pipeline.run.ratelimit import Limiter
from pipeline.run.retry import RetryPolicy, hold_code, persist
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from pipeline.states import AttemptOutcome, HoldCode, JobState, Route

log = logging.getLogger("editbatch.executor")

DUPLICATE_WAIT_SECONDS = 10.0
PERMIT_RETRY_SECONDS = 5.0


@dataclass
class Deps:
    """What a job needs, built once per worker process."""

    db: Database
    gateway: Gateway
    settings: Settings
    prices: PriceTable  # with each provider's overrides (`ProviderSet.prices`)
    limiter: Limiter
    breaker: Breaker  # the default provider's; `breaker.of(provider)` for the others
    providers: ProviderSet
    catalog: Catalog = field(default_factory=load_catalog)
    sleep: Callable[[float], None] = time.sleep
    on_batch_finished: Callable[[int], None] | None = None
    # This process held a batch for a provider's outage: start probing it (batch, provider).
    on_outage: Callable[[int, str], None] | None = None
    storages: collector.StorageCache = field(default_factory=collector.StorageCache)

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy.from_settings(self.settings)

    def probe(self, provider: str | None = None) -> str | None:
        """A free call to `provider` (None: the default): retrieve the default model (or the
        first the provider serves) through one of its lanes. None when it answers, else why
        not (the outage breaker's probe)."""
        chosen = self.providers.get(provider)
        model = self.settings.default_model
        if not chosen.serves(model):
            model = next(iter(chosen.served() or ()), model)
        return self.gateway.probe(model, lane=chosen.lanes(model)[0])


class Handback(StrEnum):
    """Results of an execution that leave the job to someone else (not job states)."""

    SKIPPED = "skipped"  # not ours to run: finished, or another worker holds it
    DEFERRED = "deferred"  # given back, to be sent again after `retry_in` seconds
    CRASHED = "crashed"  # the executor raised (the local pool logs it; a rerun picks it up)


@dataclass(frozen=True)
class JobResult:
    """Where one execution left the job: its state, or a Handback."""

    job_id: int
    state: JobState | Handback
    detail: str = ""
    retry_in: float | None = None  # Handback.DEFERRED: send the job again after this many s


@dataclass(frozen=True)
class _Claimed:
    """A job this worker holds, with what every step needs to know about it."""

    job_id: int
    token: str
    batch_id: int
    spec: EditSpec
    fingerprint: str | None
    reuse: bool
    budgeted: bool  # reserve against a budget (two writes per call: only when there is one)
    attempts_left: int
    pixels: tuple[tuple[int, int], ...]
    estimate: Estimate
    provider: str
    lanes: tuple[Lane, ...]  # empty: the provider lacks the model (`no_lane` says why)
    no_lane: str = ""
    route: str = Route.SYNC


class _Stop(EditbatchError):
    """The batch stopped (held, paused, cancelled) between two attempts; `outage`: because the
    outage breaker is open."""

    def __init__(self, state: JobState, outage: bool = False) -> None:
        super().__init__(state)
        self.state = state
        self.outage = outage


@dataclass
class _Tally:
    """What this run of a job spent on an API outage (given back if the outage stops it)."""

    outage_calls: int = 0


def process_job(job_id: int, deps: Deps) -> JobResult:
    """Execute job `job_id` once through to a resting state; safe to call twice for one job.

    A database error escapes (the caller tries again shortly: `retry.redeliver_after`) after the
    claim is given back, so the retry can take the job at once instead of waiting for the lease.
    """
    with deps.db.session() as session:
        token = jobs.claim(session, job_id, deps.settings.lease_seconds)
    if token is None:
        return JobResult(job_id, Handback.SKIPPED, "not claimable (finished or taken)")
    try:
        return _run_claimed(_load(deps, job_id, token), deps)
    except DBAPIError:
        with contextlib.suppress(DBAPIError), deps.db.session() as session:
            jobs.mark_interrupted(session, [job_id])  # attempts before jobs: one lock order
            jobs.set_state(session, job_id, token, JobState.QUEUED)
            session.commit()
        raise


def _run_claimed(job: _Claimed, deps: Deps) -> JobResult:
    if job.route != Route.SYNC:
        # Its request goes as a line of a provider batch (pipeline.run.batchroute), not as a
        # call from here: a message for it (a stale one, a resend) leaves it queued for that.
        return _park(deps, job, JobState.QUEUED, "sent on the batch route")
    stop = _stop_state(deps, job.batch_id)
    if stop is not None:
        return _park(deps, job, stop)
    if job.reuse and job.fingerprint:
        donor, busy = _identical_jobs(deps, job.job_id, job.fingerprint)
        if donor is not None:
            return _reuse(deps, job, donor)
        if busy:
            # The same edit is being bought right now by another job: wait for it, then reuse.
            return _defer(deps, job, DUPLICATE_WAIT_SECONDS, "identical job in flight")
    if not job.lanes:
        # The provider's settings changed since preflight, or this worker lacks them: no call
        # could succeed, for this job or its batch's others, until a person fixes them.
        reason = (
            f"{job.no_lane}; fix the provider settings of the workers (docs/providers.md), "
            f"then: editbatch resume {job.batch_id}"
        )
        return _hold(deps, job, HoldCode.PROVIDER, reason, "provider", job.no_lane)
    tally = _Tally()
    try:
        outcome = deps.policy.run(
            lambda: _attempt(deps, job, tally),
            attempts=job.attempts_left,
            sleep=deps.sleep,
            before_call=lambda n: _back_to_running(deps, job, n),
            before_wait=lambda seconds: _wait_for_retry(deps, job, seconds),
        )
    except _Stop as stop_:
        return _park(deps, job, stop_.state, forgive=tally.outage_calls if stop_.outage else 0)
    except PermitTimeout as exc:
        return _defer(deps, job, PERMIT_RETRY_SECONDS, str(exc))
    return _settle(deps, job, outcome, tally)


def _load(deps: Deps, job_id: int, token: str) -> _Claimed:
    with deps.db.session() as session:
        row = session.get(Job, job_id)
        assert row is not None
        batch = session.get(Batch, row.batch_id)
        assert batch is not None
        spec = EditSpec.from_json(row.spec)
        pixels = image_sizes(spec.images)
        provider = spec.provider or deps.providers.default
        try:
            lanes, no_lane = deps.providers.lanes(provider, spec.model), ""
        except ConfigError as exc:
            lanes, no_lane = (), str(exc)
        return _Claimed(
            job_id=job_id,
            token=token,
            batch_id=row.batch_id,
            spec=spec,
            fingerprint=row.fingerprint,
            reuse=bool(batch.settings.get("reuse", True)),
            budgeted=batch.budget_usd is not None or deps.settings.daily_budget_usd is not None,
            attempts_left=deps.policy.attempts_left(row.attempts, row.attempt_base),
            pixels=pixels,
            estimate=estimate_cost(spec, pixels, deps.prices),
            provider=provider,
            lanes=lanes,
            no_lane=no_lane,
            route=row.route or batch.route or Route.SYNC,
        )


# -- steps before any call ------------------------------------------------------------------


def _stop_state(deps: Deps, batch_id: int) -> JobState | None:
    with deps.db.session() as session:
        return jobs.batch_stop_state(session, batch_id)


def _park(
    deps: Deps,
    job: _Claimed,
    state: JobState,
    why: str = "batch is not running",
    forgive: int = 0,
) -> JobResult:
    """The batch stopped: the job waits (held) or ends (cancelled) without a call; `forgive`
    calls an outage cost it stop counting against its attempts."""
    with deps.db.session() as session:
        jobs.set_state(session, job.job_id, job.token, state, forgive=forgive)
        session.commit()
    return JobResult(job.job_id, state, why)


def reuse_if_done(job_id: int, deps: Deps) -> JobResult | None:
    """Succeed a queued job with copies of an identical job's outputs, at $0, if one already
    succeeded (the batch route's reuse, before its lines are cut). None, with the job left
    queued as it was, when there is none or the job is not claimable."""
    with deps.db.session() as session:
        token = jobs.claim(session, job_id, deps.settings.lease_seconds)
    if token is None:
        return None
    job = _load(deps, job_id, token)
    donor = _identical_jobs(deps, job_id, job.fingerprint)[0] if job.fingerprint else None
    if donor is None or not job.reuse:
        with deps.db.session() as session:
            jobs.set_state(session, job_id, token, JobState.QUEUED)
            session.commit()
        return None
    return _reuse(deps, job, donor)


def _identical_jobs(deps: Deps, job_id: int, fingerprint: str) -> tuple[int | None, bool]:
    """(a succeeded job with the same fingerprint, is one in flight?)"""
    with deps.db.session() as session:
        donor = session.scalar(
            select(Job.id)
            .where(
                Job.fingerprint == fingerprint, Job.state == JobState.SUCCEEDED, Job.id != job_id
            )
            .order_by(Job.id)
            .limit(1)
        )
        busy = session.scalar(
            select(Job.id)
            .where(
                Job.fingerprint == fingerprint,
                Job.state.in_((JobState.RUNNING, JobState.RETRYING)),
                Job.id != job_id,
            )
            .limit(1)
        )
    return donor, busy is not None


def _reuse(deps: Deps, job: _Claimed, donor: int) -> JobResult:
    """Succeed with copies of an identical earlier job's outputs, at no cost."""
    try:
        copied = collector.copy_outputs(deps.db, donor, deps.storages)
    except (OSError, StorageError) as exc:  # the donor's files are gone: buy the edit again
        log.warning(
            "job %s: cannot reuse job %s outputs (%s); calling the API", job.job_id, donor, exc
        )
        return _defer(deps, job, 0.0, "reuse failed", forget_fingerprint=True)
    paths = spool.write(
        deps.settings.effective_spool_dir,
        job.batch_id,
        job.job_id,
        job.token,
        copied.ext,
        copied.data,
    )
    with deps.db.session() as session:
        if not jobs.set_state(session, job.job_id, job.token, JobState.SUCCEEDED):
            session.rollback()
            return JobResult(job.job_id, Handback.SKIPPED, "lost the claim before finishing")
        session.execute(
            update(Job)
            .where(Job.id == job.job_id)
            .values(reused_from_job_id=donor)
            .execution_options(synchronize_session=False)
        )
        for index, (path, drift) in enumerate(zip(paths, copied.drift, strict=True), start=1):
            session.add(Output(job_id=job.job_id, index=index, spool_path=str(path), drift=drift))
        session.commit()
    collector.collect_job(deps.db, job.job_id, deps.storages)
    finish_if_done(deps, job.batch_id)
    return JobResult(job.job_id, JobState.SUCCEEDED, f"reused the outputs of job {donor}")


def _defer(
    deps: Deps,
    job: _Claimed,
    seconds: float,
    reason: str,
    forget_fingerprint: bool = False,
    forgive: int = 0,
) -> JobResult:
    """Give the job back (queued) to be sent again in `seconds`, without spending anything more
    (`forgive`: calls an outage cost it stop counting against its attempts)."""
    with deps.db.session() as session:
        jobs.set_state(session, job.job_id, job.token, JobState.QUEUED, forgive=forgive)
        if forget_fingerprint:  # its twin's files are gone: this job must buy its own edit
            session.execute(
                update(Job)
                .where(Job.id == job.job_id)
                .values(fingerprint=None)
                .execution_options(synchronize_session=False)
            )
        session.commit()
    return JobResult(job.job_id, Handback.DEFERRED, reason, retry_in=seconds)


# -- the attempt loop -----------------------------------------------------------------------


def _back_to_running(deps: Deps, job: _Claimed, attempt_number: int) -> None:
    if attempt_number > 1:
        with deps.db.session() as session:
            jobs.set_state(
                session,
                job.job_id,
                job.token,
                JobState.RUNNING,
                lease_seconds=deps.settings.lease_seconds,
            )
            session.commit()


def _wait_for_retry(deps: Deps, job: _Claimed, seconds: float) -> None:
    with deps.db.session() as session:
        jobs.set_state(
            session,
            job.job_id,
            job.token,
            JobState.RETRYING,
            lease_seconds=deps.settings.lease_seconds + seconds,
            next_attempt_at=utcnow() + timedelta(seconds=seconds),
        )
        session.commit()


@dataclass
class _Reservation:
    """What the budget holds for one call (nothing when the batch has no budget)."""

    today: date
    amount: Decimal = Decimal(0)
    active: bool = False


def _attempt(deps: Deps, job: _Claimed, tally: _Tally) -> CallOutcome:
    """One call: the batch still runs and its provider's breaker is closed -> reserve -> permit
    -> call -> record -> the provider's breaker hears the outcome (an outage holds the batch)."""
    breaker = deps.breaker.of(job.provider)
    state = _stop_state(deps, job.batch_id)
    if state is not None:
        raise _Stop(state, outage=breaker.open() is not None)
    trip = breaker.open()
    if trip is not None:
        _hold_for_outage(deps, job, breaker, trip)
    reservation = _reserve(deps, job)
    try:
        attempt_id, outcome = _call(deps, job)
    except BaseException:
        _release(deps, job, reservation)  # nothing was bought: give the reservation back
        raise
    persist(
        f"job {job.job_id}: recording the attempt",
        lambda: _record(deps, job, attempt_id, outcome, reservation),
        deps.sleep,
    )
    if is_outage(outcome.http_status, outcome.error_type):
        tally.outage_calls += 1
    trip = breaker.hear(outcome.http_status, outcome.error_type, _detail(outcome))
    if trip is not None:
        _hold_for_outage(deps, job, breaker, trip)
    return outcome


def _hold_for_outage(deps: Deps, job: _Claimed, breaker: Breaker, trip: Trip) -> NoReturn:
    """The job's provider's breaker is open: hold the batch (the first one to do so starts the
    probing of that provider) and stop this job without spending its attempts."""
    held = hold_for_outage(deps.db, job.batch_id, trip, breaker.policy, breaker.provider)
    if held and deps.on_outage:
        deps.on_outage(job.batch_id, breaker.provider)
    raise _Stop(JobState.HELD, outage=True)


def _detail(outcome: CallOutcome) -> str:
    """A failed call in a few words, for the breaker's reason."""
    status = f"{outcome.http_status} " if outcome.http_status else ""
    text = outcome.error_message or outcome.error_code or outcome.error_type or "no answer"
    return f"{status}{text}"[:300]


def _reserve(deps: Deps, job: _Claimed) -> _Reservation:
    reservation = _Reservation(today=utcnow().date(), active=job.budgeted)
    if job.budgeted:
        with deps.db.session() as session:
            reservation.amount, refusal = budget.reserve_call(
                session,
                job.batch_id,
                job.estimate,
                deps.settings.daily_budget_usd,
                reservation.today,
            )
        if refusal:
            raise _Stop(JobState.HELD)  # reserve_call held the batch with the reason
    return reservation


def _release(deps: Deps, job: _Claimed, reservation: _Reservation) -> None:
    if reservation.active:
        with deps.db.session() as session:
            budget.settle(session, job.batch_id, reservation.amount, Decimal(0), reservation.today)
            session.commit()


def _call(deps: Deps, job: _Claimed) -> tuple[int, CallOutcome]:
    """Wait for a rate permit on any lane of the job's provider and model, record the attempt
    as in flight, make the one HTTP call on that lane."""
    spec = job.spec
    lanes = {lane.scope: lane for lane in job.lanes}
    units = job.lanes[0].units(spec.n)  # the lanes of one provider and model count alike
    wait_started = time.monotonic()
    try:
        with deps.limiter.permit_any(
            list(lanes), units, max_wait=_max_permit_wait(deps.settings)
        ) as scope:
            lane = lanes[scope]
            metrics.observe_permit_wait(spec.model, time.monotonic() - wait_started)
            attempt_id = _start_attempt(deps, job.job_id, lane)
            with metrics.call_in_flight(spec.model):
                outcome = deps.gateway.edit(spec, lane)
    except PermitTimeout:
        metrics.observe_permit_wait(spec.model, time.monotonic() - wait_started, timed_out=True)
        raise
    rate_limited = outcome.kind == AttemptOutcome.TRANSIENT and outcome.http_status == 429
    if rate_limited and outcome.retry_after:
        deps.limiter.backoff(lane.scope, outcome.retry_after)
    deps.limiter.observe(lane.scope, outcome.headers)
    return attempt_id, outcome


def _max_permit_wait(settings: Settings) -> float:
    """Wait for a rate permit at most a third of the lease, then hand the job back."""
    return max(settings.lease_seconds / 3.0, 1.0)


def _start_attempt(deps: Deps, job_id: int, lane: Lane) -> int:
    """Record the attempt (and the lane it takes) before the call, so a worker killed mid-call
    leaves a trace."""
    with deps.db.session() as session:
        number = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
        attempt = Attempt(
            job_id=job_id,
            number=number + 1,
            started_at=utcnow(),
            outcome=AttemptOutcome.IN_FLIGHT,
            provider=lane.provider,
            deployment=lane.deployment,
        )
        session.add(attempt)
        jobs.count_attempt(session, job_id, deps.settings.lease_seconds)
        session.commit()
        return attempt.id


def _record(
    deps: Deps, job: _Claimed, attempt_id: int, outcome: CallOutcome, reservation: _Reservation
) -> None:
    """The attempt's outcome, tokens and cost; the job's cost; the reservation swapped for the
    cost, in one transaction. Safe to run twice (a retry after a database error)."""
    spec = job.spec
    usage = outcome.usage
    estimated = False
    if usage is None and (outcome.http_status == 200 or outcome.maybe_billed):
        # Billed, but the API said nothing about tokens (or we never got the answer: a timeout,
        # a body cut off): estimate from the published tables.
        usage = fallback_usage(spec, len(outcome.images) or spec.n, job.pixels)
        estimated = True
    cost = deps.prices.cost(spec.model, usage, job.provider) if usage is not None else None
    if cost is not None and outcome.svg_usage is not None:
        # SVG output: the author model's tokens are billed at its own rates; with no price for
        # it the attempt's cost is unknown (flagged unpriced), never silently short.
        author = deps.prices.cost(outcome.svg_author or "", outcome.svg_usage, job.provider)
        cost = None if author is None else cost + author
    metrics.observe_attempt(
        spec.model, outcome.kind, outcome.http_status, outcome.latency_ms / 1000.0, cost
    )
    with deps.db.session() as session:
        attempt = session.get(Attempt, attempt_id)
        assert attempt is not None
        if attempt.outcome not in (AttemptOutcome.IN_FLIGHT, AttemptOutcome.INTERRUPTED):
            return  # an earlier try committed before its error reached us: count it once
        # The reaper may have booked this call as lost at its estimate while it was still
        # running: the real answer replaces the estimate in the job's cost.
        booked = attempt.cost_usd if attempt.outcome == AttemptOutcome.INTERRUPTED else 0
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
        attempt.priced = (usage is None and outcome.svg_usage is None) or cost is not None
        jobs.add_cost(session, job.job_id, attempt.cost_usd - (booked or Decimal(0)))
        if reservation.active:
            if cost is not None:
                actual = cost
            elif outcome.http_status is None or usage is not None:
                actual = reservation.amount  # may have been billed (timeout, or no price)
            else:
                actual = Decimal(0)
            budget.settle(session, job.batch_id, reservation.amount, actual, reservation.today)
        session.commit()


# -- after the last attempt -----------------------------------------------------------------


def _settle(deps: Deps, job: _Claimed, outcome: CallOutcome, tally: _Tally) -> JobResult:
    """Move the job to its resting state for the last outcome."""
    if outcome.kind == AttemptOutcome.OK:
        return _succeed(deps, job, outcome)
    if _outage_before_the_trip(deps, job, outcome, tally):
        # Its attempts ran out on an outage the breaker has not tripped for yet: hand it back
        # (the breaker trips as the failures go on) instead of failing it.
        return _defer(
            deps,
            job,
            deps.breaker.policy.probe_first,
            f"every call to {job.provider} fails with an outage error",
            forgive=tally.outage_calls,
        )
    message = outcome.error_message or outcome.error_code or "unknown error"
    code = outcome.error_code or outcome.error_type
    if outcome.kind == AttemptOutcome.HOLD:
        hold = hold_code(
            outcome.http_status, outcome.error_code, outcome.error_param, outcome.error_message
        )
        reason = f"{outcome.http_status} {code}: {message}"
        if outcome.provider is not None and outcome.provider != "openai":
            reason = f"provider {outcome.provider}, deployment {outcome.deployment}: {reason}"
        if hold == HoldCode.MODEL_UNAVAILABLE:
            reason = _model_gone_reason(deps, job, reason)
        elif hold == HoldCode.PROVIDER:
            reason += (
                "; fix the deployment or api-version in the provider's settings "
                f"(docs/providers.md), then: editbatch resume {job.batch_id}"
            )
        return _hold(deps, job, hold, reason, code, message)
    if outcome.kind == AttemptOutcome.TRANSIENT:
        message = f"gave up after {deps.settings.max_attempts} attempts; last: {message}"
    with deps.db.session() as session:
        jobs.set_state(
            session, job.job_id, job.token, JobState.FAILED, error_code=code, error_message=message
        )
        session.commit()
    finish_if_done(deps, job.batch_id)
    return JobResult(job.job_id, JobState.FAILED, message)


def _outage_before_the_trip(deps: Deps, job: _Claimed, outcome: CallOutcome, tally: _Tally) -> bool:
    """The job's last call failed as an outage fails, no call to its provider anywhere has
    succeeded since its first such failure (the provider's breaker's streak covers them all),
    and a free call on the job's lane (a model lookup) gets no answer either. A job whose
    request alone breaks the server still fails: the provider answers the lookup."""
    if outcome.kind != AttemptOutcome.TRANSIENT or not tally.outage_calls:
        return False
    if not is_outage(outcome.http_status, outcome.error_type):
        return False
    if deps.breaker.of(job.provider).streak() < tally.outage_calls:
        return False
    lane = next((ln for ln in job.lanes if ln.deployment == outcome.deployment), job.lanes[0])
    return deps.gateway.probe(job.spec.model, lane=lane) is not None


def _hold(
    deps: Deps, job: _Claimed, hold: HoldCode, reason: str, code: str | None, message: str
) -> JobResult:
    """Hold the batch (with the code and reason) and park this job with its error."""
    with deps.db.session() as session:
        jobs.hold_batch(session, job.batch_id, hold, reason)
        jobs.set_state(
            session,
            job.job_id,
            job.token,
            JobState.HELD,
            error_code=code,
            error_message=message,
        )
        session.commit()
    log.warning("batch %s held: %s", job.batch_id, reason)
    return JobResult(job.job_id, JobState.HELD, reason)


def _model_gone_reason(deps: Deps, job: _Claimed, answer: str) -> str:
    """The hold reason for a model the API no longer serves: the model, the catalogue's
    replacement and the command that moves the batch to it."""
    model = job.spec.model
    info = deps.catalog.get(model)
    replacement = info.replacement if info is not None else None
    text = f"model {model} is not available (the API answered {answer})"
    if replacement:
        return (
            f"{text}; the catalogue's replacement is {replacement}: move the unfinished jobs "
            f"with `editbatch resume {job.batch_id} --model-map {model}={replacement}`"
        )
    return (
        f"{text}; move the unfinished jobs to another model with "
        f"`editbatch resume {job.batch_id} --model-map {model}=NEW_MODEL` (`editbatch models` "
        "lists them)"
    )


def _succeed(deps: Deps, job: _Claimed, outcome: CallOutcome) -> JobResult:
    """Spool the images, record them with the job's success (if still ours), collect them."""
    paths = spool.write(
        deps.settings.effective_spool_dir,
        job.batch_id,
        job.job_id,
        job.token,
        job.spec.ext,
        outcome.images,
    )
    recorded = persist(
        f"job {job.job_id}: recording the outputs",
        lambda: _record_outputs(deps, job, paths),
        deps.sleep,
    )
    if not recorded:
        spool.discard(paths)
        return JobResult(job.job_id, Handback.SKIPPED, "lost the claim before finishing")
    persist(
        f"job {job.job_id}: collecting the outputs",
        lambda: collector.collect_job(deps.db, job.job_id, deps.storages),
        deps.sleep,
    )
    finish_if_done(deps, job.batch_id)
    return JobResult(job.job_id, JobState.SUCCEEDED)


def _record_outputs(deps: Deps, job: _Claimed, paths: list[Path]) -> bool:
    """The job succeeded with these spooled outputs, if it is still ours; True once recorded."""
    with deps.db.session() as session:
        if jobs.set_state(session, job.job_id, job.token, JobState.SUCCEEDED):
            for index, path in enumerate(paths, start=1):
                session.add(Output(job_id=job.job_id, index=index, spool_path=str(path)))
            session.commit()
            return True
        session.rollback()
        # Already recorded: an earlier try committed before its error reached us. The files
        # are referenced then, and must not be deleted.
        mine = session.scalar(
            select(func.count())
            .select_from(Output)
            .where(Output.job_id == job.job_id, Output.spool_path.in_([str(p) for p in paths]))
        )
        return bool(mine)


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
