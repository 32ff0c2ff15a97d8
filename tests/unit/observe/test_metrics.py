"""Prometheus metrics: the observe functions, the database gauges, the HTTP endpoint, the hooks."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.errors import PermitTimeout
from pipeline.observe import metrics
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings, get_settings
from tests.factories import product_rows, write_manifest
from tests.servers import free_port
from tests.unit.helpers import new_batch

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MODEL = "gpt-image-2.5-sunburst"


def value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 when the series does not exist yet)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def serve() -> Iterator[Callable[..., metrics.MetricsServer]]:
    servers: list[metrics.MetricsServer] = []

    def start(**kwargs: Any) -> metrics.MetricsServer:
        server = metrics.start_metrics_server(0, addr="127.0.0.1", **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


# --- observe functions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "2xx"), (400, "4xx"), (429, "4xx"), (503, "5xx"), (None, "none"), (0, "none")],
)
def test_status_class(status: int | None, expected: str) -> None:
    assert metrics.status_class(status) == expected


def test_observe_attempt_counts_outcome_cost_and_latency(
    serve: Callable[..., metrics.MetricsServer],
) -> None:
    model = "test-observe"
    metrics.observe_attempt(model, "ok", 200, 42.0, Decimal("0.0125"))
    metrics.observe_attempt(model, "ok", 200, 3.0, Decimal("0.0100"))
    metrics.observe_attempt(model, "transient", 429, 0.2, None)
    metrics.observe_attempt(model, "hold", 429, 0.1, Decimal(0))
    metrics.observe_attempt(model, "failed", 400, 0.3)
    metrics.observe_attempt(model, "transient", None, 300.0)
    metrics.observe_attempt(model, "weird", 200, 1.0)

    got = scrape(serve().port)
    attempts = "editbatch_attempts_total"
    assert sample(got, attempts, model=model, outcome="ok", status_class="2xx") == 2
    assert sample(got, attempts, model=model, outcome="transient", status_class="4xx") == 1
    assert sample(got, attempts, model=model, outcome="transient", status_class="none") == 1
    assert sample(got, attempts, model=model, outcome="hold", status_class="4xx") == 1
    assert sample(got, attempts, model=model, outcome="failed", status_class="4xx") == 1
    assert sample(got, attempts, model=model, outcome="other", status_class="2xx") == 1
    assert sample(got, "editbatch_cost_usd_total", model=model) == pytest.approx(0.0225)

    latency = "editbatch_call_latency_seconds"
    assert sample(got, f"{latency}_count", model=model, outcome="ok") == 2
    assert sample(got, f"{latency}_sum", model=model, outcome="ok") == pytest.approx(45.0)
    assert sample(got, f"{latency}_bucket", model=model, outcome="ok", le="5.0") == 1
    assert sample(got, f"{latency}_bucket", model=model, outcome="ok", le="45.0") == 2
    assert sample(got, f"{latency}_bucket", model=model, outcome="transient", le="1.0") == 1
    assert sample(got, f"{latency}_bucket", model=model, outcome="transient", le="120.0") == 1


def test_latency_buckets_cover_one_to_120_seconds() -> None:
    buckets = metrics.LATENCY_BUCKETS
    assert buckets[0] <= 1 and 120 in buckets and buckets[-1] >= 300
    assert len([b for b in buckets if 1 <= b <= 120]) >= 8


def test_in_flight_counts_while_the_block_runs(
    serve: Callable[..., metrics.MetricsServer],
) -> None:
    server = serve()
    before = value("editbatch_calls_in_flight")
    with metrics.call_in_flight("test-inflight"), metrics.call_in_flight():
        during = sample(scrape(server.port), "editbatch_calls_in_flight")
    assert during == before + 2
    assert sample(scrape(server.port), "editbatch_calls_in_flight") == before


def test_an_exception_in_flight_is_an_interrupted_attempt() -> None:
    labels = {"model": "test-interrupt", "outcome": "interrupted", "status_class": "none"}
    before = value("editbatch_calls_in_flight")
    with pytest.raises(KeyboardInterrupt), metrics.call_in_flight("test-interrupt"):
        raise KeyboardInterrupt
    assert value("editbatch_attempts_total", **labels) == 1
    assert value("editbatch_calls_in_flight") == before
    with pytest.raises(RuntimeError), metrics.call_in_flight():  # no model: nothing to attribute
        raise RuntimeError
    assert value("editbatch_attempts_total", **labels) == 1


def test_permit_waits(serve: Callable[..., metrics.MetricsServer]) -> None:
    model = "test-permit"
    metrics.observe_permit_wait(model, 0.0)
    metrics.observe_permit_wait(model, 7.5)
    metrics.observe_permit_wait(model, 300.0, timed_out=True)
    got = scrape(serve().port)
    name = "editbatch_permit_wait_seconds"
    assert sample(got, f"{name}_count", model=model, result="granted") == 2
    assert sample(got, f"{name}_sum", model=model, result="granted") == pytest.approx(7.5)
    assert sample(got, f"{name}_bucket", model=model, result="granted", le="0.01") == 1
    assert sample(got, f"{name}_bucket", model=model, result="granted", le="10.0") == 2
    assert sample(got, f"{name}_count", model=model, result="timeout") == 1


def test_process_metrics_are_exported(serve: Callable[..., metrics.MetricsServer]) -> None:
    got = scrape(serve().port)
    assert sample(got, "process_open_fds") is not None
    assert any(name == "python_info" for name, _ in got)


# --- job and batch gauges ----------------------------------------------------------------------


def test_state_gauges_are_read_at_scrape_time_and_cached(
    serve: Callable[..., metrics.MetricsServer],
) -> None:
    calls: list[int] = []

    def source() -> metrics.StateCounts:
        calls.append(1)
        return metrics.StateCounts(jobs={"queued": 5, "running": 2}, batches={"running": 1})

    server = serve(state_source=source)
    got = scrape(server.port)
    assert sample(got, "editbatch_jobs", state="queued") == 5
    assert sample(got, "editbatch_jobs", state="running") == 2
    assert sample(got, "editbatch_jobs", state="retrying") == 0  # every state, even when empty
    assert sample(got, "editbatch_batches", state="running") == 1
    assert sample(got, "editbatch_batches", state="held") == 0
    scrape(server.port)
    assert len(calls) == 1, "read again within STATE_TTL_SECONDS"


def test_a_failing_state_source_does_not_fail_the_scrape(
    serve: Callable[..., metrics.MetricsServer],
) -> None:
    def source() -> metrics.StateCounts:
        raise RuntimeError("database is down")

    server = serve(state_source=source)
    got = scrape(server.port)
    assert sample(got, "editbatch_jobs", state="queued") is None
    assert sample(got, "editbatch_state_query_errors_total") == 1
    got = scrape(server.port)  # a failure is not cached: the next scrape tries again
    assert sample(got, "editbatch_state_query_errors_total") == 2


def test_no_state_gauges_without_a_source(serve: Callable[..., metrics.MetricsServer]) -> None:
    got = scrape(serve().port)
    assert not [name for name, _ in got if name in ("editbatch_jobs", "editbatch_batches")]


def _batch(tmp_path: Path, db: Database, count: int, **row: Any) -> tuple[int, list[int]]:
    manifest = write_manifest(
        tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", count, **row)
    )
    result = new_batch(db, manifest, str(tmp_path / "out"))
    return result.batch_id, [i for chunk in queued_job_ids(db, result.batch_id) for i in chunk]


def test_state_counts_from_the_database(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    try:
        batch_id, _ = _batch(tmp_path, db, 3)
        counts = metrics.state_counts(db)
        assert counts.jobs == {"queued": 3}
        assert counts.batches == {"running": 1}
        with db.session() as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(state="finished"))
            s.commit()
        counts = metrics.state_counts(db)
        assert counts.jobs == {}, "jobs of finished batches are not counted"
        assert counts.batches == {"finished": 1}
    finally:
        db.dispose()


# --- the executor observes every call ----------------------------------------------------------


def _deps(settings: Settings, db: Database) -> Deps:
    deps = build_deps(settings, LocalLimiter(None, None), db)
    deps.sleep = lambda _s: None
    return deps


def test_the_executor_observes_attempts_cost_latency_and_permits(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    ok = {"model": MODEL, "outcome": "ok", "status_class": "2xx"}
    failed = {"model": MODEL, "outcome": "failed", "status_class": "4xx"}
    transient = {"model": MODEL, "outcome": "transient", "status_class": "5xx"}
    before = {
        "ok": value("editbatch_attempts_total", **ok),
        "failed": value("editbatch_attempts_total", **failed),
        "transient": value("editbatch_attempts_total", **transient),
        "cost": value("editbatch_cost_usd_total", model=MODEL),
        "latency": value("editbatch_call_latency_seconds_count", model=MODEL, outcome="ok"),
        "permits": value("editbatch_permit_wait_seconds_count", model=MODEL, result="granted"),
    }
    _, (good,) = _batch(tmp_path / "a", db, 1)
    _, (bad,) = _batch(tmp_path / "b", db, 1, prompt="x #sandbox:400")
    _, (flaky,) = _batch(tmp_path / "c", db, 1, prompt="y #sandbox:500x1")
    deps = _deps(settings, db)
    assert process_job(good, deps).state == "succeeded"
    assert process_job(bad, deps).state == "failed"
    assert process_job(flaky, deps).state == "succeeded"

    assert value("editbatch_attempts_total", **ok) == before["ok"] + 2
    assert value("editbatch_attempts_total", **failed) == before["failed"] + 1
    assert value("editbatch_attempts_total", **transient) == before["transient"] + 1
    assert value("editbatch_cost_usd_total", model=MODEL) > before["cost"]
    latency = value("editbatch_call_latency_seconds_count", model=MODEL, outcome="ok")
    assert latency == before["latency"] + 2
    permits = value("editbatch_permit_wait_seconds_count", model=MODEL, result="granted")
    assert permits == before["permits"] + 4  # one per call
    assert value("editbatch_calls_in_flight") == 0


def test_the_executor_observes_a_permit_timeout(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    class NoPermits(LocalLimiter):
        def permit(self, model: str, images: int, max_wait: float | None = None) -> Any:
            raise PermitTimeout("no permit within the wait")

    deps = build_deps(settings, NoPermits(None, None), db)
    before = value("editbatch_permit_wait_seconds_count", model=MODEL, result="timeout")
    _, (job,) = _batch(tmp_path, db, 1)
    assert process_job(job, deps).state == "deferred"
    after = value("editbatch_permit_wait_seconds_count", model=MODEL, result="timeout")
    assert after == before + 1


# --- the worker hook ---------------------------------------------------------------------------


def test_worker_init_starts_the_server_when_a_port_is_set(
    monkeypatch: pytest.MonkeyPatch, db: Database
) -> None:
    import worker.app
    import worker.tasks

    started: list[metrics.MetricsServer] = []

    def start(port: int, **kwargs: Any) -> metrics.MetricsServer:
        server = metrics.start_metrics_server(port, addr="127.0.0.1", **kwargs)
        started.append(server)
        return server

    monkeypatch.setattr(worker.app, "start_metrics_server", start)
    monkeypatch.setattr(worker.tasks, "deps", lambda: SimpleNamespace(db=db))
    get_settings.cache_clear()
    try:
        monkeypatch.delenv("EDITBATCH_METRICS_PORT", raising=False)
        worker.app._start_metrics()
        assert not started, "no port, no server"

        port = free_port()
        monkeypatch.setenv("EDITBATCH_METRICS_PORT", str(port))
        get_settings.cache_clear()
        worker.app._start_metrics()
        assert [s.port for s in started] == [port]
        got = scrape(port)
        assert sample(got, "editbatch_calls_in_flight") is not None
        assert sample(got, "editbatch_jobs", state="queued") == 0  # read from `db`
    finally:
        for server in started:
            server.close()
        get_settings.cache_clear()
