"""What the dashboard's pages read: plain values from a few indexed queries each.

Nothing here aggregates all the jobs of a batch: counts and costs come from the counters that
migration 0005's triggers keep (`pipeline.batch.status`), and every list is one page through an
index in id order (keyset pagination: `after`/`before` an id, never OFFSET). Migration 0007
adds the indexes: (batch_id, state, id), (batch_id, model, id), (batch_id, last_error_code,
id) for jobs with an error, (batch_id, external_key), (batch_id, finished_at), the partial
ix_jobs_failures, and the `job_metadata` table for metadata columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, and_, bindparam, exists, func, select, text, tuple_
from sqlalchemy.orm import Session, aliased

from pipeline.batch.controls import rerunnable
from pipeline.batch.status import BatchStatus, batch_status, review_counts, usd_of_nanos
from pipeline.db.models import (
    FAILURES_WHERE,
    Attempt,
    Batch,
    Job,
    JobMetadata,
    Output,
    Review,
    utcnow,
)
from pipeline.errors import NotFoundError
from pipeline.spec import EditSpec
from pipeline.states import (
    JOB_PENDING,
    JOB_TERMINAL,
    JOB_TO_RUN,
    AttemptOutcome,
    BatchState,
    JobState,
    ReviewDecision,
)
from pipeline.web.advice import failure_advice, hold_advice

STATES = tuple(JobState)
RATE_WINDOW = timedelta(minutes=10)
BATCHES_PAGE = 25
JOBS_PAGE = 50
GALLERY_PAGE = 200
ALL, UNREVIEWED = "all", "unreviewed"
REVIEW_FILTERS = (ALL, UNREVIEWED, *(d.value for d in ReviewDecision))


def route_of(batch: Batch) -> str:
    """How the batch's calls reach the provider: sync (one call per attempt) or batch."""
    return str((batch.settings or {}).get("route", "sync"))


def eta_seconds(session: Session, batch: Batch, remaining: int) -> float | None:
    """Seconds left at the rate jobs finished over the last ten minutes (None: no rate yet)."""
    if batch.state != BatchState.RUNNING or remaining <= 0:
        return None
    now = utcnow()
    created = (
        batch.created_at if batch.created_at.tzinfo else batch.created_at.replace(tzinfo=now.tzinfo)
    )
    window = min(RATE_WINDOW, max(now - created, timedelta(seconds=1)))
    recent = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch.id, Job.finished_at >= now - window)
    )
    if not recent:
        return None
    return remaining * window.total_seconds() / int(recent)


@dataclass
class BatchRow:
    id: int
    name: str
    state: str
    route: str
    created_at: datetime
    finished_at: datetime | None
    jobs: int
    done: int
    cost_usd: Decimal
    budget_usd: Decimal | None
    eta_s: float | None


def batches_page(session: Session, before: int | None = None) -> tuple[list[BatchRow], int | None]:
    """The newest batches (before id `before`), and the id to page on from (None: last page)."""
    query = select(Batch).order_by(Batch.id.desc()).limit(BATCHES_PAGE + 1)
    if before is not None:
        query = query.where(Batch.id < before)
    batches = list(session.scalars(query))
    more = len(batches) > BATCHES_PAGE
    batches = batches[:BATCHES_PAGE]
    sums: dict[int, tuple[int, int, int, int]] = {}
    if batches:
        done = ", ".join(f"'{s}'" for s in sorted(JOB_TERMINAL))
        active = ", ".join(f"'{s}'" for s in sorted(JOB_TO_RUN))
        for bid, jobs, finished, cost, left in session.execute(
            text(
                "SELECT batch_id, sum(jobs), "
                f"sum(CASE WHEN state IN ({done}) THEN jobs ELSE 0 END), sum(cost_nanos), "
                f"sum(CASE WHEN state IN ({active}) THEN jobs ELSE 0 END) "
                "FROM batch_job_counts WHERE batch_id IN :ids GROUP BY batch_id"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": [b.id for b in batches]},
        ):
            sums[int(bid)] = (int(jobs), int(finished), int(cost), int(left))
    rows = []
    for b in batches:
        jobs, finished, cost, left = sums.get(b.id, (0, 0, 0, 0))
        rows.append(
            BatchRow(
                id=b.id,
                name=b.name,
                state=b.state,
                route=route_of(b),
                created_at=b.created_at,
                finished_at=b.finished_at,
                jobs=jobs,
                done=finished,
                cost_usd=usd_of_nanos(cost),
                budget_usd=b.budget_usd,
                eta_s=eta_seconds(session, b, left),
            )
        )
    return rows, (batches[-1].id if more else None)


@dataclass
class FailureGroup:
    code: str
    state: str
    jobs: int
    message: str
    advice: str


@dataclass
class BatchView:
    batch: Batch
    status: BatchStatus
    route: str
    in_flight: int
    eta_s: float | None
    remaining: int
    by_model: list[dict[str, Any]]
    failures: list[FailureGroup]
    hold_advice: str | None
    models: list[str] = field(default_factory=list)


# Literal, not bound: a partial index is used only when the query repeats its predicate
# (SQLite never matches a bound parameter against it).
FAILED = text(f"jobs.{FAILURES_WHERE}")


def failure_counts(session: Session, batch_id: int) -> list[tuple[str, str, int]]:
    """(error code, state, jobs) of the failed and rejected jobs: an index-only scan of the
    partial index ix_jobs_failures."""
    rows = session.execute(
        select(Job.last_error_code, Job.state, func.count())
        .where(Job.batch_id == batch_id, FAILED, Job.last_error_code.is_not(None))
        .group_by(Job.last_error_code, Job.state)
    )
    return [(str(code), str(state), int(n)) for code, state, n in rows]


def failure_groups(session: Session, batch_id: int, limit: int = 20) -> list[FailureGroup]:
    """Failed and rejected jobs grouped by error code: how many, one message, what to do."""
    groups: list[FailureGroup] = []
    for code, state, n in sorted(failure_counts(session, batch_id), key=lambda g: (-g[2], g[0])):
        if len(groups) == limit:
            break
        message = session.scalar(
            select(Job.last_error_message)
            .where(Job.batch_id == batch_id, FAILED, Job.state == state)
            .where(Job.last_error_code == code)
            .limit(1)
        )
        groups.append(FailureGroup(code, state, n, message or "", failure_advice(code, state)))
    return groups


def review_summary(session: Session, batch_id: int) -> dict[str, int]:
    """Approved / rejected / unreviewed outputs of the batch, from the counters."""
    outputs = session.scalar(
        text("SELECT outputs FROM batch_output_counts WHERE batch_id = :b"), {"b": batch_id}
    )
    return review_counts(session, batch_id, int(outputs or 0))


def batch_models(session: Session, batch_id: int) -> list[str]:
    """The models of the batch's jobs (from the counters)."""
    return sorted(
        str(m)
        for m in session.scalars(
            text(
                "SELECT DISTINCT model FROM batch_job_counts WHERE batch_id = :b "
                "AND jobs > 0 AND model <> ''"
            ),
            {"b": batch_id},
        )
    )


def batch_view(session: Session, batch_id: int) -> BatchView:
    """Everything the batch page shows (and its live part refreshes)."""
    # Reuse figures grow with the reused jobs: the page loads them once, apart (reuse_figures).
    status = batch_status(
        session,
        batch_id,
        failures_limit=0,
        with_reviews=True,
        with_reuse=False,
        with_providers=False,
    )
    batch = session.get(Batch, batch_id)
    assert batch is not None  # batch_status raised NotFoundError otherwise
    remaining = sum(status.counts.get(s, 0) for s in JOB_PENDING)
    by_model: dict[tuple[str, str], dict[str, Any]] = {}
    for row in status.breakdown:
        if row["state"] == JobState.REJECTED:
            continue
        key = (row["model"] or "", row["quality"] or "")
        entry = by_model.setdefault(
            key, {"model": key[0], "quality": key[1], "jobs": 0, "cost_usd": Decimal(0)}
        )
        entry["jobs"] += row["jobs"]
        entry["cost_usd"] += Decimal(row["cost_usd"])
    return BatchView(
        batch=batch,
        status=status,
        route=route_of(batch),
        in_flight=status.attempts_by_outcome.get(AttemptOutcome.IN_FLIGHT, 0),
        eta_s=eta_seconds(session, batch, sum(status.counts.get(s, 0) for s in JOB_TO_RUN)),
        remaining=remaining,
        by_model=sorted(by_model.values(), key=lambda e: (e["model"], e["quality"])),
        failures=failure_groups(session, batch_id),
        hold_advice=hold_advice(status.hold_code, status.hold_reason, status.state),
        models=sorted({m for m, _ in by_model if m}),
    )


def get_batch(session: Session, batch_id: int) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}")
    return batch


def metadata_keys(session: Session, batch_id: int) -> list[str]:
    """The batch's metadata columns, from its first rows (a manifest's rows share columns)."""
    keys: dict[str, None] = {}
    for spec in session.scalars(
        select(Job.spec).where(Job.batch_id == batch_id).order_by(Job.row_number).limit(20)
    ):
        try:
            meta = json.loads(spec).get("metadata") or {}
        except (ValueError, AttributeError):
            continue
        keys.update(dict.fromkeys(str(k) for k in meta))
    return list(keys)


@dataclass(frozen=True)
class JobFilters:
    state: str | None = None
    model: str | None = None
    code: str | None = None
    key: str | None = None  # the user's id (jobs.external_key), exact
    meta: str | None = None  # a metadata column ...
    value: str | None = None  # ... and its value, exact (first 200 characters)

    def params(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class Page:
    rows: list[Any]
    next_after: int | None  # id to pass as `after` for the next page
    prev_before: int | None  # id to pass as `before` for the previous page


def _keyset(
    session: Session,
    query: Select[Any],
    id_col: Any,
    after: int | None,
    before: int | None,
    size: int,
) -> Page:
    """One page of `query` in `id_col` order after/before an id; one extra row tells "more"."""
    if before is not None:
        rows = list(
            session.execute(query.where(id_col < before).order_by(id_col.desc()).limit(size + 1))
        )
        more_before = len(rows) > size
        rows = rows[:size][::-1]
        return Page(
            rows,
            next_after=rows[-1][0] if rows else None,
            prev_before=rows[0][0] if rows and more_before else None,
        )
    if after is not None:
        query = query.where(id_col > after)
    rows = list(session.execute(query.order_by(id_col).limit(size + 1)))
    more = len(rows) > size
    rows = rows[:size]
    return Page(
        rows,
        next_after=rows[-1][0] if rows and more else None,
        prev_before=rows[0][0] if rows and after is not None else None,
    )


def jobs_page(
    session: Session,
    batch_id: int,
    filters: JobFilters,
    after: int | None = None,
    before: int | None = None,
    size: int = JOBS_PAGE,
) -> Page:
    """One page of the batch's jobs in row order, filtered in SQL through an index."""
    by_meta = bool(filters.meta) and filters.value is not None
    # With a metadata filter the walk is job_metadata's (batch_id, key, value, job_id) key,
    # which is in job id order too.
    id_col: Any = JobMetadata.job_id if by_meta else Job.id
    query = select(
        id_col,
        Job.row_number,
        Job.external_key,
        Job.state,
        Job.model,
        Job.quality,
        Job.attempts,
        Job.cost_usd,
        Job.last_error_code,
        Job.updated_at,
        Job.rerun_of_job_id,
    ).where(Job.batch_id == batch_id)
    if by_meta:
        query = query.join(
            JobMetadata,
            and_(
                JobMetadata.job_id == Job.id,
                JobMetadata.batch_id == batch_id,
                JobMetadata.key == filters.meta,
                JobMetadata.value == (filters.value or "")[:200],
            ),
        )
    if filters.state:
        query = query.where(Job.state == filters.state)
    if filters.model:
        query = query.where(Job.model == filters.model)
    if filters.code:
        query = query.where(Job.last_error_code == filters.code)
    if filters.key:
        query = query.where(Job.external_key == filters.key)
    return _keyset(session, query, id_col, after, before, size)


@dataclass
class JobView:
    job: Job
    spec: EditSpec | None
    attempts: list[Attempt]
    outputs: list[tuple[Output, Review | None]]
    rerun_of: Job | None
    rerun: Job | None


def job_view(session: Session, batch_id: int, job_id: int) -> JobView:
    job = session.get(Job, job_id)
    if job is None or job.batch_id != batch_id:
        raise NotFoundError(f"batch {batch_id} has no job {job_id}")
    try:
        spec: EditSpec | None = EditSpec.from_json(job.spec)
    except (ValueError, TypeError, KeyError):
        spec = None  # a row preflight rejected has no spec
    attempts = list(
        session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number))
    )
    outputs: list[tuple[Output, Review | None]] = [
        (out, rev)
        for out, rev in session.execute(
            select(Output, Review)
            .outerjoin(Review, Review.output_id == Output.id)
            .where(Output.job_id == job_id)
            .order_by(Output.index)
        )
    ]
    rerun_of = session.get(Job, job.rerun_of_job_id) if job.rerun_of_job_id else None
    rerun = session.scalar(select(Job).where(Job.rerun_of_job_id == job_id))
    return JobView(job, spec, attempts, outputs, rerun_of, rerun)


@dataclass(frozen=True)
class GalleryFilters:
    review: str = ALL
    model: str | None = None
    meta: str | None = None
    value: str | None = None

    def params(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v and not (k == "review" and v == ALL)}


@dataclass
class Card:
    output_id: int
    job_id: int
    index: int
    key: str | None
    row: int
    model: str | None
    prompt: str
    width: int | None
    height: int | None
    drift: float | None
    decision: str | None
    note: str | None
    rerun_of_job_id: int | None


@dataclass
class Gallery:
    cards: list[Card]
    next_after: str | None  # "jobid-outputid" of the last card when there is more


def gallery_page(
    session: Session,
    batch_id: int,
    filters: GalleryFilters,
    after: tuple[int, int] | None = None,
    size: int = GALLERY_PAGE,
) -> Gallery:
    """One page of the batch's outputs in row order, with their review, filtered in SQL.

    Outputs belong to succeeded jobs, so the walk goes through (batch_id, state, id).
    """
    columns = (
        Job.id,
        Output.id,
        Output.index,
        Job.external_key,
        Job.row_number,
        Job.model,
        Job.spec,
        Output.width,
        Output.height,
        Output.drift,
        Review.decision,
        Review.note,
        Job.rerun_of_job_id,
    )
    order: tuple[Any, Any] = (Job.id, Output.id)
    if filters.review in tuple(ReviewDecision):
        # Walk the reviews' (batch, decision, job, output) index: a few decided among many.
        query = (
            select(*columns)
            .select_from(Review)
            .join(Output, Output.id == Review.output_id)
            .join(Job, Job.id == Review.job_id)
            .where(Review.batch_id == batch_id, Review.decision == filters.review)
        )
        order = (Review.job_id, Review.output_id)
    else:
        query = (
            select(*columns)
            .join(Output, Output.job_id == Job.id)
            .outerjoin(Review, Review.output_id == Output.id)
            .where(Job.batch_id == batch_id, Job.state == JobState.SUCCEEDED)
        )
        if filters.review == UNREVIEWED:
            query = query.where(Review.output_id.is_(None))
    if filters.model:
        query = query.where(Job.model == filters.model)
    if filters.meta and filters.value is not None:
        meta = aliased(JobMetadata)
        query = query.join(
            meta,
            and_(
                meta.job_id == Job.id,
                meta.batch_id == batch_id,
                meta.key == filters.meta,
                meta.value == filters.value[:200],
            ),
        )
    if after is not None:
        query = query.where(tuple_(*order) > tuple_(*after))
    rows = list(session.execute(query.order_by(*order).limit(size + 1)))
    more = len(rows) > size
    cards = []
    for r in rows[:size]:
        try:
            prompt = str(json.loads(r[6]).get("prompt", ""))
        except ValueError:
            prompt = ""
        cards.append(
            Card(
                output_id=r[1],
                job_id=r[0],
                index=r[2],
                key=r[3],
                row=r[4],
                model=r[5],
                prompt=prompt,
                width=r[7],
                height=r[8],
                drift=r[9],
                decision=r[10],
                note=r[11],
                rerun_of_job_id=r[12],
            )
        )
    last = cards[-1] if cards else None
    return Gallery(cards, f"{last.job_id}-{last.output_id}" if more and last else None)


@dataclass
class RerunRow:
    job_id: int
    row: int
    key: str | None
    prompt: str
    notes: list[str]


def rerun_candidates(session: Session, batch_id: int, limit: int = 500) -> list[RerunRow]:
    """The rejected rows `controls.rerun_rejected` would take (the first `limit` outputs'
    worth), with their review notes; walked in the reviews' index order."""
    child = aliased(Job)
    rows = session.execute(
        select(Review.job_id, Job.row_number, Job.external_key, Job.spec, Review.note)
        .join(Job, Job.id == Review.job_id)
        .where(
            Review.batch_id == batch_id,
            Review.decision == ReviewDecision.REJECTED,
            ~exists().where(child.rerun_of_job_id == Review.job_id),
        )
        .order_by(Review.job_id, Review.output_id)
        .limit(limit)
    )
    out: dict[int, RerunRow] = {}
    for job_id, row, key, spec, note in rows:
        entry = out.get(job_id)
        if entry is None:
            prompt = str(json.loads(spec).get("prompt", ""))
            entry = out[job_id] = RerunRow(job_id, row, key, prompt, [])
        if note:
            entry.notes.append(note)
    return list(out.values())


def rerun_count(session: Session, batch_id: int, cap: int = 1000) -> int:
    """How many rejected rows wait for a re-run, counted up to `cap` (the page says "cap+")."""
    ids = rerunnable(batch_id).limit(cap + 1).subquery()
    return int(session.scalar(select(func.count()).select_from(ids)) or 0)


__all__ = [
    "REVIEW_FILTERS",
    "STATES",
    "BatchRow",
    "BatchView",
    "Card",
    "FailureGroup",
    "Gallery",
    "GalleryFilters",
    "JobFilters",
    "JobView",
    "Page",
    "RerunRow",
    "batch_models",
    "batch_view",
    "batches_page",
    "gallery_page",
    "get_batch",
    "job_view",
    "jobs_page",
    "metadata_keys",
    "rerun_candidates",
    "rerun_count",
    "review_summary",
]
