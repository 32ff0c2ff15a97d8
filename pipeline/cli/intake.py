"""`check` and `estimate`: what a manifest holds and costs, before anything is stored or sent."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.app import app
from pipeline.cli.options import JsonOpt, ManifestArg, ManifestOptions, RouteOpt, shared
from pipeline.cli.ui import (
    console,
    duration,
    friendly_errors,
    print_estimate,
    print_row_errors,
    print_shutdown_notices,
)
from pipeline.errors import ConfigError, RowError
from pipeline.settings import get_settings
from pipeline.states import JobState

BATCH_WINDOW_S = 24 * 3600  # the Batch API's completion window: the most a batch can take

# Commands import Pillow, fsspec and the submit path when they run, so that `editbatch status`
# starts fast (docs/performance.md).


@app.command()
@shared(ManifestOptions)
def check(manifest: ManifestArg, opts: ManifestOptions, as_json: JsonOpt = False) -> None:
    """Validate every row (files, formats, masks, model rules) without spending anything."""
    from pipeline.batch.submit import prepare, shutdown_notices_for

    with friendly_errors():
        settings = get_settings()
        prepared = prepare(settings, manifest, opts.intake(settings))
        rows = 0
        errors: list[RowError] = []
        notes: list[str] = []
        bad_rows = 0
        rows_by_model: dict[str, int] = {}
        for r in prepared.rows():
            rows += 1
            if r.errors:
                bad_rows += 1
                errors.extend(r.errors)
            elif r.spec is not None:
                rows_by_model[r.spec.model] = rows_by_model.get(r.spec.model, 0) + 1
            notes.extend(f"row {r.row}: {note}" for note in r.notes)
        notices = shutdown_notices_for(settings, rows_by_model)
    if as_json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "accepted": rows - bad_rows,
                    JobState.REJECTED: bad_rows,
                    "errors": [e.__dict__ for e in errors],
                    "notes": notes,
                    "shutdowns": [n.text() for n in notices],
                }
            )
        )
    else:
        print_shutdown_notices(notices)
        print_row_errors(errors, manifest)
        for note in notes[:50]:
            console.print(f"note: {note}")
        console.print(f"{rows} rows: {rows - bad_rows} ok, {bad_rows} rejected")
    if bad_rows:
        raise typer.Exit(1)


@app.command()
@shared(ManifestOptions)
def estimate(
    manifest: ManifestArg,
    opts: ManifestOptions,
    rows: Annotated[int, typer.Option(help="Rows to list (0: all).")] = 50,
    route: RouteOpt = "sync",
    as_json: JsonOpt = False,
) -> None:
    """What a manifest will cost (per row and in total, low-high) and how long it will take,
    on the sync route and the batch route side by side (rows at the prices of `--route`)."""
    from pipeline.batch.submit import prepare, shutdown_notices_for, sync_duration
    from pipeline.cost.estimate import estimate_batch, estimate_cost
    from pipeline.cost.pricing import load_prices

    with friendly_errors():
        if route not in ("sync", "batch"):
            raise ConfigError(f"--route {route!r}: use sync or batch")
        settings = get_settings()
        prepared = prepare(settings, manifest, opts.intake(settings))
        sync_prices = load_prices(settings.prices_file)
        table_data = sync_prices.for_route(route)
        per_row = []
        other = []
        rejected = 0
        for r in prepared.rows():
            if r.spec is None or r.errors:
                rejected += 1
                continue
            est = estimate_cost(r.spec, r.pixels, table_data)
            per_row.append((r, est))
            alt = "batch" if route == "sync" else "sync"
            other.append((estimate_cost(r.spec, r.pixels, sync_prices.for_route(alt)), r.spec.n))
        total = estimate_batch((est, r.spec.n) for r, est in per_row if r.spec)
        totals = {route: total, ("batch" if route == "sync" else "sync"): estimate_batch(other)}
        models = {est.model for _, est in per_row}
        sync_seconds = sync_duration(settings, total).seconds
        rows_by_model = {m: sum(1 for _, e in per_row if e.model == m) for m in models}
        notices = shutdown_notices_for(settings, rows_by_model, total)

    def money(value: Decimal | None) -> str | None:
        return None if value is None else str(value)

    if as_json:
        print(
            json.dumps(
                {
                    "rows": [
                        {
                            "row": r.row,
                            "id": r.key,
                            "model": est.model,
                            "expected_usd": money(est.expected),
                            "low_usd": money(est.low),
                            "high_usd": money(est.high),
                            "priced": est.priced,
                        }
                        for r, est in per_row
                    ],
                    "total": {
                        "calls": total.calls,
                        "images": total.images,
                        "expected_usd": str(total.expected),
                        "low_usd": str(total.low),
                        "high_usd": str(total.high),
                        "unpriced_calls": total.unpriced,
                        "unpriced_models": list(total.unpriced_models),
                    },
                    "rejected_rows": rejected,
                    "shutdowns": [n.text() for n in notices],
                    "route": route,
                    "duration_s": sync_seconds if route == "sync" else BATCH_WINDOW_S,
                    "routes": {
                        name: {
                            "expected_usd": str(t.expected),
                            "low_usd": str(t.low),
                            "high_usd": str(t.high),
                            "duration": f"about {duration(sync_seconds)}"
                            if name == "sync"
                            else "within 24 h",
                        }
                        for name, t in totals.items()
                    },
                }
            )
        )
        return
    table = Table(title=f"Estimate for {manifest}", title_justify="left")
    for col in ("row", "id", "model", "quality", "size", "n", "expected $", "low-high $"):
        table.add_column(col, justify="right" if "$" in col else "left")
    shown = per_row if rows == 0 else per_row[:rows]
    for r, est in shown:
        assert r.spec is not None
        table.add_row(
            str(r.row),
            r.key or "",
            est.model,
            r.spec.quality,
            r.spec.size,
            str(r.spec.n),
            f"{est.expected:.6f}" if est.expected is not None else "unpriced",
            f"{est.low:.4f}-{est.high:.4f}"
            if est.low is not None and est.high is not None
            else "-",
        )
    console.print(table)
    if len(shown) < len(per_row):
        console.print(f"... {len(per_row) - len(shown)} more rows (--rows 0 lists all)")
    if rejected:
        console.print(f"{rejected} rows rejected by preflight (see: editbatch check)")
    print_estimate(total, settings, None, route=route)
    print_shutdown_notices(notices)
    side = Table(title="Both routes", title_justify="left")
    for col in ("route", "expected $", "low-high $", "duration"):
        side.add_column(col, justify="right" if "$" in col else "left")
    for name in ("sync", "batch"):
        t = totals[name]
        side.add_row(
            name + (" (chosen)" if name == route else ""),
            f"{t.expected:.4f}",
            f"{t.low:.4f}-{t.high:.4f}",
            f"about {duration(sync_seconds)} at the configured limits"
            if name == "sync"
            else "within 24 h (OpenAI's Batch API)",
        )
    console.print(side)
