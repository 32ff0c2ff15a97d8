"""The dashboard and what comes out of a review: `serve`, `export`."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.cli import dispatch
from pipeline.cli.app import app
from pipeline.cli.options import BatchArg
from pipeline.cli.ui import console, err, friendly_errors
from pipeline.db.session import Database
from pipeline.settings import get_settings


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond 127.0.0.1 needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8700,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Hide and refuse every action.")
    ] = False,
) -> None:
    """Serve the web dashboard: batches, live progress, jobs, and the review gallery."""
    from pipeline.web import serve as serve_dashboard

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)

        def send(batch_id: int) -> int:
            # Resume, retry and re-run send like the CLI: to the Celery workers.
            return dispatch.to_workers(db, batch_id, settings)

        serve_dashboard(settings, db, host, port, read_only, send)


@app.command()
def export(
    batch: BatchArg,
    destination: Annotated[str, typer.Argument(help="Folder or URL (s3://bucket/prefix).")],
    approved: Annotated[
        bool, typer.Option("--approved", help="Export the outputs approved in review.")
    ] = False,
) -> None:
    """Copy the approved outputs of a batch to DESTINATION, each verified by sha256."""
    if not approved:
        err.print("say what to export: editbatch export BATCH --approved DEST")
        raise typer.Exit(2)
    from pipeline.output.export import export_approved

    with friendly_errors():
        db = Database(get_settings().effective_database_url)
        result = export_approved(db, batch, destination)
    console.print(
        f"exported {len(result.copied)} approved outputs ({result.bytes:,} bytes) to "
        f"{result.destination}, each verified by sha256"
    )
    if result.superseded:
        console.print(
            f"{len(result.superseded)} names were approved twice (an original and its re-run): "
            "the re-run's output was exported"
        )
