"""The batch report: one row per job (the user's id, state, outputs, cost, error), CSV and JSON.

Per output, in the order of `outputs`: its sha256, format (png, webp, jpeg, gif, svg), bytes and
size ("WxH"; empty for an SVG whose size its attributes do not give), and its review decision
(approved, rejected or unreviewed) with the reviewers' notes; `rerun_of_row` is the row a re-run
of a rejected output was made from. `provider` is where the job was sent (empty: before
providers, i.e. openai), `deployment` the lane its last call took; the JSON summary adds jobs,
successes, calls and cost per provider (`providers`).

CSV cells that a spreadsheet would run as a formula (starting with = + - @, tab or CR) are
prefixed with a quote, so a hostile prompt or file name cannot execute in Excel.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import aliased

from pipeline.batch.status import batch_status
from pipeline.db.jobs import ANSWER_LOST
from pipeline.db.models import Attempt, Batch, Job, Output, Review
from pipeline.db.session import Database
from pipeline.output.collector import StorageCache
from pipeline.states import JobState

COLUMNS = (
    "row",
    "id",
    "state",
    "model",
    "provider",
    "deployment",
    "quality",
    "attempts",
    "cost_usd",
    "outputs",
    "sha256",
    "formats",
    "bytes",
    "sizes",
    "mask_drift",
    "review",
    "review_note",
    "rerun_of_row",
    "error_code",
    "error_message",
)
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_START):
        return "'" + text
    return text


def _size(width: int | None, height: int | None) -> str:
    return "" if width is None or height is None else f"{width}x{height}"


def report_rows(db: Database, batch_id: int) -> Iterator[dict[str, Any]]:
    """Yield the report rows in manifest order, a chunk of jobs at a time."""
    last_id = 0
    original = aliased(Job)
    while True:
        with db.session() as session:
            chunk = list(
                session.execute(
                    select(
                        original.row_number.label("rerun_of_row"),
                        Job.id,
                        Job.row_number,
                        Job.external_key,
                        Job.state,
                        Job.model,
                        Job.provider,
                        Job.quality,
                        Job.attempts,
                        Job.cost_usd,
                        Job.last_error_code,
                        Job.last_error_message,
                    )
                    .outerjoin(original, original.id == Job.rerun_of_job_id)
                    .where(Job.batch_id == batch_id, Job.id > last_id)
                    .order_by(Job.id)
                    .limit(1000)
                )
            )
            if not chunk:
                return
            ids = [r.id for r in chunk]
            outputs: dict[int, list[Any]] = {}
            for out in session.execute(
                select(
                    Output.job_id,
                    Output.uri,
                    Output.sha256,
                    Output.format,
                    Output.bytes,
                    Output.width,
                    Output.height,
                    Output.drift,
                    Review.decision,
                    Review.note,
                )
                .outerjoin(Review, Review.output_id == Output.id)
                .where(Output.job_id.in_(ids))
                .order_by(Output.job_id, Output.index)
            ):
                outputs.setdefault(out.job_id, []).append(out)
            deployments: dict[int, str | None] = {}
            for job_id, deployment in session.execute(
                select(Attempt.job_id, Attempt.deployment)
                .where(Attempt.job_id.in_(ids))
                .order_by(Attempt.job_id, Attempt.number)
            ):
                deployments[job_id] = deployment  # the last attempt's lane
        for r in chunk:
            outs = outputs.get(r.id, [])
            yield {
                "row": r.row_number,
                "id": r.external_key,
                "state": r.state,
                "model": r.model,
                "provider": r.provider,
                "deployment": deployments.get(r.id),
                "quality": r.quality,
                "attempts": r.attempts,
                "cost_usd": str(Decimal(str(r.cost_usd)).quantize(Decimal("0.000001"))),
                "outputs": [o.uri or "" for o in outs],
                "sha256": [o.sha256 or "" for o in outs],
                "formats": [o.format or "" for o in outs],
                "bytes": ["" if o.bytes is None else str(o.bytes) for o in outs],
                "sizes": [_size(o.width, o.height) for o in outs],
                "mask_drift": [f"{o.drift:.4f}" for o in outs if o.drift is not None],
                "review": [o.decision or "unreviewed" for o in outs],
                "review_note": [o.note for o in outs if o.note],
                "rerun_of_row": r.rerun_of_row,
                "error_code": r.last_error_code,
                "error_message": r.last_error_message,
            }
        last_id = ids[-1]


def provider_totals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Jobs, successes, calls and cost per provider, from the report's rows (rejected rows,
    which went nowhere, are left out)."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["state"] == JobState.REJECTED:
            continue
        entry = totals.setdefault(
            row["provider"] or "openai",
            {"jobs": 0, "succeeded": 0, "attempts": 0, "cost_usd": Decimal(0)},
        )
        entry["jobs"] += 1
        entry["succeeded"] += row["state"] == JobState.SUCCEEDED
        entry["attempts"] += row["attempts"] or 0
        entry["cost_usd"] += Decimal(row["cost_usd"])
    return {name: {**e, "cost_usd": str(e["cost_usd"])} for name, e in sorted(totals.items())}


def lost_answers(db: Database, batch_id: int, limit: int = 1000) -> list[dict[str, Any]]:
    """Calls a dead worker left unanswered, booked at their estimated cost (the API bills an
    answer once it is made): row, id, attempt, what was booked."""
    with db.session() as session:
        return [
            {
                "row": row,
                "id": key,
                "attempt": number,
                "estimated_usd": str(Decimal(str(cost)).quantize(Decimal("0.000001"))),
            }
            for row, key, number, cost in session.execute(
                select(Job.row_number, Job.external_key, Attempt.number, Attempt.cost_usd)
                .join(Job, Job.id == Attempt.job_id)
                .where(Job.batch_id == batch_id, Attempt.error_code == ANSWER_LOST)
                .order_by(Job.row_number, Attempt.number)
                .limit(limit)
            )
        ]


def write_report(db: Database, batch_id: int, storages: StorageCache) -> tuple[str, str]:
    """Write report-<batch>.csv and .json at the output root; returns their URIs."""
    with db.session() as session:
        status = batch_status(session, batch_id, with_reviews=True)
        batch = session.get(Batch, batch_id)
        assert batch is not None
        output_uri = batch.output_uri
    rows = list(report_rows(db, batch_id))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(
            [safe_cell("|".join(row[c]) if isinstance(row[c], list) else row[c]) for c in COLUMNS]
        )
    summary = status.to_json()
    summary["providers"] = provider_totals(rows)
    summary["lost_answers"]["list"] = lost_answers(db, batch_id)
    storage = storages.get(output_uri)
    csv_uri = storage.write(f"report-{batch_id}.csv", text.getvalue().encode("utf-8"))
    body = json.dumps({"summary": summary, "jobs": rows}, indent=2, default=str)
    json_uri = storage.write(f"report-{batch_id}.json", body.encode("utf-8"))
    with db.session() as session:
        b = session.get(Batch, batch_id)
        assert b is not None
        b.report_uri = csv_uri
        session.commit()
    return csv_uri, json_uri
