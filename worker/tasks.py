"""Celery tasks: thin wrappers around plain functions of `pipeline`.

editbatch.edit            a job id -> `pipeline.run.executor.process_job`
editbatch.reap            (beat, every minute) expired leases, lost messages, missed finishes,
                          and a probe chain for each provider with an open breaker or batches
                          held for its outage when none is alive
editbatch.probe           one probe of an unreachable provider (`pipeline.run.breaker.probe`);
                          sends the jobs of the batches it resumed, or schedules the next probe
editbatch.reconcile       a finished nightly batch's days against the provider's figures
editbatch.nightly         tonight's dated manifest (beat, EDITBATCH_NIGHTLY_CRON)
editbatch.batch_dispatch  a batch-route batch -> provider batches (sent by submit/resume)
editbatch.batch_tick      the batch route's poll (beat, EDITBATCH_BATCH_POLL_SECONDS)
editbatch.batch_collect   one finished provider batch, read and booked (sent by the tick)
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task, signals
from kombu.exceptions import ChannelError
from redis import Redis
from sqlalchemy import Select, func, select
from sqlalchemy.exc import DBAPIError

from pipeline.batch.nightly import NAME_PREFIX, run_nightly
from pipeline.batch.submit import Enqueue, send
from pipeline.cost.reconcile import after_batch
from pipeline.db import jobs
from pipeline.db.models import Batch, Job, utcnow
from pipeline.run import breaker
from pipeline.run.batchroute import collect, dispatch, poll
from pipeline.run.batchroute.context import RouteContext
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, Handback, finish_if_done, process_job
from pipeline.run.gateway import BillingGateway
from pipeline.run.retry import redeliver_after
from pipeline.settings import get_settings
from pipeline.states import BatchState, HoldCode, JobState, Route
from worker.app import app
from worker.breaker import build_breaker
from worker.constants import QUEUE
from worker.limits import build_limiter
from worker.watch import BrokerWatch

log = logging.getLogger("editbatch.worker")

_deps: Deps | None = None
_route: RouteContext | None = None
_lock = threading.Lock()

# A queued job whose message may have been lost (Redis flushed or restarted) is sent again by
# the reaper once it has waited this long and the broker queue is empty.
STALE_QUEUED_SECONDS = 120
# The provider's usage figures lag behind its answers: reconcile a nightly batch this much later.
RECONCILE_DELAY_SECONDS = 900
# A probe chain holds its lease this long past its next probe; a chain whose message was lost
# lets go after that, and the reaper starts another.
PROBE_LEASE_MARGIN = 30.0


def deps() -> Deps:
    """Clients are built once per worker process, not per task."""
    global _deps
    with _lock:
        if _deps is None:
            settings = get_settings()
            _deps = build_deps(
                settings,
                build_limiter(settings),
                breaker=build_breaker(settings),
                on_outage=start_probing,
            )
            if settings.openai_admin_key is not None:
                _deps.on_batch_finished = _then_reconcile(_deps.on_batch_finished)
        return _deps


def route() -> RouteContext:
    """The batch route's context, built once per worker process (its collections run as tasks
    of their own; jobs moved to the sync route go to `editbatch.edit`)."""
    global _route
    d = deps()
    with _lock:
        if _route is None:
            _route = RouteContext.build(d, celery_enqueue)
            _route.collect_async = lambda pb_id: batch_collect.apply_async((pb_id,))
        return _route


def _then_reconcile(finished: Callable[[int], None] | None) -> Callable[[int], None]:
    """After a nightly batch's report, reconcile its days with the provider's figures later."""

    def on_finished(batch_id: int) -> None:
        if finished is not None:
            finished(batch_id)
        with deps().db.session() as session:
            name = session.scalar(select(Batch.name).where(Batch.id == batch_id)) or ""
        if name.startswith(NAME_PREFIX):
            reconcile.apply_async((batch_id,), countdown=RECONCILE_DELAY_SECONDS)

    return on_finished


@app.task(name="editbatch.reconcile")  # type: ignore[untyped-decorator]
def reconcile(batch_id: int) -> str:
    """Reconcile a finished nightly batch's days; `reconcile-<batch>.json` beside its report."""
    d = deps()
    with d.db.session() as session:
        output = session.scalar(select(Batch.output_uri).where(Batch.id == batch_id))
    billing = BillingGateway.from_settings(d.settings)
    return after_batch(d.db, billing, int(batch_id), d.storages.get(str(output)))


@app.task(  # type: ignore[untyped-decorator]
    name="editbatch.edit", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def edit(self: Task, job_id: int) -> dict[str, Any]:
    try:
        result = process_job(int(job_id), deps())
    except DBAPIError as exc:
        # "database is locked", a dropped PostgreSQL connection: the job's state in the database
        # is consistent (each step is one transaction), so trying again shortly is safe.
        raise self.retry(countdown=redeliver_after(int(job_id), exc), exc=exc) from exc
    if result.state == Handback.DEFERRED:
        # Handed back without spending (no rate permit in time, or an identical job in flight).
        edit.apply_async((job_id,), countdown=result.retry_in or 0)
    return {"job_id": result.job_id, "state": result.state}


@app.task(name="editbatch.reap")  # type: ignore[untyped-decorator]
def reap() -> int:
    """Requeue jobs whose lease expired (their worker died) and re-send lost messages."""
    d = deps()
    with d.db.session() as session:
        ids = jobs.requeue_expired(session)
    if broker_queue_length() == 0:
        ids += stale_queued(d, STALE_QUEUED_SECONDS)
    celery_enqueue(sorted(set(ids)))
    # A worker that died between a batch's last job and its finish leaves the batch running
    # with nothing to do: finish it (collect what it spooled, write the report).
    for batch_id in jobs.idle_running_batches(d.db):
        finish_if_done(d, batch_id)
    held = held_for_outage(d)
    for b in d.breaker.every():
        if b.open() is not None or b.provider in held:
            probe.delay(None, b.provider)  # nothing while another chain holds its lease
    return len(ids)


def start_probing(batch_id: int, provider: str) -> None:
    """This worker held `batch_id` for `provider`'s outage: probe it after the first wait."""
    d = deps()
    log.info("batch %s held for an outage of %s; probing it", batch_id, provider)
    probe.apply_async((None, provider), countdown=d.breaker.policy.probe_first)


@app.task(name="editbatch.probe")  # type: ignore[untyped-decorator]
def probe(token: str | None = None, provider: str | None = None) -> str:
    """One probe of `provider` (None: the default) for the batches held for its outage. One
    chain per provider probes at a time (a lease in Redis); it sends the jobs of the batches
    it resumed or schedules its next probe."""
    d = deps()
    b = d.breaker.of(provider)
    token = token or uuid.uuid4().hex
    first_wait = b.policy.probe_first + PROBE_LEASE_MARGIN
    if not b.store.lease_probe(b.scope, token, first_wait):
        return f"another probe chain of {b.provider} is running"
    result = breaker.probe(b, d.db, lambda: d.probe(b.provider))
    for batch_id in result.resumed:
        send(d.db, batch_id, celery_enqueue, d.on_batch_finished, dispatch_batch=dispatch_later)
    if result.retry_in is None:
        b.store.release_probe(b.scope, token)
        return f"{b.provider}: resumed {result.resumed}, gave up {result.gave_up}"
    b.store.lease_probe(b.scope, token, result.retry_in + PROBE_LEASE_MARGIN)
    probe.apply_async((token, b.provider), countdown=result.retry_in)
    return f"{b.provider}: no answer; next probe in {result.retry_in:.0f} s"


def held_for_outage(d: Deps) -> set[str]:
    """The providers whose outage holds a batch (api_unreachable)."""
    with d.db.session() as session:
        ids = list(
            session.scalars(
                select(Batch.id).where(
                    Batch.state == BatchState.HELD, Batch.hold_code == HoldCode.API_UNREACHABLE
                )
            )
        )
    return {p for batch_id in ids if (p := breaker.held_for(d.db, batch_id)) is not None}


@app.task(name="editbatch.nightly")  # type: ignore[untyped-decorator]
def nightly(now: str | None = None) -> int | None:
    """Submit the dated manifest of `now` (ISO 8601; beat sends none: the UTC time) once."""
    d = deps()
    at = datetime.fromisoformat(now) if now else datetime.now(UTC)
    return run_nightly(
        d.settings,
        at,
        celery_enqueue,
        db=d.db,
        on_finished=d.on_batch_finished,
        dispatch_batch=dispatch_later,
    )


@app.task(name="editbatch.batch_dispatch")  # type: ignore[untyped-decorator]
def batch_dispatch(batch_id: int) -> list[int]:
    """Cut a batch-route batch's queued jobs into provider batches and create them."""
    return dispatch.dispatch(route(), int(batch_id))


@app.task(name="editbatch.batch_tick")  # type: ignore[untyped-decorator]
def batch_tick() -> dict[str, int]:
    """The batch route's poll: recover, cancel, refresh, collect (as tasks), dispatch, finish."""
    done = poll.tick(route())
    return {
        "recovered": len(done.recovered),
        "refreshed": done.refreshed,
        "created": len(done.created),
        "finished": len(done.finished),
    }


@app.task(  # type: ignore[untyped-decorator]
    name="editbatch.batch_collect", acks_late=True, reject_on_worker_lost=True
)
def batch_collect(pb_id: int) -> int:
    """Read and book one finished provider batch (a lease keeps a second copy from it)."""
    done = collect.collect(route(), int(pb_id))
    return 0 if done is None else done.booked


def dispatch_later(batch_id: int) -> None:
    """Ask a worker to dispatch a batch-route batch (after its jobs are committed)."""
    batch_dispatch.apply_async((batch_id,))


def _sync_queued() -> Select[int]:
    """Queued jobs of running batches on the sync route (a batch-route job is sent as a line
    by the batch route's tick, not as a message, so a lost queue does not concern it)."""
    return (
        select(Job.id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            Batch.state == BatchState.RUNNING,
            Job.state == JobState.QUEUED,
            func.coalesce(Job.route, Batch.route) == Route.SYNC,
        )
    )


def stale_queued(d: Deps, older_than: float) -> list[int]:
    """Queued jobs of running batches untouched for `older_than` seconds, on the sync route."""
    cutoff = utcnow() - timedelta(seconds=older_than)
    with d.db.session() as session:
        return list(session.scalars(_sync_queued().where(Job.updated_at < cutoff).limit(10_000)))


def broker_queue_length() -> int:
    """Messages waiting in the broker's queue (not counting those workers already hold)."""
    with app.connection_for_write() as conn:
        try:
            _, count, _ = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
        except ChannelError:  # Redis keeps no key for an empty list: "no queue" means empty
            return 0
        return int(count)


def celery_enqueue(ids: list[int]) -> None:
    """Send one `editbatch.edit` message per job id over a single broker connection."""
    if not ids:
        return
    # Producer.batch (kombu >= 5.7) sends the messages through one Redis pipeline per 1,000
    # instead of a client and a round trip each: 3x faster for a 100,000-row submit.
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for job_id in ids:
            edit.apply_async((job_id,), producer=producer)


enqueue: Enqueue = celery_enqueue


def worker_stats(timeout: float) -> dict[str, Any]:
    """Celery's `inspect stats` of every worker that answers within `timeout` (for doctor)."""
    stats: dict[str, Any] | None = app.control.inspect(timeout=timeout).stats()
    return stats or {}


def resend_queued() -> int:
    """Send every queued job of every running batch on the sync route again (Redis lost their
    messages); how many. A job whose message survived gets two: the second claim does nothing.
    The batch route needs nothing: its tick finds its queued jobs in the database."""
    d = deps()
    sent, last = 0, 0
    while True:
        with d.db.session() as session:
            ids = list(
                session.scalars(_sync_queued().where(Job.id > last).order_by(Job.id).limit(1000))
            )
        if not ids:
            return sent
        celery_enqueue(ids)
        sent += len(ids)
        last = ids[-1]


_watch: BrokerWatch | None = None


def start_broker_watch(**_: Any) -> None:
    """worker_ready: start this worker's broker check (EDITBATCH_BROKER_CHECK_SECONDS; 0: off)."""
    global _watch
    settings = get_settings()
    if not settings.broker_check_seconds or _watch is not None:
        return
    try:
        client = Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
    except ValueError as exc:  # a broker URL redis-py cannot open (e.g. sentinel://)
        log.warning("broker check off: %s", exc)
        return
    _watch = BrokerWatch(client, resend_queued, settings.broker_check_seconds)
    _watch.start()


def stop_broker_watch(**_: Any) -> None:
    if _watch is not None:
        _watch.stop()


# Celery's signal decorators are untyped; connecting by call keeps mypy --strict meaningful.
signals.worker_ready.connect(start_broker_watch)
signals.worker_shutdown.connect(stop_broker_watch)
