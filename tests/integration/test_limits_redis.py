"""RedisLimiter against a real redis-server, hammered by threads in several processes."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from pipeline.errors import PermitTimeout
from worker.limits import ModelLimit, RedisLimiter

pytestmark = pytest.mark.integration

MODEL = "gpt-image-1"
API_KEY = "sk-integration-test"
IN_FLIGHT = "test:limits:in_flight"  # test-only counter, not a project key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def limiter_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server (no persistence) for this module; a missing binary fails."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        pytest.fail("redis-server not found: apt-get install redis-server")
    port = _free_port()
    folder = tmp_path_factory.mktemp("limits-redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc.poll() is None:
        proc.kill()


@pytest.fixture
def redis_url(limiter_redis: str) -> Iterator[str]:
    client = Redis.from_url(limiter_redis)
    client.flushall()
    yield limiter_redis
    client.flushall()
    client.close()


@dataclass(frozen=True)
class Load:
    images_per_minute: int | None
    max_in_flight: int | None
    hold: tuple[float, float]  # seconds a granted "call" lasts, uniform
    threads: int


def _hammer(url: str, load: Load, ready: Any, go: Any, window: Any, out: str) -> None:
    """One worker process: `load.threads` threads take permits until the window closes."""
    client = Redis.from_url(url)
    limiter = RedisLimiter(
        client,
        API_KEY,
        ModelLimit(load.images_per_minute, load.max_in_flight),
        slot_lease=30.0,
        slot_poll=0.02,
    )
    grants: list[float] = []
    seen: list[int] = []
    lock = threading.Lock()
    ready.put(os.getpid())
    go.wait()
    start, end = window[0], window[1]
    time.sleep(max(start - time.time(), 0.0))

    def run(seed: int) -> None:
        rng = random.Random(seed)
        while (left := end - time.time()) > 0:
            try:
                with limiter.permit(MODEL, 1, max_wait=left):
                    granted_at = time.time()
                    in_flight = int(client.incr(IN_FLIGHT))
                    time.sleep(rng.uniform(*load.hold))
                    client.decr(IN_FLIGHT)
            except PermitTimeout:
                return
            with lock:
                grants.append(granted_at)
                seen.append(in_flight)

    threads = [
        threading.Thread(target=run, args=(os.getpid() * 100 + i,)) for i in range(load.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out).write_text(json.dumps({"grants": grants, "max_in_flight": max(seen, default=0)}))


def _run_processes(
    url: str, load: Load, processes: int, seconds: float, tmp: Path
) -> tuple[list[float], int, float, float]:
    """Run the load in `processes` spawned processes; (grant times, max in flight, start, end)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    go = ctx.Event()
    window = ctx.Array("d", 2)
    outs = [tmp / f"worker-{i}.json" for i in range(processes)]
    procs = [
        ctx.Process(target=_hammer, args=(url, load, ready, go, window, str(out))) for out in outs
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=30)
    start = time.time() + 0.1
    window[0], window[1] = start, start + seconds
    go.set()
    for p in procs:
        p.join(seconds + 30)
        assert p.exitcode == 0
    results = [json.loads(out.read_text()) for out in outs]
    grants = sorted(g for r in results for g in r["grants"])
    return grants, max(r["max_in_flight"] for r in results), start, start + seconds


def test_rate_is_shared_by_every_process_and_thread(redis_url: str, tmp_path: Path) -> None:
    rate, cap, burst, seconds = 600, 4, 1, 6.0
    interval = 60.0 / rate
    load = Load(rate, cap, hold=(0.05, 0.45), threads=4)
    grants, max_seen, start, end = _run_processes(redis_url, load, 2, seconds, tmp_path)

    # A permit may be granted a few ms after its max_wait ran out: measure the real span.
    span = max(end, grants[-1]) - start
    allowed = rate * span / 60 + burst
    print(
        f"\nrate: {len(grants)} grants in {span:.2f} s = {len(grants) / span:.2f}/s "
        f"(target {rate / 60:.2f}/s, ceiling {allowed:.1f}); max in flight {max_seen}/{cap}"
    )
    assert grants[0] >= start
    assert len(grants) <= allowed
    assert len(grants) >= 0.9 * rate * seconds / 60
    assert max_seen <= cap
    # Every sub-window too (grant times are taken locally, so allow 50 ms of read latency).
    for i in range(len(grants)):
        for j in range(i + 1, len(grants)):
            assert j - i + 1 <= (grants[j] - grants[i] + 0.05) / interval + burst


def test_in_flight_cap_holds_across_processes(redis_url: str, tmp_path: Path) -> None:
    cap, seconds, hold = 3, 2.5, 0.25
    load = Load(None, cap, hold=(hold, hold), threads=4)
    grants, max_seen, _, _ = _run_processes(redis_url, load, 2, seconds, tmp_path)

    best = cap / hold
    print(
        f"\nslots: max in flight {max_seen}/{cap}; {len(grants) / seconds:.2f} calls/s "
        f"(slot-bound ceiling {best:.1f}/s)"
    )
    assert max_seen == cap
    assert len(grants) >= 0.7 * best * seconds
    assert Redis.from_url(redis_url).zcard(_limiter(redis_url, cap).keys(MODEL)[1]) == 0


def _limiter(url: str, cap: int, lease: float = 30.0) -> RedisLimiter:
    return RedisLimiter(Redis.from_url(url), API_KEY, ModelLimit(None, cap), slot_lease=lease)


def _crash_holding_a_slot(url: str, lease: float) -> None:
    limiter = _limiter(url, 1, lease)
    with limiter.permit(MODEL, 1):
        os._exit(1)  # the worker dies mid-call: no release


def test_slot_of_a_killed_process_frees_after_its_lease(redis_url: str) -> None:
    lease = 1.5
    proc = multiprocessing.get_context("spawn").Process(
        target=_crash_holding_a_slot, args=(redis_url, lease)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == 1
    limiter = _limiter(redis_url, 1, lease)
    assert limiter.try_acquire(MODEL, 1, "probe")[2] == "slots"
    started = time.monotonic()
    with limiter.permit(MODEL, 1, max_wait=10.0):
        waited = time.monotonic() - started
    assert 0.0 < waited <= lease + 0.5


def test_backoff_pauses_every_client(redis_url: str) -> None:
    first = RedisLimiter(Redis.from_url(redis_url), API_KEY, ModelLimit(6000, None))
    second = RedisLimiter(Redis.from_url(redis_url), API_KEY, ModelLimit(6000, None))
    first.backoff(MODEL, 0.4)
    started = time.monotonic()
    with second.permit(MODEL, 1):
        waited = time.monotonic() - started
    assert 0.38 <= waited <= 0.6
