"""Prometheus metrics of one editbatch process, served on `EDITBATCH_METRICS_PORT`.

What the executor observes (per process; Prometheus sums them over the workers):

    editbatch_attempts_total{model, outcome, status_class}   calls by outcome: ok | transient |
                                                             hold | failed | interrupted
    editbatch_cost_usd_total{model}                          dollars spent, priced from usage
    editbatch_call_latency_seconds{model, outcome}           histogram of one edit call
    editbatch_calls_in_flight                                calls running in this process
    editbatch_permit_wait_seconds{model, result}             wait for a rate permit (granted |
                                                             timeout)

What the database says (refreshed at most every STATE_TTL_SECONDS, at scrape time):

    editbatch_jobs{state}        jobs of unfinished batches (running, held, paused) by job state
    editbatch_batches{state}     batches by state
    editbatch_state_query_errors_total   failed reads of those counts

The job gauges are read from SQL aggregates rather than counted from transitions: the database
is the truth, transitions happen in many processes (producer, CLI controls, reaper, workers on
other machines) and a counter would miss those made elsewhere and restart from zero with its
worker. Every worker exports the same numbers, so aggregate them with `max`, not `sum`:
`max by (state) (editbatch_jobs)`.

The counters live in this process's memory: this works with the threads pool (the default), not
with Celery's prefork pool, whose children would each keep their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pipeline.db.models import Batch, Job
from pipeline.states import BATCH_OPEN, AttemptOutcome, BatchState, JobState

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from pipeline.db.session import Database

__all__ = [
    "OUTCOMES",
    "REGISTRY",
    "MetricsServer",
    "StateCounts",
    "call_in_flight",
    "observe_attempt",
    "observe_permit_wait",
    "start_metrics_server",
    "state_counts",
    "status_class",
]

log = logging.getLogger("editbatch.metrics")

OUTCOMES = tuple(o for o in AttemptOutcome if o is not AttemptOutcome.IN_FLIGHT)
STATE_TTL_SECONDS = 15.0

# Edits take 20-60 s and may run to the request timeout; errors come back in well under 1 s.
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 75, 90, 120, 180, 300)
PERMIT_WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

ATTEMPTS = Counter(
    "editbatch_attempts",
    "Edit calls by outcome (ok, transient, hold, failed, interrupted) and HTTP status class.",
    ["model", "outcome", "status_class"],
    registry=REGISTRY,
)
COST = Counter(
    "editbatch_cost_usd",
    "Dollars spent on edit calls, priced from usage.",
    ["model"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "editbatch_call_latency_seconds",
    "Duration of one edit call.",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "editbatch_calls_in_flight", "Edit calls running in this process.", registry=REGISTRY
)
PERMIT_WAIT = Histogram(
    "editbatch_permit_wait_seconds",
    "Time spent waiting for a rate-limit permit (result: granted or timeout).",
    ["model", "result"],
    buckets=PERMIT_WAIT_BUCKETS,
    registry=REGISTRY,
)


def status_class(http_status: int | None) -> str:
    """'2xx'..'5xx' for an HTTP status, 'none' when there was no response (timeout, reset)."""
    if http_status is None or not 100 <= http_status <= 599:
        return "none"
    return f"{http_status // 100}xx"


def observe_attempt(
    model: str,
    outcome: str,
    http_status: int | None,
    latency_s: float,
    cost_usd: Decimal | float | None = None,
) -> None:
    """Count one finished call: its outcome, status class, latency and cost."""
    kind = outcome if outcome in OUTCOMES else "other"
    ATTEMPTS.labels(model, kind, status_class(http_status)).inc()
    LATENCY.labels(model, kind).observe(max(latency_s, 0.0))
    cost = COST.labels(model)  # created at zero, so a dashboard shows the model before it spends
    if cost_usd is not None and cost_usd > 0:
        cost.inc(float(cost_usd))


@contextmanager
def call_in_flight(model: str | None = None) -> Iterator[None]:
    """Count a call as in flight while the block runs.

    With `model`, an exception escaping the block (the call never produced an outcome) is
    counted as an `interrupted` attempt.
    """
    IN_FLIGHT.inc()
    started = time.monotonic()
    try:
        yield
    except BaseException:
        if model is not None:
            observe_attempt(model, AttemptOutcome.INTERRUPTED, None, time.monotonic() - started)
        raise
    finally:
        IN_FLIGHT.dec()


def observe_permit_wait(model: str, seconds: float, timed_out: bool = False) -> None:
    """Record how long a call waited for its rate permit (or waited before giving up)."""
    PERMIT_WAIT.labels(model, "timeout" if timed_out else "granted").observe(max(seconds, 0.0))


@dataclass(frozen=True)
class StateCounts:
    """Jobs of unfinished batches by job state, and batches by state."""

    jobs: Mapping[str, int]
    batches: Mapping[str, int]


def state_counts(db: Database) -> StateCounts:
    """Two GROUP BY queries (jobs via the (batch_id, state) index of unfinished batches)."""
    with db.session() as session:
        jobs = session.execute(
            select(Job.state, func.count())
            .join(Batch, Batch.id == Job.batch_id)
            .where(Batch.state.in_(list(BATCH_OPEN)))
            .group_by(Job.state)
        ).all()
        batches = session.execute(select(Batch.state, func.count()).group_by(Batch.state)).all()
    return StateCounts(
        jobs={str(s): int(n) for s, n in jobs}, batches={str(s): int(n) for s, n in batches}
    )


class _StateCollector(Collector):
    """Gauges read from the database at scrape time, cached for `ttl` seconds."""

    def __init__(self, ttl: float = STATE_TTL_SECONDS) -> None:
        self.source: Callable[[], StateCounts] | None = None
        self.ttl = ttl
        self._cached: StateCounts | None = None
        self._read_at = float("-inf")
        self._errors = 0
        self._lock = threading.Lock()

    def set_source(self, source: Callable[[], StateCounts] | None) -> None:
        with self._lock:
            self.source, self._cached, self._read_at = source, None, float("-inf")

    def _counts(self) -> tuple[StateCounts | None, int] | None:
        """(the counts, or None when unreadable; errors so far), or None without a source."""
        with self._lock:
            if self.source is None:
                return None
            now = time.monotonic()
            if self._cached is None or now - self._read_at >= self.ttl:
                try:
                    self._cached, self._read_at = self.source(), now
                except Exception as exc:  # a scrape must not fail because the DB is down
                    self._errors += 1
                    log.warning("metrics: cannot read job counts from the database: %s", exc)
                    self._cached = None
            return self._cached, self._errors

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("editbatch_jobs", "", labels=["state"]),
            GaugeMetricFamily("editbatch_batches", "", labels=["state"]),
            CounterMetricFamily("editbatch_state_query_errors", ""),
        ]

    def collect(self) -> Iterable[Metric]:
        read = self._counts()
        if read is None:
            return []
        counts, error_count = read
        errors = CounterMetricFamily(
            "editbatch_state_query_errors",
            "Failed reads of the job and batch counts from the database.",
            value=error_count,
        )
        if counts is None:
            return [errors]
        jobs = GaugeMetricFamily(
            "editbatch_jobs", "Jobs of unfinished batches by state (database).", labels=["state"]
        )
        for state in sorted({*JobState, *counts.jobs}):
            jobs.add_metric([state], counts.jobs.get(state, 0))
        batches = GaugeMetricFamily(
            "editbatch_batches", "Batches by state (database).", labels=["state"]
        )
        for state in sorted({*BatchState, *counts.batches}):
            batches.add_metric([state], counts.batches.get(state, 0))
        return [jobs, batches, errors]


_STATES = _StateCollector()
REGISTRY.register(_STATES)


@dataclass
class MetricsServer:
    """The HTTP server answering `GET /metrics`, on a daemon thread."""

    server: WSGIServer
    thread: threading.Thread
    closed: bool = field(default=False)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and forget the state source (the registry itself stays)."""
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()
            _STATES.set_source(None)


def start_metrics_server(
    port: int,
    addr: str = "0.0.0.0",
    state_source: Callable[[], StateCounts] | None = None,
) -> MetricsServer:
    """Serve REGISTRY on `addr:port` (0: any free port) from a daemon thread.

    `state_source` (e.g. `lambda: state_counts(db)`) adds the job and batch gauges; it is
    called lazily at scrape time, so a database that is down at start does not stop the server.
    """
    _STATES.set_source(state_source)
    server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
    log.info("metrics on http://%s:%s/metrics", addr, server.server_port)
    return MetricsServer(server, thread)
