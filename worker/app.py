"""The Celery app: `celery -A worker.app worker` (broker from EDITBATCH_BROKER_URL).

Delivery is at least once (acks_late + reject_on_worker_lost); every task begins with an
atomic claim in the database, so a redelivered message for a finished job does nothing.
Edit calls are slow I/O (20-60 s), so the default pool is threads, not a process per call.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab

from pipeline.db.session import check_driver
from pipeline.errors import ConfigError
from pipeline.observe.logs import setup_logging
from pipeline.observe.metrics import start_metrics_server, state_counts
from pipeline.providers import providers_of
from pipeline.settings import Settings, cron_fields, get_settings
from worker.constants import QUEUE


def _settings() -> Settings:
    """The worker's settings, or the one-line error and exit status 2 (as the CLI does): a
    traceback from inside Celery's app loader would hide which setting is wrong. The providers
    are read here too, so a bad [providers.NAME] table stops the worker before its first job."""
    try:
        current = get_settings()
        check_driver(current.effective_database_url)
        providers_of(current)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    return current


settings = _settings()
app = Celery("editbatch", broker=settings.broker_url, include=["worker.tasks"])
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_pool="threads",
    worker_concurrency=settings.concurrency,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # A message unacknowledged for longer than this is delivered again: keep it above the
    # job lease so a slow but live call is not started twice.
    broker_transport_options={"visibility_timeout": settings.lease_seconds + 300},
    beat_schedule={
        "reap-expired-leases": {"task": "editbatch.reap", "schedule": 60.0},
        # The batch route: poll open provider batches, collect finished ones, dispatch.
        "batch-route-tick": {
            "task": "editbatch.batch_tick",
            "schedule": settings.batch_poll_seconds,
        },
    },
)
if settings.nightly_manifest:
    # Tonight's dated manifest, submitted once (pipeline.batch.nightly); the cron is read as UTC.
    app.conf.beat_schedule["editbatch-nightly"] = {
        "task": "editbatch.nightly",
        "schedule": crontab(**cron_fields(settings.nightly_cron)),
    }


def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our logging instead of Celery's: plain or JSON lines, keys redacted (EDITBATCH_LOG_*)."""
    current = get_settings()
    setup_logging(json=current.log_json, level=current.log_level or loglevel or "INFO")


def _start_metrics(**_: Any) -> None:
    """Serve Prometheus metrics from this worker process when EDITBATCH_METRICS_PORT is set."""
    port = get_settings().metrics_port
    if port is None:
        return
    from worker.tasks import deps  # worker.tasks imports this module

    start_metrics_server(port, state_source=lambda: state_counts(deps().db))


# Celery's signal decorators are untyped; connecting by call keeps mypy --strict meaningful.
signals.setup_logging.connect(_setup_logging)
signals.worker_init.connect(_start_metrics)
