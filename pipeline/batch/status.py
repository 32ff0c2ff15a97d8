"""Batch status from per-batch counters kept by triggers (never by aggregating every job).

On the batch route it also lists the provider batches (a few rows: one per model and 50,000
lines) with the provider's status and request counts as last polled. Attempts `interrupted`
(a worker died mid-call) are shown as lost answers: booked at their estimated cost, since the
API bills an answer once it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, aliased

from pipeline.db import events
from pipeline.db.events import Event
from pipeline.db.models import Batch, Job, ProviderBatch
from pipeline.errors import NotFoundError
from pipeline.states import JOB_PENDING, JOB_TERMINAL, AttemptOutcome, JobState, ReviewDecision


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
    hold_code: str | None = None
    # approved / rejected / unreviewed outputs; None when not asked for (with_reviews)
    reviews: dict[str, int] | None = None
    route: str = "sync"
    provider_batches: list[dict[str, Any]] = field(default_factory=list)
    lost_answers: int = 0  # attempts interrupted mid-call: answers billed but never received
    lost_answers_usd: Decimal = Decimal(0)  # what they were booked at (estimated)
    events: list[Event] = field(default_factory=list)  # outages: held, resumed, gave up
    # calls and cost per provider, when the batch's jobs go to more than one (else empty)
    by_provider: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cost_per_output_usd(self) -> Decimal | None:
        """Spend divided by the images delivered (None before the first one)."""
        if not self.outputs:
            return None
        return (self.cost_usd / self.outputs).quantize(Decimal("0.000001"))

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in JOB_TERMINAL)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "name": self.name,
            "state": self.state,
            "hold_code": self.hold_code,
            "hold_reason": self.hold_reason,
            "counts": self.counts,
            "jobs_total": self.jobs_total,
            "cost_usd": usd_text(self.cost_usd),
            "budget_usd": None if self.budget_usd is None else str(self.budget_usd),
            "attempts": self.attempts,
            "attempts_by_outcome": self.attempts_by_outcome,
            "outputs": self.outputs,
            "outputs_uncollected": self.outputs_uncollected,
            "unpriced_attempts": self.unpriced_attempts,
            "unpriced_jobs": self.unpriced_jobs,
            "estimated_usd": usd_text(self.estimated_usd),
            "estimated_remaining_usd": usd_text(self.estimated_remaining_usd),
            "in_flight_reserved_usd": str(max(self.reserved_usd - self.cost_usd, Decimal(0))),
            "cost_per_output_usd": None
            if self.cost_per_output_usd is None
            else str(self.cost_per_output_usd),
            "retry_waste_usd": usd_text(self.retry_waste_usd),
            "cost_breakdown": self.breakdown,
            "reused": self.reused,
            "saved_usd": usd_text(self.saved_usd),
            "output_uri": self.output_uri,
            "mask_drift": {
                "outputs": self.drift_outputs,
                "mean": self.drift_mean,
                "max": self.drift_max,
            },
            "failures": self.failures,
            **({} if self.reviews is None else {"reviews": self.reviews}),
            "route": self.route,
            "provider_batches": self.provider_batches,
            "lost_answers": {
                "attempts": self.lost_answers,
                "estimated_usd": usd_text(self.lost_answers_usd),
            },
            "events": [event.to_json() for event in self.events],
            "cost_by_provider": self.by_provider,
        }


MICRO = Decimal("0.000001")


NANO = Decimal("0.000000001")


def usd_of_nanos(nanos: object) -> Decimal:
    """Integer nano-dollars from the counters (migration 0009) as exact USD: six decimals when
    that is exact (every sync-route cost), up to nine for batch-route lines at half price."""
    return usd_exact(Decimal(int(str(nanos or 0))).scaleb(-9))


def usd_exact(value: Decimal) -> Decimal:
    """`value` with at least six decimals and no trailing zeros past them (exact, never rounded
    beyond the nano-dollar)."""
    micro = value.quantize(MICRO)
    return micro if micro == value else value.quantize(NANO).normalize()


def usd_text(value: Decimal) -> str:
    """A dollar amount as text, exact, without an exponent (`0.0000005`, never `5E-7`)."""
    return format(value, "f")


_usd = usd_of_nanos


def review_counts(session: Session, batch_id: int, outputs: int) -> dict[str, int]:
    """Outputs approved, rejected and not reviewed yet (counters kept by triggers, 0007)."""
    counts = {
        str(decision): int(n)
        for decision, n in session.execute(
            text("SELECT decision, outputs FROM batch_review_counts WHERE batch_id = :b"),
            {"b": batch_id},
        )
    }
    approved = counts.get(ReviewDecision.APPROVED, 0)
    rejected = counts.get(ReviewDecision.REJECTED, 0)
    return {
        ReviewDecision.APPROVED.value: approved,
        ReviewDecision.REJECTED.value: rejected,
        "unreviewed": max(outputs - approved - rejected, 0),
    }


def reuse_figures(session: Session, batch_id: int) -> tuple[int, Decimal]:
    """(jobs reused from a twin, what their twins cost): the reused jobs joined to their donors
    (a partial index holds just them; one donor lookup each, so it grows with the reuse)."""
    donor = aliased(Job)
    reused, saved = session.execute(
        select(func.count(Job.id), func.coalesce(func.sum(donor.cost_usd), 0))
        .join(donor, donor.id == Job.reused_from_job_id)
        .where(Job.batch_id == batch_id, Job.reused_from_job_id.is_not(None))
    ).one()
    return int(reused or 0), Decimal(str(saved))


def batch_status(
    session: Session,
    batch_id: int,
    failures_limit: int = 20,
    with_reviews: bool = False,
    with_reuse: bool = True,
    with_providers: bool = True,
) -> BatchStatus:
    """Read from the per-batch counters that triggers keep (migration 0005): a few rows.

    `with_reviews`: also count the review decisions (status, report, dashboard).
    `with_reuse=False`: leave `reused`/`saved_usd` at 0 (the dashboard's polled part, which
    reads them once, apart: `reuse_figures`). `with_providers=False`: leave `by_provider`
    empty (the same: the dashboard reads `cost_by_provider` once, with the page).
    """
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    b = {"b": batch_id}
    counts: dict[str, int] = {s: 0 for s in JobState}
    cost = est_total = est_remaining = kept = 0
    unpriced_jobs = 0
    groups: dict[tuple[str | None, str | None, str], list[int]] = {}
    for model, quality, state, n, c, est, unest, k in session.execute(
        text(
            "SELECT model, quality, state, jobs, cost_nanos, estimated_nanos, unestimated, "
            "kept_nanos FROM batch_job_counts WHERE batch_id = :b"
        ),
        b,
    ):
        n, c, est, unest, k = int(n), int(c), int(est), int(unest), int(k)
        counts[state] = counts.get(state, 0) + n
        cost += c
        kept += k
        if state != JobState.REJECTED:
            est_total += est
            unpriced_jobs += unest
            if state in JOB_PENDING:
                est_remaining += est
            if n:
                key = (model or None, quality or None, state)
                group = groups.setdefault(key, [0, 0])
                group[0] += n
                group[1] += c
    by_outcome: dict[str, int] = {}
    unpriced = estimated = attempt_cost = lost = lost_cost = 0
    for outcome, n, n_unpriced, n_estimated, c in session.execute(
        text(
            "SELECT outcome, attempts, unpriced, estimated, cost_nanos "
            "FROM batch_attempt_counts WHERE batch_id = :b"
        ),
        b,
    ):
        if int(n):
            by_outcome[outcome] = int(n)
        unpriced += int(n_unpriced)
        estimated += int(n_estimated)
        attempt_cost += int(c)
        if outcome == AttemptOutcome.INTERRUPTED:
            lost, lost_cost = int(n), int(c)
    out = session.execute(
        text(
            "SELECT outputs, uncollected, drift_n, drift_sum, drift_max "
            "FROM batch_output_counts WHERE batch_id = :b"
        ),
        b,
    ).one_or_none()
    out_total, out_left, drift_n, drift_sum, drift_max = out or (0, 0, 0, 0.0, None)
    drift_n = int(drift_n or 0)
    # ORDER BY model, quality, state as the database sorts NULL: first (SQLite), last (PG).
    null_first = session.get_bind().dialect.name == "sqlite"

    def order(item: tuple[tuple[str | None, str | None, str], list[int]]) -> tuple[Any, ...]:
        return tuple(
            (v is not None, v or "") if null_first else (v is None, v or "") for v in item[0]
        )

    breakdown = [
        {
            "model": model,
            "quality": quality,
            "state": state,
            "jobs": n,
            "cost_usd": usd_text(_usd(c)),
        }
        for (model, quality, state), (n, c) in sorted(groups.items(), key=order)
    ]
    reused, saved = reuse_figures(session, batch_id) if with_reuse else (0, Decimal(0))
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
            .where(Job.batch_id == batch_id, Job.state.in_((JobState.FAILED, JobState.REJECTED)))
            .order_by(Job.row_number)
            .limit(failures_limit)
        )
    ]
    outputs = int(out_total or 0)
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
        cost_usd=_usd(cost),
        attempts=sum(by_outcome.values()),
        attempts_by_outcome=by_outcome,
        outputs=outputs,
        outputs_uncollected=int(out_left or 0),
        drift_outputs=drift_n,
        drift_mean=float(drift_sum) / drift_n if drift_n else None,
        drift_max=None if drift_max is None or not drift_n else float(drift_max),
        unpriced_attempts=unpriced,
        estimated_cost_attempts=estimated,
        budget_usd=batch.budget_usd,
        reserved_usd=Decimal(str(batch.reserved_usd or 0)),
        estimated_usd=_usd(est_total),
        estimated_remaining_usd=_usd(est_remaining),
        unpriced_jobs=unpriced_jobs,
        breakdown=breakdown,
        # Retry waste: what attempts cost that produced nothing kept (billed bad responses,
        # and successes whose job lost its claim) = all attempts - ok attempts of succeeded jobs.
        retry_waste_usd=_usd(attempt_cost - kept),
        reused=reused,
        saved_usd=saved,
        failures=failures,
        reviews=review_counts(session, batch_id, outputs) if with_reviews else None,
        route=batch.route,
        provider_batches=provider_batches(session, batch_id),
        lost_answers=lost,
        lost_answers_usd=_usd(lost_cost),
        events=events.recent(session, batch_id),
        by_provider=cost_by_provider(session, batch) if with_providers else [],
    )


def cost_by_provider(session: Session, batch: Batch) -> list[dict[str, Any]]:
    """Calls and exact cost per provider the batch's calls went to, for a batch whose jobs use
    more than one (`batches.settings["providers"]`, recorded at submit); [] otherwise, so the
    status of a one-provider batch stays a read of its counters. An attempt of a job sent
    before providers existed went to OpenAI."""
    used = batch.settings.get("providers") if isinstance(batch.settings, dict) else None
    if not isinstance(used, list) or len(used) < 2:
        return []
    scale = "1000000000"
    if session.get_bind().dialect.name == "postgresql":
        nanos = f"round(coalesce(a.cost_usd, 0) * {scale})::bigint"
    else:
        nanos = f"CAST(round(coalesce(a.cost_usd, 0) * {scale}) AS INTEGER)"
    rows = session.execute(
        text(
            "SELECT coalesce(a.provider, j.provider, 'openai') AS p, count(*), "
            f"sum({nanos}) FROM attempts a JOIN jobs j ON j.id = a.job_id "
            "WHERE j.batch_id = :b GROUP BY coalesce(a.provider, j.provider, 'openai') "
            "ORDER BY 1"
        ),
        {"b": batch.id},
    )
    return [
        {"provider": name, "calls": int(calls), "cost_usd": usd_text(_usd(int(cost or 0)))}
        for name, calls, cost in rows
    ]


def provider_batches(session: Session, batch_id: int) -> list[dict[str, Any]]:
    """The batch route's provider batches of a batch, oldest first, as last polled."""
    rows = session.scalars(
        select(ProviderBatch).where(ProviderBatch.batch_id == batch_id).order_by(ProviderBatch.id)
    )
    return [
        {
            "id": pb.id,
            "provider_id": pb.provider_id,
            "model": pb.model,
            "state": pb.state,
            "provider_status": pb.provider_status,
            "lines": pb.lines,
            "completed": pb.completed,
            "failed": pb.failed,
            "booked": pb.booked,
            "cost_usd": usd_text(usd_exact(Decimal(str(pb.cost_usd or 0)))),
            "expires_at": pb.expires_at.isoformat(timespec="seconds") if pb.expires_at else None,
            "refreshed_at": pb.refreshed_at.isoformat(timespec="seconds")
            if pb.refreshed_at
            else None,
            "error": pb.error,
        }
        for pb in rows
    ]


def list_batches(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The newest batches with their job count and cost (from the counters)."""
    rows = session.execute(
        text(
            "SELECT b.id, b.name, b.state, b.created_at, coalesce(sum(c.jobs), 0), "
            "coalesce(sum(c.cost_nanos), 0) "
            "FROM (SELECT id, name, state, created_at FROM batches ORDER BY id DESC LIMIT :n) b "
            "LEFT JOIN batch_job_counts c ON c.batch_id = b.id "
            "GROUP BY b.id, b.name, b.state, b.created_at ORDER BY b.id DESC"
        ).columns(created_at=Batch.__table__.c.created_at.type),
        {"n": limit},
    )
    return [
        {
            "batch_id": bid,
            "name": name,
            "state": state,
            "created_at": created.isoformat(timespec="seconds"),
            "jobs_total": int(total),
            "cost_usd": usd_text(_usd(cost)),
        }
        for bid, name, state, created, total, cost in rows
    ]
