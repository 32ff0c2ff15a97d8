"""What a person can do to a batch: pause, cancel, resume, retry failed jobs.

Each is a few atomic UPDATEs; workers notice through the batch state before every call.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipeline.cost import budget
from pipeline.db import jobs
from pipeline.db.models import Batch, Job, utcnow
from pipeline.errors import EditbatchError, NotFoundError
from pipeline.spec import EditSpec


def _batch(session: Session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    return batch


def pause(session: Session, batch_id: int) -> None:
    """Stop starting new calls; calls in flight finish. `resume` continues."""
    batch = _batch(session, batch_id)
    if batch.state != "running":
        raise EditbatchError(f"batch {batch_id} is {batch.state}; only a running batch pauses")
    batch.state, batch.hold_reason = "paused", "paused by a person"
    session.commit()


def cancel(session: Session, batch_id: int) -> int:
    """Cancel every job not yet started; returns how many. Calls in flight finish (and count)."""
    batch = _batch(session, batch_id)
    if batch.state in ("finished", "cancelled"):
        raise EditbatchError(f"batch {batch_id} is already {batch.state}")
    batch.state, batch.finished_at = "cancelled", utcnow()
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.state.in_(("queued", "retrying", "held")))
        .values(state="cancelled", finished_at=utcnow(), claim_token=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return jobs.rowcount(result)


def resume(session: Session, batch_id: int, budget_usd: Decimal | None = None) -> None:
    """Make a held/paused batch run again; held jobs and jobs of dead workers are queued."""
    batch = _batch(session, batch_id)
    if batch.state in ("finished", "cancelled"):
        raise EditbatchError(
            f"batch {batch_id} is {batch.state}; nothing to resume "
            f"(to run failed jobs again: editbatch retry {batch_id} --failed)"
        )
    batch.state, batch.hold_reason = "running", None
    if budget_usd is not None:
        batch.budget_usd = budget_usd
    jobs.release_held_jobs(session, batch_id)
    session.commit()
    jobs.requeue_expired(session, batch_id)
    # Reservations of calls whose workers died never settled: count only what was spent.
    budget.reconcile(session, batch_id)
    session.commit()


def retry_failed(
    session: Session, batch_id: int, prompt: str | None = None, model: str | None = None
) -> int:
    """Queue the failed jobs again (successes kept), optionally with a new prompt or model.

    Each retried job gets a fresh set of attempts; its earlier attempts stay in the ledger.
    """
    batch = _batch(session, batch_id)
    if batch.state == "cancelled":
        raise EditbatchError(f"batch {batch_id} is cancelled")
    failed = list(
        session.scalars(select(Job).where(Job.batch_id == batch_id, Job.state == "failed"))
    )
    now = utcnow()
    for job in failed:
        if prompt is not None or model is not None:
            spec = EditSpec.from_json(job.spec)
            spec = replace(
                spec,
                prompt=prompt if prompt is not None else spec.prompt,
                model=model if model is not None else spec.model,
            )
            job.spec = spec.to_json()
            job.model = spec.model
            job.fingerprint = None  # a changed request is a different edit: never reuse
        job.state = "queued"
        job.attempt_base = job.attempts
        job.last_error_code = None
        job.last_error_message = None
        job.finished_at = None
        job.updated_at = now
    if failed:
        batch.state, batch.finished_at, batch.hold_reason = "running", None, None
    session.commit()
    return len(failed)
