"""Nightly runs: submit the manifest of the day, once, and say when it is done.

Celery beat sends `editbatch.nightly` on `nightly_cron` (UTC). The task calls `run_nightly`:

1. `plan(settings, now)` renders the dated patterns (`nightly_manifest`, `nightly_output`) for
   `now`'s date, e.g. `s3://bucket/manifests/{date:%Y-%m-%d}.csv`, and names the batch
   `nightly-<YYYY-MM-DD>`. Pure: no I/O.
2. Tonight's batch already exists (same name and manifest): nothing to do. The check is made
   again after the batch is stored; of two racing submitters the lower batch id wins and the
   other cancels its own batch before sending anything.
3. No manifest at that address yet: nothing to do (logged). A cron that fires several times in
   a window ("*/15 2-5 * * *") picks it up when it arrives.
4. The manifest and its images are fetched (`pipeline.intake.remote`), preflighted, stored with
   `nightly_budget_usd` as the batch budget and `nightly_route` as its route, and its jobs
   enqueued (on the batch route: one message, and a worker creates the provider batches).

When the batch finishes, `Deps.on_batch_finished` writes the report at the output root and
POSTs the signed summary to `webhook_url` (`pipeline.observe.webhook`).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.batch import controls, submit
from pipeline.batch.submit import Enqueue
from pipeline.cost.pricing import load_prices
from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.errors import ConfigError
from pipeline.intake import remote
from pipeline.intake.manifest import Defaults
from pipeline.observe.webhook import origin
from pipeline.settings import Settings, cron_fields

__all__ = [
    "NAME_PREFIX",
    "NightlyPlan",
    "cron_fields",
    "existing_batch",
    "night_of",
    "plan",
    "preview",
    "render",
    "run_nightly",
]

log = logging.getLogger("editbatch.nightly")

NAME_PREFIX = "nightly-"


@dataclass(frozen=True)
class NightlyPlan:
    """What tonight's run would submit (`editbatch nightly --dry-run` prints this)."""

    date: date
    name: str
    manifest_uri: str
    output_uri: str
    budget_usd: Decimal | None
    cron: str
    webhook: str | None  # scheme://host only: a webhook URL's path may be a secret
    route: str = "sync"  # EDITBATCH_NIGHTLY_ROUTE

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["date"] = self.date.isoformat()
        out["budget_usd"] = None if self.budget_usd is None else str(self.budget_usd)
        return out


def render(pattern: str, day: date, setting: str = "pattern") -> str:
    """`pattern` with `{date:<strftime>}` (or `{date}`, ISO) filled in for `day`.

    Only the `date` field is allowed: no attribute access or indexing, so a pattern cannot
    reach into Python objects.
    """
    out = []
    for literal, name, spec, conversion in string.Formatter().parse(pattern):
        out.append(literal)
        if name is None:
            continue
        if name != "date" or conversion:
            raise ConfigError(
                f"{setting}={pattern!r}: only {{date}} or {{date:%Y-%m-%d}}-style fields are "
                f"allowed, not {{{name}}}"
            )
        out.append(day.strftime(spec) if spec else day.isoformat())
    return "".join(out)


def night_of(day: str | None) -> datetime:
    """`now` for a run: the given date (YYYY-MM-DD) at 00:00 UTC, or the current UTC time."""
    if day is None:
        return datetime.now(UTC)
    try:
        return datetime.combine(date.fromisoformat(day), time(0), UTC)
    except ValueError as exc:
        raise ConfigError(f"{day!r} is not a date: give YYYY-MM-DD") from exc


def plan(settings: Settings, now: datetime) -> NightlyPlan:
    """Tonight's run for `now` (its calendar date, as given: the beat task passes UTC)."""
    if not settings.nightly_manifest:
        raise ConfigError(
            "no nightly run is configured: set EDITBATCH_NIGHTLY_MANIFEST "
            "(e.g. s3://bucket/manifests/{date:%Y-%m-%d}.csv) and EDITBATCH_NIGHTLY_OUTPUT"
        )
    if not settings.nightly_output:
        raise ConfigError(
            "EDITBATCH_NIGHTLY_OUTPUT is not set: say where the nightly outputs go "
            "(a folder or s3://bucket/outputs/{date:%Y-%m-%d})"
        )
    day = now.date()
    cron_fields(settings.nightly_cron)
    output = render(settings.nightly_output, day, "EDITBATCH_NIGHTLY_OUTPUT")
    webhook = origin(settings.webhook_url) if settings.webhook_url else None
    if webhook and not settings.webhook_secret:
        webhook += " (not sent: EDITBATCH_WEBHOOK_SECRET is not set)"
    return NightlyPlan(
        date=day,
        name=f"{NAME_PREFIX}{day.isoformat()}",
        manifest_uri=render(settings.nightly_manifest, day, "EDITBATCH_NIGHTLY_MANIFEST"),
        output_uri=output if "://" in output else str(Path(output).resolve()),
        budget_usd=settings.nightly_budget_usd,
        cron=settings.nightly_cron,
        webhook=webhook,
        route=settings.nightly_route,
    )


def existing_batch(db: Database, tonight: NightlyPlan) -> int | None:
    """The batch already submitted for this plan (the first one, if two raced)."""
    with db.session() as session:
        return session.scalar(
            select(Batch.id)
            .where(Batch.name == tonight.name, Batch.manifest_uri == tonight.manifest_uri)
            .order_by(Batch.id)
            .limit(1)
        )


def preview(settings: Settings, now: datetime, db: Database | None = None) -> dict[str, Any]:
    """`editbatch nightly --dry-run`: the plan, whether its manifest is there, whether it ran."""
    tonight = plan(settings, now)
    database = db or Database(settings.effective_database_url)
    try:
        earlier = existing_batch(database, tonight)
    finally:
        if db is None:
            database.dispose()
    found = remote.exists(tonight.manifest_uri)
    return {
        **tonight.to_json(),
        "manifest_found": found,
        "submitted_as": earlier,
        "would_submit": found and earlier is None,
    }


def run_nightly(
    settings: Settings,
    now: datetime,
    enqueue: Enqueue,
    *,
    db: Database | None = None,
    on_finished: Callable[[int], None] | None = None,
    dispatch_batch: submit.DispatchBatch | None = None,
) -> int | None:
    """Submit tonight's manifest once; the new batch id, or None when there is nothing to do.

    `on_finished` is called for a batch that is finished as soon as it is stored (every row
    rejected), since no worker will ever finish it. With EDITBATCH_NIGHTLY_ROUTE=batch the
    batch runs on the batch route: `dispatch_batch(batch_id)` sends it.
    """
    tonight = plan(settings, now)
    database = db or Database(settings.effective_database_url)
    try:
        return _run(settings, tonight, enqueue, database, on_finished, dispatch_batch)
    finally:
        if db is None:
            database.dispose()


def _run(
    settings: Settings,
    tonight: NightlyPlan,
    enqueue: Enqueue,
    db: Database,
    on_finished: Callable[[int], None] | None,
    dispatch_batch: submit.DispatchBatch | None = None,
) -> int | None:
    earlier = existing_batch(db, tonight)
    if earlier is not None:
        log.info("%s: already submitted as batch %s", tonight.name, earlier)
        return None
    if not remote.exists(tonight.manifest_uri):
        log.warning("%s: no manifest at %s (yet)", tonight.name, tonight.manifest_uri)
        return None
    defaults = Defaults(model=settings.default_model, provider=settings.provider)
    prepared = submit.prepare(settings, tonight.manifest_uri, submit.Intake(defaults))
    options = submit.BatchOptions(
        output_uri=tonight.output_uri,
        name=tonight.name,
        budget_usd=tonight.budget_usd,
        extra={"nightly": {"date": tonight.date.isoformat(), "manifest": tonight.manifest_uri}},
        route=tonight.route,
    )
    result = submit.store(db, prepared, options, load_prices(settings.prices_file))
    batch_id = result.batch_id
    for notice in submit.shutdown_notices_for(settings, result.rows_by_model, result.estimate):
        log.warning("%s: batch %s: %s", tonight.name, batch_id, notice.text(batch_id))
    first = existing_batch(db, tonight)
    if first != batch_id:
        with db.session() as session:
            controls.cancel(session, batch_id)
        log.warning("%s: batch %s was submitted first; cancelled %s", tonight.name, first, batch_id)
        return None
    sent = submit.send(db, batch_id, enqueue, on_finished, dispatch_batch)
    log.info(
        "%s: batch %s from %s: %s jobs queued, %s rejected",
        tonight.name,
        batch_id,
        tonight.manifest_uri,
        sent,
        result.rejected,
    )
    return batch_id
