"""`submit` (to the Celery workers) and `run` (everything in this process): a manifest in,
a batch out, through the one submit path (`pipeline.batch.submit`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.cli import dispatch
from pipeline.cli.app import app
from pipeline.cli.options import (
    BatchCliOptions,
    JsonOpt,
    ManifestArg,
    ManifestOptions,
    parse_budget,
    shared,
)
from pipeline.cli.ui import (
    console,
    err,
    friendly_errors,
    print_estimate,
    print_row_errors,
    print_shutdown_notices,
)
from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.settings import Settings, get_settings
from pipeline.states import BatchState, JobState

if TYPE_CHECKING:
    from pipeline.batch.submit import Prepared, SubmitResult

# The bundled sandbox finishes a provider batch in seconds: poll it often.
SANDBOX_POLL_SECONDS = 0.5


def _store(
    settings: Settings,
    db: Database,
    prepared: Prepared,
    batch: BatchCliOptions,
    quiet: bool = False,
) -> SubmitResult:
    """Store the batch (nothing sent yet) and print its estimate."""
    from pipeline.batch.submit import BatchOptions, shutdown_notices_for, store
    from pipeline.cost.pricing import load_prices

    budget = parse_budget(batch.budget)
    result = store(
        db,
        prepared,
        BatchOptions(
            output_uri=batch.output_uri,
            name=batch.name,
            budget_usd=budget,
            strict=batch.strict,
            reuse=not batch.no_reuse,
            route=batch.route,
            fallback=batch.fallback,
            keep_provider_files=batch.keep_provider_files,
        ),
        load_prices(settings.prices_file),
    )
    if result.estimate is not None:
        print_estimate(
            result.estimate,
            settings,
            budget,
            out=err if quiet else console,
            route=batch.route,
        )
    notices = shutdown_notices_for(settings, result.rows_by_model, result.estimate)
    print_shutdown_notices(notices, result.batch_id)
    return result


@app.command()
@shared(ManifestOptions, BatchCliOptions)
def submit(
    manifest: ManifestArg,
    opts: ManifestOptions,
    batch: BatchCliOptions,
    as_json: JsonOpt = False,
) -> None:
    """Store a batch and queue its jobs for the Celery workers (`celery -A worker.app worker`)."""
    from pipeline.batch.submit import prepare

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        prepared = prepare(settings, manifest, opts.intake(settings))
        result = _store(settings, db, prepared, batch, quiet=as_json)
        sent = dispatch.to_workers(db, result.batch_id, settings)
    if as_json:
        print(
            json.dumps(
                {
                    "batch_id": result.batch_id,
                    "accepted": result.accepted,
                    JobState.REJECTED: result.rejected,
                    "enqueued": sent,
                }
            )
        )
        return
    print_row_errors(result.errors, manifest)
    console.print(
        f"batch {result.batch_id}: {result.accepted} jobs queued, {result.rejected} rejected"
    )
    console.print(f"watch it with: editbatch status {result.batch_id} --watch")
    print(result.batch_id)


@app.command()
@shared(ManifestOptions, BatchCliOptions)
def run(
    manifest: ManifestArg,
    opts: ManifestOptions,
    batch: BatchCliOptions,
    sandbox: Annotated[
        bool, typer.Option("--sandbox", help="Start the bundled sandbox API and use it.")
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option(help="Calls in flight (default EDITBATCH_CONCURRENCY).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit, run and collect on this machine: no Redis, no other server.

    Ctrl-C stops after the calls in flight; run the same command again to continue. With
    `--route batch` it uploads, creates the provider batches and polls them until every line
    is collected (Ctrl-C leaves them running at the provider; the same command continues).
    """
    from pipeline.batch import controls
    from pipeline.batch.submit import find_resumable, prepare

    say = err if as_json else console  # with --json, stdout holds the JSON alone
    with friendly_errors(), dispatch.sandbox_if(sandbox, say) as overrides:
        settings = get_settings().model_copy(update=overrides) if overrides else get_settings()
        db = Database(settings.effective_database_url)
        prepared = prepare(settings, manifest, opts.intake(settings))
        batch_id = find_resumable(db, prepared.sha256, batch.output_uri)
        if batch_id is not None:
            # The same manifest and output: continue that batch, the way `resume` does (what
            # the killed run left claimed is queued again, its reservations are dropped).
            with db.session() as session:
                controls.resume(session, batch_id, parse_budget(batch.budget), orphans=True)
            say.print(f"continuing batch {batch_id} (same manifest and output)")
        else:
            result = _store(settings, db, prepared, batch, quiet=as_json)
            batch_id = result.batch_id
            print_row_errors(result.errors, manifest)
            say.print(
                f"batch {batch_id}: {result.accepted} jobs to run, {result.rejected} rejected"
            )
        status = dispatch.in_process(
            settings,
            db,
            batch_id,
            concurrency or settings.concurrency,
            poll_seconds=SANDBOX_POLL_SECONDS if sandbox else None,
        )
    if as_json:
        print(json.dumps(status.to_json()))
    else:
        from pipeline.cli.ui import print_status

        print_status(status)
        with db.session() as session:
            row = session.get(Batch, batch_id)
            report = row.report_uri if row else None
        console.print(f"outputs: {status.output_uri}")
        if report:
            console.print(f"report: {report} (and .json)")
    if status.outputs_uncollected:
        err.print(
            f"[yellow]{status.outputs_uncollected} outputs could not be written[/] to "
            f"{status.output_uri}; they wait in the spool (reasons above)."
        )
        err.print(f"fix the location, then run: editbatch collect {batch_id}")
        raise typer.Exit(4)
    if status.state != BatchState.FINISHED:
        raise typer.Exit(3)
