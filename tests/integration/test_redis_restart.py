"""Redis restarts empty in the middle of a batch: the workers notice within seconds and the
queued jobs are sent again, with nobody typing `resume` (worker/watch.py).

Real redis-server (restarted on its port, no persistence), three real `celery -A worker.app
worker` processes, a real `celery -A worker.app beat`, the SDK over HTTP to the sandbox, and
PostgreSQL. The throughput is read from the sandbox's own request log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import redis

from pipeline.sandbox import SandboxConfig
from tests.factories import write_manifest
from tests.integration.test_crash_safety import audit, small_rows, stack, wait_for
from tests.servers import CeleryBeat, PostgresServer, RedisServer
from worker.constants import BROKER_MARK, BROKER_RECOVERY_LOCK
from worker.watch import check_once

JOBS = 700
WORKERS = 3
THREADS = 4
BACK_WITHIN = 15.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (it is restarted)."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder)
    yield server
    server.stop()


def test_check_once_resends_after_a_flush_or_a_restart_and_only_then(
    own_redis: RedisServer,
) -> None:
    """The mark holds the server's run_id: a missing mark (flush) or another run_id (restart)
    re-sends once, under a lock; otherwise nothing is sent."""
    sends: list[int] = []

    def resend() -> int:
        sends.append(1)
        return 7

    client = redis.Redis.from_url(own_redis.url)
    assert check_once(client, resend) == 7  # no mark yet: a first start re-sends what is queued
    assert check_once(client, resend) is None
    client.flushall()
    assert check_once(client, resend) == 7
    assert check_once(client, resend) is None
    client.set(BROKER_RECOVERY_LOCK, "another-worker")
    client.delete(BROKER_MARK)
    assert check_once(client, resend) is None  # another worker is re-sending
    client.delete(BROKER_RECOVERY_LOCK)
    client.close()
    own_redis.restart()
    client = redis.Redis.from_url(own_redis.url)
    client.set(BROKER_MARK, "run-id-of-a-dead-server")
    assert check_once(client, resend) == 7
    assert client.get(BROKER_RECOVERY_LOCK) is None
    assert len(sends) == 3
    client.close()


def edit_times(base_url: str, since: float) -> list[float]:
    root = base_url.removesuffix("/v1")
    response = httpx2.get(f"{root}/sandbox/requests", params={"since": since}, timeout=30)
    response.raise_for_status()
    return sorted(
        r["time"]
        for r in response.json()["requests"]
        if r["path"].endswith("/images/edits") and r["status"] == "200"
    )


def test_redis_restarted_empty_mid_batch_recovers_within_15_s(
    tmp_path: Path, own_redis: RedisServer, postgres_server: PostgresServer
) -> None:
    """Redis restarts empty with 3 workers and beat running: the sandbox sees edits at half the
    rate before the restart again within 15 s, every job succeeds, none is paid twice."""
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", JOBS))
    with stack(
        tmp_path,
        own_redis.url,
        postgres_server.create_database(),
        SandboxConfig(latency_ms=250),
    ) as st:
        for i in range(WORKERS):
            st.worker(f"w{i}", concurrency=THREADS)
        beat = CeleryBeat(st.env, tmp_path / "beat.log")
        try:
            started = time.time()
            batch_id = st.submit(manifest)
            wait_for(lambda: st.done(batch_id) >= JOBS // 3, 180, "a third of the jobs done")
            own_redis.restart()
            restarted = time.time()
            st.wait_finished(batch_id, 300)
        finally:
            beat.stop()
        times = edit_times(st.sandbox.base_url, started)
        result = audit(st.db, batch_id, st.out, st.billing_log)
    before = [t for t in times if restarted - 10 <= t < restarted]
    rate_before = len(before) / 10
    window = 3.0
    back_at = next(
        (
            t - restarted
            for t in times
            if t >= restarted + window
            and sum(1 for u in times if t - window <= u < t) / window >= rate_before / 2
        ),
        None,
    )
    print(
        f"\nrate before the restart {rate_before:.1f} edits/s; back to half of it "
        f"{back_at if back_at is None else round(back_at, 1)} s after; {result.summary()}"
    )
    assert rate_before > 5, "too slow before the restart to measure anything"
    assert back_at is not None and back_at <= BACK_WITHIN, back_at
    result.assert_clean()
    assert (result.jobs, result.succeeded) == (JOBS, JOBS)
    assert result.billed_calls == JOBS  # none paid twice
