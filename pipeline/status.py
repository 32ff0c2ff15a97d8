"""Batch status from SQL aggregates (never by loading every job)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased

from pipeline.db.models import Attempt, Batch, Job, Output
from pipeline.errors import NotFoundError

STATES = ("queued", "running", "retrying", "held", "succeeded", "failed", "rejected", "cancelled")


@dataclass
class BatchStatus:
    batch_id: int
    name: str
    state: str
    hold_reason: str | None
    created_at: datetime
    finished_at: datetime | None
    output_uri: str
    jobs_total: int
    counts: dict[str, int]
    cost_usd: Decimal
    attempts: int
    attempts_by_outcome: dict[str, int]
    outputs: int
    outputs_uncollected: int
    unpriced_attempts: int
    estimated_cost_attempts: int
    budget_usd: Decimal | None
    reserved_usd: Decimal = Decimal(0)
    estimated_usd: Decimal = Decimal(0)
    estimated_remaining_usd: Decimal = Decimal(0)
    unpriced_jobs: int = 0
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    retry_waste_usd: Decimal = Decimal(0)
    reused: int = 0
    saved_usd: Decimal = Decimal(0)
    drift_outputs: int = 0
    drift_mean: float | None = None
    drift_max: float | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cost_per_output_usd(self) -> Decimal | None:
        """Spend divided by the images delivered (None before the first one)."""
        if not self.outputs:
            return None
        return (self.cost_usd / self.outputs).quantize(Decimal("0.000001"))

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("succeeded", "failed", "rejected", "cancelled"))

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "name": self.name,
            "state": self.state,
            "hold_reason": self.hold_reason,
            "counts": self.counts,
            "jobs_total": self.jobs_total,
            "cost_usd": str(self.cost_usd),
            "budget_usd": None if self.budget_usd is None else str(self.budget_usd),
            "attempts": self.attempts,
            "attempts_by_outcome": self.attempts_by_outcome,
            "outputs": self.outputs,
            "outputs_uncollected": self.outputs_uncollected,
            "unpriced_attempts": self.unpriced_attempts,
            "unpriced_jobs": self.unpriced_jobs,
            "estimated_usd": str(self.estimated_usd),
            "estimated_remaining_usd": str(self.estimated_remaining_usd),
            "in_flight_reserved_usd": str(max(self.reserved_usd - self.cost_usd, Decimal(0))),
            "cost_per_output_usd": None
            if self.cost_per_output_usd is None
            else str(self.cost_per_output_usd),
            "retry_waste_usd": str(self.retry_waste_usd),
            "cost_breakdown": self.breakdown,
            "reused": self.reused,
            "saved_usd": str(self.saved_usd),
            "output_uri": self.output_uri,
            "mask_drift": {
                "outputs": self.drift_outputs,
                "mean": self.drift_mean,
                "max": self.drift_max,
            },
            "failures": self.failures,
        }


def batch_status(session: Session, batch_id: int, failures_limit: int = 20) -> BatchStatus:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    counts = {s: 0 for s in STATES}
    cost = Decimal(0)
    for state, n, state_cost in session.execute(
        select(Job.state, func.count(), func.coalesce(func.sum(Job.cost_usd), 0))
        .where(Job.batch_id == batch_id)
        .group_by(Job.state)
    ):
        counts[state] = int(n)
        cost += Decimal(str(state_cost))
    by_outcome: dict[str, int] = {}
    unpriced = 0
    estimated = 0
    for outcome, n, n_unpriced, n_estimated in session.execute(
        select(
            Attempt.outcome,
            func.count(),
            func.sum(case((Attempt.priced.is_(False), 1), else_=0)),
            func.sum(case((Attempt.cost_estimated.is_(True), 1), else_=0)),
        )
        .join(Job, Job.id == Attempt.job_id)
        .where(Job.batch_id == batch_id)
        .group_by(Attempt.outcome)
    ):
        by_outcome[outcome] = int(n)
        unpriced += int(n_unpriced or 0)
        estimated += int(n_estimated or 0)
    out_total, out_left, drift_n, drift_avg, drift_max = session.execute(
        select(
            func.count(Output.id),
            func.count(Output.id) - func.count(Output.collected_at),
            func.count(Output.drift),
            func.avg(Output.drift),
            func.max(Output.drift),
        )
        .join(Job, Job.id == Output.job_id)
        .where(Job.batch_id == batch_id)
    ).one()
    est_total, est_remaining, unpriced_jobs = session.execute(
        select(
            func.coalesce(func.sum(Job.estimated_usd), 0),
            func.coalesce(
                func.sum(
                    case(
                        (
                            Job.state.in_(("queued", "running", "retrying", "held")),
                            Job.estimated_usd,
                        ),
                        else_=0,
                    )
                ),
                0,
            ),
            func.sum(case((Job.estimated_usd.is_(None), 1), else_=0)),
        ).where(Job.batch_id == batch_id, Job.state != "rejected")
    ).one()
    breakdown = [
        {
            "model": model,
            "quality": quality,
            "state": state,
            "jobs": int(n),
            "cost_usd": str(Decimal(str(c)).quantize(Decimal("0.000001"))),
        }
        for model, quality, state, n, c in session.execute(
            select(
                Job.model,
                Job.quality,
                Job.state,
                func.count(),
                func.coalesce(func.sum(Job.cost_usd), 0),
            )
            .where(Job.batch_id == batch_id, Job.state != "rejected")
            .group_by(Job.model, Job.quality, Job.state)
            .order_by(Job.model, Job.quality, Job.state)
        )
    ]
    # Retry waste: what attempts cost that produced nothing kept (billed bad responses, and
    # successes whose job lost its claim).
    waste = session.scalar(
        select(func.coalesce(func.sum(Attempt.cost_usd), 0))
        .join(Job, Job.id == Attempt.job_id)
        .where(
            Job.batch_id == batch_id,
            (Attempt.outcome != "ok") | (Job.state != "succeeded"),
        )
    )
    donor = aliased(Job)
    reused, saved = session.execute(
        select(func.count(Job.id), func.coalesce(func.sum(donor.cost_usd), 0))
        .join(donor, donor.id == Job.reused_from_job_id)
        .where(Job.batch_id == batch_id)
    ).one()
    failures = [
        {
            "row": row,
            "id": key,
            "state": state,
            "code": code,
            "message": message,
        }
        for row, key, state, code, message in session.execute(
            select(
                Job.row_number,
                Job.external_key,
                Job.state,
                Job.last_error_code,
                Job.last_error_message,
            )
            .where(Job.batch_id == batch_id, Job.state.in_(("failed", "rejected")))
            .order_by(Job.row_number)
            .limit(failures_limit)
        )
    ]
    return BatchStatus(
        batch_id=batch.id,
        name=batch.name,
        state=batch.state,
        hold_reason=batch.hold_reason,
        created_at=batch.created_at,
        finished_at=batch.finished_at,
        output_uri=batch.output_uri,
        jobs_total=sum(counts.values()),
        counts=counts,
        cost_usd=cost,
        attempts=sum(by_outcome.values()),
        attempts_by_outcome=by_outcome,
        outputs=int(out_total or 0),
        outputs_uncollected=int(out_left or 0),
        drift_outputs=int(drift_n or 0),
        drift_mean=None if drift_avg is None else float(drift_avg),
        drift_max=None if drift_max is None else float(drift_max),
        unpriced_attempts=unpriced,
        estimated_cost_attempts=estimated,
        budget_usd=batch.budget_usd,
        reserved_usd=Decimal(str(batch.reserved_usd or 0)),
        estimated_usd=Decimal(str(est_total)),
        estimated_remaining_usd=Decimal(str(est_remaining)),
        unpriced_jobs=int(unpriced_jobs or 0),
        breakdown=breakdown,
        retry_waste_usd=Decimal(str(waste or 0)),
        reused=int(reused or 0),
        saved_usd=Decimal(str(saved)),
        failures=failures,
    )


def list_batches(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    rows = session.execute(
        select(
            Batch.id,
            Batch.name,
            Batch.state,
            Batch.created_at,
            func.count(Job.id),
            func.coalesce(func.sum(Job.cost_usd), 0),
        )
        .outerjoin(Job, Job.batch_id == Batch.id)
        .group_by(Batch.id)
        .order_by(Batch.id.desc())
        .limit(limit)
    )
    return [
        {
            "batch_id": bid,
            "name": name,
            "state": state,
            "created_at": created.isoformat(timespec="seconds"),
            "jobs_total": int(total),
            "cost_usd": str(Decimal(str(cost)).quantize(Decimal("0.000001"))),
        }
        for bid, name, state, created, total, cost in rows
    ]
