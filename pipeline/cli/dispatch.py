"""Where a batch's jobs go: to the Celery workers through the broker, or to a pool of threads
in this process (`run`, `--local`); a batch-route batch to a worker that cuts it into provider
batches, or to this process's poll loop. The one module of `pipeline` that imports `worker`."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from sqlalchemy.exc import DBAPIError

from pipeline import clock
from pipeline.batch.status import BatchStatus, batch_status
from pipeline.cli.ui import console, database_said, err, progress_table
from pipeline.db.session import Database
from pipeline.errors import EditbatchError
from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipeline.batch.submit import DispatchBatch, Enqueue
    from pipeline.observe.doctor import WorkerInfo
    from pipeline.run.batchroute.context import RouteContext
    from pipeline.run.executor import Deps


def celery_enqueue() -> Enqueue:
    """The function that sends job ids to the Celery workers (imports Celery when called)."""
    from worker.tasks import enqueue

    return enqueue


def celery_dispatch_batch() -> DispatchBatch:
    """The function that asks a Celery worker to cut a batch-route batch into provider
    batches (imports Celery when called)."""
    from worker.tasks import dispatch_later

    return dispatch_later


def ping_workers(timeout: float = 2.0) -> list[WorkerInfo]:
    """The Celery workers that answer a ping now, with their pool and concurrency."""
    from pipeline.observe.doctor import WorkerInfo
    from worker.tasks import worker_stats

    stats = worker_stats(timeout)
    workers = []
    for name, info in sorted(stats.items()):
        pool = info.get("pool", {}) if isinstance(info, dict) else {}
        kind = str(pool.get("implementation", "?"))
        short = "threads" if "thread" in kind else kind.rsplit(".", 1)[-1].split(":")[0]
        workers.append(WorkerInfo(name, short, int(pool.get("max-concurrency", 0) or 0)))
    return workers


def to_workers(db: Database, batch_id: int, settings: Settings) -> int:
    """Send the batch's queued jobs to the Celery workers; how many were sent."""
    from pipeline.batch.submit import send

    # Masked: the dashboard shows this message in a page too.
    broker = settings.masked()["broker_url"]
    try:
        return send(db, batch_id, celery_enqueue(), dispatch_batch=celery_dispatch_batch())
    except DBAPIError as exc:  # a new submit would store the batch twice: resume sends it
        raise EditbatchError(
            f"batch {batch_id} is stored, but the database failed while its jobs were being "
            f"sent ({database_said(exc)}); send them with: editbatch resume {batch_id}"
        ) from exc
    except Exception as exc:  # kombu raises OperationalError and friends
        raise EditbatchError(
            f"batch {batch_id} is stored, but the broker at {broker} refused the "
            f"messages ({type(exc).__name__}: {exc}). Start Redis, then: "
            f"editbatch resume {batch_id}"
        ) from exc


def in_process(
    settings: Settings,
    db: Database,
    batch_id: int,
    concurrency: int,
    poll_seconds: float | None = None,
) -> BatchStatus:
    """Run the batch's jobs in this process, collect, finish if done; the status afterwards.

    A batch-route batch is dispatched and polled from here (every `poll_seconds`, default
    EDITBATCH_BATCH_POLL_SECONDS) until every provider batch is collected."""
    from pipeline.db.models import Batch
    from pipeline.output.collector import collect_batch
    from pipeline.run.executor import finish_if_done
    from pipeline.run.localpool import LocalPool
    from pipeline.states import Route

    deps = local_deps(settings, db)
    with db.session() as session:
        batch = session.get(Batch, batch_id)
        route = batch.route if batch is not None else Route.SYNC
    stop = threading.Event()
    pool = LocalPool(deps, concurrency, stop=stop)
    if route == Route.BATCH:
        ctx = route_context(deps, concurrency, stop)
        every = poll_seconds or settings.batch_poll_seconds
        _run_with_progress(lambda: pool.run_route(ctx, batch_id, every), stop, db, batch_id)
    else:
        _run_with_progress(lambda: pool.run_batch(batch_id), stop, db, batch_id)
    collect_batch(db, batch_id, deps.storages)  # outputs a storage failure left in the spool
    finish_if_done(deps, batch_id)
    with db.session() as session:
        return batch_status(session, batch_id)


def local_deps(settings: Settings, db: Database) -> Deps:
    """The executor's dependencies for this process (an in-process rate limiter, with each
    provider lane's own limits)."""
    from pipeline.providers import providers_of
    from pipeline.run.deps import build_deps
    from pipeline.run.ratelimit import local_limiter

    return build_deps(settings, local_limiter(providers_of(settings).limit_for), db)


def route_context(
    deps: Deps, concurrency: int, stop: threading.Event | None = None
) -> RouteContext:
    """The batch route run from this process: jobs sent back to the sync route (`--fallback
    sync`) run on a pool of threads here."""
    from pipeline.run.batchroute.context import RouteContext
    from pipeline.run.localpool import LocalPool

    def run_sync(job_ids: list[int]) -> None:
        LocalPool(deps, concurrency, stop=stop or threading.Event()).run_ids(job_ids)

    return RouteContext.build(deps, run_sync)


def _run_with_progress(
    run: Callable[[], None], stop: threading.Event, db: Database, batch_id: int
) -> None:
    """Run `run` in a thread and show a live status with an ETA; Ctrl-C sets `stop`."""
    runner = threading.Thread(target=run, daemon=True)
    stop_requested = {"n": 0}

    def on_sigint(_sig: int, _frame: Any) -> None:
        stop_requested["n"] += 1
        stop.set()
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
                live.update(progress_table(status, time.monotonic() - started))
                runner.join(timeout=0.5)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sandbox_if(enabled: bool, say: Console = console) -> Iterator[dict[str, Any]]:
    """With `--sandbox`: the bundled sandbox API on a free local port, and the settings that
    point this process at it."""
    if not enabled:
        yield {}
        return
    from pipeline.providers import sandbox_overrides
    from pipeline.sandbox import SandboxConfig, SandboxServer

    settings = get_settings()
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    # The sandbox keeps the same calendar as this process (EDITBATCH_TODAY rehearses a date).
    config = SandboxConfig(
        billing_log=str(home / "sandbox-billing.jsonl"), today=clock.today().isoformat()
    )
    with SandboxServer(config) as server:
        say.print(f"sandbox API at {server.base_url} (not AI: a deterministic stand-in)")
        # Every provider goes to the sandbox (Azure's deployments are served there too), with
        # throwaway keys: a rehearsal never reaches a real endpoint.
        overrides, deployments = sandbox_overrides(settings, server.base_url.removesuffix("/v1"))
        server.config.azure_deployments = deployments
        yield overrides
