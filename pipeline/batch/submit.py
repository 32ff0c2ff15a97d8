"""Turn a manifest into a batch: preflight every row, store every job, commit, THEN enqueue.

Rejected rows are stored too (state `rejected`, with the reason) so the report accounts for
every row. Messages carry job ids only; the database is the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from pipeline.cost.estimate import BatchEstimate, Estimate, estimate_batch, estimate_cost
from pipeline.cost.pricing import PriceTable, load_prices
from pipeline.db.models import Batch, Job, utcnow
from pipeline.db.session import Database
from pipeline.errors import EditbatchError, RowError
from pipeline.intake.manifest import Defaults, read_manifest
from pipeline.intake.naming import OutputNameError, render_name
from pipeline.intake.preflight import Preflight
from pipeline.spec import EditSpec, file_sha256

log = logging.getLogger("editbatch.producer")

Enqueue = Callable[[list[int]], None]
CHUNK = 1000


@dataclass
class CheckedRow:
    row: int
    key: str | None
    spec: EditSpec | None
    errors: list[RowError]
    notes: tuple[str, ...] = ()
    fingerprint: str | None = None
    pixels: tuple[tuple[int, int], ...] = ()


@dataclass
class SubmitResult:
    batch_id: int
    accepted: int = 0
    rejected: int = 0
    errors: list[RowError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    estimate: BatchEstimate | None = None
    models: set[str] = field(default_factory=set)


class StrictRefusal(EditbatchError):
    """Raised by `--strict` when any row is bad: nothing was stored or sent."""


def check_rows(manifest: Path, defaults: Defaults, preflight: Preflight) -> Iterator[CheckedRow]:
    """Parse and preflight every row (streaming); output names must be unique in the manifest."""
    names: dict[str, int] = {}
    pending: dict[int, list[RowError]] = {}
    for item in read_manifest(manifest, defaults):
        if isinstance(item, RowError):
            pending.setdefault(item.row, []).append(item)
            continue
        for row in sorted(r for r in pending if r < item.row):
            errs = pending.pop(row)
            yield CheckedRow(row, errs[0].key, None, errs)
        spec = item
        errors = pending.pop(spec.row, [])
        result = preflight.check(spec)
        errors.extend(result.errors)
        checked = result.spec if result.spec is not None else spec
        for index in range(1, checked.n + 1):
            try:
                name = render_name(checked, index)
            except OutputNameError as exc:
                errors.append(RowError(spec.row, "output", str(exc), spec.key))
                break
            first = names.setdefault(name, spec.row)
            if first != spec.row:
                errors.append(
                    RowError(
                        spec.row,
                        "output",
                        f"output name {name!r} is also produced by row {first}; "
                        "add {id} or {row} to the template",
                        spec.key,
                    )
                )
                break
        fingerprint = None
        if not errors:
            digests = dict(result.digests)
            for path in (*checked.images, checked.mask, checked.markup):
                if path and path not in digests:
                    digests[path] = file_sha256(path)
            fingerprint = checked.fingerprint(digests)
        yield CheckedRow(
            spec.row,
            spec.key,
            checked if not errors else None,
            errors,
            result.notes,
            fingerprint,
            tuple(result.pixels),
        )
    for row in sorted(pending):
        errs = pending[row]
        yield CheckedRow(row, errs[0].key, None, errs)


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def find_resumable(db: Database, manifest_sha: str, output_uri: str) -> int | None:
    """An unfinished batch of the same manifest and output (so `run` can continue it)."""
    with db.session() as session:
        return session.scalar(
            select(Batch.id)
            .where(
                Batch.manifest_sha256 == manifest_sha,
                Batch.output_uri == output_uri,
                Batch.state.in_(("running", "held", "paused")),
            )
            .order_by(Batch.id.desc())
            .limit(1)
        )


def create_batch(
    db: Database,
    manifest: Path,
    *,
    name: str | None,
    output_uri: str,
    defaults: Defaults,
    preflight: Preflight,
    budget_usd: Decimal | None = None,
    strict: bool = False,
    settings_snapshot: dict[str, Any] | None = None,
    prices: PriceTable | None = None,
) -> SubmitResult:
    """Store a batch and all of its jobs in one transaction; nothing is enqueued here."""
    manifest_sha = file_sha256(str(manifest))
    checked_rows: Iterable[CheckedRow] = check_rows(manifest, defaults, preflight)
    if strict:
        materialised = list(checked_rows)
        bad = [e for r in materialised for e in r.errors]
        if bad:
            raise StrictRefusal(
                f"{manifest}: {len(bad)} problem(s) in "
                f"{sum(1 for r in materialised if r.errors)} row(s); --strict refuses the "
                "whole manifest. First: " + str(bad[0])
            )
        checked_rows = materialised
    with db.session() as session:
        batch = Batch(
            name=name or manifest.stem,
            manifest_uri=str(manifest.resolve()),
            manifest_sha256=manifest_sha,
            output_uri=output_uri,
            state="running",
            budget_usd=budget_usd,
            settings=settings_snapshot or {},
        )
        session.add(batch)
        session.flush()
        result = SubmitResult(batch_id=batch.id)
        now = utcnow()
        table = prices or load_prices()
        estimates: list[tuple[Estimate, int]] = []

        def job_rows() -> Iterator[dict[str, Any]]:
            # Every row dict has the same keys, so each chunk is one executemany.
            for r in checked_rows:
                for note in r.notes:
                    result.notes.append(f"row {r.row}: {note}")
                row: dict[str, Any] = {
                    "batch_id": batch.id,
                    "row_number": r.row,
                    "external_key": r.key,
                    "created_at": now,
                    "updated_at": now,
                }
                if r.errors or r.spec is None:
                    result.rejected += 1
                    result.errors.extend(r.errors)
                    row.update(
                        spec="{}",
                        model=None,
                        quality=None,
                        state="rejected",
                        fingerprint=None,
                        estimated_usd=None,
                        last_error_code=f"invalid_{r.errors[0].field}",
                        last_error_message="; ".join(f"{e.field}: {e.reason}" for e in r.errors),
                        finished_at=now,
                    )
                else:
                    result.accepted += 1
                    est = estimate_cost(r.spec, r.pixels, table)
                    estimates.append((est, r.spec.n))
                    result.models.add(r.spec.model)
                    row.update(
                        spec=r.spec.to_json(),
                        model=r.spec.model,
                        quality=r.spec.quality,
                        state="queued",
                        fingerprint=r.fingerprint,
                        estimated_usd=est.expected,
                        last_error_code=None,
                        last_error_message=None,
                        finished_at=None,
                    )
                yield row

        for chunk in _chunks(job_rows(), CHUNK):
            session.execute(insert(Job), chunk)
        session.commit()
    result.estimate = estimate_batch(estimates)
    return result


def queued_job_ids(db: Database, batch_id: int) -> Iterator[list[int]]:
    """The ids of the batch's queued jobs, in chunks (for enqueueing after commit)."""
    last = 0
    while True:
        with db.session() as session:
            ids = list(
                session.scalars(
                    select(Job.id)
                    .where(Job.batch_id == batch_id, Job.state == "queued", Job.id > last)
                    .order_by(Job.id)
                    .limit(CHUNK)
                )
            )
        if not ids:
            return
        yield ids
        last = ids[-1]


def enqueue_batch(db: Database, batch_id: int, enqueue: Enqueue) -> int:
    """Send one message per queued job; returns how many were sent."""
    sent = 0
    for ids in queued_job_ids(db, batch_id):
        enqueue(ids)
        sent += len(ids)
    return sent
