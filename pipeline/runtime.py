"""Build the per-process dependencies (database, gateway, prices, limiter) from settings."""

from __future__ import annotations

from pipeline import webhook
from pipeline.collector import StorageCache
from pipeline.db.session import Database
from pipeline.executor import Deps
from pipeline.gateway import Gateway
from pipeline.pricing import load_prices
from pipeline.ratelimit import Limiter
from pipeline.report import write_report
from pipeline.settings import Settings


def build_deps(settings: Settings, limiter: Limiter, db: Database | None = None) -> Deps:
    database = db or Database(settings.effective_database_url)
    storages = StorageCache()

    def on_finished(batch_id: int) -> None:
        try:
            report = write_report(database, batch_id, storages)
        except Exception as exc:
            # The webhook still goes out (saying the report is missing); then the error is
            # raised as before, and `editbatch collect BATCH` writes the report later.
            webhook.notify_batch_finished(settings, database, batch_id, None, str(exc))
            raise
        webhook.notify_batch_finished(settings, database, batch_id, report)

    return Deps(
        db=database,
        gateway=Gateway(
            settings.api_key(), settings.openai_base_url, settings.request_timeout_seconds
        ),
        settings=settings,
        prices=load_prices(settings.prices_file),
        limiter=limiter,
        on_batch_finished=on_finished,
        storages=storages,
    )
