"""Setting up and looking around: `nightly`, `sandbox`, `prices`, `config`, `db upgrade`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli import dispatch
from pipeline.cli.app import app, db_app
from pipeline.cli.options import JsonOpt
from pipeline.cli.ui import console, friendly_errors
from pipeline.cost.pricing import load_prices
from pipeline.db.session import Database, upgrade
from pipeline.settings import get_settings


@app.command()
def nightly(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what tonight's run would do; change nothing.")
    ] = False,
    date: Annotated[
        str | None, typer.Option(help="Run as on this date (YYYY-MM-DD, UTC) instead of today.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit tonight's dated manifest once, as the beat entry does at EDITBATCH_NIGHTLY_CRON."""
    from pipeline.batch import nightly as nights

    with friendly_errors():
        settings = get_settings()
        db = Database(settings.effective_database_url)
        now = nights.night_of(date)
        if dry_run:
            info = nights.preview(settings, now, db)
        else:
            from pipeline.run.deps import build_deps
            from pipeline.run.ratelimit import LocalLimiter

            finished = build_deps(settings, LocalLimiter(None, None), db).on_batch_finished
            batch_id = nights.run_nightly(
                settings,
                now,
                dispatch.celery_enqueue(),
                db=db,
                on_finished=finished,
                dispatch_batch=dispatch.celery_dispatch_batch(),
            )
            info = {**nights.preview(settings, now, db), "batch_id": batch_id}
    if as_json:
        print(json.dumps(info))
        return
    title = "Nightly run" + (" (dry run: nothing submitted)" if dry_run else "")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        table.add_row(key, "" if value is None else str(value))
    console.print(table)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def sandbox(ctx: typer.Context) -> None:
    """Serve the OpenAI-compatible sandbox (`POST /v1/images/edits`) for tests and demos.

    Every option of `python -m pipeline.sandbox` works here: --port, --latency-ms,
    --rate-limit, --error-rate, --quota-after, --billing-log, ... (`editbatch sandbox --help`).
    """
    from pipeline.sandbox.__main__ import main as sandbox_main

    sandbox_main(list(ctx.args))


@app.command()
def prices(as_json: JsonOpt = False) -> None:
    """Print the price table in use (USD per 1M tokens) with its date and sources."""
    with friendly_errors():
        table_data = load_prices(get_settings().prices_file)
    rows = [
        {
            "model": p.model,
            "text_input": str(p.text_input),
            "image_input": str(p.image_input),
            "image_output": str(p.image_output),
            "source": p.source,
        }
        for p in table_data.models.values()
    ]
    batch = {
        "factor": str(table_data.batch.factor),
        "as_of": table_data.batch.as_of,
        "source": table_data.batch.source,
    }
    if as_json:
        print(json.dumps({"as_of": table_data.as_of, "models": rows, "batch": batch}))
        return
    table = Table(
        title=f"Prices, USD per 1M tokens (as of {table_data.as_of})", title_justify="left"
    )
    for col in ("model", "text in", "image in", "image out", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["text_input"], r["image_input"], r["image_output"], r["source"])
    console.print(table)
    console.print(
        f"batch route (--route batch): x{batch['factor']} of these, as of {batch['as_of']} "
        f"({batch['source']})"
    )


@app.command()
def config(as_json: JsonOpt = False) -> None:
    """Print the effective settings (secrets masked)."""
    with friendly_errors():
        values = get_settings().masked()
    if as_json:
        print(json.dumps(values))
        return
    table = Table(title="Effective settings", title_justify="left")
    table.add_column("setting")
    table.add_column("value")
    for k, v in values.items():
        table.add_row(k, "" if v is None else str(v))
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply database migrations (also done automatically on first use)."""
    with friendly_errors():
        url = get_settings().effective_database_url
        upgrade(url, revision)
    console.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Revert database migrations to REVISION."""
    from alembic import command

    from pipeline.db.session import alembic_config

    with friendly_errors():
        command.downgrade(alembic_config(get_settings().effective_database_url), revision)
    console.print(f"database at revision {revision}")
