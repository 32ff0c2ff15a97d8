"""Build the per-process dependencies (database, providers, gateway, prices, limiter) from
settings."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx2

from pipeline.cost.pricing import load_prices
from pipeline.db.session import Database
from pipeline.errors import StorageError
from pipeline.intake.catalog import load_catalog
from pipeline.observe import webhook
from pipeline.output.collector import StorageCache
from pipeline.output.report import write_report
from pipeline.providers import providers_of
from pipeline.run.breaker import Breaker, LocalBreakerStore, breaker_of
from pipeline.run.executor import Deps
from pipeline.run.gateway import Gateway
from pipeline.run.ratelimit import Limiter
from pipeline.settings import Settings

log = logging.getLogger("editbatch.report")


def build_deps(
    settings: Settings,
    limiter: Limiter,
    db: Database | None = None,
    http_client: httpx2.Client | None = None,
    breaker: Breaker | None = None,
    on_outage: Callable[[int, str], None] | None = None,
) -> Deps:
    """Clients built once per process. `http_client` replaces the SDK's transport (unit tests:
    `tests.fakes.InProcessAPI`). `breaker`: the outage breaker shared by the workers (default:
    one for this process); `on_outage(batch_id, provider)` starts probing a provider after this
    process held a batch for its outage."""
    database = db or Database(settings.effective_database_url)
    storages = StorageCache()
    providers = providers_of(settings)

    def on_finished(batch_id: int) -> None:
        try:
            report = write_report(database, batch_id, storages)
        except Exception as exc:
            # The webhook still goes out (saying the report is missing). A storage error is
            # not the job's failure (it succeeded): it is logged with what to do, and
            # `editbatch collect BATCH` writes the report later. Anything else is raised.
            webhook.notify_batch_finished(settings, database, batch_id, None, str(exc))
            if not isinstance(exc, StorageError):
                raise
            log.warning(
                "batch %s: report not written (%s); fix the output location, then run: "
                "editbatch collect %s",
                batch_id,
                exc,
                batch_id,
            )
            return
        webhook.notify_batch_finished(settings, database, batch_id, report)

    return Deps(
        db=database,
        gateway=Gateway(
            settings.api_key(),
            settings.openai_base_url,
            settings.request_timeout_seconds,
            http_client=http_client,
            connections=providers.connections(),
        ),
        settings=settings,
        prices=providers.prices(load_prices(settings.prices_file)),
        limiter=limiter,
        breaker=breaker or local_breaker(settings),
        catalog=load_catalog(settings.catalog_file),
        on_batch_finished=on_finished,
        on_outage=on_outage,
        storages=storages,
        providers=providers,
    )


def local_breaker(settings: Settings) -> Breaker:
    """The outage breakers (one per provider) of one process (`editbatch run`, `resume
    --local`)."""
    return breaker_of(LocalBreakerStore(), settings)
