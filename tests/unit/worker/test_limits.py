"""RedisLimiter against fakeredis (Lua via lupa), with one fake clock for Redis and the worker."""

from __future__ import annotations

import random
import time
import types
from collections.abc import Iterator

import fakeredis
import pytest
from fakeredis._socket import _base as fake_socket
from fakeredis.commands_mixins import server_mixin

from pipeline.errors import ConfigError, PermitTimeout
from pipeline.run.ratelimit import LocalLimiter, gcra_wait
from pipeline.settings import Settings
from worker import constants
from worker.limits import ModelLimit, RedisLimiter, account_id, build_limiter

MODEL = "gpt-image-1"
SECRET = "sk-proj-THIS-MUST-NEVER-REACH-REDIS-0123456789"


class FakeClock:
    """Time for both fakeredis (TIME, key expiry) and the limiter (deadline, sleep)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # fakeredis reads time.time() for TIME and for key expiry; give both modules our clock.
    patched = types.SimpleNamespace(**{**vars(time), "time": fake.time})
    monkeypatch.setattr(server_mixin, "time", patched)
    monkeypatch.setattr(fake_socket, "time", patched)
    return fake


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def redis(server: fakeredis.FakeServer) -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(server=server)
    yield client
    client.close()


def make(
    redis: fakeredis.FakeRedis,
    clock: FakeClock,
    ipm: int | None = None,
    cap: int | None = None,
    burst: int = 1,
    **kwargs: object,
) -> RedisLimiter:
    return RedisLimiter(
        redis,
        SECRET,
        ModelLimit(ipm, cap, burst),
        jitter=0.0,
        clock=clock.time,
        sleep=clock.sleep,
        **kwargs,  # type: ignore[arg-type]
    )


def grant_times(
    limiter: RedisLimiter, clock: FakeClock, count: int, images: int = 1
) -> list[float]:
    start = clock.now
    times = []
    for _ in range(count):
        with limiter.permit(MODEL, images):
            times.append(round(clock.now - start, 3))
    return times


def test_gcra_spaces_grants_one_interval_apart(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, ipm=60)
    assert grant_times(limiter, clock, 4) == [0.0, 1.0, 2.0, 3.0]


def test_burst_goes_at_once_then_spacing(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = make(redis, clock, ipm=120, burst=3)
    assert grant_times(limiter, clock, 5) == [0.0, 0.0, 0.0, 0.5, 1.0]


def test_a_call_larger_than_the_burst_is_charged_in_full(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, ipm=60)
    assert grant_times(limiter, clock, 2, images=3) == [0.0, 3.0]


def test_waiting_worker_sleeps_the_exact_wait_and_does_not_spin(
    redis: fakeredis.FakeRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = make(redis, clock, ipm=6)
    calls = 0
    attempt = limiter._attempt

    def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return attempt(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(limiter, "_attempt", counting)
    with limiter.permit(MODEL, 1):
        pass
    with limiter.permit(MODEL, 1):
        pass
    assert clock.sleeps == [10.0]
    assert calls == 3


def test_script_agrees_with_pure_gcra(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    rng = random.Random(7)
    ipm, burst = 30, 3
    interval = 60.0 / ipm
    limiter = make(redis, clock, ipm=ipm, burst=burst)
    tat = 0.0
    for _ in range(200):
        clock.now += rng.choice([0.0, 0.0, 0.25, 1.0, 2.5, 7.0])
        cost = rng.choice([1, 1, 1, 2, 5])
        expected_wait, new_tat = gcra_wait(tat, clock.now, interval, max(burst, cost), cost)
        granted, wait, reason = limiter.try_acquire(MODEL, cost)
        assert granted == (expected_wait == 0), (clock.now, tat, cost)
        if granted:
            tat = new_tat
        else:
            assert reason == "rate"
            assert wait == pytest.approx(expected_wait, abs=0.0011)


def test_in_flight_cap_and_release(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = make(redis, clock, cap=2)
    slots = limiter.keys(MODEL)[1]
    with limiter.permit(MODEL, 1), limiter.permit(MODEL, 1):
        assert redis.zcard(slots) == 2
        with pytest.raises(PermitTimeout, match="in-flight slot"), limiter.permit(MODEL, 1, 1.0):
            pass
        assert sum(clock.sleeps) == pytest.approx(1.0)
    assert redis.zcard(slots) == 0
    with limiter.permit(MODEL, 1, max_wait=0.0):
        assert redis.zcard(slots) == 1


def test_slot_of_a_crashed_worker_frees_itself_after_the_lease(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, cap=1, slot_lease=30.0, slot_poll=5.0)
    crashed = limiter.permit(MODEL, 1)
    crashed.__enter__()  # never exits: its worker died mid-call
    start = clock.now
    with limiter.permit(MODEL, 1, max_wait=60.0):
        waited = clock.now - start
    assert 30.0 <= waited <= 30.0 + 5.0


def test_slot_wait_is_a_bounded_poll(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = make(redis, clock, cap=1, slot_lease=300.0, slot_poll=0.5)
    with limiter.permit(MODEL, 1):
        granted, wait, reason = limiter.try_acquire(MODEL, 1, "other")
    assert (granted, wait, reason) == (False, 0.5, "slots")


def test_backoff_pauses_every_worker_of_that_model_only(
    server: fakeredis.FakeServer, clock: FakeClock
) -> None:
    one = make(fakeredis.FakeRedis(server=server), clock)
    two = make(fakeredis.FakeRedis(server=server), clock, ipm=600)
    one.backoff(MODEL, 5.0)
    start = clock.now
    with two.permit("gpt-image-1-mini", 1):
        assert clock.now == start
    with two.permit(MODEL, 1):
        assert clock.now - start == pytest.approx(5.0)


def test_backoff_never_shortens_a_longer_pause(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock)
    limiter.backoff(MODEL, 10.0)
    limiter.backoff(MODEL, 2.0)
    assert limiter.try_acquire(MODEL, 1) == (False, 10.0, "pause")
    limiter.backoff(MODEL, 20.0)
    assert limiter.try_acquire(MODEL, 1) == (False, 20.0, "pause")
    clock.now += 20.0
    assert limiter.try_acquire(MODEL, 1)[0]
    clock.now += 0.001
    assert redis.exists(limiter.keys(MODEL)[2]) == 0


def test_pause_longer_than_max_wait_fails_fast(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, ipm=60)
    limiter.backoff(MODEL, 120.0)
    with pytest.raises(PermitTimeout, match="429"), limiter.permit(MODEL, 1, max_wait=30.0):
        pass
    assert clock.sleeps == []


def test_rate_wait_longer_than_max_wait_fails_fast(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, ipm=1, max_wait=5.0)
    with limiter.permit(MODEL, 1):
        pass
    with pytest.raises(PermitTimeout, match="images-per-minute"), limiter.permit(MODEL, 1):
        pass
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("headers", "paused"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"X-RateLimit-Remaining-Requests": "0", "X-RateLimit-Reset-Requests": "1m30s"}, 90.0),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "2s"}, 0.0),
        ({"x-ratelimit-remaining-requests": "0"}, 0.0),
        ({}, 0.0),
    ],
)
def test_observe_pauses_until_the_request_limit_resets(
    redis: fakeredis.FakeRedis, clock: FakeClock, headers: dict[str, str], paused: float
) -> None:
    limiter = make(redis, clock)
    limiter.observe(MODEL, headers)
    granted, wait, _ = limiter.try_acquire(MODEL, 1)
    assert wait == pytest.approx(paused)
    assert granted == (paused == 0.0)


def test_redis_never_holds_the_api_key(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = make(redis, clock, ipm=60, cap=3)
    with limiter.permit(MODEL, 1):
        limiter.backoff(MODEL, 1.0)
        keys = [k.decode() if isinstance(k, bytes) else k for k in redis.keys("*")]
        values = [redis.dump(k) or b"" for k in keys]
    assert len(keys) == 3
    assert limiter.account == account_id(SECRET)
    assert len(limiter.account) == 12
    for key in keys:
        assert key.startswith(constants.RATE_TAT_PREFIX.rsplit(":", 2)[0])
        assert f"{{{limiter.account}:{MODEL}}}" in key
        assert "sk-" not in key and SECRET not in key
    assert all(SECRET.encode() not in value for value in values)


def test_keys_expire_when_idle(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = make(redis, clock, ipm=60, cap=2, slot_lease=10.0)
    with limiter.permit(MODEL, 1):
        pass
    clock.now += 12.0
    assert redis.keys("*") == []


def test_model_override_has_its_own_limit_and_scope(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = RedisLimiter(
        redis,
        SECRET,
        ModelLimit(6, None),
        {"gpt-image-1-mini": ModelLimit(60, None)},
        jitter=0.0,
        clock=clock.time,
        sleep=clock.sleep,
    )
    start = clock.now
    for _ in range(3):
        with limiter.permit("gpt-image-1-mini", 1):
            pass
    assert clock.now - start == pytest.approx(2.0)
    with limiter.permit(MODEL, 1):
        assert clock.now - start == pytest.approx(2.0)
    with limiter.permit(MODEL, 1):
        assert clock.now - start == pytest.approx(12.0)


def test_build_limiter_without_limits_is_a_local_no_op() -> None:
    limiter = build_limiter(Settings())
    assert isinstance(limiter, LocalLimiter)


@pytest.mark.parametrize(
    "overrides",
    [
        {"images_per_minute": 5},
        {"max_in_flight": 2},
        {"model_limits": {"gpt-image-1-mini": {"images_per_minute": 50, "max_in_flight": 10}}},
    ],
)
def test_build_limiter_with_any_limit_uses_redis(
    redis: fakeredis.FakeRedis, overrides: dict[str, object]
) -> None:
    settings = Settings(openai_api_key=SECRET, **overrides)  # type: ignore[arg-type]
    limiter = build_limiter(settings, redis)
    assert isinstance(limiter, RedisLimiter)
    assert limiter.account == account_id(SECRET)


def test_build_limiter_merges_overrides_with_defaults(redis: fakeredis.FakeRedis) -> None:
    settings = Settings(
        images_per_minute=5,
        max_in_flight=4,
        model_limits={"gpt-image-1-mini": {"images_per_minute": 50}},
    )
    limiter = build_limiter(settings, redis)
    assert isinstance(limiter, RedisLimiter)
    account = account_id("")
    assert limiter.limit_for("openai:gpt-image-1") == ModelLimit(5, 4, account=account)
    assert limiter.limit_for("openai:gpt-image-1-mini") == ModelLimit(50, 4, account=account)


def test_build_limiter_reads_the_environment(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDITBATCH_IMAGES_PER_MINUTE", "7")
    monkeypatch.setenv(
        "EDITBATCH_MODEL_LIMITS",
        '{"gpt-image-1-mini": {"images_per_minute": 50, "max_in_flight": 10}}',
    )
    limiter = build_limiter(Settings(), redis)
    assert isinstance(limiter, RedisLimiter)
    account = account_id("")
    assert limiter.limit_for("openai:gpt-image-1") == ModelLimit(7, None, account=account)
    assert limiter.limit_for("openai:gpt-image-1-mini") == ModelLimit(50, 10, account=account)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"m": {"image_per_minute": 5}}, "unknown field"),
        ({"m": {"max_in_flight": 0}}, "at least 1"),
    ],
)
def test_bad_model_limits_name_the_setting(limits: dict[str, dict[str, int]], message: str) -> None:
    with pytest.raises(ConfigError, match=f"EDITBATCH_MODEL_LIMITS.*{message}"):
        Settings(model_limits=limits)


def test_redis_down_hands_the_job_back_instead_of_failing_it(
    server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    limiter = make(redis, clock, ipm=60)
    server.connected = False  # Redis restarted / unreachable
    with pytest.raises(PermitTimeout, match="Redis is unavailable"), limiter.permit("m", 1):
        pass
    server.connected = True
    with limiter.permit("m", 1):
        pass


# --- lanes: (provider, deployment) scopes with their own limits ---------------------------------

LANE_A, LANE_B = "azure:img-a", "azure:img-b"


def lane_limiter(
    redis: fakeredis.FakeRedis, clock: FakeClock, limits: dict[str, ModelLimit]
) -> RedisLimiter:
    return RedisLimiter(
        redis,
        SECRET,
        ModelLimit(),
        limits=lambda scope: limits.get(scope, ModelLimit()),
        jitter=0.0,
        clock=clock.time,
        sleep=clock.sleep,
    )


def test_permit_any_spreads_calls_over_two_deployments_each_at_its_own_rate(
    redis: fakeredis.FakeRedis, clock: FakeClock
) -> None:
    """Two deployments of 6 requests/min: 6 calls finish in 20 s (three per lane, 10 s apart
    on each), half the time one deployment alone would take."""
    account = account_id("https://east.openai.azure.com")
    limiter = lane_limiter(
        redis,
        clock,
        {LANE_A: ModelLimit(6, account=account), LANE_B: ModelLimit(6, account=account)},
    )
    start = clock.now
    used: list[tuple[str, float]] = []
    for _ in range(6):
        with limiter.permit_any([LANE_A, LANE_B], 1) as scope:
            used.append((scope, clock.now - start))
    assert clock.now - start == pytest.approx(20.0)
    for lane in (LANE_A, LANE_B):
        times = [t for scope, t in used if scope == lane]
        assert times == pytest.approx([0.0, 10.0, 20.0])
    keys = sorted(k.decode() for k in redis.keys("editbatch:rate:tat:*"))
    assert keys == [f"editbatch:rate:tat:{{{account}:{lane}}}" for lane in (LANE_A, LANE_B)]


def test_a_429_pauses_only_its_lane(redis: fakeredis.FakeRedis, clock: FakeClock) -> None:
    limiter = lane_limiter(redis, clock, {LANE_A: ModelLimit(600), LANE_B: ModelLimit(600)})
    limiter.backoff(LANE_A, 30.0)
    assert limiter.try_acquire(LANE_A, 1)[2] == "pause"
    with limiter.permit_any([LANE_A, LANE_B], 1) as scope:
        assert scope == LANE_B
    assert clock.sleeps == []


def test_build_limiter_keys_azure_lanes_by_the_endpoint_never_a_key(
    redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    monkeypatch.setenv("EDITBATCH_AZURE_DEPLOYMENTS", "gpt-image-2=img-a,gpt-image-2=img-b")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://east.openai.azure.com")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-04-01-preview")
    monkeypatch.setenv("EDITBATCH_AZURE_REQUESTS_PER_MINUTE", "10")
    limiter = build_limiter(Settings(), redis)
    assert isinstance(limiter, RedisLimiter)
    assert limiter.limit_for(LANE_A).per_minute == 10
    with limiter.permit_any([LANE_A, LANE_B], 1):
        pass
    [key] = [k.decode() for k in redis.keys("*")]
    endpoint = account_id("https://east.openai.azure.com")
    assert key.startswith(f"{constants.RATE_TAT_PREFIX}{{{endpoint}:azure:img-")
    assert SECRET not in key and account_id(SECRET) not in key
