"""Celery tasks: thin wrappers that pass a job id to `pipeline.executor.process_job`."""

from __future__ import annotations

import threading
from typing import Any

from pipeline import runtime
from pipeline.db import jobs
from pipeline.executor import Deps, process_job
from pipeline.producer import Enqueue
from pipeline.settings import get_settings
from worker.app import app
from worker.limits import build_limiter

_deps: Deps | None = None
_lock = threading.Lock()


def deps() -> Deps:
    """Clients are built once per worker process, not per task."""
    global _deps
    with _lock:
        if _deps is None:
            settings = get_settings()
            _deps = runtime.build_deps(settings, build_limiter(settings))
        return _deps


@app.task(name="editbatch.edit", acks_late=True, reject_on_worker_lost=True)
def edit(job_id: int) -> dict[str, Any]:
    result = process_job(int(job_id), deps())
    if result.state == "deferred":
        # Handed back without spending (no rate permit in time, or an identical job in flight).
        edit.apply_async((job_id,), countdown=result.retry_in or 0)
    return {"job_id": result.job_id, "state": result.state}


@app.task(name="editbatch.reap")
def reap() -> int:
    """Requeue jobs whose lease expired (their worker died) and send them again."""
    d = deps()
    with d.db.session() as session:
        ids = jobs.requeue_expired(session)
    celery_enqueue(ids)
    return len(ids)


def celery_enqueue(ids: list[int]) -> None:
    """Send one `editbatch.edit` message per job id over a single broker connection."""
    if not ids:
        return
    with app.producer_or_acquire() as producer:
        for job_id in ids:
            edit.apply_async((job_id,), producer=producer)


enqueue: Enqueue = celery_enqueue
