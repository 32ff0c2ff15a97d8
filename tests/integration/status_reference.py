"""The old `batch_status`: SQL aggregates over jobs, attempts and outputs (the counters' oracle)."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, aliased

from pipeline.batch.status import BatchStatus, provider_batches
from pipeline.db.models import Attempt, Batch, Job, Output
from pipeline.errors import NotFoundError
from pipeline.states import JobState


def reference_status(session: Session, batch_id: int, failures_limit: int = 20) -> BatchStatus:
    """The aggregates `batch_status` ran before the counters (migration 0005)."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    counts: dict[str, int] = {s: 0 for s in JobState}
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
    lost, lost_usd = session.execute(
        select(func.count(Attempt.id), func.coalesce(func.sum(Attempt.cost_usd), 0))
        .join(Job, Job.id == Attempt.job_id)
        .where(Job.batch_id == batch_id, Attempt.outcome == "interrupted")
    ).one()
    return BatchStatus(
        batch_id=batch.id,
        name=batch.name,
        state=batch.state,
        hold_reason=batch.hold_reason,
        hold_code=batch.hold_code,
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
        route=batch.route,
        provider_batches=provider_batches(session, batch_id),
        lost_answers=lost,
        lost_answers_usd=Decimal(str(lost_usd)).quantize(Decimal("0.000001")),
    )
