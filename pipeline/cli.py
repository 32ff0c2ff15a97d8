"""The `editbatch` command line."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.batch.status import BatchStatus, batch_status, list_batches
from pipeline.cost.pricing import load_prices
from pipeline.db.models import Batch
from pipeline.db.session import Database, upgrade
from pipeline.errors import EditbatchError, RowError
from pipeline.intake.catalog import load_catalog
from pipeline.intake.manifest import Defaults
from pipeline.observe.logs import setup_logging
from pipeline.settings import Settings, get_settings
from pipeline.spec import file_sha256

if TYPE_CHECKING:
    from pipeline.batch.submit import SubmitResult
    from pipeline.cost.estimate import BatchEstimate
    from pipeline.intake.preflight import Preflight
    from pipeline.intake.remote import LocalManifest

# Commands import the modules that pull in Pillow, fsspec and the producer when they run, so
# that `editbatch status` starts fast (docs/performance.md).

app = typer.Typer(
    help="Run AI image edits in bulk, reliably and at a known cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()
err = Console(stderr=True)

ManifestArg = Annotated[
    str,
    typer.Argument(
        help="Manifest: .csv (header row), .json (array) or .jsonl; a path or a URL "
        "(s3://bucket/key.csv)."
    ),
]
ModelOpt = Annotated[str | None, typer.Option(help="Model for rows that name none.")]
SizeOpt = Annotated[str | None, typer.Option(help="Size for rows that give none.")]
QualityOpt = Annotated[str | None, typer.Option(help="Quality for rows that give none.")]
NOpt = Annotated[int | None, typer.Option("--n", help="Images per row, for rows that give none.")]
FormatOpt = Annotated[str | None, typer.Option(help="png | webp | jpeg, for rows that give none.")]
FidelityOpt = Annotated[str | None, typer.Option(help="input_fidelity for rows that give none.")]
BackgroundOpt = Annotated[str | None, typer.Option(help="background for rows that give none.")]
TemplateOpt = Annotated[
    str | None,
    typer.Option("--name-template", help="Output name template, e.g. {id}_{index}.{ext}"),
]
MaskModeOpt = Annotated[str | None, typer.Option(help="guide | strict, for rows that give none.")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Output folder or URL (default ./outputs).")
]
RootOpt = Annotated[
    list[Path] | None,
    typer.Option("--allow-root", help="Extra folder input files may come from (repeatable)."),
]
ConvertOpt = Annotated[
    bool, typer.Option("--convert", help="Convert TIFF/BMP/... inputs to PNG instead of refusing.")
]
UnknownOpt = Annotated[
    bool, typer.Option("--allow-unknown-model", help="Accept models not in the catalogue.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
NoReuseOpt = Annotated[
    bool,
    typer.Option(
        "--no-reuse", help="Buy every edit, even one already bought (same images, prompt, params)."
    ),
]
BudgetOpt = Annotated[
    str | None, typer.Option("--budget", help="Stop (hold the batch) at this many USD.")
]


def _settings() -> Settings:
    return get_settings()


def _db(settings: Settings) -> Database:
    return Database(settings.effective_database_url)


def _defaults(
    settings: Settings,
    model: str | None = None,
    size: str | None = None,
    quality: str | None = None,
    n: int | None = None,
    output_format: str | None = None,
    input_fidelity: str | None = None,
    background: str | None = None,
    name_template: str | None = None,
    mask_mode: str | None = None,
) -> Defaults:
    values = {
        "size": size,
        "quality": quality,
        "n": n,
        "output_format": output_format,
        "input_fidelity": input_fidelity,
        "background": background,
        "output": name_template,
        "mask_mode": mask_mode,
    }
    return Defaults(
        model=model or settings.default_model,
        values={k: v for k, v in values.items() if v is not None},
    )


def _preflight(
    settings: Settings,
    manifest: LocalManifest,
    roots: list[Path] | None,
    convert: bool,
    unknown: bool,
) -> Preflight:
    from pipeline.intake.preflight import PreflightOptions

    # A remote manifest's files are in the download cache (manifest.roots), nowhere else.
    allowed = (*manifest.roots, *(r.resolve() for r in roots or []))
    return manifest.preflight(
        PreflightOptions(
            allowed_roots=allowed,
            catalog=load_catalog(settings.catalog_file),
            convert=convert,
            allow_unknown_model=unknown,
            work_dir=settings.home.resolve() / "preflight",
        )
    )


def _inputs(
    settings: Settings,
    manifest: str,
    roots: list[Path] | None,
    convert: bool,
    allow_unknown_model: bool,
    **row_defaults: Any,
) -> tuple[LocalManifest, Defaults, Preflight]:
    """The manifest as a local file, the batch-wide row defaults, and a preflight for it."""
    from pipeline.intake.remote import localize_manifest

    local = localize_manifest(manifest, settings)
    defaults = _defaults(settings, **row_defaults)
    return local, defaults, _preflight(settings, local, roots, convert, allow_unknown_model)


def _budget(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        budget = Decimal(value)
    except InvalidOperation as exc:
        raise EditbatchError(f"--budget {value!r} is not a number of US dollars") from exc
    if budget < 0:
        raise EditbatchError("--budget must not be negative")
    return budget


def _output_uri(output: str | None) -> str:
    target = output or "outputs"
    return target if "://" in target else str(Path(target).resolve())


def _print_row_errors(errors: list[RowError], manifest: str | Path, limit: int = 50) -> None:
    if not errors:
        return
    table = Table(title=f"Rejected rows in {manifest}", title_justify="left")
    for col in ("row", "id", "field", "reason"):
        table.add_column(col, overflow="fold")
    for e in errors[:limit]:
        table.add_row(str(e.row), e.key or "", e.field, e.reason)
    err.print(table)
    if len(errors) > limit:
        err.print(f"... and {len(errors) - limit} more problems")


def _status_table(status: BatchStatus) -> Table:
    table = Table(
        title=f"Batch {status.batch_id} · {status.name} · {status.state}", title_justify="left"
    )
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in status.counts.items():
        if n:
            table.add_row(state, str(n))
    table.add_section()
    table.add_row("total", str(status.jobs_total))
    table.add_row("attempts", str(status.attempts))
    cost = f"${status.cost_usd:.6f}"
    if status.unpriced_attempts:
        cost += f" + {status.unpriced_attempts} unpriced attempts (cost unknown)"
    table.add_row("cost", cost)
    if status.unpriced_jobs:
        table.add_row("unpriced", f"{status.unpriced_jobs} jobs use a model with no price")
    table.add_row(
        "estimate",
        f"${status.estimated_usd:.4f} in all, ${status.estimated_remaining_usd:.4f} still to go",
    )
    if status.cost_per_output_usd is not None:
        table.add_row("per output", f"${status.cost_per_output_usd:.6f}")
    if status.retry_waste_usd:
        table.add_row("retry waste", f"${status.retry_waste_usd:.6f} (attempts that gave nothing)")
    if status.reused:
        table.add_row("reused", f"{status.reused} jobs, saved ${status.saved_usd:.6f}")
    if status.budget_usd is not None:
        in_flight = max(status.reserved_usd - status.cost_usd, Decimal(0))
        table.add_row(
            "budget", f"${status.budget_usd:.2f} (${in_flight:.4f} reserved by calls in flight)"
        )
    table.add_row("outputs", f"{status.outputs} ({status.outputs_uncollected} not collected)")
    if status.drift_outputs and status.drift_mean is not None:
        table.add_row(
            "mask drift",
            f"mean {status.drift_mean:.1%}, max {status.drift_max or 0:.1%} of protected pixels "
            f"changed by the model ({status.drift_outputs} masked outputs)",
        )
    return table


def _print_status(status: BatchStatus) -> None:
    console.print(_status_table(status))
    if status.hold_reason and status.state == "held":
        console.print(f"[yellow]held:[/] {status.hold_reason}")
        console.print(f"resume with: editbatch resume {status.batch_id}")
    if len(status.breakdown) > 1:
        table = Table(title="Cost by model, quality and state", title_justify="left")
        for col in ("model", "quality", "state", "jobs", "cost $"):
            table.add_column(col, justify="right" if col in ("jobs", "cost $") else "left")
        for b in status.breakdown:
            table.add_row(
                b["model"] or "", b["quality"] or "", b["state"], str(b["jobs"]), b["cost_usd"]
            )
        console.print(table)
    if status.failures:
        table = Table(title="Failed and rejected jobs", title_justify="left")
        for col in ("row", "id", "state", "code", "message"):
            table.add_column(col, overflow="fold")
        for f in status.failures:
            table.add_row(
                str(f["row"]), f["id"] or "", f["state"], f["code"] or "", f["message"] or ""
            )
        console.print(table)


def _print_estimate(
    est: BatchEstimate,
    settings: Settings,
    models: set[str],
    budget: Decimal | None,
    out: Console | None = None,
) -> None:
    from pipeline.cost.estimate import estimate_duration, typical_latency

    if not est.calls:
        return
    out = out or console
    latency = typical_latency(models)
    seconds = estimate_duration(
        est.calls,
        est.images,
        settings.images_per_minute,
        settings.max_in_flight or settings.concurrency,
        latency,
    )
    out.print(
        f"estimate: ${est.expected:.2f} (range ${est.low:.2f}-${est.high:.2f}) for "
        f"{est.calls} calls, {est.images} images; about {_duration(seconds)} at "
        f"{settings.images_per_minute or 'unlimited'} images/min, "
        f"{settings.max_in_flight or settings.concurrency} in flight, ~{latency:.0f} s per call"
    )
    if est.unpriced:
        err.print(
            f"[yellow]warning:[/] {est.unpriced} calls use models with no price "
            f"({', '.join(est.unpriced_models)}): their cost is unknown, not $0. Add them to a "
            "price file (EDITBATCH_PRICES_FILE)."
        )
    if budget is not None and est.low > budget:
        err.print(
            f"[yellow]warning:[/] the budget ${budget:.2f} is below the lowest estimate "
            f"${est.low:.2f}: the batch will hold before it finishes"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextmanager
def _friendly_errors() -> Iterator[None]:
    try:
        yield
    except EditbatchError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


@app.command()
def check(
    manifest: ManifestArg,
    model: ModelOpt = None,
    size: SizeOpt = None,
    quality: QualityOpt = None,
    n: NOpt = None,
    output_format: FormatOpt = None,
    input_fidelity: FidelityOpt = None,
    background: BackgroundOpt = None,
    name_template: TemplateOpt = None,
    mask_mode: MaskModeOpt = None,
    allow_root: RootOpt = None,
    convert: ConvertOpt = False,
    allow_unknown_model: UnknownOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate every row (files, formats, masks, model rules) without spending anything."""
    from pipeline.batch.submit import check_rows

    with _friendly_errors():
        settings = _settings()
        local, defaults, pre = _inputs(
            settings,
            manifest,
            allow_root,
            convert,
            allow_unknown_model,
            model=model,
            size=size,
            quality=quality,
            n=n,
            output_format=output_format,
            input_fidelity=input_fidelity,
            background=background,
            name_template=name_template,
            mask_mode=mask_mode,
        )
        rows = 0
        errors: list[RowError] = []
        notes: list[str] = []
        bad_rows = 0
        for r in check_rows(local.path, defaults, pre):
            rows += 1
            if r.errors:
                bad_rows += 1
                errors.extend(r.errors)
            notes.extend(f"row {r.row}: {note}" for note in r.notes)
    if as_json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "accepted": rows - bad_rows,
                    "rejected": bad_rows,
                    "errors": [e.__dict__ for e in errors],
                    "notes": notes,
                }
            )
        )
    else:
        _print_row_errors(errors, manifest)
        for note in notes[:50]:
            console.print(f"note: {note}")
        console.print(f"{rows} rows: {rows - bad_rows} ok, {bad_rows} rejected")
    if bad_rows:
        raise typer.Exit(1)


@app.command()
def estimate(
    manifest: ManifestArg,
    model: ModelOpt = None,
    size: SizeOpt = None,
    quality: QualityOpt = None,
    n: NOpt = None,
    output_format: FormatOpt = None,
    input_fidelity: FidelityOpt = None,
    background: BackgroundOpt = None,
    name_template: TemplateOpt = None,
    mask_mode: MaskModeOpt = None,
    allow_root: RootOpt = None,
    convert: ConvertOpt = False,
    allow_unknown_model: UnknownOpt = False,
    rows: Annotated[int, typer.Option(help="Rows to list (0: all).")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """What a manifest will cost (per row and in total, low-high) and how long it will take."""
    from pipeline.batch.submit import check_rows
    from pipeline.cost.estimate import (
        estimate_batch,
        estimate_cost,
        estimate_duration,
        typical_latency,
    )

    with _friendly_errors():
        settings = _settings()
        local, defaults, pre = _inputs(
            settings,
            manifest,
            allow_root,
            convert,
            allow_unknown_model,
            model=model,
            size=size,
            quality=quality,
            n=n,
            output_format=output_format,
            input_fidelity=input_fidelity,
            background=background,
            name_template=name_template,
            mask_mode=mask_mode,
        )
        table_data = load_prices(settings.prices_file)
        per_row = []
        rejected = 0
        for r in check_rows(local.path, defaults, pre):
            if r.spec is None or r.errors:
                rejected += 1
                continue
            est = estimate_cost(r.spec, r.pixels, table_data)
            per_row.append((r, est))
        total = estimate_batch((est, r.spec.n) for r, est in per_row if r.spec)
        models = {est.model for _, est in per_row}

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
                    "duration_s": estimate_duration(
                        total.calls,
                        total.images,
                        settings.images_per_minute,
                        settings.max_in_flight or settings.concurrency,
                        typical_latency(models),
                    ),
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
    _print_estimate(total, settings, models, None)


def _submit(
    settings: Settings,
    manifest: Path,
    name: str | None,
    output: str | None,
    defaults: Defaults,
    pre: Preflight,
    budget: Decimal | None,
    strict: bool,
    db: Database,
    reuse: bool = True,
    quiet: bool = False,
) -> SubmitResult:
    from pipeline.batch.submit import create_batch

    result = create_batch(
        db,
        manifest,
        name=name,
        output_uri=_output_uri(output),
        defaults=defaults,
        preflight=pre,
        budget_usd=budget,
        strict=strict,
        settings_snapshot={
            "defaults": dict(defaults.values),
            "model": defaults.model,
            "reuse": reuse,
        },
        prices=load_prices(settings.prices_file),
    )
    if result.estimate is not None:
        _print_estimate(
            result.estimate, settings, result.models, budget, out=err if quiet else console
        )
    return result


@app.command()
def submit(
    manifest: ManifestArg,
    name: Annotated[str | None, typer.Option(help="Batch name (default: manifest name).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    size: SizeOpt = None,
    quality: QualityOpt = None,
    n: NOpt = None,
    output_format: FormatOpt = None,
    input_fidelity: FidelityOpt = None,
    background: BackgroundOpt = None,
    name_template: TemplateOpt = None,
    mask_mode: MaskModeOpt = None,
    allow_root: RootOpt = None,
    convert: ConvertOpt = False,
    allow_unknown_model: UnknownOpt = False,
    budget: BudgetOpt = None,
    no_reuse: NoReuseOpt = False,
    strict: Annotated[
        bool, typer.Option(help="Refuse the whole manifest if any row is bad.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Store a batch and queue its jobs for the Celery workers (`celery -A worker.app worker`)."""
    with _friendly_errors():
        settings = _settings()
        db = _db(settings)
        local, defaults, pre = _inputs(
            settings,
            manifest,
            allow_root,
            convert,
            allow_unknown_model,
            model=model,
            size=size,
            quality=quality,
            n=n,
            output_format=output_format,
            input_fidelity=input_fidelity,
            background=background,
            name_template=name_template,
            mask_mode=mask_mode,
        )
        result = _submit(
            settings,
            local.path,
            name,
            output,
            defaults,
            pre,
            _budget(budget),
            strict,
            db,
            reuse=not no_reuse,
            quiet=as_json,
        )
        sent = _send(db, result.batch_id, settings)
    if as_json:
        print(
            json.dumps(
                {
                    "batch_id": result.batch_id,
                    "accepted": result.accepted,
                    "rejected": result.rejected,
                    "enqueued": sent,
                }
            )
        )
        return
    _print_row_errors(result.errors, manifest)
    console.print(
        f"batch {result.batch_id}: {result.accepted} jobs queued, {result.rejected} rejected"
    )
    console.print(f"watch it with: editbatch status {result.batch_id} --watch")
    print(result.batch_id)


@app.command()
def run(
    manifest: ManifestArg,
    sandbox: Annotated[
        bool, typer.Option("--sandbox", help="Start the bundled sandbox API and use it.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Batch name (default: manifest name).")] = None,
    output: OutputOpt = None,
    model: ModelOpt = None,
    size: SizeOpt = None,
    quality: QualityOpt = None,
    n: NOpt = None,
    output_format: FormatOpt = None,
    input_fidelity: FidelityOpt = None,
    background: BackgroundOpt = None,
    name_template: TemplateOpt = None,
    mask_mode: MaskModeOpt = None,
    allow_root: RootOpt = None,
    convert: ConvertOpt = False,
    allow_unknown_model: UnknownOpt = False,
    budget: BudgetOpt = None,
    no_reuse: NoReuseOpt = False,
    strict: Annotated[
        bool, typer.Option(help="Refuse the whole manifest if any row is bad.")
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option(help="Calls in flight (default EDITBATCH_CONCURRENCY).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit, run and collect on this machine: no Redis, no other server.

    Ctrl-C stops after the calls in flight; run the same command again to continue.
    """
    from pipeline.batch.submit import find_resumable
    from pipeline.intake.remote import localize_manifest

    with _friendly_errors(), _maybe_sandbox(sandbox) as overrides:
        settings = Settings(**overrides) if overrides else _settings()
        db = _db(settings)
        output_uri = _output_uri(output)
        local = localize_manifest(manifest, settings)
        batch_id = find_resumable(db, file_sha256(str(local.path)), output_uri)
        if batch_id is not None:
            with db.session() as session:
                batch = session.get(Batch, batch_id)
                assert batch is not None
                if batch.state in ("held", "paused"):
                    batch.state, batch.hold_reason = "running", None
                if budget is not None:
                    batch.budget_usd = _budget(budget)
                session.commit()
            console.print(f"continuing batch {batch_id} (same manifest and output)")
        else:
            defaults = _defaults(
                settings,
                model,
                size,
                quality,
                n,
                output_format,
                input_fidelity,
                background,
                name_template,
                mask_mode,
            )
            pre = _preflight(settings, local, allow_root, convert, allow_unknown_model)
            result = _submit(
                settings,
                local.path,
                name,
                output,
                defaults,
                pre,
                _budget(budget),
                strict,
                db,
                reuse=not no_reuse,
                quiet=as_json,
            )
            batch_id = result.batch_id
            _print_row_errors(result.errors, manifest)
            console.print(
                f"batch {batch_id}: {result.accepted} jobs to run, {result.rejected} rejected"
            )
        status = _run_local(
            settings, db, batch_id, concurrency or settings.concurrency, reclaim=True
        )
    if as_json:
        print(json.dumps(status.to_json()))
    else:
        _print_status(status)
        with db.session() as session:
            b = session.get(Batch, batch_id)
            report = b.report_uri if b else None
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
    if status.state not in ("finished",):
        raise typer.Exit(3)


def _run_with_progress(pool: Any, db: Database, batch_id: int) -> None:
    """Run the pool in a thread and show a live status with an ETA; Ctrl-C stops gracefully."""
    runner = threading.Thread(target=pool.run_batch, args=(batch_id,), daemon=True)
    stop_requested = {"n": 0}

    def on_sigint(_sig: int, _frame: Any) -> None:
        stop_requested["n"] += 1
        pool.stop.set()
        if stop_requested["n"] > 1:
            raise KeyboardInterrupt
        err.print(
            "stopping after the calls in flight; Ctrl-C again to quit at once "
            "(run the same command later to continue)"
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    started = time.monotonic()
    try:
        runner.start()
        with Live(console=console, refresh_per_second=2, transient=True) as live:
            while runner.is_alive():
                with db.session() as session:
                    status = batch_status(session, batch_id, failures_limit=0)
                live.update(_progress_table(status, time.monotonic() - started))
                runner.join(timeout=0.5)
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_table(status: BatchStatus, elapsed: float) -> Table:
    table = _status_table(status)
    todo = sum(status.counts.get(s, 0) for s in ("queued", "running", "retrying"))
    finished_now = status.done
    rate = finished_now / elapsed if elapsed > 0 else 0
    eta = f"{todo / rate:.0f} s" if rate > 0 and todo else "-"
    table.caption = f"elapsed {elapsed:.0f} s · {todo} to go · ETA {eta}"
    return table


@contextmanager
def _maybe_sandbox(enabled: bool) -> Iterator[dict[str, Any]]:
    if not enabled:
        yield {}
        return
    from pipeline.sandbox import SandboxConfig, SandboxServer

    settings = get_settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = SandboxConfig(billing_log=str(home / "sandbox-billing.jsonl"))
    with SandboxServer(config) as server:
        console.print(f"sandbox API at {server.base_url} (not AI: a deterministic stand-in)")
        yield {
            "openai_base_url": server.base_url,
            "openai_api_key": "sk-sandbox-local",
        }


@app.command()
def status(
    batch: Annotated[int | None, typer.Argument(help="Batch id; omit to list batches.")] = None,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until it ends.")] = False,
) -> None:
    """List batches, or show one batch: counts per state, cost so far, failures."""
    with _friendly_errors():
        db = _db(_settings())
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
            current = batch_status(session, batch)
        if as_json:
            print(json.dumps(current.to_json()))
            return
        if watch:
            started = time.monotonic()
            with Live(console=console, refresh_per_second=1) as live:
                while current.state == "running":
                    live.update(_progress_table(current, time.monotonic() - started))
                    time.sleep(1)
                    with db.session() as session:
                        current = batch_status(session, batch)
        _print_status(current)


@app.command()
def collect(batch: Annotated[int, typer.Argument(help="Batch id.")]) -> None:
    """Retry writing spooled outputs to the output location (after a storage failure)."""
    from pipeline.output.collector import StorageCache, collect_batch
    from pipeline.output.report import write_report

    with _friendly_errors():
        db = _db(_settings())
        storages = StorageCache()
        written, left = collect_batch(db, batch, storages)
        console.print(f"collected {written} outputs; {left} still waiting")
        with db.session() as session:
            state = batch_status(session, batch).state
        if state == "finished":
            csv_uri, _ = write_report(db, batch, storages)
            console.print(f"report: {csv_uri}")
    if left:
        raise typer.Exit(1)


def _send(db: Database, batch_id: int, settings: Settings) -> int:
    from pipeline.batch.submit import enqueue_batch
    from worker.tasks import enqueue

    try:
        return enqueue_batch(db, batch_id, enqueue)
    except Exception as exc:  # kombu raises OperationalError and friends
        raise EditbatchError(
            f"batch {batch_id} is stored, but the broker at {settings.broker_url} refused the "
            f"messages ({type(exc).__name__}: {exc}). Start Redis, then: "
            f"editbatch resume {batch_id}"
        ) from exc


BatchArg = Annotated[int, typer.Argument(help="Batch id.")]
LocalOpt = Annotated[
    bool, typer.Option("--local", help="Run the jobs in this process instead of sending them.")
]


def _run_local(
    settings: Settings, db: Database, batch_id: int, concurrency: int, reclaim: bool = False
) -> BatchStatus:
    """Run the batch's jobs in this process, collect, finish if done; the status afterwards."""
    from pipeline.output.collector import collect_batch
    from pipeline.run.deps import build_deps
    from pipeline.run.executor import finish_if_done
    from pipeline.run.localpool import LocalPool, reclaim_orphans
    from pipeline.run.ratelimit import LocalLimiter

    deps = build_deps(
        settings, LocalLimiter(settings.images_per_minute, settings.max_in_flight), db
    )
    if reclaim:
        reclaim_orphans(deps, batch_id)
    _run_with_progress(LocalPool(deps, concurrency), db, batch_id)
    collect_batch(db, batch_id, deps.storages)  # outputs a storage failure left in the spool
    finish_if_done(deps, batch_id)
    with db.session() as session:
        return batch_status(session, batch_id)


@app.command()
def resume(batch: BatchArg, budget: BudgetOpt = None, local: LocalOpt = False) -> None:
    """Continue a held or paused batch, and re-send every unfinished job from the database."""
    from pipeline.batch import controls

    with _friendly_errors():
        settings = _settings()
        db = _db(settings)
        with db.session() as session:
            controls.resume(session, batch, _budget(budget))
        if local:
            _print_status(_run_local(settings, db, batch, settings.concurrency))
            return
        sent = _send(db, batch, settings)
    console.print(f"batch {batch}: {sent} jobs sent to the workers")


@app.command()
def pause(batch: BatchArg) -> None:
    """Stop starting new calls (calls in flight finish); `editbatch resume` continues."""
    from pipeline.batch import controls

    with _friendly_errors():
        db = _db(_settings())
        with db.session() as session:
            controls.pause(session, batch)
    console.print(f"batch {batch} paused; continue with: editbatch resume {batch}")


@app.command()
def cancel(batch: BatchArg) -> None:
    """Cancel every job not yet started (calls in flight finish and are recorded)."""
    from pipeline.batch import controls

    with _friendly_errors():
        db = _db(_settings())
        with db.session() as session:
            n = controls.cancel(session, batch)
    console.print(f"batch {batch} cancelled ({n} jobs not started)")


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

    with _friendly_errors():
        settings = _settings()
        db = _db(settings)
        with db.session() as session:
            n = controls.retry_failed(session, batch, prompt, model)
        if not n:
            console.print(f"batch {batch} has no failed jobs")
            return
        if local:
            _print_status(_run_local(settings, db, batch, settings.concurrency))
            return
        _send(db, batch, settings)
    console.print(f"batch {batch}: {n} failed jobs sent again")


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

    with _friendly_errors():
        settings = _settings()
        db = _db(settings)
        now = nights.night_of(date)
        if dry_run:
            info = nights.preview(settings, now, db)
        else:
            from pipeline.run.deps import build_deps
            from pipeline.run.ratelimit import LocalLimiter
            from worker.tasks import enqueue

            finished = build_deps(settings, LocalLimiter(None, None), db).on_batch_finished
            batch_id = nights.run_nightly(settings, now, enqueue, db=db, on_finished=finished)
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
    with _friendly_errors():
        table_data = load_prices(_settings().prices_file)
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
    if as_json:
        print(json.dumps({"as_of": table_data.as_of, "models": rows}))
        return
    table = Table(
        title=f"Prices, USD per 1M tokens (as of {table_data.as_of})", title_justify="left"
    )
    for col in ("model", "text in", "image in", "image out", "source"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["text_input"], r["image_input"], r["image_output"], r["source"])
    console.print(table)


@app.command()
def config(as_json: JsonOpt = False) -> None:
    """Print the effective settings (secrets masked)."""
    with _friendly_errors():
        values = _settings().masked()
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
    with _friendly_errors():
        url = _settings().effective_database_url
        upgrade(url, revision)
    console.print(f"database at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Revert database migrations to REVISION."""
    from alembic import command

    from pipeline.db.session import alembic_config

    with _friendly_errors():
        command.downgrade(alembic_config(_settings().effective_database_url), revision)
    console.print(f"database at revision {revision}")


def main() -> None:
    try:
        settings = get_settings()
        json_logs, level = settings.log_json, settings.log_level or "WARNING"
    except ValueError:  # an invalid setting: the command reports it when it reads the settings
        json_logs, level = False, "WARNING"
    setup_logging(json=json_logs, level=level)
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to continue")
        sys.exit(130)


if __name__ == "__main__":
    main()
