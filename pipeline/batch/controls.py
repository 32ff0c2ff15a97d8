"""What a person can do to a batch: pause, cancel, resume, retry failed jobs.

Each is a few atomic UPDATEs through `pipeline.db.jobs`; workers notice through the batch state
before every call. `resume` is the one way a stopped batch runs again (the CLI's `resume` and
`run`, and `retry` on a held batch, all come through it), because it is also where what a dead
worker left behind is cleaned up: expired claims, and budget reservations that never settled.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.cost import budget
from pipeline.db import events, jobs
from pipeline.db.events import EventKind
from pipeline.db.models import Batch, Job
from pipeline.errors import EditbatchError, NotFoundError
from pipeline.spec import EditSpec
from pipeline.states import BATCH_CLOSED, BATCH_STOPPED, BatchState, HoldCode, JobState


def _batch(session: Session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    return batch


def pause(session: Session, batch_id: int) -> None:
    """Stop starting new calls; calls in flight finish. `resume` continues."""
    batch = _batch(session, batch_id)
    if not jobs.pause_batch(session, batch_id):
        raise EditbatchError(f"batch {batch_id} is {batch.state}; only a running batch pauses")
    session.commit()


def cancel(session: Session, batch_id: int) -> int:
    """Cancel every job not yet started; returns how many. Calls in flight finish (and count)."""
    batch = _batch(session, batch_id)
    if not jobs.cancel_batch(session, batch_id):
        raise EditbatchError(f"batch {batch_id} is already {batch.state}")
    cancelled = jobs.cancel_unstarted(session, batch_id)
    session.commit()
    return cancelled


def resume(
    session: Session,
    batch_id: int,
    budget_usd: Decimal | None = None,
    orphans: bool = False,
    note: str | None = None,
) -> None:
    """Make a held or paused batch run again (a running one is tidied the same way).

    Held jobs and jobs of dead workers are queued, and the reservations those workers left are
    dropped, so the budget counts only what was spent. `orphans`: every claimed job of the
    batch belongs to a dead process whatever its lease says (a single-machine `run` continuing
    after it was killed: no other process can hold them). A batch held for an API outage gets
    an event saying it resumed (`note`, or "resumed by a person").
    """
    batch = _batch(session, batch_id)
    if batch.state in BATCH_CLOSED:
        raise EditbatchError(
            f"batch {batch_id} is {batch.state}; nothing to resume "
            f"(to run failed jobs again: editbatch retry {batch_id} --failed)"
        )
    if batch.state in BATCH_STOPPED:
        if batch.hold_code in (HoldCode.API_UNREACHABLE, HoldCode.OUTAGE):
            events.record(
                session, batch_id, EventKind.OUTAGE_RESUMED, note or "resumed by a person"
            )
        jobs.reopen_batch(session, batch_id)
    if budget_usd is not None:
        batch.budget_usd = budget_usd
    jobs.release_held_jobs(session, batch_id)
    session.commit()
    jobs.requeue_expired(session, batch_id, ignore_lease=orphans)
    # Reservations of calls whose workers died never settled: count only what was spent.
    budget.reconcile(session, batch_id)
    session.commit()


def retry_failed(
    session: Session, batch_id: int, prompt: str | None = None, model: str | None = None
) -> int:
    """Queue the failed jobs again (successes kept), optionally with a new prompt or model.

    Each retried job gets a fresh set of attempts; its earlier attempts stay in the ledger. A
    finished batch reopens; a held or paused one is resumed (as `resume` does).
    """
    batch = _batch(session, batch_id)
    if batch.state == BatchState.CANCELLED:
        raise EditbatchError(f"batch {batch_id} is cancelled")
    if prompt is not None or model is not None:
        failed = session.scalars(
            select(Job).where(Job.batch_id == batch_id, Job.state == JobState.FAILED)
        )
        for job in failed:
            spec = EditSpec.from_json(job.spec)
            spec = replace(
                spec,
                prompt=prompt if prompt is not None else spec.prompt,
                model=model if model is not None else spec.model,
            )
            job.spec = spec.to_json()
            job.model = spec.model
            job.fingerprint = None  # a changed request is a different edit: never reuse
        session.flush()
    count = jobs.requeue_failed(session, batch_id)
    session.commit()
    if not count:
        return 0
    if batch.state in BATCH_STOPPED:
        resume(session, batch_id)
    elif batch.state == BatchState.FINISHED:
        jobs.reopen_batch(session, batch_id)
        session.commit()
    return count
