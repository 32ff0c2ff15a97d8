"""Before and after a night: `doctor` (will it work?) and `reconcile` (the ledger against the
provider's own figures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer
from rich.table import Table
from rich.text import Text

from pipeline.cli import dispatch
from pipeline.cli.app import app
from pipeline.cli.options import JsonOpt, output_uri
from pipeline.cli.ui import console, err, friendly_errors
from pipeline.errors import EditbatchError
from pipeline.observe.doctor import Check, Context, run_checks, temp_png
from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipeline.cost.reconcile import Line
    from pipeline.providers import Lane

PROBE_MODEL_SIZE = "1024x1024"


@app.command()
def doctor(
    manifest: Annotated[
        str | None,
        typer.Argument(
            help="A manifest (path or URL) whose models to check; default: the default model."
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Output folder or URL to check (default ./outputs)."),
    ] = None,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe",
            help="Spend one low-quality edit to read the account's rate limit (its price is "
            "shown and asked for first).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --probe: do not ask.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check that tonight will work: settings, database, Redis, workers, storage, key, models,
    price data; ✓ or ✗ with the fix for each. Exit status 1 when anything fails."""
    if probe and as_json and not yes:
        err.print("error: --probe with --json needs --yes (the probe edit is paid)")
        raise typer.Exit(2)
    manifest_check, uses = _manifest_uses(manifest)
    ctx = Context(
        load_settings=get_settings,
        output=output_uri(output) if output else None,
        uses=uses,
        ping_workers=dispatch.ping_workers,
        probe_edit=(lambda s: _probe_edit(s, ask=not yes)) if probe else None,
    )
    checks = run_checks(ctx)
    if manifest_check is not None:
        checks.insert(1, manifest_check)
    failed = [c for c in checks if not c.ok]
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [c.to_json() for c in checks]}))
    else:
        for check in checks:
            _print_check(check)
        console.print(
            "all checks passed" if not failed else f"{len(failed)} of {len(checks)} checks failed"
        )
    if failed:
        raise typer.Exit(1)


def _print_check(check: Check) -> None:
    mark = ("-", "yellow") if check.skipped else ("✓", "green") if check.ok else ("✗", "red")
    line = Text.assemble((mark[0], mark[1]), " ", (check.name, "bold"), "  ", check.detail)
    console.print(line, soft_wrap=True)
    if check.fix and not check.ok:
        console.print(Text.assemble("    fix: ", check.fix), soft_wrap=True)


def _manifest_uses(
    manifest: str | None,
) -> tuple[Check | None, tuple[tuple[str | None, str], ...]]:
    """The (provider, model) pairs the manifest's rows name (an empty model: the default
    model; an empty provider: None, the default provider)."""
    if manifest is None:
        return None, ()
    from pipeline.intake.manifest import iter_raw_rows
    from pipeline.intake.remote import RemoteOptions, fetch, is_remote

    try:
        settings = get_settings()
        path = Path(manifest)
        if is_remote(manifest):
            options = RemoteOptions.from_settings(settings)
            path = fetch(manifest, options, options.max_manifest_bytes, "manifest")
        uses: set[tuple[str | None, str]] = set()
        rows = 0
        for _, raw in iter_raw_rows(path):
            if isinstance(raw, dict):
                rows += 1
                model = str(raw.get("model") or "").strip() or settings.default_model
                provider = str(raw.get("provider") or "").strip() or None
                uses.add((provider, model))
    except EditbatchError as exc:
        return Check("manifest", False, str(exc), "editbatch check MANIFEST says more"), ()
    models = sorted({model for _, model in uses})
    named = sorted({provider for provider, _ in uses if provider})
    detail = f"{rows} rows, models: {', '.join(models)}"
    if named:
        detail += f"; providers named: {', '.join(named)}"
    ordered = sorted(uses, key=lambda use: (use[0] or "", use[1]))
    return Check("manifest", True, detail), tuple(ordered)


def _probe_edit(settings: Settings, ask: bool) -> Check:
    """One low-quality edit of a small grey picture on the default provider (its first lane
    for the default model): the rate-limit headers of its answer against that lane's limit
    setting. Its price is shown (and asked for) first."""
    from pipeline.cost.estimate import estimate_cost
    from pipeline.cost.pricing import load_prices
    from pipeline.providers import providers_of
    from pipeline.run.gateway import Gateway
    from pipeline.spec import EditSpec

    providers = providers_of(settings)
    provider = providers.get(None)
    model = settings.default_model
    if not provider.serves(model):
        model = next(iter(provider.served() or ()), model)
    lane = provider.lanes(model)[0]
    image = temp_png()
    try:
        spec = EditSpec(
            row=0,
            key="doctor",
            images=(str(image),),
            prompt="editbatch doctor: rate limit probe",
            model=model,
            size=PROBE_MODEL_SIZE,
            quality="low",
            provider=provider.name,
        )
        prices = providers.prices(load_prices(settings.prices_file))
        estimate = estimate_cost(spec, ((256, 256),), prices)
        price = f"${estimate.expected:.4f}" if estimate.expected is not None else "an unknown price"
        where = "" if lane.provider == "openai" else f" on {lane.scope}"
        question = (
            f"--probe makes one paid edit ({spec.model}{where}, low, {spec.size}): about {price}"
        )
        if ask and not _agreed(f"{question}. Go on?"):
            return Check("rate limit", True, "not probed (declined)", skipped=True)
        outcome = Gateway(
            settings.api_key(),
            settings.openai_base_url,
            settings.request_timeout_seconds,
            connections=providers.connections(),
        ).edit(spec, lane)
    finally:
        image.unlink(missing_ok=True)
    if outcome.http_status != 200:
        detail = f"{outcome.http_status or ''} {outcome.error_code or ''} {outcome.error_message}"
        return Check("rate limit", False, f"the probe edit failed: {detail.strip()}", "see above")
    usage = outcome.usage
    cost = prices.cost(spec.model, usage, provider.name) if usage is not None else None
    paid = f"paid ${cost:.6f}" if cost is not None else "paid (price unknown)"
    return rate_limit_check(
        outcome.headers, lane.limit.per_minute, paid, _limit_setting(settings, lane)
    )


def _limit_setting(settings: Settings, lane: Lane) -> str:
    """The setting that holds `lane`'s per-minute limit (what the probe's fix names)."""
    if lane.provider in settings.providers:
        per = "requests_per_minute" if lane.per_request else "images_per_minute"
        return f"providers.{lane.provider}.{per}"
    if lane.per_request:
        return "EDITBATCH_AZURE_REQUESTS_PER_MINUTE"
    if "images_per_minute" in settings.model_limits.get(lane.model, {}):
        return f"EDITBATCH_MODEL_LIMITS[{lane.model!r}].images_per_minute"
    return "EDITBATCH_IMAGES_PER_MINUTE"


def _agreed(question: str) -> bool:
    """Yes to `question` on the terminal (no answer, or no terminal: no)."""
    try:
        return bool(typer.confirm(question, err=True))
    except (typer.Abort, click.exceptions.Abort):
        return False


def rate_limit_check(
    headers: dict[str, str],
    configured: int | None,
    paid: str,
    setting: str = "EDITBATCH_IMAGES_PER_MINUTE",
) -> Check:
    """The account's (or deployment's) images or requests per minute from the answer's headers
    against the setting (pure)."""
    raw = headers.get("x-ratelimit-limit-images") or headers.get("x-ratelimit-limit-requests")
    if raw is None or not raw.strip().isdigit():
        return Check("rate limit", True, f"{paid}; the answer carried no rate-limit header")
    limit = int(raw)
    if configured is None:
        return Check(
            "rate limit",
            False,
            f"{paid}; the account allows {limit} per minute, {setting} is unset",
            f"set {setting}={limit} so that every worker shares the limit",
        )
    if configured > limit:
        return Check(
            "rate limit",
            False,
            f"{paid}; {setting}={configured} is above the account's {limit}",
            f"set {setting}={limit} (above it, calls end in 429s)",
        )
    return Check(
        "rate limit",
        True,
        f"{paid}; {setting}={configured} within the account's {limit}/min",
    )


@app.command()
def reconcile(
    date: Annotated[
        str | None, typer.Option(help="The UTC day to reconcile (YYYY-MM-DD); default today.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The ledger against the provider's own usage and costs, per model, with the difference
    named (lost answers, calls made outside editbatch, price changes). Needs OPENAI_ADMIN_KEY.
    Exit status 1 when they differ."""
    from pipeline.batch.nightly import night_of
    from pipeline.cost.reconcile import reconcile_day
    from pipeline.db.session import Database
    from pipeline.run.gateway import BillingGateway

    with friendly_errors():
        settings = get_settings()
        day = night_of(date).date()
        lines = reconcile_day(
            Database(settings.effective_database_url), BillingGateway.from_settings(settings), day
        )
    differ = [line for line in lines if not line.matches]
    if as_json:
        print(
            json.dumps(
                {
                    "day": day.isoformat(),
                    "match": not differ,
                    "models": [line.to_json() for line in lines],
                }
            )
        )
    else:
        print_reconciliation(day, lines)
    if differ:
        raise typer.Exit(1)


def print_reconciliation(day: object, lines: list[Line]) -> None:
    table = Table(title=f"Ledger against the provider, {day} (UTC)", title_justify="left")
    for col in ("model", "", "calls", "images", "tokens in", "tokens out", "USD"):
        table.add_column(col, justify="left" if col in ("model", "") else "right", no_wrap=True)
    for line in lines:
        for side, figures in (("ledger", line.ledger), ("provider", line.provider)):
            table.add_row(
                line.model if side == "ledger" else "",
                side,
                str(figures.calls),
                str(figures.images),
                str(figures.input_tokens),
                str(figures.output_tokens),
                f"{figures.usd:.6f}",
            )
        if line.unsure:
            # Booked at their estimate, apart: the provider may or may not have billed them.
            table.add_row(
                "", "unknown fate", str(line.unsure), "", "", "", f"{line.unsure_usd:.6f}"
            )
        table.add_section()
    console.print(table)
    if not lines:
        console.print("no billed calls on either side")
    for line in lines:
        mark = Text("✓", "green") if line.matches else Text("✗", "red")
        console.print(Text.assemble(mark, f" {line.model}: {line.verdict}"), soft_wrap=True)
