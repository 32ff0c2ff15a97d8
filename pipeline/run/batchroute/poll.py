"""The tick of the batch route: what beat runs every EDITBATCH_BATCH_POLL_SECONDS, what
`editbatch status` runs for one batch (refresh only), and what `editbatch run --route batch`
runs in a loop. Every step is safe to run twice, in two processes at once.

    recover    `preparing` provider batches whose process died (lease lapsed): finished by
               `dispatch.prepare` (which adopts a batch created just before the crash)
    cancel     open provider batches of a cancelled batch are cancelled at the provider
    refresh    open provider batches: status, request counts, expiry, file ids. A poll books
               nothing and bills nothing.
    collect    provider batches finished at the provider (completed, expired, cancelled,
               failed) and collections whose collector died: `collect.collect` (inline, or a
               Celery task each)
    dispatch   running batch-route batches with queued jobs (new, or lines sent back)
    sync       queued jobs moved to the sync route (`--fallback sync`) are handed on
    finish     a batch with nothing left to run is finished (collected, reported); a closed
               batch's uploaded inputs are deleted (unless it keeps its provider files)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, exists, or_, select, update

from pipeline.db.models import (
    Batch,
    Job,
    ProviderBatch,
    ProviderBatchFile,
    ProviderFile,
    utcnow,
)
from pipeline.errors import ProviderError
from pipeline.run import executor
from pipeline.run.batchroute import collect, dispatch, uploads
from pipeline.run.batchroute.context import RouteContext, remote_values, take_lease
from pipeline.states import (
    BATCH_OPEN,
    JOB_PENDING,
    PROVIDER_FINAL,
    BatchState,
    JobState,
    ProviderBatchState,
    Route,
)

log = logging.getLogger("editbatch.batchroute")

P = ProviderBatchState


@dataclass
class Tick:
    """What one tick did (for logs and tests)."""

    recovered: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    refreshed: int = 0
    collected: list[int] = field(default_factory=list)
    created: list[int] = field(default_factory=list)
    to_sync: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)


def _in(batch_ids: Collection[int] | None) -> list[ColumnElement[bool]]:
    return [] if batch_ids is None else [ProviderBatch.batch_id.in_(list(batch_ids))]


def tick(ctx: RouteContext, batch_ids: Collection[int] | None = None) -> Tick:
    """One pass over every batch-route batch (or those of `batch_ids`)."""
    done = Tick()
    done.recovered = recover(ctx, batch_ids)
    done.cancelled = cancel_open(ctx, batch_ids, only_cancelled=True)
    done.refreshed = refresh(ctx, batch_ids)
    for pb_id in collectable(ctx, batch_ids):
        if ctx.collect_async is not None:
            ctx.collect_async(pb_id)
        elif collect.collect(ctx, pb_id) is not None:
            done.collected.append(pb_id)
    for batch_id in _dispatchable(ctx, batch_ids):
        done.created += dispatch.dispatch(ctx, batch_id)
    done.to_sync = _sync_queued(ctx, batch_ids)
    if done.to_sync and ctx.send_sync is not None:
        ctx.send_sync(done.to_sync)
    for batch_id in _finishable(ctx, batch_ids):
        if executor.finish_if_done(ctx.deps, batch_id):
            done.finished.append(batch_id)
    for batch_id in _with_inputs_left(ctx, batch_ids):
        uploads.clean_inputs(ctx, batch_id)
    return done


def recover(ctx: RouteContext, batch_ids: Collection[int] | None = None) -> list[int]:
    """Finish `preparing` provider batches whose process is gone (their lease lapsed)."""
    now = utcnow()
    with ctx.deps.db.session() as session:
        ids = list(
            session.scalars(
                select(ProviderBatch.id).where(
                    ProviderBatch.state == P.PREPARING,
                    or_(ProviderBatch.lease_until.is_(None), ProviderBatch.lease_until < now),
                    *_in(batch_ids),
                )
            )
        )
    taken = []
    for pb_id in ids:
        if take_lease(ctx, pb_id, [P.PREPARING]) is not None:
            dispatch.prepare(ctx, pb_id)
            taken.append(pb_id)
    return taken


def cancel_open(
    ctx: RouteContext, batch_ids: Collection[int] | None = None, only_cancelled: bool = False
) -> list[int]:
    """Cancel at the provider the open provider batches of these batches (with
    `only_cancelled`: of batches a person cancelled); the ids asked to cancel. Lines finished
    before the cancel stay in the output file, billed: they are collected and booked."""
    conditions = [
        ProviderBatch.state == P.OPEN,
        ProviderBatch.provider_status.not_in([*PROVIDER_FINAL, "cancelling"]),
        *_in(batch_ids),
    ]
    with ctx.deps.db.session() as session:
        query = select(ProviderBatch.id, ProviderBatch.provider_id).where(*conditions)
        if only_cancelled:
            query = query.join(Batch, Batch.id == ProviderBatch.batch_id).where(
                Batch.state == BatchState.CANCELLED
            )
        rows = list(session.execute(query))
    asked = []
    for pb_id, provider_id in rows:
        if provider_id is None:
            continue
        try:
            remote = ctx.api.cancel(provider_id)
        except ProviderError as exc:
            log.warning("provider batch %s: cancel failed (tried again later): %s", pb_id, exc)
            continue
        _store(ctx, pb_id, remote_values(remote))
        asked.append(pb_id)
    return asked


def refresh(ctx: RouteContext, batch_ids: Collection[int] | None = None) -> int:
    """Ask the provider where each open provider batch is; how many were refreshed."""
    with ctx.deps.db.session() as session:
        rows = list(
            session.execute(
                select(ProviderBatch.id, ProviderBatch.provider_id).where(
                    ProviderBatch.state == P.OPEN,
                    ProviderBatch.provider_id.is_not(None),
                    *_in(batch_ids),
                )
            )
        )
    refreshed = 0
    for pb_id, provider_id in rows:
        assert provider_id is not None
        try:
            remote = ctx.api.retrieve(provider_id)
        except ProviderError as exc:
            log.warning("provider batch %s: could not be read: %s", pb_id, exc)
            continue
        _store(ctx, pb_id, remote_values(remote))
        refreshed += 1
    return refreshed


def _store(ctx: RouteContext, pb_id: int, values: dict[str, object]) -> None:
    with ctx.deps.db.session() as session:
        session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.id == pb_id, ProviderBatch.state == P.OPEN)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        session.commit()


def collectable(ctx: RouteContext, batch_ids: Collection[int] | None = None) -> list[int]:
    """Provider batches to collect: finished at the provider, or whose collector died."""
    now = utcnow()
    with ctx.deps.db.session() as session:
        return list(
            session.scalars(
                select(ProviderBatch.id)
                .where(
                    or_(
                        and_(
                            ProviderBatch.state == P.OPEN,
                            ProviderBatch.provider_status.in_(list(PROVIDER_FINAL)),
                        ),
                        ProviderBatch.state == P.COLLECTING,
                    ),
                    or_(ProviderBatch.lease_until.is_(None), ProviderBatch.lease_until < now),
                    *_in(batch_ids),
                )
                .order_by(ProviderBatch.id)
            )
        )


def _batch_route(batch_ids: Collection[int] | None) -> list[ColumnElement[bool]]:
    cond: list[ColumnElement[bool]] = [Batch.route == Route.BATCH]
    if batch_ids is not None:
        cond.append(Batch.id.in_(list(batch_ids)))
    return cond


def _dispatchable(ctx: RouteContext, batch_ids: Collection[int] | None) -> list[int]:
    queued = exists().where(
        Job.batch_id == Batch.id,
        Job.state == JobState.QUEUED,
        or_(Job.route.is_(None), Job.route == Route.BATCH),
    )
    with ctx.deps.db.session() as session:
        return list(
            session.scalars(
                select(Batch.id).where(
                    Batch.state == BatchState.RUNNING, queued, *_batch_route(batch_ids)
                )
            )
        )


def _sync_queued(ctx: RouteContext, batch_ids: Collection[int] | None) -> list[int]:
    """Queued jobs of running batch-route batches moved to the sync route, untouched for a
    poll interval (the collector hands them on at once; this catches what a crash dropped)."""
    cutoff = utcnow() - timedelta(seconds=ctx.deps.settings.batch_poll_seconds)
    with ctx.deps.db.session() as session:
        return list(
            session.scalars(
                select(Job.id)
                .join(Batch, Batch.id == Job.batch_id)
                .where(
                    Batch.state == BatchState.RUNNING,
                    Job.state == JobState.QUEUED,
                    Job.route == Route.SYNC,
                    Job.updated_at < cutoff,
                    *_batch_route(batch_ids),
                )
                .limit(10_000)
            )
        )


def _finishable(ctx: RouteContext, batch_ids: Collection[int] | None) -> list[int]:
    """Open batch-route batches with no job left to run and no provider batch open."""
    pending = exists().where(Job.batch_id == Batch.id, Job.state.in_(list(JOB_PENDING)))
    with ctx.deps.db.session() as session:
        return list(
            session.scalars(
                select(Batch.id).where(
                    Batch.state.in_(list(BATCH_OPEN)), ~pending, *_batch_route(batch_ids)
                )
            )
        )


def _with_inputs_left(ctx: RouteContext, batch_ids: Collection[int] | None) -> list[int]:
    """Closed batch-route batches (finished or cancelled) with no provider batch open that
    still have uploaded inputs at the provider (their provider files not kept)."""
    open_pb = exists().where(
        ProviderBatch.batch_id == Batch.id,
        ProviderBatch.state.in_([P.PREPARING, P.OPEN, P.COLLECTING]),
    )
    live = exists().where(
        ProviderBatch.batch_id == Batch.id,
        ProviderBatchFile.provider_batch_id == ProviderBatch.id,
        ProviderFile.id == ProviderBatchFile.provider_file_id,
        ProviderFile.deleted_at.is_(None),
    )
    with ctx.deps.db.session() as session:
        return [
            batch_id
            for batch_id, settings in session.execute(
                select(Batch.id, Batch.settings).where(
                    Batch.state.in_([BatchState.FINISHED, BatchState.CANCELLED]),
                    ~open_pb,
                    live,
                    *_batch_route(batch_ids),
                )
            )
            if not (settings or {}).get("keep_provider_files")
        ]


def open_provider_batches(ctx: RouteContext, batch_id: int) -> int:
    """Provider batches of a batch with lines not yet booked."""
    with ctx.deps.db.session() as session:
        return len(
            session.scalars(
                select(ProviderBatch.id).where(
                    ProviderBatch.batch_id == batch_id,
                    ProviderBatch.state.in_((P.PREPARING, P.OPEN, P.COLLECTING)),
                )
            ).all()
        )


def release_leases(ctx: RouteContext, batch_id: int) -> int:
    """Drop every lease on the batch's provider batches: a single-machine run continuing after
    it was killed (no other process can hold them; `resume --local`, `run` again)."""
    with ctx.deps.db.session() as session:
        result = session.execute(
            update(ProviderBatch)
            .where(ProviderBatch.batch_id == batch_id, ProviderBatch.lease_until.is_not(None))
            .values(lease_until=None, lease_token=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


def run_local(
    ctx: RouteContext,
    batch_id: int,
    stop: Callable[[], bool],
    every: float,
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """`editbatch run --route batch`: tick this batch until nothing is left to do for it (or
    `stop`). Provider batches left open by a stop are found again by the next run, which
    first takes back what a killed run held (`release_leases`)."""
    release_leases(ctx, batch_id)
    while not stop():
        tick(ctx, [batch_id])
        with ctx.deps.db.session() as session:
            state = session.scalar(select(Batch.state).where(Batch.id == batch_id))
            pending = session.scalar(
                select(Job.id)
                .where(Job.batch_id == batch_id, Job.state.in_(list(JOB_PENDING)))
                .limit(1)
            )
        if not open_provider_batches(ctx, batch_id) and (
            pending is None or state != BatchState.RUNNING
        ):
            return  # done, or stopped (held, paused, cancelled) with nothing at the provider
        sleep(every)


__all__ = [
    "Tick",
    "cancel_open",
    "collectable",
    "open_provider_batches",
    "recover",
    "refresh",
    "release_leases",
    "run_local",
    "tick",
]
