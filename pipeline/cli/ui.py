"""What the commands print: tables, estimates, and errors a person can act on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.exc import DBAPIError

from pipeline.batch.status import BatchStatus, usd_text
from pipeline.errors import EditbatchError, RowError
from pipeline.settings import Settings
from pipeline.states import BATCH_STOPPED, JOB_TO_RUN, HoldCode

if TYPE_CHECKING:
    from pipeline.cost.estimate import BatchEstimate
    from pipeline.intake.catalog import ShutdownNotice

console = Console()
err = Console(stderr=True)


def print_row_errors(errors: list[RowError], manifest: str | Path, limit: int = 50) -> None:
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


def status_table(status: BatchStatus) -> Table:
    route = " · batch route" if status.route == "batch" else ""
    table = Table(
        title=f"Batch {status.batch_id} · {status.name} · {status.state}{route}",
        title_justify="left",
    )
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in status.counts.items():
        if n:
            table.add_row(state, str(n))
    table.add_section()
    table.add_row("total", str(status.jobs_total))
    table.add_row("attempts", str(status.attempts))
    cost = f"${usd_text(status.cost_usd)}"
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
    if status.lost_answers:
        table.add_row(
            "lost in flight",
            f"{status.lost_answers} answers, ${status.lost_answers_usd:.6f} estimated (a worker "
            "died mid-call: the API billed answers nobody received)",
        )
    if status.reused:
        table.add_row("reused", f"{status.reused} jobs, saved ${status.saved_usd:.6f}")
    if status.budget_usd is not None:
        in_flight = max(status.reserved_usd - status.cost_usd, Decimal(0))
        table.add_row(
            "budget", f"${status.budget_usd:.2f} (${in_flight:.4f} reserved by calls in flight)"
        )
    table.add_row("outputs", f"{status.outputs} ({status.outputs_uncollected} not collected)")
    if status.reviews is not None and status.outputs:
        r = status.reviews
        table.add_row(
            "review",
            f"{r['approved']} approved, {r['rejected']} rejected, {r['unreviewed']} unreviewed",
        )
    if status.drift_outputs and status.drift_mean is not None:
        table.add_row(
            "mask drift",
            f"mean {status.drift_mean:.1%}, max {status.drift_max or 0:.1%} of protected pixels "
            f"changed by the model ({status.drift_outputs} masked outputs)",
        )
    return table


def print_status(status: BatchStatus) -> None:
    console.print(status_table(status))
    if status.hold_reason and status.state in BATCH_STOPPED:
        why = f" ({status.hold_code})" if status.hold_code else ""
        console.print(f"[yellow]{status.state}{why}:[/] {status.hold_reason}")
        if status.hold_code != HoldCode.MODEL_UNAVAILABLE:  # its reason names the --model-map
            console.print(f"resume with: editbatch resume {status.batch_id}")
    if status.provider_batches:
        console.print(provider_table(status))
    if status.events:
        table = Table(title="Outages", title_justify="left")
        for col in ("at", "event", "what"):
            table.add_column(col, overflow="fold")
        for event in status.events:
            at = event.at.strftime("%Y-%m-%d %H:%M:%S")
            table.add_row(at, event.kind.removeprefix("outage_"), event.message)
        console.print(table)
    if status.by_provider:
        table = Table(title="Cost by provider", title_justify="left")
        for col in ("provider", "calls", "cost $"):
            table.add_column(col, justify="left" if col == "provider" else "right")
        for p in status.by_provider:
            table.add_row(p["provider"], str(p["calls"]), p["cost_usd"])
        console.print(table)
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


def provider_table(status: BatchStatus) -> Table:
    """The batch route's provider batches: where each is, at the provider and here."""
    table = Table(title="Provider batches (OpenAI Batch API)", title_justify="left")
    for col in ("#", "provider id", "model", "status", "done/failed/lines", "booked", "cost $"):
        table.add_column(col, justify="right" if col in ("booked", "cost $") else "left")
    table.add_column("expires (UTC)")
    for pb in status.provider_batches:
        where = pb["provider_status"] or "-"
        if pb["state"] != "open":
            where = f"{where} ({pb['state']})"
        table.add_row(
            str(pb["id"]),
            pb["provider_id"] or "-",
            pb["model"],
            where,
            f"{pb['completed']}/{pb['failed']}/{pb['lines']}",
            str(pb["booked"]),
            pb["cost_usd"],
            pb["expires_at"] or "",
        )
    return table


def print_estimate(
    est: BatchEstimate,
    settings: Settings,
    budget: Decimal | None,
    out: Console | None = None,
    route: str = "sync",
) -> None:
    from pipeline.batch.submit import sync_duration

    if not est.calls:
        return
    out = out or console
    if route == "batch":
        out.print(
            f"estimate: ${est.expected:.2f} (range ${est.low:.2f}-${est.high:.2f}) for "
            f"{est.calls} calls, {est.images} images at batch prices (half the sync price); "
            "within 24 h (OpenAI's Batch API)"
        )
    else:
        took = sync_duration(settings, est)
        out.print(
            f"estimate: ${est.expected:.2f} (range ${est.low:.2f}-${est.high:.2f}) for "
            f"{est.calls} calls, {est.images} images; about {duration(took.seconds)} at "
            f"{took.limits(settings)}"
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


def print_shutdown_notices(
    notices: list[ShutdownNotice], batch_id: int | None = None, out: Console | None = None
) -> None:
    """One warning per model of the batch that shuts down soon (or before the batch ends)."""
    for notice in notices:
        (out or err).print(f"[yellow]warning:[/] {notice.text(batch_id)}")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_error(exc: EditbatchError) -> None:
    """`error: <message>`, each line of the message unwrapped (a script can grep it), no markup
    read from the message (it may hold brackets)."""
    for line in str(exc).splitlines() or [""]:
        err.print(Text.assemble(("error: ", "red"), line), soft_wrap=True)


def database_said(exc: DBAPIError) -> str:
    """What the database said, in one line: the driver's error and its first line (never the
    SQL statement and its parameters, which SQLAlchemy appends)."""
    said = exc.orig if exc.orig is not None else exc
    lines = str(said).strip().splitlines()
    return f"{type(said).__name__}: {lines[0][:300] if lines else ''}"


def database_error(exc: DBAPIError) -> EditbatchError:
    """A database error during a command (a deadlock, a lock timeout, a dropped connection) as
    one line: what the database said, and what to do. Each step of a command is one
    transaction and every command can be repeated (`resume`, `retry`, `run` continue where
    they stopped; `submit` names the batch it stored before sending), so: run it again."""
    return EditbatchError(
        f"the database failed during this command ({database_said(exc)}); what it finished "
        "is saved and the command is safe to repeat: run it again (if it keeps failing, "
        "check the database of EDITBATCH_DATABASE_URL)"
    )


@contextmanager
def friendly_errors() -> Iterator[None]:
    try:
        yield
    except EditbatchError as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    except DBAPIError as exc:
        print_error(database_error(exc))
        raise typer.Exit(2) from None


def progress_table(status: BatchStatus, elapsed: float) -> Table:
    table = status_table(status)
    todo = sum(status.counts.get(s, 0) for s in JOB_TO_RUN)
    finished_now = status.done
    rate = finished_now / elapsed if elapsed > 0 else 0
    eta = f"{todo / rate:.0f} s" if rate > 0 and todo else "-"
    table.caption = f"elapsed {elapsed:.0f} s · {todo} to go · ETA {eta}"
    if status.provider_batches:
        open_ = [pb for pb in status.provider_batches if pb["state"] != "collected"]
        answered = sum(pb["completed"] + pb["failed"] for pb in open_)
        lines = sum(pb["lines"] for pb in open_)
        table.caption = (
            f"elapsed {elapsed:.0f} s · {todo} to go · provider batches: {len(open_)} open, "
            f"{answered}/{lines} lines answered (within 24 h)"
        )
    return table
