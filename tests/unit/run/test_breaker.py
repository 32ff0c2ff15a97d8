"""The outage breaker: its rules (pure), its two stores (one process, Redis) under the same
contract, and the executor and the local pool against an API that goes away and comes back
(the real SDK over an in-process transport that refuses every connection, then the sandbox)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fakeredis
import httpx2
import pytest
from sqlalchemy import select, update

from pipeline.db.events import EventKind, recent
from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Attempt, Batch, BatchEvent, Job
from pipeline.db.session import Database
from pipeline.intake.manifest import Defaults
from pipeline.run.batchroute.context import RouteContext
from pipeline.run.breaker import (
    FLAP_SECONDS,
    Breaker,
    BreakerPolicy,
    BreakerStore,
    LocalBreakerStore,
    ProbeResult,
    held_for,
    is_outage,
    outage_since,
    probe,
)
from pipeline.run.deps import build_deps
from pipeline.run.executor import Deps, process_job
from pipeline.run.localpool import LocalPool
from pipeline.run.ratelimit import LocalLimiter
from pipeline.sandbox import SandboxConfig
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import product_rows, write_manifest
from tests.fakes import InProcessAPI
from tests.unit.helpers import new_batch
from worker.breaker import RedisBreakerStore

# -- the rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_type", "outage"),
    [
        (None, "connection", True),
        (None, "timeout", True),
        (500, "server_error", True),
        (503, "server_error", True),
        (429, "rate_limit_exceeded", False),  # the API answers: it is there
        (400, "invalid_request_error", False),
        (401, "invalid_api_key", False),
        (200, "bad_response", False),  # an unreadable answer is still an answer
        (None, "bad_response", False),
    ],
)
def test_what_counts_as_an_outage(status: int | None, error_type: str, outage: bool) -> None:
    """No connection, a timeout or a 5xx say the API is not there; any other answer says it is."""
    assert is_outage(status, error_type) is outage


def test_probe_waits_double_up_to_the_cap() -> None:
    policy = BreakerPolicy(threshold=20, probe_first=5, probe_max=60, give_up=3600)
    assert [policy.probe_wait(n) for n in range(6)] == [5, 10, 20, 40, 60, 60]
    assert policy.probe_wait(10_000) == 60


def _at(minute: float) -> datetime:
    return datetime(2026, 11, 30, 2, 0, tzinfo=UTC) + timedelta(minutes=minute)


def test_outage_since_continues_through_flapping_and_restarts_after_a_give_up() -> None:
    """A trip soon after a resume is the same outage (its give-up clock keeps running); a trip
    long after a resume, or after a give-up, is a new one."""
    held, resumed, gave_up = (
        EventKind.OUTAGE_HELD,
        EventKind.OUTAGE_RESUMED,
        EventKind.OUTAGE_GAVE_UP,
    )
    assert outage_since([]) is None
    assert outage_since([(_at(0), held)]) == _at(0)
    soon = FLAP_SECONDS / 60 / 2
    late = FLAP_SECONDS / 60 * 2
    assert outage_since([(_at(0), held), (_at(1), resumed), (_at(1 + soon), held)]) == _at(0)
    assert outage_since([(_at(0), held), (_at(1), resumed), (_at(1 + late), held)]) == _at(1 + late)
    assert outage_since([(_at(0), held), (_at(70), gave_up), (_at(71), held)]) == _at(71)


# -- the two stores, one contract -----------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[BreakerStore]:
    if request.param == "local":
        yield LocalBreakerStore()
        return
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    yield RedisBreakerStore(client)
    client.close()


def test_store_trips_at_the_threshold_and_an_answer_resets_the_streak(store: BreakerStore) -> None:
    """The streak counts outage failures in a row; one answer starts it again; the breaker trips
    when it reaches the threshold and stays open (with the first reason) until closed."""
    for _ in range(3):
        assert store.record("s", True, 4, "connection failed") is None
    assert store.record("s", False, 4, "") is None  # an answer: the streak starts again
    assert store.streak("s") == 0
    for _ in range(3):
        assert store.record("s", True, 4, "first") is None
    trip = store.record("s", True, 4, "503 overloaded")
    assert trip is not None and trip.reason == "503 overloaded" and trip.probes == 0
    assert store.record("s", True, 4, "later") == trip  # stays open, keeps when and why
    assert store.trip("s") == trip
    assert store.trip("other") is None  # scopes are separate (one per provider)
    assert store.probed("s") == 1 and store.probed("s") == 2
    assert store.trip("s") is not None and store.trip("s").probes == 2  # type: ignore[union-attr]
    store.close("s")
    assert store.trip("s") is None and store.streak("s") == 0
    assert store.probed("s") == 0  # counting a probe never opens a closed breaker
    assert store.trip("s") is None


def test_store_lets_one_probe_chain_hold_the_lease(store: BreakerStore) -> None:
    assert store.lease_probe("s", "a", 30)
    assert not store.lease_probe("s", "b", 30)
    assert store.lease_probe("s", "a", 60)  # the holder extends it
    store.release_probe("s", "b")  # not b's to release
    assert not store.lease_probe("s", "b", 30)
    store.release_probe("s", "a")
    assert store.lease_probe("s", "b", 30)


def test_redis_store_down_counts_as_closed() -> None:
    """A Redis error never stops a job: the breaker counts as closed and nothing is raised."""
    server = fakeredis.FakeServer()
    store = RedisBreakerStore(fakeredis.FakeRedis(server=server))
    server.connected = False
    assert store.record("s", True, 1, "x") is None
    assert store.trip("s") is None and store.streak("s") == 0
    assert not store.lease_probe("s", "a", 30)
    store.close("s")


# -- the executor and the local pool against an API that goes away -------------------------------


class SwitchableAPI:
    """The in-process sandbox behind a transport that can refuse every connection (an outage:
    the SDK raises APIConnectionError, as for a dead network)."""

    def __init__(self, api: InProcessAPI) -> None:
        self.api = api
        self.down = False
        self.refused = 0

    def client(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self._handle))

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        if self.down:
            self.refused += 1
            raise httpx2.ConnectError("connection refused", request=request)
        return self.api._handle(request)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[SwitchableAPI]:
    with InProcessAPI(SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"))) as fake:
        yield SwitchableAPI(fake)


@pytest.fixture
def settings(tmp_path: Path, api: SwitchableAPI) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'editbatch.db'}",
        openai_base_url=api.api.base_url,
        openai_api_key=FAKE_KEY,
        backoff_base_seconds=0.001,
        backoff_max_seconds=0.002,
        request_timeout_seconds=10,
        max_attempts=5,
        breaker_threshold=6,
        breaker_probe_seconds=0.05,
        breaker_probe_max_seconds=0.1,
    )


def _deps(settings: Settings, db: Database, api: SwitchableAPI) -> Deps:
    return build_deps(settings, LocalLimiter(None, None), db, http_client=api.client())


def _batch(tmp_path: Path, db: Database, count: int) -> tuple[int, list[int]]:
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", count))
    result = new_batch(db, manifest, str(tmp_path / "out"))
    return result.batch_id, [i for chunk in queued_job_ids(db, result.batch_id) for i in chunk]


def test_an_outage_holds_the_batch_and_gives_back_the_attempts(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """Calls that cannot connect trip the breaker after `threshold` in a row: the batch is held
    api_unreachable with when and why, each job is held (none failed) and the calls the outage
    cost it no longer count against its attempts."""
    batch_id, ids = _batch(tmp_path, db, 3)
    deps = _deps(settings.model_copy(update={"max_attempts": 10}), db, api)
    api.down = True
    results = [process_job(job_id, deps).state for job_id in ids]
    assert results == ["held", "held", "held"]
    # The first job's 6th call in a row trips the breaker; the others make no call at all.
    assert api.refused == settings.breaker_threshold
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.state == "held"
        assert batch.hold_code == "api_unreachable"
        assert "calls in a row failed" in str(batch.hold_reason)
        assert "connection failed" in str(batch.hold_reason)
        for job in s.scalars(select(Job).where(Job.batch_id == batch_id)):
            assert job.state == "held"
            assert job.attempts - job.attempt_base == 0, "the outage's calls still count"
        events = recent(s, batch_id)
    assert [e.kind for e in events] == ["outage_held"]
    assert deps.breaker.open() is not None


def test_attempts_used_up_before_the_trip_do_not_fail_the_job(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """With a threshold above a job's attempts, a job whose every call failed to connect is
    handed back (its attempts given back) instead of failed, because a free model lookup fails
    too; the next jobs' failures trip the breaker."""
    deps = _deps(settings.model_copy(update={"max_attempts": 2, "breaker_threshold": 5}), db, api)
    batch_id, ids = _batch(tmp_path, db, 3)
    api.down = True
    first = process_job(ids[0], deps)
    assert first.state == "deferred" and first.retry_in == settings.breaker_probe_seconds
    with db.session() as s:
        job = s.get(Job, ids[0])
        assert job is not None and job.state == "queued"
        assert job.attempts == 2 and job.attempt_base == 2
    assert [process_job(i, deps).state for i in ids[1:]] == ["deferred", "held"]
    with db.session() as s:
        assert s.scalar(select(Batch.hold_code).where(Batch.id == batch_id)) == "api_unreachable"
        failed = s.scalars(select(Job.id).where(Job.state == "failed")).all()
    assert failed == []


def test_the_probe_resumes_held_batches_when_the_api_answers(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """A probe that gets no answer says when to probe again (doubling); one that gets an
    answer closes the breaker and resumes the batch, whose jobs are queued again."""
    batch_id, ids = _batch(tmp_path, db, 2)
    deps = _deps(settings, db, api)
    api.down = True
    for job_id in ids:
        process_job(job_id, deps)

    def ask() -> str | None:
        return deps.gateway.probe(settings.default_model)

    first = probe(deps.breaker, db, ask)
    second = probe(deps.breaker, db, ask)
    assert (first.resumed, first.retry_in) == ([], 0.1)  # 0.05 doubled, capped at 0.1
    assert second.retry_in == 0.1
    api.down = False
    third = probe(deps.breaker, db, ask)
    assert third.resumed == [batch_id] and third.retry_in is None
    assert deps.breaker.open() is None
    with db.session() as s:
        assert s.scalar(select(Batch.state).where(Batch.id == batch_id)) == "running"
        assert set(s.scalars(select(Job.state).where(Job.batch_id == batch_id))) == {"queued"}
        kinds = [e.kind for e in recent(s, batch_id)]
        messages = [e.message for e in recent(s, batch_id)]
    assert kinds == ["outage_held", "outage_resumed"]
    assert messages[1].startswith("the API answers again; resumed after ")
    assert [process_job(i, deps).state for i in ids] == ["succeeded", "succeeded"]


def test_probing_gives_up_to_a_batch_held_for_a_person(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """After the give-up time the batch stays held (hold_code outage, saying how to resume),
    probing stops and the breaker closes so that a person's resume tries the API again."""
    batch_id, ids = _batch(tmp_path, db, 1)
    quick = {"breaker_give_up_seconds": 0.01, "max_attempts": 10}
    deps = _deps(settings.model_copy(update=quick), db, api)
    api.down = True
    process_job(ids[0], deps)
    refused = api.refused
    time.sleep(0.05)  # past the give-up time
    result = probe(deps.breaker, db, lambda: deps.gateway.probe(settings.default_model))
    assert (result.gave_up, result.resumed, result.retry_in) == ([batch_id], [], None)
    assert api.refused == refused  # gave up without probing
    assert deps.breaker.open() is None
    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and (batch.state, batch.hold_code) == ("held", "outage")
        assert f"editbatch resume {batch_id}" in str(batch.hold_reason)
        assert [e.kind for e in recent(s, batch_id)] == ["outage_held", "outage_gave_up"]


def test_local_pool_waits_out_an_outage_and_finishes_the_batch(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """`editbatch run`'s pool: the API goes away mid-batch and comes back; the pool probes,
    resumes and finishes. Every job succeeds, none fails, and the ledger equals the bill."""
    batch_id, _ = _batch(tmp_path, db, 8)
    deps = _deps(settings, db, api)
    calls = {"n": 0}
    handle = api._handle

    def flaky(request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/images/edits"):
            calls["n"] += 1
            if calls["n"] == 3:
                api.down = True  # the API goes away after two answers
        if api.down and api.refused >= 12:
            api.down = False  # ... and comes back after a dozen refused calls
        return handle(request)

    deps.gateway = build_deps(
        settings,
        LocalLimiter(None, None),
        db,
        http_client=httpx2.Client(transport=httpx2.MockTransport(flaky)),
    ).gateway
    LocalPool(deps, concurrency=2).run_batch(batch_id)
    with db.session() as s:
        states = list(s.scalars(select(Job.state).where(Job.batch_id == batch_id)))
        batch = s.get(Batch, batch_id)
        ledger = sum(a.cost_usd for a in s.scalars(select(Attempt)))
        kinds = [e.kind for e in recent(s, batch_id)]
    assert states == ["succeeded"] * 8
    assert batch is not None and batch.state == "finished"
    assert kinds == ["outage_held", "outage_resumed"]
    billed, _ = billed_total(Path(str(api.api.config.billing_log)))
    assert ledger == billed


def test_breaker_is_per_scope(tmp_path: Path) -> None:
    """Two providers (scopes) on one store trip separately."""
    store = LocalBreakerStore()
    a = Breaker(store, BreakerPolicy(threshold=2), "openai:a")
    b = Breaker(store, BreakerPolicy(threshold=2), "azure:b")
    a.hear(None, "connection", "x")
    assert a.hear(503, "server_error", "y") is not None
    assert b.open() is None
    assert b.hear(200, None, "") is None


def test_a_local_batch_route_run_waits_out_an_outage_of_its_sync_jobs(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """`editbatch run --route batch`: jobs sent back to the sync route (`--fallback sync`) are
    sync calls, so an outage during them holds the batch; the run probes, resumes and finishes
    it instead of returning with the batch held and nobody probing. The ledger equals the bill."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 4))
    batch_id = new_batch(db, manifest, str(tmp_path / "out"), route="batch").batch_id
    with db.session() as s:  # as after an expiry with --fallback sync
        s.execute(update(Job).where(Job.batch_id == batch_id).values(route="sync"))
        s.commit()

    def flaky(request: httpx2.Request) -> httpx2.Response:
        if api.down and api.refused >= 12:
            api.down = False  # the API comes back after a dozen refused calls
        return api._handle(request)

    quick = settings.model_copy(update={"batch_poll_seconds": 0.01})
    client = httpx2.Client(transport=httpx2.MockTransport(flaky))
    deps = build_deps(quick, LocalLimiter(None, None), db, http_client=client)
    pool = LocalPool(deps, concurrency=2)
    api.down = True
    timer = threading.Timer(30, pool.stop.set)  # a hung run fails the test, not the suite
    timer.start()
    try:
        pool.run_route(RouteContext.build(deps, pool.run_ids), batch_id, 0.02)
    finally:
        timer.cancel()
    assert not pool.stop.is_set(), "the run did not finish in 30 s"
    with db.session() as s:
        states = list(s.scalars(select(Job.state).where(Job.batch_id == batch_id)))
        batch = s.get(Batch, batch_id)
        ledger = sum(a.cost_usd for a in s.scalars(select(Attempt)))
        kinds = [e.kind for e in recent(s, batch_id)]
    assert states == ["succeeded"] * 4
    assert batch is not None and batch.state == "finished"
    assert kinds == ["outage_held", "outage_resumed"]
    billed, _ = billed_total(Path(str(api.api.config.billing_log)))
    assert ledger == billed


def test_an_outage_of_one_provider_holds_only_the_batches_sent_to_it(
    tmp_path: Path, db: Database, settings: Settings, api: SwitchableAPI
) -> None:
    """Two providers, one down (a gateway that refuses every connection): the batch sent to the
    gateway is held api_unreachable, naming the provider, after the threshold; the batch sent
    to OpenAI meanwhile runs to the end and OpenAI's breaker stays closed. OpenAI's probe does
    not touch the held batch; the gateway's probe resumes it once the gateway answers. Every
    job succeeds once and the ledger equals the bill."""
    gateway = {
        "kind": "compatible",
        "base_url": "http://gateway.test/v1",
        "api_key": "sk-gateway-0000000000",
    }
    two = settings.model_copy(update={"providers": {"gateway": gateway}, "max_attempts": 10})
    down = {"gateway": True}
    refused: list[str] = []

    def route(request: httpx2.Request) -> httpx2.Response:
        if request.url.host == "gateway.test" and down["gateway"]:
            refused.append(request.url.path)
            raise httpx2.ConnectError("connection refused", request=request)
        return api.api._handle(request)  # both providers' calls reach the sandbox when up

    client = httpx2.Client(transport=httpx2.MockTransport(route))
    deps = build_deps(two, LocalLimiter(None, None), db, http_client=client)
    rows = product_rows(tmp_path / "in", 6)
    to_openai = write_manifest(tmp_path / "in" / "a.csv", rows[:3])
    to_gateway = write_manifest(tmp_path / "in" / "b.csv", rows[3:])
    batch_a = new_batch(db, to_openai, str(tmp_path / "out-a")).batch_id
    batch_b = new_batch(
        db, to_gateway, str(tmp_path / "out-b"), defaults=Defaults(provider="gateway")
    ).batch_id
    jobs_a = [i for chunk in queued_job_ids(db, batch_a) for i in chunk]
    jobs_b = [i for chunk in queued_job_ids(db, batch_b) for i in chunk]

    # The gateway's batch: its first job's calls trip the gateway's breaker; the others wait.
    assert [process_job(i, deps).state for i in jobs_b] == ["held"] * 3
    assert len(refused) == two.breaker_threshold
    # OpenAI's batch, at the same time: untouched by the gateway's outage.
    assert [process_job(i, deps).state for i in jobs_a] == ["succeeded"] * 3
    assert deps.breaker.open() is None
    assert deps.breaker.of("gateway").open() is not None
    with db.session() as s:
        a = s.get(Batch, batch_a)
        b = s.get(Batch, batch_b)
        assert a is not None and a.state == "finished"
        assert b is not None and (b.state, b.hold_code) == ("held", "api_unreachable")
        assert str(b.hold_reason).startswith("provider gateway unreachable since ")
        (event,) = s.scalars(select(BatchEvent).where(BatchEvent.batch_id == batch_b))
        assert (event.kind, event.provider) == ("outage_held", "gateway")
    assert held_for(db, batch_b) == "gateway" and held_for(db, batch_a) is None

    # OpenAI's probe: nothing of OpenAI's is held, so it neither asks nor resumes anything.
    assert probe(deps.breaker, db, lambda: "must not be asked") == ProbeResult()
    gateway_breaker = deps.breaker.of("gateway")
    still = probe(gateway_breaker, db, lambda: deps.probe("gateway"))
    assert still.resumed == [] and still.retry_in is not None
    assert refused[-1] == f"/v1/models/{two.default_model}"  # a free lookup, on the gateway
    down["gateway"] = False
    back = probe(gateway_breaker, db, lambda: deps.probe("gateway"))
    assert back.resumed == [batch_b] and gateway_breaker.open() is None
    assert [process_job(i, deps).state for i in jobs_b] == ["succeeded"] * 3
    with db.session() as s:
        b = s.get(Batch, batch_b)
        assert b is not None and b.state == "finished"
        attempts = list(s.scalars(select(Attempt).where(Attempt.outcome == "ok")))
        ledger = sum(a.cost_usd for a in s.scalars(select(Attempt)))
    assert sorted(str(a.provider) for a in attempts) == ["gateway"] * 3 + ["openai"] * 3
    billed, _ = billed_total(Path(str(api.api.config.billing_log)))
    assert ledger == billed
