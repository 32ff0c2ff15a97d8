"""Job and batch state transitions as single SQL statements (atomic across workers).

Job states:
    rejected                                  preflight failed, never sent (terminal)
    queued -> running -> succeeded            (terminal)
                      -> retrying -> running  transient error, waiting for the next attempt
                      -> failed               permanent error or attempts exhausted (terminal)
    queued|retrying -> held -> queued         batch held (quota, auth, budget) or paused
    queued|retrying|held -> cancelled         (terminal)
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Result, and_, func, or_, select, update
from sqlalchemy.orm import Session

from pipeline.db.models import Attempt, Batch, Job, utcnow
from pipeline.db.session import Database


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (CursorResult has it; the generic Result type does not say so)."""
    return int(getattr(result, "rowcount", 0) or 0)


TERMINAL = ("succeeded", "failed", "rejected", "cancelled")
ACTIVE = ("queued", "running", "retrying")


def claim(session: Session, job_id: int, lease_seconds: float) -> str | None:
    """Take job `job_id` for this worker: returns a claim token, or None if not claimable.

    Claimable: queued, or running/retrying whose lease has expired (its worker is gone). A
    redelivered message for a finished job, or one another worker holds, does nothing.
    """
    now = utcnow()
    token = uuid.uuid4().hex
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.state == "queued",
                and_(
                    Job.state.in_(("running", "retrying")),
                    or_(Job.lease_until.is_(None), Job.lease_until < now),
                ),
            ),
        )
        .values(
            state="running",
            lease_until=now + timedelta(seconds=lease_seconds),
            claim_token=token,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return token if rowcount(result) == 1 else None


def owned(job_id: int, token: str) -> list[ColumnElement[bool]]:
    """WHERE clause parts: the job is still ours (nobody re-claimed it after our lease)."""
    return [Job.id == job_id, Job.claim_token == token, Job.state.in_(("running", "retrying"))]


def set_state(
    session: Session,
    job_id: int,
    token: str,
    state: str,
    *,
    lease_seconds: float | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    next_attempt_at: datetime | None = None,
) -> bool:
    """Move our claimed job to `state`; False if we no longer own it. Caller commits."""
    now = utcnow()
    values: dict[str, object] = {"state": state, "updated_at": now}
    if lease_seconds is not None:
        values["lease_until"] = now + timedelta(seconds=lease_seconds)
    if state in TERMINAL or state in ("held", "queued"):
        values["lease_until"] = None
        values["claim_token"] = None
    if state in TERMINAL:
        values["finished_at"] = now
    if error_code is not None or error_message is not None:
        values["last_error_code"] = error_code
        values["last_error_message"] = error_message
    values["next_attempt_at"] = next_attempt_at
    result = session.execute(
        update(Job)
        .where(*owned(job_id, token))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def count_attempt(session: Session, job_id: int, lease_seconds: float) -> None:
    """One more call is starting: count it and renew the lease to cover it. Caller commits."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(attempts=Job.attempts + 1, lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )


def add_cost(session: Session, job_id: int, cost: Decimal) -> None:
    """Add an attempt's cost to the job's running total. Caller commits."""
    if cost:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(cost_usd=Job.cost_usd + cost)
            .execution_options(synchronize_session=False)
        )


def hold_batch(session: Session, batch_id: int, reason: str) -> bool:
    """Stop sending for a batch until a person resumes it. Caller commits."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == "running")
        .values(state="held", hold_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def finish_batch_if_done(session: Session, batch_id: int) -> bool:
    """Mark the batch finished when no job is left to run; True for exactly one caller."""
    pending = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.state.in_((*ACTIVE, "held")))
    )
    if pending:
        return False
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_(("running", "held", "paused")))
        .values(state="finished", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def release_held_jobs(session: Session, batch_id: int) -> int:
    """Held jobs of a batch go back to queued (on resume). Caller commits."""
    result = session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.state == "held")
        .values(state="queued", updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


def requeue_expired(
    session: Session, batch_id: int | None = None, ignore_lease: bool = False
) -> list[int]:
    """Jobs left running/retrying past their lease (worker gone) go back to queued.

    `ignore_lease`: every running job of the batch, for a single-machine `run` whose previous
    process was killed (no other process can be working on it).
    """
    now = utcnow()
    cond: list[ColumnElement[bool]] = [Job.state.in_(("running", "retrying"))]
    if not ignore_lease:
        cond.append(Job.lease_until < now)
    if batch_id is not None:
        cond.append(Job.batch_id == batch_id)
    ids = list(session.scalars(select(Job.id).where(*cond)))
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), *cond)
            .values(state="queued", claim_token=None, lease_until=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        mark_interrupted(session, ids)
    session.commit()
    return ids


def mark_interrupted(session: Session, job_ids: list[int]) -> None:
    """Attempts left `in_flight` by a dead worker: the call's fate is unknown. Caller commits."""
    session.execute(
        update(Attempt)
        .where(Attempt.job_id.in_(job_ids), Attempt.outcome == "in_flight")
        .values(
            outcome="interrupted",
            finished_at=utcnow(),
            error_message="the worker stopped during the call (killed or lost)",
        )
        .execution_options(synchronize_session=False)
    )


def idle_running_batches(db: Database) -> list[int]:
    """Running batches with no job left to run (their finish may have been missed)."""
    active = select(Job.id).where(Job.batch_id == Batch.id, Job.state.in_((*ACTIVE, "held")))
    with db.session() as session:
        return list(
            session.scalars(select(Batch.id).where(Batch.state == "running", ~active.exists()))
        )
