"""Watching and steering batches: `status`, `resume`, `pause`, `cancel`, `retry`, `collect`."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live
from rich.table import Table

from pipeline.batch.status import batch_status, list_batches
from pipeline.cli import dispatch
from pipeline.cli.app import app
from pipeline.cli.options import (
    BatchArg,
    BudgetOpt,
    JsonOpt,
    LocalOpt,
    parse_budget,
    parse_model_map,
)
from pipeline.cli.ui import (
    console,
    err,
    friendly_errors,
    print_row_errors,
    print_status,
    progress_table,
)
from pipeline.db.session import Database
from pipeline.errors import ConfigError
from pipeline.settings import Settings, get_settings
from pipeline.states import BatchState, JobState

if TYPE_CHECKING:
    from pipeline.batch.controls import Remap


@app.command()
def status(
    batch: Annotated[int | None, typer.Argument(help="Batch id; omit to list batches.")] = None,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until it ends.")] = False,
) -> None:
    """List batches, or show one batch: counts per state, cost so far, failures."""
    with friendly_errors():
        db = Database(get_settings().effective_database_url)
        with db.session() as session:
            if batch is None:
                rows = list_batches(session)
                if as_json:
                    print(json.dumps(rows))
                    return
                table = Table(title="Batches", title_justify="left")
                for col in ("batch", "name", "state", "created", "jobs", "cost $"):
                    table.add_column(col)
                for r in rows:
                    table.add_row(
                        str(r["batch_id"]),
                        r["name"],
                        r["state"],
                        r["created_at"],
                        str(r["jobs_total"]),
                        r["cost_usd"],
                    )
                console.print(table)
                return
            current = batch_status(session, batch, with_reviews=True)
        if _refresh_provider_batches(current.provider_batches, db, batch):
            with db.session() as session:
                current = batch_status(session, batch, with_reviews=True)
        if as_json:
            print(json.dumps(current.to_json()))
            return
        if watch:
            started = time.monotonic()
            with Live(console=console, refresh_per_second=1) as live:
                while current.state == BatchState.RUNNING:
                    live.update(progress_table(current, time.monotonic() - started))
                    time.sleep(1)
                    with db.session() as session:
                        current = batch_status(session, batch)
        print_status(current)


def _refresh_provider_batches(listed: list[dict[str, object]], db: Database, batch: int) -> bool:
    """Poll the batch's open provider batches once (nothing is booked or billed by a poll);
    True if any was refreshed. Unreachable API: the stored values are shown, with a note."""
    if not any(pb["state"] == "open" for pb in listed):
        return False
    from pipeline.errors import ProviderError
    from pipeline.run.batchroute.poll import refresh

    settings = get_settings()
    try:
        ctx = dispatch.route_context(dispatch.local_deps(settings, db), settings.concurrency)
        return refresh(ctx, [batch]) > 0
    except ProviderError as exc:
        err.print(f"[yellow]provider batches not refreshed:[/] {exc}")
        return False


def _collect_provider_batches(settings: Settings, db: Database, batch: int) -> None:
    """The batch route: poll the batch's provider batches and collect the finished ones here
    (what beat does; for a machine without it, or after a cancel)."""
    from pipeline.run.batchroute import collect as provider
    from pipeline.run.batchroute.poll import collectable, refresh

    ctx = dispatch.route_context(dispatch.local_deps(settings, db), settings.concurrency)
    refresh(ctx, [batch])
    for pb_id in collectable(ctx, [batch]):
        done = provider.collect(ctx, pb_id)
        if done is not None:
            console.print(f"provider batch {pb_id}: {done.booked} lines booked")


@app.command()
def collect(batch: BatchArg) -> None:
    """Retry writing spooled outputs to the output location (after a storage failure); on the
    batch route, collect the provider batches that finished."""
    from pipeline.output.collector import StorageCache, collect_batch
    from pipeline.output.report import write_report

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        storages = StorageCache()
        with db.session() as session:
            listed = batch_status(session, batch, failures_limit=0).provider_batches
        if any(pb["state"] in ("open", "collecting") for pb in listed):
            _collect_provider_batches(settings, db, batch)
        written, left = collect_batch(db, batch, storages)
        console.print(f"collected {written} outputs; {left} still waiting")
        with db.session() as session:
            state = batch_status(session, batch).state
        if state == BatchState.FINISHED:
            csv_uri, _ = write_report(db, batch, storages)
            console.print(f"report: {csv_uri}")
    if left:
        raise typer.Exit(1)


ModelMapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model-map",
        help="OLD=NEW: move the unfinished jobs of model OLD to NEW (repeatable); their "
        "parameters are checked against NEW's rules first.",
    ),
]


@app.command()
def resume(
    batch: BatchArg,
    budget: BudgetOpt = None,
    local: LocalOpt = False,
    model_map: ModelMapOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="With --model-map: show what would move; change nothing."),
    ] = False,
) -> None:
    """Continue a held or paused batch, and re-send every unfinished job from the database."""
    from pipeline.batch import controls
    from pipeline.cost.pricing import load_prices
    from pipeline.intake.catalog import load_catalog
    from pipeline.providers import providers_of

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        mapping = parse_model_map(model_map)
        providers = providers_of(settings)
        if dry_run and not mapping:
            raise ConfigError("--dry-run shows what --model-map would move: give --model-map")
        with db.session() as session:

            def remap() -> controls.Remap:
                return controls.remap_models(
                    session,
                    batch,
                    mapping,
                    load_catalog(settings.catalog_file),
                    providers.prices(load_prices(settings.prices_file)),
                    providers,
                )

            if dry_run:
                _print_remap(remap(), mapping, dry_run=True)
                session.rollback()
                return
            report = controls.resume(
                session, batch, parse_budget(budget), remap=remap if mapping else None
            )
        if report is not None:
            _print_remap(report, mapping)
        if local:
            print_status(dispatch.in_process(settings, db, batch, settings.concurrency))
            return
        sent = dispatch.to_workers(db, batch, settings)
    console.print(f"batch {batch}: {sent} jobs sent to the workers")


def _print_remap(report: Remap, mapping: dict[str, str], dry_run: bool = False) -> None:
    pairs = ", ".join(f"{old} -> {new}" for old, new in mapping.items())
    would = "would move" if dry_run else "moved"
    console.print(f"{would} {report.moved} jobs ({pairs})")
    if report.unfit:
        print_row_errors(report.unfit, "the new model's rules")
        fate = "would fail" if dry_run else f"{JobState.FAILED}"
        rows = len({e.row for e in report.unfit})
        err.print(f"{rows} rows do not fit their new model and {fate} without being sent")
    if report.estimate is not None and report.estimate.calls:
        est = report.estimate
        console.print(
            f"estimate for the moved jobs: ${est.expected:.2f} (range ${est.low:.2f}-"
            f"${est.high:.2f}) for {est.calls} calls"
        )


@app.command()
def pause(batch: BatchArg) -> None:
    """Stop starting new calls (calls in flight finish); `editbatch resume` continues."""
    from pipeline.batch import controls

    with friendly_errors():
        db = Database(get_settings().effective_database_url)
        with db.session() as session:
            controls.pause(session, batch)
    console.print(f"batch {batch} paused; continue with: editbatch resume {batch}")


@app.command()
def cancel(batch: BatchArg) -> None:
    """Cancel every job not yet started (calls in flight finish and are recorded)."""
    from pipeline.batch import controls

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        with db.session() as session:
            n = controls.cancel(session, batch)
            listed = batch_status(session, batch, failures_limit=0).provider_batches
    console.print(f"batch {batch} cancelled ({n} jobs not started)")
    if any(pb["state"] == "open" for pb in listed):
        from pipeline.errors import ProviderError
        from pipeline.run.batchroute.poll import cancel_open

        try:
            ctx = dispatch.route_context(dispatch.local_deps(settings, db), settings.concurrency)
            asked = cancel_open(ctx, [batch])
        except ProviderError as exc:
            asked = []
            err.print(f"[yellow]provider batches not cancelled yet:[/] {exc} (the poll retries)")
        console.print(
            f"{len(asked)} provider batches cancelled at the provider: the lines they finished "
            "are billed, and are collected and booked by the next poll"
        )


@app.command()
def retry(
    batch: BatchArg,
    failed: Annotated[bool, typer.Option("--failed", help="Retry the failed jobs.")] = False,
    prompt: Annotated[str | None, typer.Option(help="New prompt for the retried jobs.")] = None,
    model: Annotated[str | None, typer.Option(help="New model for the retried jobs.")] = None,
    local: LocalOpt = False,
) -> None:
    """Run the failed jobs of a batch again; successes are kept, new attempts are recorded."""
    if not failed:
        err.print("say what to retry: editbatch retry BATCH --failed")
        raise typer.Exit(2)
    from pipeline.batch import controls
    from pipeline.intake.catalog import load_catalog
    from pipeline.providers import providers_of

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        # A new model: each row is checked against its rules (and its provider) first.
        catalog = load_catalog(settings.catalog_file) if model is not None else None
        providers = providers_of(settings) if model is not None else None
        with db.session() as session:
            retried = controls.retry_failed(session, batch, prompt, model, catalog, providers)
        n = retried.count
        if retried.unfit:
            print_row_errors(retried.unfit, f"{model}'s rules")
            rows = len({e.row for e in retried.unfit})
            err.print(f"{rows} failed rows do not fit {model}: they stay failed, not sent")
        if not n:
            console.print(f"batch {batch} has no failed jobs to send again")
            return
        if local:
            print_status(dispatch.in_process(settings, db, batch, settings.concurrency))
            return
        dispatch.to_workers(db, batch, settings)
    console.print(f"batch {batch}: {n} failed jobs sent again")
