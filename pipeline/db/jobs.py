"""Every change of a job's or a batch's state, as single SQL statements (atomic across workers).

`insert_jobs` is the one way jobs are created (in a state `pipeline.states.JOB_INITIAL` lists);
`move_jobs`, `move_batch` and `move_provider_batch` are the only writers of `jobs.state`,
`batches.state` and `provider_batches.state`: each
states the states it moves from, checks every move against `pipeline.states` (raising
`InvalidTransition` for one the table does not allow), and puts the sources in the WHERE clause,
so the database never makes a move the table does not list. The helpers below (claim, set_state,
hold_batch, ...) are the named moves the rest of the code uses. The diagrams are in
`pipeline/states.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Result, func, insert, or_, select, update
from sqlalchemy.orm import Session

from pipeline.db.models import Attempt, Batch, Job, ProviderBatch, utcnow
from pipeline.db.session import Database
from pipeline.states import (
    BATCH_OPEN,
    BATCH_STOPPED,
    JOB_CLAIMED,
    JOB_MOVES,
    JOB_PENDING,
    JOB_TERMINAL,
    AttemptOutcome,
    BatchState,
    HoldCode,
    JobState,
    ProviderBatchState,
    check_batch_move,
    check_job_creation,
    check_job_move,
    check_provider_batch_move,
)


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (CursorResult has it; the generic Result type does not say so)."""
    return int(getattr(result, "rowcount", 0) or 0)


# -- the writers ---------------------------------------------------------------------------


def insert_jobs(
    session: Session, rows: Sequence[Mapping[str, Any]], *, return_ids: bool = False
) -> list[int]:
    """Create jobs from `rows` (column -> value, the same keys in every row: one executemany).

    Every row's state must be one a job is created in (`InvalidTransition` otherwise, and
    nothing is written). `return_ids`: the new ids, in the order of `rows`. Caller commits.
    """
    if not rows:
        return []
    check_job_creation({JobState(r["state"]) for r in rows})
    if not return_ids:
        session.execute(insert(Job), list(rows))
        return []
    returning = insert(Job).returning(Job.id, sort_by_parameter_order=True)
    return list(session.scalars(returning, list(rows)))


def move_jobs(
    session: Session,
    target: JobState,
    *where: ColumnElement[bool],
    sources: Collection[JobState],
    values: Mapping[str, Any] | None = None,
) -> int:
    """Move the jobs matching `where` that are in one of `sources` to `target`; how many moved.

    Leaving a claim (to queued, held or a terminal state) drops the lease and the claim token;
    reaching a terminal state stamps `finished_at`. `values` sets more columns. Caller commits.
    """
    check_job_move(sources, target)
    now = utcnow()
    row: dict[str, Any] = {"state": target, "updated_at": now}
    if target not in JOB_CLAIMED:
        row["lease_until"] = None
        row["claim_token"] = None
    if target in JOB_TERMINAL:
        row["finished_at"] = now
    row.update(values or {})
    result = session.execute(
        update(Job)
        .where(Job.state.in_(list(sources)), *where)
        .values(**row)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


def move_batch(
    session: Session,
    batch_id: int,
    target: BatchState,
    *,
    sources: Collection[BatchState],
    values: Mapping[str, Any] | None = None,
) -> bool:
    """Move batch `batch_id` to `target` if it is in one of `sources`; True if it moved.

    Leaving the stopped states clears the hold; finishing stamps `finished_at`. Caller commits.
    """
    check_batch_move(sources, target)
    row: dict[str, Any] = {"state": target}
    if target not in BATCH_STOPPED:
        row["hold_code"] = None
        row["hold_reason"] = None
    if target in (BatchState.FINISHED, BatchState.CANCELLED):
        row["finished_at"] = utcnow()
    elif target is BatchState.RUNNING:
        row["finished_at"] = None
    row.update(values or {})
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state.in_(list(sources)))
        .values(**row)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def move_provider_batch(
    session: Session,
    target: ProviderBatchState,
    *where: ColumnElement[bool],
    sources: Collection[ProviderBatchState],
    values: Mapping[str, Any] | None = None,
) -> int:
    """Move the provider batches matching `where` that are in one of `sources` to `target`;
    how many moved. Reaching collected or abandoned stamps `finished_at`. Caller commits."""
    check_provider_batch_move(sources, target)
    row: dict[str, Any] = {"state": target}
    if target in (ProviderBatchState.COLLECTED, ProviderBatchState.ABANDONED):
        row["finished_at"] = utcnow()
        row["lease_until"] = None
        row["lease_token"] = None
    row.update(values or {})
    result = session.execute(
        update(ProviderBatch)
        .where(ProviderBatch.state.in_(list(sources)), *where)
        .values(**row)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)


# -- jobs -----------------------------------------------------------------------------------


def claim(session: Session, job_id: int, lease_seconds: float) -> str | None:
    """Take job `job_id` for this worker: returns a claim token, or None if not claimable.

    Claimable: queued, or running/retrying whose lease has expired (its worker is gone). A
    redelivered message for a finished job, or one another worker holds, does nothing.
    """
    now = utcnow()
    token = uuid.uuid4().hex
    moved = move_jobs(
        session,
        JobState.RUNNING,
        Job.id == job_id,
        or_(
            Job.state == JobState.QUEUED,
            or_(Job.lease_until.is_(None), Job.lease_until < now),
        ),
        sources=(JobState.QUEUED, *JOB_CLAIMED),
        values={"lease_until": now + timedelta(seconds=lease_seconds), "claim_token": token},
    )
    session.commit()
    return token if moved == 1 else None


def owned(job_id: int, token: str) -> list[ColumnElement[bool]]:
    """WHERE clause parts: the job is still ours (nobody re-claimed it after our lease)."""
    return [Job.id == job_id, Job.claim_token == token, Job.state.in_(list(JOB_CLAIMED))]


def set_state(
    session: Session,
    job_id: int,
    token: str,
    state: JobState,
    *,
    lease_seconds: float | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    next_attempt_at: datetime | None = None,
    forgive: int = 0,
) -> bool:
    """Move our claimed job to `state`; False if we no longer own it. `forgive` attempts stop
    counting against its attempt budget (calls an API outage cost it). Caller commits."""
    values: dict[str, Any] = {"next_attempt_at": next_attempt_at}
    if forgive:
        values["attempt_base"] = Job.attempt_base + forgive
    if lease_seconds is not None:
        values["lease_until"] = utcnow() + timedelta(seconds=lease_seconds)
    if error_code is not None or error_message is not None:
        values["last_error_code"] = error_code
        values["last_error_message"] = error_message
    sources = [s for s in JOB_CLAIMED if state in JOB_MOVES[s]]
    if not sources:
        check_job_move(JOB_CLAIMED, state)  # raises, naming the move
    return (
        move_jobs(
            session,
            state,
            Job.id == job_id,
            Job.claim_token == token,
            sources=sources,
            values=values,
        )
        == 1
    )


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


def release_held_jobs(session: Session, batch_id: int) -> int:
    """Held jobs of a batch go back to queued (on resume). Caller commits."""
    return move_jobs(session, JobState.QUEUED, Job.batch_id == batch_id, sources=[JobState.HELD])


def cancel_unstarted(session: Session, batch_id: int) -> int:
    """Jobs of a batch that no call is running for are cancelled. Caller commits."""
    return move_jobs(
        session,
        JobState.CANCELLED,
        Job.batch_id == batch_id,
        sources=(JobState.QUEUED, JobState.RETRYING, JobState.HELD),
    )


def requeue_failed(session: Session, batch_id: int, keep: Collection[int] = ()) -> int:
    """Failed jobs go back to queued with a fresh attempt budget (`retry --failed`), except
    the jobs `keep` names (they stay failed)."""
    cond: list[ColumnElement[bool]] = [Job.batch_id == batch_id]
    if keep:
        cond.append(Job.id.not_in(list(keep)))
    return move_jobs(
        session,
        JobState.QUEUED,
        *cond,
        sources=[JobState.FAILED],
        values={
            "attempt_base": Job.attempts,
            "last_error_code": None,
            "last_error_message": None,
            "finished_at": None,
        },
    )


def requeue_expired(
    session: Session, batch_id: int | None = None, ignore_lease: bool = False
) -> list[int]:
    """Jobs left running/retrying past their lease (worker gone) go back to queued.

    `ignore_lease`: every running job of the batch, for a single-machine `run` whose previous
    process was killed (no other process can be working on it).
    """
    cond: list[ColumnElement[bool]] = []
    if not ignore_lease:
        cond.append(Job.lease_until < utcnow())
    if batch_id is not None:
        cond.append(Job.batch_id == batch_id)
    claimed = Job.state.in_(list(JOB_CLAIMED))
    ids = list(session.scalars(select(Job.id).where(claimed, *cond)))
    if ids:
        # Attempts first, then jobs: the order in which the executor writes them, so that
        # PostgreSQL's counter triggers lock the counter rows in one order (no deadlock with a
        # worker recording an attempt at the same moment; migration 0005).
        mark_interrupted(session, ids)
        move_jobs(session, JobState.QUEUED, Job.id.in_(ids), *cond, sources=JOB_CLAIMED)
    session.commit()
    return ids


ANSWER_LOST = "answer_lost"
"""error_code of an interrupted attempt: its answer, made and billed by the API, never came."""


def mark_interrupted(session: Session, job_ids: list[int]) -> int:
    """Attempts left `in_flight` by a dead worker become `interrupted`; how many. Caller commits.

    The API bills an answer once it is made, whether or not the client is still there to
    receive it, so each is booked at its job's estimated cost, flagged as estimated, with
    error_code `answer_lost`: the ledger stays within the estimate's error of the bill instead
    of missing those answers. (A call killed before it reached the API was not billed: the
    estimate then over-counts; status and the report list these attempts.)
    """
    if not job_ids:
        return 0
    lost = list(
        session.execute(
            select(Attempt.id, Attempt.job_id, Job.estimated_usd)
            .join(Job, Job.id == Attempt.job_id)
            .where(
                Attempt.job_id.in_(job_ids),
                Attempt.outcome == AttemptOutcome.IN_FLIGHT,
                Attempt.provider_batch_id.is_(None),  # batch-route lines are at the provider
            )
        )
    )
    for attempt_id, job_id, estimate in lost:
        cost = Decimal(0) if estimate is None else Decimal(estimate)
        result = session.execute(
            update(Attempt)
            .where(Attempt.id == attempt_id, Attempt.outcome == AttemptOutcome.IN_FLIGHT)
            .values(
                outcome=AttemptOutcome.INTERRUPTED,
                finished_at=utcnow(),
                error_code=ANSWER_LOST,
                error_message="the worker stopped during the call (killed or lost): the answer "
                "was lost; booked at the job's estimated cost, since the API bills an answer "
                "once it is made",
                cost_usd=cost,
                cost_estimated=estimate is not None,
                priced=estimate is not None,
            )
            .execution_options(synchronize_session=False)
        )
        if rowcount(result) == 1:
            add_cost(session, job_id, cost)
    return len(lost)


# -- batches --------------------------------------------------------------------------------


def hold_batch(session: Session, batch_id: int, code: HoldCode, reason: str) -> bool:
    """Stop sending for a running batch until it is resumed. Caller commits."""
    return move_batch(
        session,
        batch_id,
        BatchState.HELD,
        sources=[BatchState.RUNNING],
        values={"hold_code": code, "hold_reason": reason},
    )


def change_hold(
    session: Session, batch_id: int, current: HoldCode, code: HoldCode, reason: str
) -> bool:
    """A batch held for `current` stays held, now for `code` (not a move of its state: the
    outage breaker giving up leaves the batch to a person). Caller commits."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == BatchState.HELD, Batch.hold_code == current)
        .values(hold_code=code, hold_reason=reason)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1


def pause_batch(session: Session, batch_id: int) -> bool:
    """A person stops a running batch (calls in flight finish). Caller commits."""
    return move_batch(
        session,
        batch_id,
        BatchState.PAUSED,
        sources=[BatchState.RUNNING],
        values={"hold_code": HoldCode.PAUSED, "hold_reason": "paused by a person"},
    )


def reopen_batch(session: Session, batch_id: int) -> bool:
    """A held, paused or finished batch runs again (resume, retry). Caller commits."""
    return move_batch(
        session,
        batch_id,
        BatchState.RUNNING,
        sources=(*BATCH_STOPPED, BatchState.FINISHED),
    )


def cancel_batch(session: Session, batch_id: int) -> bool:
    """An open batch is cancelled. Caller commits."""
    return move_batch(session, batch_id, BatchState.CANCELLED, sources=BATCH_OPEN)


def batch_stop_state(session: Session, batch_id: int) -> JobState | None:
    """What a claimed job of the batch must become instead of calling: held or cancelled."""
    state = session.scalar(select(Batch.state).where(Batch.id == batch_id))
    if state in BATCH_STOPPED:
        return JobState.HELD
    if state == BatchState.CANCELLED:
        return JobState.CANCELLED
    return None


def finish_batch_if_done(session: Session, batch_id: int) -> bool:
    """Mark the batch finished when no job is left to run; True for exactly one caller."""
    pending = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.state.in_(list(JOB_PENDING)))
    )
    if pending:
        return False
    finished = move_batch(session, batch_id, BatchState.FINISHED, sources=BATCH_OPEN)
    session.commit()
    return finished


def queued_job_ids(db: Database, batch_id: int, chunk: int = 1000) -> Iterator[list[int]]:
    """The ids of the batch's queued jobs, in chunks (to send them, after their commit)."""
    last = 0
    while True:
        with db.session() as session:
            ids = list(
                session.scalars(
                    select(Job.id)
                    .where(Job.batch_id == batch_id, Job.state == JobState.QUEUED, Job.id > last)
                    .order_by(Job.id)
                    .limit(chunk)
                )
            )
        if not ids:
            return
        yield ids
        last = ids[-1]


def idle_running_batches(db: Database) -> list[int]:
    """Running batches with no job left to run (their finish may have been missed)."""
    active = select(Job.id).where(Job.batch_id == Batch.id, Job.state.in_(list(JOB_PENDING)))
    with db.session() as session:
        return list(
            session.scalars(
                select(Batch.id).where(Batch.state == BatchState.RUNNING, ~active.exists())
            )
        )


__all__ = [
    "ANSWER_LOST",
    "add_cost",
    "batch_stop_state",
    "cancel_batch",
    "cancel_unstarted",
    "change_hold",
    "claim",
    "count_attempt",
    "finish_batch_if_done",
    "hold_batch",
    "idle_running_batches",
    "insert_jobs",
    "mark_interrupted",
    "move_batch",
    "move_jobs",
    "move_provider_batch",
    "owned",
    "pause_batch",
    "queued_job_ids",
    "release_held_jobs",
    "reopen_batch",
    "requeue_expired",
    "requeue_failed",
    "rowcount",
    "set_state",
]
