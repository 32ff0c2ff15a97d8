"""Budgets: reserve a call's cost before it is sent, swap it for the real cost afterwards.

Two counters, each moved by single conditional UPDATEs, so the check and the increment are one
atomic step on SQLite (one writer at a time) and PostgreSQL (a concurrent UPDATE of the same row
waits, then re-checks the WHERE clause on the row as committed) - across threads, processes and
machines alike:

    batches.reserved_usd       committed spend of the batch + reservations of its calls in flight
    daily_spend.reserved_usd   the same across every batch, per UTC day

    reserve:  UPDATE ... SET reserved_usd = reserved_usd + :x
              WHERE ... AND (cap IS NULL OR reserved_usd + :x <= cap)      -- 0 rows: refused
    settle:   UPDATE ... SET reserved_usd = reserved_usd - :reserved + :actual

Sums are rounded to the micro-dollar inside the statement: SQLite keeps NUMERIC as a double, and
rounding each sum stops float error from accumulating over 100k calls (PostgreSQL is exact).
Overshoot is bounded: spend <= cap + calls in flight x (largest actual - its reservation); see
docs/cost.md.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, bindparam, exists, func, or_, select, true, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.cost.estimate import Estimate
from pipeline.cost.pricing import quantize
from pipeline.db.jobs import hold_batch, rowcount
from pipeline.db.models import Batch, DailySpend, Job, Money
from pipeline.errors import NotFoundError
from pipeline.states import HoldCode, JobState

__all__ = [
    "BUDGET_PREFIX",
    "DAILY_PREFIX",
    "daily_spent",
    "reconcile",
    "reserve",
    "reserve_call",
    "settle",
]

BUDGET_PREFIX = "budget:"
DAILY_PREFIX = "daily budget:"


def _money(value: Decimal, name: str) -> Any:
    return bindparam(name, quantize(value), type_=Money)


def _plus(column: Any, amount: Any) -> ColumnElement[Decimal]:
    """column + amount, rounded to the micro-dollar (kept exact on SQLite's float NUMERIC)."""
    return func.round(column + amount, 6, type_=Money)


def _ensure_day(session: Session, day: date) -> None:
    """Insert the day's row if it is missing (concurrent callers: exactly one insert wins)."""
    dialect = session.get_bind().dialect.name
    values = {"day": day, "reserved_usd": Decimal(0)}
    if dialect == "sqlite":
        session.execute(
            sqlite_insert(DailySpend)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["day"])
        )
        return
    if dialect == "postgresql":
        session.execute(
            pg_insert(DailySpend).values(**values).on_conflict_do_nothing(index_elements=["day"])
        )
        return
    if session.get(DailySpend, day) is None:  # other databases: insert, tolerate losing the race
        try:
            with session.begin_nested():
                session.add(DailySpend(day=day, reserved_usd=Decimal(0)))
        except IntegrityError:
            pass


def _usd(value: Decimal | None) -> str:
    return "$?" if value is None else f"${quantize(Decimal(value))}"


def reserve(
    session: Session, batch_id: int, amount: Decimal, daily_cap: Decimal | None, today: date
) -> str | None:
    """Reserve `amount` USD for one call of batch `batch_id` before sending it.

    Returns None when reserved (the reservation is committed), else the reason it was refused:
    nothing is reserved, the batch is held with that reason (committed), and the call must not
    be sent. Reasons start with "budget:" (the batch's budget) or "daily budget:" (the cap of
    UTC day `today` across every batch; None means no cap). Uses and commits `session`.
    """
    if amount < 0:
        raise ValueError(f"cannot reserve a negative amount ({amount})")
    x = _money(amount, "amount")
    _ensure_day(session, today)
    session.commit()  # the day's row exists for everyone before anyone counts on it

    # Batch first, then the day: every writer takes the two rows in the same order.
    result = session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            or_(Batch.budget_usd.is_(None), _plus(Batch.reserved_usd, x) <= Batch.budget_usd),
        )
        .values(reserved_usd=_plus(Batch.reserved_usd, x))
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        session.rollback()
        row = session.execute(
            select(Batch.budget_usd, Batch.reserved_usd).where(Batch.id == batch_id)
        ).one_or_none()
        if row is None:
            raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
        budget, reserved = row
        reason = (
            f"{BUDGET_PREFIX} batch budget {_usd(budget)} reached ({_usd(reserved)} "
            f"committed+reserved; the next call needs up to {_usd(amount)}). Raise it with "
            f"`editbatch resume {batch_id} --budget USD`"
        )
        return _refuse(session, batch_id, HoldCode.BUDGET, reason)

    cap_ok: ColumnElement[bool] = true()
    if daily_cap is not None:
        cap_ok = _plus(DailySpend.reserved_usd, x) <= _money(daily_cap, "cap")
    result = session.execute(
        update(DailySpend)
        .where(DailySpend.day == today, cap_ok)
        .values(reserved_usd=_plus(DailySpend.reserved_usd, x))
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        session.rollback()  # undoes the batch's reservation too
        spent = daily_spent(session, today)
        reason = (
            f"{DAILY_PREFIX} {_usd(daily_cap)} for {today.isoformat()} (UTC) reached "
            f"({_usd(spent)} committed+reserved across all batches; the next call needs up to "
            f"{_usd(amount)}). Raise EDITBATCH_DAILY_BUDGET_USD, or resume tomorrow with "
            f"`editbatch resume {batch_id}`"
        )
        return _refuse(session, batch_id, HoldCode.DAILY_BUDGET, reason)
    session.commit()
    return None


def reserve_call(
    session: Session, batch_id: int, estimate: Estimate, daily_cap: Decimal | None, today: date
) -> tuple[Decimal, str | None]:
    """Reserve one call's upper-bound cost (`estimate.high`): (amount reserved, refusal reason).

    The upper bound, not the expected value, so that spend stays within the budget whenever the
    published token tables hold (docs/cost.md). A model with no price reserves $0 when neither a
    batch budget nor a daily cap is set; with either set it is refused, since no budget can be
    enforced on calls of unknown cost. Uses and commits `session`, like `reserve`.
    """
    if estimate.priced and estimate.high is not None:
        return estimate.high, reserve(session, batch_id, estimate.high, daily_cap, today)
    budget = session.scalar(select(Batch.budget_usd).where(Batch.id == batch_id))
    if budget is None and daily_cap is None:
        return Decimal(0), reserve(session, batch_id, Decimal(0), None, today)
    session.rollback()
    reason = (
        f"{BUDGET_PREFIX} model {estimate.model!r} has no price, so a budget cannot be enforced "
        "on its calls: add it to a price file (EDITBATCH_PRICES_FILE) and "
        f"`editbatch resume {batch_id}`, or remove the budget"
    )
    return Decimal(0), _refuse(session, batch_id, HoldCode.BUDGET, reason)


def _refuse(session: Session, batch_id: int, code: HoldCode, reason: str) -> str:
    hold_batch(session, batch_id, code, reason)
    session.commit()
    return reason


def settle(
    session: Session, batch_id: int, reserved: Decimal, actual: Decimal, today: date
) -> None:
    """Swap a call's reservation for its actual cost (0 when nothing was billed).

    `today` must be the day passed to `reserve` for this call. When the cost is unknown (an
    unpriced model), pass `actual=reserved` to keep the reservation as spent. Caller commits,
    best in the same transaction as the attempt row, so the cost and the counters move together.
    """
    delta = _money(quantize(actual) - quantize(reserved), "delta")
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(reserved_usd=_plus(Batch.reserved_usd, delta))
        .execution_options(synchronize_session=False)
    )
    _ensure_day(session, today)
    session.execute(
        update(DailySpend)
        .where(DailySpend.day == today)
        .values(reserved_usd=_plus(DailySpend.reserved_usd, delta))
        .execution_options(synchronize_session=False)
    )


def daily_spent(session: Session, day: date) -> Decimal:
    """Committed spend + in-flight reservations of UTC day `day`, across all batches."""
    value = session.scalar(select(DailySpend.reserved_usd).where(DailySpend.day == day))
    return Decimal(0) if value is None else quantize(Decimal(value))


def reconcile(session: Session, batch_id: int) -> bool:
    """Drop reservations leaked by workers that died mid-call: set the batch's counter to its
    committed spend (sum of its jobs' costs), in one statement, only while none of its jobs is
    running or submitted (a line of a provider batch). True if reset. Call after expired
    leases are requeued (e.g. on resume). Caller commits. The day's counter is left as it is:
    a leak there only makes the cap stricter, and only until the day ends.
    """
    committed = (
        select(func.coalesce(func.sum(Job.cost_usd), 0))
        .where(Job.batch_id == batch_id)
        .scalar_subquery()
    )
    # A submitted job's line (the batch route) holds a reservation until it is booked.
    running = exists().where(
        Job.batch_id == batch_id, Job.state.in_((JobState.RUNNING, JobState.SUBMITTED))
    )
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, ~running)
        .values(reserved_usd=func.round(committed, 6, type_=Money))
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) == 1
