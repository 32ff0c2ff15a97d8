"""The outage breaker with real processes: the API goes away for 60 s in the middle of a batch.

Real redis-server, two real `celery -A worker.app worker` processes, the SDK over HTTP to the
sandbox, whose whole API goes away (`outage`: connections reset, or 503 to everything) for 60 s
while 300 jobs run. Nobody types anything: the batch must be held after a bounded number of
calls, no job may fail because of the outage, the batch must resume by itself when the API is
back, and it must end with every job succeeded, each paid once, the ledger equal to the bill.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.run.breaker import is_outage
from pipeline.sandbox import SandboxConfig
from tests.factories import write_manifest
from tests.integration.test_crash_safety import audit, small_rows, stack, wait_for

JOBS = 300
THREADS = 4  # per worker; two workers
THRESHOLD = 20  # the default EDITBATCH_BREAKER_THRESHOLD
OUTAGE_SECONDS = 60.0


def sandbox_post(base_url: str, path: str, body: dict[str, Any]) -> None:
    root = base_url.removesuffix("/v1")
    response = httpx2.post(f"{root}{path}", json=body, timeout=10)
    response.raise_for_status()


def sandbox_requests(base_url: str, since: float) -> list[dict[str, Any]]:
    root = base_url.removesuffix("/v1")
    response = httpx2.get(f"{root}/sandbox/requests", params={"since": since}, timeout=10)
    response.raise_for_status()
    return list(response.json()["requests"])


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def streak_at_the_hold(
    db: Database, batch_id: int, began: float, ends: float
) -> tuple[int, int, int]:
    """(outage failures after the last answer received once the outage began, all outage
    failures, answers received after it began). An answer to a call that was already being
    served when the outage began ends the streak, as any answer does: the breaker counts the
    failures after it."""
    with db.session() as s:
        rows = s.execute(
            select(Attempt.finished_at, Attempt.http_status, Attempt.error_type)
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch_id, Attempt.finished_at.is_not(None))
        ).all()
    during = sorted(
        (_epoch(at), is_outage(status, kind))
        for at, status, kind in rows
        if began <= _epoch(at) < ends
    )
    answers = [at for at, failed in during if not failed]
    last = answers[-1] if answers else began
    streak = sum(1 for at, failed in during if failed and at > last)
    return streak, sum(1 for _, failed in during if failed), len(answers)


@pytest.mark.parametrize(("outage", "database"), [("unreachable", "sqlite"), ("503", "postgresql")])
def test_a_60_s_outage_holds_the_batch_then_it_resumes_by_itself(
    outage: str,
    database: str,
    tmp_path: Path,
    redis_url: str,
    request: pytest.FixtureRequest,
) -> None:
    if database == "sqlite":
        database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    else:
        database_url = request.getfixturevalue("postgres_server").create_database()
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", JOBS))
    with stack(
        tmp_path,
        redis_url,
        database_url,
        SandboxConfig(latency_ms=60),
        EDITBATCH_BREAKER_PROBE_SECONDS="1",
        EDITBATCH_BREAKER_PROBE_MAX_SECONDS="4",
    ) as st:
        st.worker("w1", concurrency=THREADS)
        st.worker("w2", concurrency=THREADS)
        batch_id = st.submit(manifest)
        wait_for(lambda: st.done(batch_id) >= JOBS // 3, 120, "a third of the jobs done")

        began = time.time()
        ends = began + OUTAGE_SECONDS
        sandbox_post(
            st.sandbox.base_url, "/sandbox/config", {"outage": outage, "outage_until": ends}
        )
        wait_for(lambda: st.batch_state(batch_id) == "held", 30, "the batch to be held")
        held_after = time.time() - began
        with st.db.session() as s:
            batch = s.get(Batch, batch_id)
            assert batch is not None and batch.hold_code == "api_unreachable", batch.hold_reason
            assert f"{THRESHOLD} calls in a row failed" in str(batch.hold_reason)
        assert st.counts(batch_id).get("failed", 0) == 0

        # It resumes by itself once the API answers again: nobody runs `editbatch resume`.
        wait_for(lambda: time.time() > ends, OUTAGE_SECONDS + 5, "the outage to end")
        wait_for(lambda: st.batch_state(batch_id) != "held", 30, "the batch to resume by itself")
        resumed_after = time.time() - ends
        st.wait_finished(batch_id, 180)

        during = sandbox_requests(st.sandbox.base_url, began)
        refused = [r for r in during if r["time"] < ends and r["status"] in ("reset", "503")]
        edits = [r for r in refused if r["path"].endswith("/images/edits")]
        probes = [r for r in refused if r["path"].startswith("/v1/models")]
        status = st.cli("status", str(batch_id), "--json")
        assert status.returncode == 0, status.stderr
        events = json.loads(status.stdout)["events"]

        streak, failed_calls, late_answers = streak_at_the_hold(st.db, batch_id, began, ends)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        result.assert_clean()
        print(
            f"\n{outage}: held {held_after:.1f} s after the outage began, after "
            f"{len(edits)} refused edit calls ({streak} after the last of {late_answers} "
            f"answers to calls already being served); {len(probes)} probes; resumed "
            f"{resumed_after:.1f} s after it ended; {result.summary()}"
        )
    # Held within a bounded number of calls: the streak, plus the calls already on their way.
    # A call being served when the outage began may still answer, and an answer ends the
    # streak (the breaker cannot tell it from an API that is back): failures before it are
    # spent too, at most a few per worker thread in the call's remaining latency.
    assert THRESHOLD <= streak <= THRESHOLD + 2 * THREADS, (streak, len(edits))
    assert failed_calls == len(edits)  # every refused call is an attempt in the ledger, once
    # One probe at a time, with backoff (1, 2, 4, 4, ... s): about 15 in 60 s, never a flood.
    assert 5 <= len(probes) <= OUTAGE_SECONDS / 1 + 2, len(probes)
    assert resumed_after < 4 + 5  # the longest wait between probes, plus some slack
    assert (result.jobs, result.succeeded, result.failed) == (JOBS, JOBS, 0)
    assert result.billed_calls == JOBS  # each job paid once
    kinds = [e["kind"] for e in events]
    assert kinds == ["outage_held", "outage_resumed"], events
    assert events[1]["message"].startswith("the API answers again; resumed after ")
    with st.db.session() as s:
        assert s.scalar(select(Batch.hold_code).where(Batch.id == batch_id)) is None
