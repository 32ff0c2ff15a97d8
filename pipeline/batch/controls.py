"""What a person can do to a batch: pause, cancel, resume, retry failed jobs, and re-run the
rows whose outputs were rejected in review, with an amended prompt.

Each is a few atomic UPDATEs through `pipeline.db.jobs`; workers notice through the batch state
before every call. `resume` is the one way a stopped batch runs again (the CLI's `resume` and
`run`, and `retry` on a held batch, all come through it), because it is also where what a dead
worker left behind is cleaned up: expired claims, and budget reservations that never settled.
The CLI and the dashboard call these same functions; the caller then sends the queued jobs
(`pipeline.batch.submit.send`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session, aliased

from pipeline.cost import budget
from pipeline.cost.estimate import BatchEstimate, Estimate, estimate_batch, estimate_cost
from pipeline.cost.pricing import PriceTable
from pipeline.db import events, jobs
from pipeline.db.events import EventKind
from pipeline.db.models import Batch, Job, Review, utcnow
from pipeline.errors import EditbatchError, NotFoundError, RowError
from pipeline.files import file_sha256, image_sizes
from pipeline.intake.catalog import Catalog
from pipeline.intake.preflight import Preflight, PreflightOptions
from pipeline.providers import ProviderSet
from pipeline.spec import EditSpec
from pipeline.states import (
    BATCH_CLOSED,
    BATCH_STOPPED,
    JOB_CLAIMED,
    BatchState,
    HoldCode,
    JobState,
    ReviewDecision,
)

# The API's limit on a prompt (../shared/API-FACTS.md).
MAX_PROMPT_CHARS = 32_000
# A re-run's outputs go to rerun<N>/<the row's own name>, so they never overwrite the
# rejected originals; `editbatch export` strips the folder again.
RERUN_FOLDER = re.compile(r"^rerun(\d+)/")


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


@dataclass
class Remap:
    """What `resume --model-map` did: jobs moved to their new model, jobs whose parameters do
    not fit it (failed without a call, by row and field), and the estimate of the moved jobs."""

    moved: int = 0
    unfit: list[RowError] = field(default_factory=list)
    estimate: BatchEstimate | None = None


def remap_models(
    session: Session,
    batch_id: int,
    model_map: Mapping[str, str],
    catalog: Catalog,
    prices: PriceTable,
    providers: ProviderSet | None = None,
) -> Remap:
    """Move the unfinished jobs of each OLD model to NEW (`--model-map OLD=NEW`). Caller commits.

    Each job's parameters are checked again against the new model's rules (sizes, fidelity,
    qualities differ), and, given `providers`, against its provider (which must deploy NEW): a
    job that no longer fits fails now, naming the field, and is never sent. Fingerprints follow
    the new model, so no output of the old model is reused for it. Refused while a call to an
    OLD model is in flight (its answer would hold the batch again).
    """
    _batch(session, batch_id)
    unknown = [new for new in model_map.values() if new not in catalog]
    if unknown:
        raise EditbatchError(
            f"--model-map: {', '.join(sorted(set(unknown)))} is not in the catalogue "
            "(`editbatch models` lists the models)"
        )
    old_models = list(model_map)
    in_flight = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.batch_id == batch_id,
            Job.model.in_(old_models),
            Job.state.in_(list(JOB_CLAIMED)),
            Job.lease_until >= utcnow(),
        )
    )
    if in_flight:
        raise EditbatchError(
            f"batch {batch_id}: {in_flight} calls to {', '.join(old_models)} are still in "
            "flight; wait for them to end (`editbatch status`), then run this again"
        )
    # With the providers, a job whose provider has no deployment of NEW is refused too.
    checker = Preflight(
        PreflightOptions(allowed_roots=(Path.cwd(),), catalog=catalog, providers=providers)
    )
    report = Remap()
    estimates: list[tuple[Estimate, int]] = []
    digests: dict[str, str | None] = {}
    rows = session.scalars(
        select(Job).where(
            Job.batch_id == batch_id,
            Job.model.in_(old_models),
            Job.state.in_((JobState.QUEUED, JobState.HELD)),
        )
    )
    for job in rows:
        old = EditSpec.from_json(job.spec)
        spec = replace(old, model=model_map[old.model])
        problems = checker.check_model_rules(spec)
        if problems:
            report.unfit.extend(problems)
            jobs.move_jobs(
                session,
                JobState.FAILED,
                Job.id == job.id,
                sources=(JobState.QUEUED, JobState.HELD),
                values={
                    "last_error_code": f"invalid_{problems[0].field}",
                    "last_error_message": f"not sent: on {spec.model}, "
                    + "; ".join(f"{e.field}: {e.reason}" for e in problems),
                },
            )
            continue
        estimate = estimate_cost(spec, image_sizes(spec.images), prices)
        estimates.append((estimate, spec.n))
        job.spec = spec.to_json()
        job.model = spec.model
        job.fingerprint = _fingerprint(spec, digests)
        job.estimated_usd = estimate.expected
        report.moved += 1
    session.flush()
    report.estimate = estimate_batch(estimates)
    return report


def _fingerprint(spec: EditSpec, digests: dict[str, str | None]) -> str | None:
    """The spec's fingerprint from its files' bytes; None (never reused) if one is gone."""
    for path in (*spec.images, spec.mask, spec.markup):
        if path and path not in digests:
            try:
                digests[path] = file_sha256(path)
            except OSError:
                digests[path] = None
    known = {p: d for p, d in digests.items() if d is not None}
    needed = [p for p in (*spec.images, spec.mask, spec.markup) if p]
    if any(p not in known for p in needed):
        return None
    return spec.fingerprint(known)


def resume(
    session: Session,
    batch_id: int,
    budget_usd: Decimal | None = None,
    orphans: bool = False,
    remap: Callable[[], Remap] | None = None,
    note: str | None = None,
) -> Remap | None:
    """Make a held or paused batch run again (a running one is tidied the same way).

    Held jobs and jobs of dead workers are queued, and the reservations those workers left are
    dropped, so the budget counts only what was spent. `orphans`: every claimed job of the
    batch belongs to a dead process whatever its lease says (a single-machine `run` continuing
    after it was killed: no other process can hold them). `remap` (see `remap_models`) runs
    while the batch is still stopped, in the same transaction that reopens it, so no worker
    starts a job on the old model in between. A batch held for an API outage gets an event
    saying it resumed (`note`, or "resumed by a person").
    """
    batch = _batch(session, batch_id)
    if batch.state in BATCH_CLOSED:
        raise EditbatchError(
            f"batch {batch_id} is {batch.state}; nothing to resume "
            f"(to run failed jobs again: editbatch retry {batch_id} --failed)"
        )
    stopped = batch.state in BATCH_STOPPED
    jobs.requeue_expired(session, batch_id, ignore_lease=orphans)  # commits
    report = remap() if remap is not None else None
    jobs.release_held_jobs(session, batch_id)
    # Reservations of calls whose workers died never settled: count only what was spent.
    budget.reconcile(session, batch_id)
    if budget_usd is not None:
        batch.budget_usd = budget_usd
    if stopped:
        if batch.hold_code in (HoldCode.API_UNREACHABLE, HoldCode.OUTAGE):
            events.record(
                session, batch_id, EventKind.OUTAGE_RESUMED, note or "resumed by a person"
            )
        jobs.reopen_batch(session, batch_id)
    session.commit()
    return report


@dataclass
class Retried:
    """What `retry_failed` queued again, and the failed rows that do not fit a new model (they
    stay failed, unsent, naming the field)."""

    count: int = 0
    unfit: list[RowError] = field(default_factory=list)


def retry_failed(
    session: Session,
    batch_id: int,
    prompt: str | None = None,
    model: str | None = None,
    catalog: Catalog | None = None,
    providers: ProviderSet | None = None,
) -> Retried:
    """Queue the failed jobs again (successes kept), optionally with a new prompt or model.

    Each retried job gets a fresh set of attempts; its earlier attempts stay in the ledger. A
    finished batch reopens; a held or paused one is resumed (as `resume` does). With a new
    model and the `catalog`, each job is checked against the model's rules first (and, given
    `providers`, against its provider), as `resume --model-map` does: a row that does not fit
    stays failed, with the reason, and is not sent.
    """
    batch = _batch(session, batch_id)
    if batch.state == BatchState.CANCELLED:
        raise EditbatchError(f"batch {batch_id} is cancelled")
    if model is not None and catalog is not None and model not in catalog:
        raise EditbatchError(
            f"--model {model}: not in the catalogue (`editbatch models` lists the models)"
        )
    checker = (
        Preflight(
            PreflightOptions(allowed_roots=(Path.cwd(),), catalog=catalog, providers=providers)
        )
        if model is not None and catalog is not None
        else None
    )
    result = Retried()
    unfit_ids: set[int] = set()
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
            problems = checker.check_model_rules(spec) if checker is not None else []
            if problems:
                result.unfit.extend(problems)
                unfit_ids.add(job.id)
                job.last_error_code = f"invalid_{problems[0].field}"
                job.last_error_message = f"not retried: on {spec.model}, " + "; ".join(
                    f"{e.field}: {e.reason}" for e in problems
                )
                continue
            job.spec = spec.to_json()
            job.model = spec.model
            job.fingerprint = None  # a changed request is a different edit: never reuse
        session.flush()
    result.count = jobs.requeue_failed(session, batch_id, keep=unfit_ids)
    session.commit()
    if result.count:
        _run_again(session, batch_id, BatchState(batch.state))
    return result


def _run_again(session: Session, batch_id: int, was: BatchState) -> None:
    """New work was queued in the batch (committed): a finished batch reopens (and finishes
    again, with a new report); a held or paused one is resumed, as `resume` does."""
    if was in BATCH_STOPPED:
        resume(session, batch_id)
    elif was == BatchState.FINISHED:
        jobs.reopen_batch(session, batch_id)
        session.commit()


def rerunnable(batch_id: int) -> Select[int]:
    """Ids of the batch's rejected rows: jobs with a rejected output and no re-run yet.

    Driven from the reviews' (batch, decision, job) index, never from all the batch's jobs.
    """
    child = aliased(Job)
    return select(Review.job_id).where(
        Review.batch_id == batch_id,
        Review.decision == ReviewDecision.REJECTED,
        ~exists().where(child.rerun_of_job_id == Review.job_id),
    )


def rerun_rejected(
    session: Session,
    batch_id: int,
    prompts: Mapping[int, str] | None = None,
    amend: str | None = None,
    job_ids: Collection[int] | None = None,
) -> list[int]:
    """A new queued job for each rejected row (a job with a rejected output, not re-run yet).

    `prompts`: job id -> that row's whole new prompt; `amend`: text added to the end of every
    re-run's prompt; `job_ids`: only these rejected jobs. Each new job copies its original
    (id, metadata, parameters, estimate), points at it (`rerun_of_job_id`, unique: a job is
    re-run once, so a second click adds nothing), takes the next free row number of the
    batch (the manifest row stays in its spec, for names) and writes its outputs under
    `rerun<N>/`. The batch runs again as after `retry_failed`. Returns the new job ids; the
    caller sends them (`pipeline.batch.submit.send`).
    """
    # FOR UPDATE: two re-runs of one batch take row numbers one after the other (PostgreSQL;
    # SQLite's write transactions are serial already). populate_existing: its state as it is
    # now, not as this session last saw it (sessions keep objects across commits).
    batch = session.get(Batch, batch_id, with_for_update=True, populate_existing=True)
    if batch is None:
        raise NotFoundError(f"no batch {batch_id}; `editbatch status` lists the batches")
    if batch.state == BatchState.CANCELLED:
        raise EditbatchError(f"batch {batch_id} is cancelled; nothing can run in it")
    was = BatchState(batch.state)
    query = select(Job).where(Job.id.in_(rerunnable(batch_id))).order_by(Job.id)
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    originals = list(session.scalars(query))
    unknown = set(prompts or ()) - {j.id for j in originals}
    if unknown:
        raise EditbatchError(
            f"jobs {sorted(unknown)} of batch {batch_id} have no rejected output left to "
            "re-run (not rejected, or re-run already)"
        )
    if not originals:
        session.rollback()
        return []
    last_row = session.scalar(select(func.max(Job.row_number)).where(Job.batch_id == batch_id))
    now = utcnow()
    rows = []
    for offset, job in enumerate(originals, start=1):
        spec = EditSpec.from_json(job.spec)
        prompt = (prompts or {}).get(job.id, spec.prompt).strip()
        if amend and amend.strip():
            prompt = f"{prompt} {amend.strip()}"
        if not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise EditbatchError(
                f"row {spec.row} (job {job.id}): the prompt must have 1 to "
                f"{MAX_PROMPT_CHARS:,} characters (it has {len(prompt):,})"
            )
        found = RERUN_FOLDER.match(spec.output)
        generation = int(found.group(1)) + 1 if found else 1
        template = f"rerun{generation}/{RERUN_FOLDER.sub('', spec.output)}"
        spec = replace(spec, prompt=prompt, output=template)
        rows.append(
            {
                "batch_id": batch_id,
                "row_number": int(last_row or 0) + offset,
                "external_key": job.external_key,
                "fingerprint": None,  # a changed request is a different edit: never reuse
                "spec": spec.to_json(),
                "model": job.model,
                "provider": job.provider,
                "quality": job.quality,
                "state": JobState.QUEUED,
                "estimated_usd": job.estimated_usd,
                "rerun_of_job_id": job.id,
                "created_at": now,
                "updated_at": now,
            }
        )
    new_ids = jobs.insert_jobs(session, rows, return_ids=True)
    session.commit()
    _run_again(session, batch_id, was)
    return new_ids
