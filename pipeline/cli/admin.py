"""Setting up and looking around: `nightly`, `sandbox`, `prices`, `config`, `db upgrade`."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli import dispatch
from pipeline.cli.app import app, db_app
from pipeline.cli.options import JsonOpt
from pipeline.cli.ui import console, friendly_errors
from pipeline.cost.pricing import ModelPrice, load_prices
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
    """Print the price table in use (USD per 1M tokens), each row with its date and source;
    a provider's own prices (its `prices` overrides) follow, naming the provider."""
    from pipeline.providers import providers_of

    with friendly_errors():
        settings = get_settings()
        table_data = providers_of(settings).prices(load_prices(settings.prices_file))

    def money(value: Decimal | None) -> str | None:
        return None if value is None else str(value)

    listed: list[tuple[str | None, ModelPrice]] = [(None, p) for p in table_data.models.values()]
    for name, overrides in sorted(table_data.providers.items()):
        listed.extend((name, p) for p in overrides.values())
    rows: list[dict[str, Any]] = [
        {
            "model": p.model,
            "provider": provider,
            "text_input": str(p.text_input),
            "cached_text_input": money(p.cached_text_input),
            "image_input": str(p.image_input),
            "cached_image_input": money(p.cached_image_input),
            "image_output": str(p.image_output),
            "checked_on": p.checked_on,
            "source": p.source,
        }
        for provider, p in listed
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
        title=f"Prices, USD per 1M tokens (as of {table_data.as_of}; cached input in brackets)",
        title_justify="left",
    )
    for col in ("model", "text in", "image in", "image out", "checked", "source"):
        table.add_column(col, justify="right" if col.endswith((" in", " out")) else "left")

    def with_cached(value: str, cached: str | None) -> str:
        return f"{value} ({cached})" if cached else value

    for r in rows:
        table.add_row(
            r["model"] + (f" ({r['provider']} only)" if r["provider"] else ""),
            with_cached(r["text_input"], r["cached_text_input"]),
            with_cached(r["image_input"], r["cached_image_input"]),
            r["image_output"],
            r["checked_on"],
            r["source"],
        )
    console.print(table)
    console.print(
        f"batch route (--route batch): x{batch['factor']} of these, as of {batch['as_of']} "
        f"({batch['source']})"
    )


@app.command()
def models(as_json: JsonOpt = False) -> None:
    """Every model of the catalogue: its state today, shutdown, replacement, price of a
    1024x1024 output at each quality, and what it accepts."""
    from pipeline import clock
    from pipeline.cost.estimate import output_price
    from pipeline.intake.catalog import load_catalog

    with friendly_errors():
        settings = get_settings()
        catalog = load_catalog(settings.catalog_file)
        table_data = load_prices(settings.prices_file)
        today = clock.today()
    qualities = ("low", "medium", "high")
    rows: list[dict[str, Any]] = []
    for info in catalog:
        price = table_data.get(info.name)
        rule = info.size_rule
        rows.append(
            {
                "model": info.name,
                "state": str(info.state_on(today)),
                "deprecated_on": info.deprecated_on.isoformat() if info.deprecated_on else None,
                "shutdown_on": info.shutdown_on.isoformat() if info.shutdown_on else None,
                "replacement": info.replacement,
                "usd_per_1024x1024_output": {
                    q: str(output_price(price, "1024x1024", q)) if price else None
                    for q in qualities
                },
                "sizes": list(info.sizes),
                "size_rule": None
                if rule is None
                else {
                    "multiple": rule.multiple,
                    "max_aspect": rule.max_aspect,
                    "max": f"{rule.max_long_side}x{rule.max_short_side}",
                },
                "qualities": list(info.qualities),
                "input_fidelity": list(info.input_fidelity),
                "mask": info.mask,
                "markup": info.markup,
                "output_formats": list(info.output_formats),
                # None: the catalogue does not know (check passes the value on, with a note)
                "complexity": None if info.complexity is None else list(info.complexity),
                "gif": info.gif,
                "svg": info.svg,
                "source": info.source,
            }
        )
    if as_json:
        print(json.dumps({"today": today.isoformat(), "as_of": catalog.as_of, "models": rows}))
        return
    life = Table(
        title=f"Models on {today} (catalogue as of {catalog.as_of}); $ of one 1024x1024 "
        "output image (output tokens)",
        title_justify="left",
    )
    for col in ("model", "state", "shuts down", "replacement", "low", "medium", "high"):
        life.add_column(col, justify="right" if col in qualities else "left")
    colour = {"current": "green", "deprecated": "yellow", "gone": "red"}
    for r in rows:
        usd = r["usd_per_1024x1024_output"]
        life.add_row(
            r["model"],
            f"[{colour[r['state']]}]{r['state']}[/]",
            r["shutdown_on"] or "",
            r["replacement"] or "",
            *(f"{Decimal(usd[q]):.4f}" if usd[q] else "unpriced" for q in qualities),
        )
    console.print(life)
    accepts = Table(title="What each model accepts", title_justify="left")
    for col in ("model", "sizes", "quality", "input_fidelity", "mask", "markup", "formats"):
        accepts.add_column(col, overflow="fold")
    accepts.add_column("complexity / gif / svg", overflow="fold")

    def known(value: object) -> str:
        if value is None:
            return "unknown"
        if isinstance(value, list):
            return ", ".join(value) or "no"
        return "yes" if value else "no"

    for r in rows:
        rule = r["size_rule"]
        sizes = ", ".join(r["sizes"])
        if rule is not None:
            sizes = (
                f"any WxH (both ÷{rule['multiple']}, up to {rule['max']}, aspect "
                f"1:{rule['max_aspect']:g}..{rule['max_aspect']:g}:1), {sizes}"
            )
        accepts.add_row(
            r["model"],
            sizes,
            ", ".join(r["qualities"]),
            ", ".join(r["input_fidelity"]) or "omit",
            "yes" if r["mask"] else "no",
            "yes" if r["markup"] else "no",
            ", ".join(r["output_formats"]),
            f"{known(r['complexity'])} / {known(r['gif'])} / {known(r['svg'])}",
        )
    console.print(accepts)


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
