"""One submit: a manifest and options in, a stored batch with its queued jobs out.

    prepare(settings, manifest, intake)   fetch what is remote, build the preflight (no DB)
    Prepared.rows()                        parse + preflight every row, streaming (`check`,
                                           `estimate` stop here)
    store(db, prepared, options, prices)   the batch and every job in one transaction
                                           (rejected rows kept with the reason), nothing sent
    send(db, batch_id, enqueue)            one message per queued job id, after the commit (a
                                           batch-route batch: one "dispatch this batch" message)
    submit(...)                            store + send (`submit`; `run` sends to its own pool;
                                           the nightly task stores, checks for a racing twin,
                                           then sends)

Messages carry job ids only; the database is the truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline import clock
from pipeline.cost.estimate import (
    BatchEstimate,
    Estimate,
    Workload,
    estimate_batch,
    estimate_cost,
    estimate_duration,
    lanes_duration,
    typical_latency,
    workloads,
)
from pipeline.cost.pricing import PriceTable
from pipeline.db import jobs
from pipeline.db.models import Batch, utcnow
from pipeline.db.session import Database
from pipeline.errors import ConfigError, OutputNameError, RowError, StrictRefusal
from pipeline.files import file_sha256
from pipeline.intake.catalog import ShutdownNotice, load_catalog, shutdown_notices
from pipeline.intake.manifest import Defaults
from pipeline.intake.naming import render_name
from pipeline.intake.preflight import Preflight, PreflightOptions
from pipeline.intake.remote import LocalManifest, is_remote, localize_manifest
from pipeline.providers import DEFAULT_PROVIDER, ProviderSet, providers_of
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from pipeline.states import BATCH_OPEN, BatchState, JobState, Route

log = logging.getLogger("editbatch.submit")

Enqueue = Callable[[list[int]], None]
DispatchBatch = Callable[[int], None]
CHUNK = 1000
FALLBACKS = ("sync",)


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
    rows_by_model: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    @property
    def models(self) -> set[str]:
        return set(self.rows_by_model)


def check_rows(
    manifest: LocalManifest, defaults: Defaults, preflight: Preflight
) -> Iterator[CheckedRow]:
    """Parse and preflight every row (streaming); output names must be unique in the manifest."""
    names: dict[str, int] = {}
    pending: dict[int, list[RowError]] = {}
    for item in manifest.read(defaults):
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


def _batch_route_refusal(row: CheckedRow, default_provider: str | None) -> list[RowError]:
    """The batch route is OpenAI's Batch API, reached with OPENAI_API_KEY: a row sent to
    another provider cannot take it (refused by row, before anything is stored as queued)."""
    assert row.spec is not None
    provider = row.spec.provider or default_provider or DEFAULT_PROVIDER
    if provider == DEFAULT_PROVIDER:
        return []
    return [
        RowError(
            row.row,
            "provider",
            f"provider {provider} has no batch route (OpenAI's Batch API runs on provider "
            "openai only): send this batch with --route sync, or this row to openai",
            row.key,
        )
    ]


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Intake:
    """How a manifest's rows are read and checked: batch-wide row defaults, preflight options."""

    defaults: Defaults
    allow_roots: tuple[Path, ...] = ()
    convert: bool = False
    allow_unknown_model: bool = False


@dataclass(frozen=True)
class Prepared:
    """A manifest ready to be checked, estimated or stored: local files and a preflight."""

    manifest: LocalManifest
    defaults: Defaults
    preflight: Preflight

    @classmethod
    def local(cls, path: Path, defaults: Defaults, preflight: Preflight) -> Prepared:
        """A local manifest file whose references are all local (tests, benchmarks)."""
        return cls(LocalManifest(path, str(path), (path.resolve().parent,)), defaults, preflight)

    def rows(self) -> Iterator[CheckedRow]:
        return check_rows(self.manifest, self.defaults, self.preflight)

    @property
    def providers(self) -> ProviderSet | None:
        """The providers the rows were checked against (None: OpenAI only)."""
        return self.preflight.options.providers

    @property
    def sha256(self) -> str:
        return file_sha256(str(self.manifest.path))

    @property
    def source_uri(self) -> str:
        """The manifest as the person named it: a URI, or an absolute local path."""
        source = self.manifest.source
        return source if is_remote(source) else str(Path(source).resolve())


def prepare(settings: Settings, manifest: str | Path, intake: Intake) -> Prepared:
    """Fetch what the manifest names that is remote and build its preflight (no database)."""
    local = localize_manifest(manifest, settings)
    # A remote manifest's files are in the download cache (local.roots), nowhere else.
    allowed = (*local.roots, *(r.resolve() for r in intake.allow_roots))
    preflight = local.preflight(
        PreflightOptions(
            allowed_roots=allowed,
            catalog=load_catalog(settings.catalog_file),
            convert=intake.convert,
            allow_unknown_model=intake.allow_unknown_model,
            work_dir=settings.home.resolve() / "preflight",
            providers=providers_of(settings),
        )
    )
    return Prepared(local, intake.defaults, preflight)


@dataclass(frozen=True)
class BatchOptions:
    """What a person chose for the batch as a whole."""

    output_uri: str
    name: str | None = None
    budget_usd: Decimal | None = None
    strict: bool = False
    reuse: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)  # more of the settings snapshot
    route: str = Route.SYNC  # sync, or batch (OpenAI's Batch API)
    fallback: str | None = None  # batch route: "sync" sends an expired batch's leftovers sync
    keep_provider_files: bool = False  # batch route: keep uploads and output files

    def __post_init__(self) -> None:
        if self.route not in tuple(Route):
            raise ConfigError(
                f"--route {self.route!r}: use sync (one call per edit) or batch (OpenAI's "
                "Batch API: half price, within 24 h)"
            )
        if self.fallback is not None and self.fallback not in FALLBACKS:
            raise ConfigError(f"--fallback {self.fallback!r}: the only fallback is sync")
        if self.route == Route.SYNC and (self.fallback or self.keep_provider_files):
            what = "--fallback" if self.fallback else "--keep-provider-files"
            raise ConfigError(f"{what} applies to the batch route only: add --route batch")


@dataclass(frozen=True)
class SyncDuration:
    """How long a batch takes on the sync route at best, and the lanes that set it."""

    seconds: float
    loads: tuple[Workload, ...]
    in_flight: int  # the in-flight slots when the lanes set none (max_in_flight or concurrency)

    def limits(self, settings: Settings) -> str:
        """The limits behind the figure, for `estimate`: OpenAI's alone as before (images/min,
        in flight, latency), else one phrase per (provider, model)."""
        if not self.loads:  # the providers could not be read: the settings' limits
            rate = settings.images_per_minute or "unlimited"
            return f"{rate} images/min, {self.in_flight} in flight"
        if len(self.loads) == 1 and self.loads[0].provider == DEFAULT_PROVIDER:
            (w,) = self.loads
            return (
                f"{w.per_minute or 'unlimited'} images/min, {w.in_flight or self.in_flight} in "
                f"flight, ~{w.latency_s:.0f} s per call"
            )
        return "; ".join(w.describe() for w in self.loads)


def sync_duration(
    settings: Settings, estimate: BatchEstimate, providers: ProviderSet | None = None
) -> SyncDuration:
    """The sync route's duration from each provider's lanes: a (provider, model) runs at the
    sum of its deployments' limits, side by side with the others (`lanes_duration`); the
    settings' EDITBATCH_IMAGES_PER_MINUTE are the OpenAI lanes' limit."""
    threads = settings.max_in_flight or settings.concurrency
    if providers is None:
        try:
            providers = providers_of(settings)
        except ConfigError:  # said by preflight, by row or setting; estimate on the settings
            providers = None
    loads = tuple(workloads(estimate.work, providers)) if providers is not None else ()
    if loads:
        return SyncDuration(lanes_duration(loads, threads), loads, threads)
    models = {model for _, model in estimate.work} or set(estimate.unpriced_models)
    seconds = estimate_duration(
        estimate.calls,
        estimate.images,
        settings.images_per_minute,
        threads,
        typical_latency(models),
    )
    return SyncDuration(seconds, (), threads)


def shutdown_notices_for(
    settings: Settings, rows_by_model: Mapping[str, int], estimate: BatchEstimate | None = None
) -> list[ShutdownNotice]:
    """The models of a batch that shut down within EDITBATCH_SHUTDOWN_WARN_DAYS, or before the
    batch's estimated finish (when its estimate is known): said before anything is spent."""
    finish = None
    if estimate is not None and estimate.calls:
        seconds = sync_duration(settings, estimate).seconds
        now = datetime.combine(clock.today(), datetime.now(UTC).time(), UTC)
        finish = now + timedelta(seconds=seconds)
    return shutdown_notices(
        load_catalog(settings.catalog_file),
        rows_by_model,
        warn_days=settings.shutdown_warn_days,
        finish=finish,
    )


def find_resumable(db: Database, manifest_sha: str, output_uri: str) -> int | None:
    """An unfinished batch of the same manifest and output (so `run` can continue it)."""
    with db.session() as session:
        return session.scalar(
            select(Batch.id)
            .where(
                Batch.manifest_sha256 == manifest_sha,
                Batch.output_uri == output_uri,
                Batch.state.in_(list(BATCH_OPEN)),
            )
            .order_by(Batch.id.desc())
            .limit(1)
        )


def store(
    db: Database, prepared: Prepared, options: BatchOptions, prices: PriceTable
) -> SubmitResult:
    """Store a batch and all of its jobs in one transaction; nothing is sent here."""
    checked_rows: Iterable[CheckedRow] = prepared.rows()
    if options.strict:
        materialised = list(checked_rows)
        bad = [e for r in materialised for e in r.errors]
        if bad:
            raise StrictRefusal(
                f"{prepared.manifest.source}: {len(bad)} problem(s) in "
                f"{sum(1 for r in materialised if r.errors)} row(s); --strict refuses the "
                "whole manifest. First: " + str(bad[0])
            )
        checked_rows = materialised
    defaults = prepared.defaults
    providers = prepared.providers
    if providers is not None:
        prices = providers.prices(prices)  # a provider's own prices estimate its rows
    default_provider = providers.default if providers is not None else None
    with db.session() as session:
        batch = Batch(
            name=options.name or Path(prepared.manifest.path).stem,
            manifest_uri=prepared.source_uri,
            manifest_sha256=prepared.sha256,
            output_uri=options.output_uri,
            state=BatchState.RUNNING,
            budget_usd=options.budget_usd,
            route=options.route,
            settings={
                "defaults": dict(defaults.values),
                "model": defaults.model,
                "provider": defaults.provider or default_provider,
                "reuse": options.reuse,
                "route": options.route,
                "fallback": options.fallback,
                "keep_provider_files": options.keep_provider_files,
                **options.extra,
            },
        )
        session.add(batch)
        session.flush()
        result = SubmitResult(batch_id=batch.id)
        route_prices = prices.for_route(options.route)  # what the batch's calls will cost
        now = utcnow()
        estimates: list[tuple[Estimate, int]] = []
        used: set[str] = set()  # the providers the batch's jobs go to (status: cost by provider)

        def job_rows() -> Iterator[dict[str, Any]]:
            # Every row dict has the same keys, so each chunk is one executemany.
            for r in checked_rows:
                if options.route == Route.BATCH and r.spec is not None and not r.errors:
                    r.errors.extend(_batch_route_refusal(r, default_provider))
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
                        provider=None,
                        quality=None,
                        state=JobState.REJECTED,
                        fingerprint=None,
                        estimated_usd=None,
                        last_error_code=f"invalid_{r.errors[0].field}",
                        last_error_message="; ".join(f"{e.field}: {e.reason}" for e in r.errors),
                        finished_at=now,
                    )
                else:
                    result.accepted += 1
                    est = estimate_cost(r.spec, r.pixels, route_prices)
                    estimates.append((est, r.spec.n))
                    model = r.spec.model
                    result.rows_by_model[model] = result.rows_by_model.get(model, 0) + 1
                    used.add(r.spec.provider or default_provider or DEFAULT_PROVIDER)
                    row.update(
                        spec=r.spec.to_json(),
                        model=r.spec.model,
                        provider=r.spec.provider or default_provider,
                        quality=r.spec.quality,
                        state=JobState.QUEUED,
                        fingerprint=r.fingerprint,
                        estimated_usd=est.expected,
                        last_error_code=None,
                        last_error_message=None,
                        finished_at=None,
                    )
                yield row

        for chunk in _chunks(job_rows(), CHUNK):
            jobs.insert_jobs(session, chunk)
        batch.settings = {**batch.settings, "providers": sorted(used)}
        session.commit()
    result.estimate = estimate_batch(estimates)
    return result


def send(
    db: Database,
    batch_id: int,
    enqueue: Enqueue,
    on_finished: Callable[[int], None] | None = None,
    dispatch_batch: DispatchBatch | None = None,
) -> int:
    """Send one message per queued job of the batch; returns how many were sent.

    A batch-route batch is sent as one message instead (`dispatch_batch(batch_id)`: a worker
    cuts its queued jobs into provider batches); the count is of its queued jobs then. A batch
    with nothing to send (every row rejected) is finished here, since no worker will ever
    finish it; `on_finished` then reports it.
    """
    sent = 0
    with db.session() as session:
        route = session.scalar(select(Batch.route).where(Batch.id == batch_id))
    if route == Route.BATCH:
        if dispatch_batch is None:
            raise ConfigError(f"batch {batch_id} runs on the batch route: nothing can send it here")
        sent = sum(len(ids) for ids in jobs.queued_job_ids(db, batch_id))
        if sent:
            dispatch_batch(batch_id)
    else:
        for ids in jobs.queued_job_ids(db, batch_id):
            enqueue(ids)
            sent += len(ids)
    if sent == 0:
        with db.session() as session:
            finished = jobs.finish_batch_if_done(session, batch_id)
        if finished and on_finished is not None:
            on_finished(batch_id)
    return sent


def submit(
    db: Database,
    prepared: Prepared,
    options: BatchOptions,
    prices: PriceTable,
    enqueue: Enqueue,
    on_finished: Callable[[int], None] | None = None,
    dispatch_batch: DispatchBatch | None = None,
) -> SubmitResult:
    """Store the batch, then send its jobs (see `send`)."""
    result = store(db, prepared, options, prices)
    result.sent = send(db, result.batch_id, enqueue, on_finished, dispatch_batch)
    return result
