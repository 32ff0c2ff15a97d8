"""Chaos: 1,000 jobs through the real distributed pipeline while everything goes wrong at once.

Real redis-server, real `celery -A worker.app worker` processes, PostgreSQL, the SDK over HTTP
to the sandbox injecting 20% server errors, 5% timeouts, 5% connection resets, 429 bursts,
truncated bodies and invalid base64. Mid-run one worker is SIGKILLed (and replaced), and later
Redis loses every message (FLUSHALL), followed by `editbatch resume`. At the end it prints one
line and holds it to: nothing lost, nothing twice, and the ledger against the bill with the
answers lost in flight named:

    jobs N, succeeded S, failed F, lost 0, duplicate outputs 0, ledger $L vs bill $B: mismatch
    $M (x%); answers lost in flight: K booked at $E estimated, U billed with no trace ($T);
    answers received vs their bills $0.000000

The API bills an answer once it is made (the sandbox's `bill_undelivered`): the calls the
killed worker had in flight, and bodies cut off mid-way, are billed with no request id we ever
saw. They are booked at their estimated cost, so the ledger is within the estimate's error of
the bill (here the estimate of these fixed-size rows is exact: what remains is calls killed
before the API received them, booked but never billed), and every answer received is booked at
exactly its bill.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.db.models import Job
from pipeline.sandbox import SandboxConfig
from tests.factories import write_manifest
from tests.integration.test_crash_safety import (
    audit,
    flushall,
    shortest_lease,
    small_rows,
    stack,
    wait_for,
)
from tests.servers import PostgresServer

JOBS = 1000
WORKER_THREADS = 8
LEASE_SECONDS = shortest_lease(8)
KILL_AT = JOBS // 4
FLUSH_AT = JOBS // 2
FINISH_WITHIN = 200.0
STALL_SECONDS = 1.0


def _chaos_config() -> SandboxConfig:
    return SandboxConfig(
        latency_ms=80,
        latency_sigma=0.4,
        error_rate=0.20,
        timeout_rate=0.05,
        hang_seconds=3.0,  # longer than the client's timeout: the client gives up first
        reset_rate=0.05,
        truncated_rate=0.02,
        bad_b64_rate=0.02,
        burst_429_rate=0.02,
        seed=20261121,
        # The sandbox bills an answer once it is made, as the API does, even when the client
        # is gone or the body is cut off (bill_undelivered, its default): the ledger books
        # those lost answers at their estimate, and the line names them.
    )


def test_chaos_1000_jobs_lose_nothing_duplicate_nothing_and_match_the_bill(
    tmp_path: Path,
    redis_url: str,
    postgres_server: PostgresServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", JOBS))
    with stack(
        tmp_path,
        redis_url,
        postgres_server.create_database(),
        _chaos_config(),
        EDITBATCH_REQUEST_TIMEOUT_SECONDS="1.5",  # 3x the slowest normal answer
        EDITBATCH_MAX_ATTEMPTS="8",
        EDITBATCH_BACKOFF_BASE_SECONDS="0.05",
        EDITBATCH_BACKOFF_MAX_SECONDS="0.5",
        EDITBATCH_LEASE_SECONDS=str(LEASE_SECONDS),
    ) as st:
        victim = st.worker("a", concurrency=WORKER_THREADS)
        st.worker("b", concurrency=WORKER_THREADS)
        batch_id = st.submit(manifest)

        def done() -> int:
            with st.db.session() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(Job)
                        .where(
                            Job.batch_id == batch_id,
                            Job.state.in_(("succeeded", "failed", "rejected", "cancelled")),
                        )
                    )
                    or 0
                )

        # 1. SIGKILL a worker with calls in flight; a new worker takes its place. The sandbox
        # is stalled for a moment first, so that the calls the victim has in flight are waiting
        # in the API: it makes and bills them all the same, and nobody receives them (answers
        # lost in flight, booked at their estimate once the reaper finds the dead worker's
        # attempts).
        wait_for(lambda: done() >= KILL_AT, 120, f"{KILL_AT} jobs done", interval=0.5)
        calm = (st.sandbox.config.latency_ms, st.sandbox.config.latency_sigma)
        st.sandbox.config.update({"latency_ms": 5000, "latency_sigma": 0.0})
        time.sleep(STALL_SECONDS)
        victim.kill()
        killed_at = datetime.now(UTC)
        st.sandbox.config.update({"latency_ms": calm[0], "latency_sigma": calm[1]})
        st.worker("c", concurrency=WORKER_THREADS)

        # 2. Redis loses every message once the victim's leases have run out; a person resumes.
        wait_for(
            lambda: (
                done() >= FLUSH_AT
                and datetime.now(UTC) > killed_at + timedelta(seconds=LEASE_SECONDS + 1)
            ),
            120,
            f"{FLUSH_AT} jobs done",
            interval=0.5,
        )
        flushall(redis_url)
        st.resume(batch_id)

        st.wait_finished(batch_id, FINISH_WITHIN)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        stats = st.sandbox.sandbox.stats.snapshot()

    with capsys.disabled():
        print(f"\n{result.summary()}")

    assert result.jobs == JOBS
    assert not result.lost, f"lost jobs {result.lost[:20]}"
    assert not result.duplicates, f"duplicate outputs {result.duplicates[:20]}"
    assert result.known_mismatch == 0, result.summary()
    # Every answer billed with no trace is one we booked at its estimate, and the ledger is
    # over the bill by at most what lost calls were booked at (those the API never received).
    assert len(result.unrecorded_bills) <= result.estimated_calls, result.summary()
    assert result.ledger_usd >= result.billed_usd, result.summary()
    assert result.ledger_usd - result.billed_usd <= result.estimated_usd, result.summary()
    assert result.in_flight == 0
    assert not result.failed_without_message, result.failed_without_message
    assert result.succeeded + result.failed == JOBS
    # Never paid twice for a success: one `ok` call per succeeded job, none for the others.
    assert sum(1 for a in result.attempts if a.outcome == "ok") == result.succeeded
    # The chaos happened: every kind of fault, the kill (interrupted calls), the flush.
    for fault in ("500", "timeout", "reset", "truncated", "badb64", "429"):
        assert stats["faults"].get(fault, 0) > 0, (fault, stats["faults"])
    assert any(a.outcome == "interrupted" for a in result.attempts)
    assert stats["by_status"].get("disconnected", 0) > 0
    assert stats["billed_undelivered"] > 0 and result.unrecorded_bills
