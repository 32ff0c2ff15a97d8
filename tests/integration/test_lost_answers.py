"""A call lost in flight is still paid for (the sync route). 1,000 jobs on three real Celery
workers; one is SIGKILLed while its calls wait in the API, which makes and bills those answers
all the same (the sandbox bills as the real API does: `bill_undelivered`). The dead worker's
attempts are booked at their estimated cost as lost answers, so the ledger stays within 0.1%
of the bill, and status and the report list them."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

from sqlalchemy import func, select

from pipeline.db.models import Job
from pipeline.sandbox import SandboxConfig
from tests.factories import write_manifest
from tests.integration.test_crash_safety import audit, shortest_lease, small_rows, stack, wait_for
from tests.servers import PostgresServer

JOBS = 1000
LEASE = shortest_lease(8)


def test_1000_jobs_a_worker_killed_mid_call_the_ledger_within_0_1_percent_of_the_bill(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> None:
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", JOBS))
    config = SandboxConfig(latency_ms=120, latency_sigma=0.2, seed=8)
    assert config.bill_undelivered  # an answer made is billed, received or not
    with stack(
        tmp_path,
        redis_url,
        postgres_server.create_database(),
        config,
        EDITBATCH_LEASE_SECONDS=str(LEASE),
        EDITBATCH_REQUEST_TIMEOUT_SECONDS="5",
    ) as st:
        victim = st.worker("a", concurrency=4)
        st.worker("b", concurrency=4)
        st.worker("c", concurrency=4)
        batch_id = st.submit(manifest)

        def done() -> int:
            with st.db.session() as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(Job)
                        .where(Job.batch_id == batch_id, Job.state.in_(("succeeded", "failed")))
                    )
                    or 0
                )

        wait_for(lambda: done() >= JOBS // 3, 120, "a third of the jobs", interval=0.2)
        # The victim's calls are waiting in the API (slow for a moment): killed mid-call.
        st.sandbox.config.update({"latency_ms": 2000, "latency_sigma": 0.0})
        time.sleep(0.5)
        victim.kill()
        st.sandbox.config.update({"latency_ms": 120, "latency_sigma": 0.2})
        with st.beat(2.0):  # the reaper requeues the dead worker's jobs once their lease ends
            st.wait_finished(batch_id, 180)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        stats = st.sandbox.sandbox.snapshot()
        status = json.loads(st.cli("status", str(batch_id), "--json").stdout)
        shown = st.cli("status", str(batch_id)).stdout
    report = json.loads((st.out / f"report-{batch_id}.json").read_text())

    share = result.mismatch / result.billed_usd
    print(f"\nsync route, a worker killed: {result.summary()}; billed {stats['billed']} calls")
    result.assert_clean()
    assert result.succeeded == JOBS
    lost = [a for a in result.attempts if a.error_code == "answer_lost"]
    assert lost and stats["billed_undelivered"] >= len(result.unrecorded_bills) > 0
    assert share < Decimal("0.001"), result.summary()
    # Listed as such: status (counts and cost), the report (each one), the status table.
    assert status["lost_answers"]["attempts"] == len(lost)
    assert Decimal(status["lost_answers"]["estimated_usd"]) == sum(
        (a.cost_usd for a in lost), Decimal(0)
    )
    listed = report["summary"]["lost_answers"]["list"]
    assert len(listed) == len(lost) and all(Decimal(x["estimated_usd"]) > 0 for x in listed)
    assert "lost in flight" in shown
