"""`editbatch run`: the same executor as the Celery workers, on a thread pool in this process.

The "broker" is an in-memory queue of job ids read from the database, so a crash or Ctrl-C
loses nothing: a rerun reads the unfinished jobs again. When the outage breaker of a provider
holds the batch (`pipeline.run.breaker`), the pool probes that provider with backoff and runs
the batch again once it answers, as the Celery workers' probe task does; so does a batch-route
run whose jobs went back to the sync route (`run_route`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sqlalchemy.exc import DBAPIError

from pipeline.db.jobs import queued_job_ids
from pipeline.run import breaker
from pipeline.run.batchroute import poll
from pipeline.run.batchroute.context import RouteContext
from pipeline.run.executor import Deps, Handback, JobResult, process_job
from pipeline.run.retry import redeliver_after

log = logging.getLogger("editbatch.run")


@dataclass
class LocalPool:
    """A pool of threads running `process_job` on the job ids put into it."""

    deps: Deps
    concurrency: int
    on_result: Callable[[JobResult], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run_batch(self, batch_id: int) -> None:
        """Run every queued job of the batch; returns when all are done or `stop` is set. A
        batch held for an API outage is run again when the API answers (or probing gives up)."""
        while True:
            self.run_ids([i for ids in queued_job_ids(self.deps.db, batch_id) for i in ids])
            if self.stop.is_set() or not self.outage_ended(batch_id):
                return

    def run_route(self, ctx: RouteContext, batch_id: int, every: float) -> None:
        """`editbatch run --route batch`: tick the batch every `every` seconds until nothing is
        left for it (`poll.run_local`). Its jobs sent back to the sync route (`--fallback
        sync`) are sync calls: an outage that holds the batch meanwhile is waited out here as
        in `run_batch`, then the route goes on."""
        while True:
            poll.run_local(ctx, batch_id, self.stop.is_set, every, sleep=self.stop.wait)
            if self.stop.is_set() or not self.outage_ended(batch_id):
                return

    def outage_ended(self, batch_id: int) -> bool:
        """Probe the provider whose outage holds the batch; True once it was resumed (False at
        once when it is not held for one)."""
        deps = self.deps
        if breaker.held_for(deps.db, batch_id) is None:
            return False  # finished, or held for another reason: nothing to wait for
        wait: float | None = deps.breaker.policy.probe_first
        while wait is not None and not self.stop.wait(wait):
            provider = breaker.held_for(deps.db, batch_id)
            if provider is None:
                return False
            result = breaker.probe(
                deps.breaker.of(provider), deps.db, partial(deps.probe, provider)
            )
            if batch_id in result.resumed:
                return True
            wait = result.retry_in
        return False

    def run_ids(self, job_ids: list[int]) -> None:
        """Run these jobs (the batch route's fallback to sync); returns when all are done or
        `stop` is set."""
        work: queue.Queue[int] = queue.Queue()
        for job_id in job_ids:
            work.put(job_id)
        self._pending = work.qsize()
        self._lock = threading.Lock()
        threads = [
            threading.Thread(target=self._loop, args=(work,), name=f"editbatch-{i}", daemon=True)
            for i in range(min(self.concurrency, max(self._pending, 1)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)

    def _loop(self, work: queue.Queue[int]) -> None:
        while not self.stop.is_set():
            try:
                job_id = work.get(timeout=0.2)
            except queue.Empty:
                with self._lock:
                    if self._pending == 0:
                        return
                continue
            try:
                result = process_job(job_id, self.deps)
            except DBAPIError as exc:  # "database is locked" and friends: try again shortly
                delay = redeliver_after(job_id, exc)
                result = JobResult(job_id, Handback.DEFERRED, "database error", retry_in=delay)
            except Exception:  # one bad job must not stop the pool; a rerun picks it up
                log.exception("job %s crashed in the executor", job_id)
                result = JobResult(job_id, Handback.CRASHED)
            if result.state == Handback.DEFERRED:
                timer = threading.Timer(result.retry_in or 0.0, work.put, (job_id,))
                timer.daemon = True
                timer.start()
                continue
            with self._lock:
                self._pending -= 1
            if self.on_result is not None:
                self.on_result(result)
