"""The batch route with the real things: redis-server, `celery -A worker.app worker` and
`celery -A worker.app beat` processes, PostgreSQL (and SQLite), the SDK over HTTP to the
sandbox's Files and Batches APIs. Time is compressed with the sandbox's batch pace settings
(a provider batch of 500 lines takes about a second) and a 0.5 s poll.

    1,000 jobs on two models, 5% of lines answered 500 and 2% moderation_blocked, a worker
    SIGKILLed while it reads an output file: every job ends, one output set each, one upload
    per distinct input, the ledger equal to the bill to the micro-dollar.
    A process killed between `batches.create` and its commit: exactly one provider batch.
    The quick start on the batch route: every job succeeds at half the sync route's cost.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import openai
from sqlalchemy import func, select

from pipeline.db.models import Job, ProviderBatch, ProviderFile
from pipeline.sandbox import SandboxConfig
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import write_manifest
from tests.integration.test_cli_run import editbatch
from tests.integration.test_crash_safety import (
    Stack,
    audit,
    shortest_lease,
    small_rows,
    stack,
    wait_for,
)
from tests.servers import REPO, CeleryBeat, PostgresServer

LEASE_SECONDS = shortest_lease(8)
ROUTE_ENV = {
    "EDITBATCH_BATCH_POLL_SECONDS": "0.5",
    "EDITBATCH_LEASE_SECONDS": str(LEASE_SECONDS),
    "EDITBATCH_REQUEST_TIMEOUT_SECONDS": "5",
}


def fast_batches(**kw: object) -> SandboxConfig:
    return SandboxConfig(
        batch_validating_seconds=0.2,
        batch_lines_per_second=400,
        batch_finalizing_seconds=0.2,
        **kw,  # type: ignore[arg-type]
    )


def submit_batch_route(st: Stack, manifest: Path) -> int:
    proc = st.cli("submit", str(manifest), "--json", "--output", str(st.out), "--route", "batch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(json.loads(proc.stdout)["batch_id"])


def beat(st: Stack) -> CeleryBeat:
    return CeleryBeat(st.env, st.tmp / "beat.log")


def sdk(st: Stack) -> openai.OpenAI:
    return openai.OpenAI(api_key=FAKE_KEY, base_url=st.sandbox.base_url, max_retries=0)


def test_1000_jobs_two_models_lines_failing_and_a_worker_killed_mid_read(
    tmp_path: Path, redis_url: str, postgres_server: PostgresServer
) -> None:
    """1,000 jobs on two models through the batch route: two or more provider batches; 5% of
    lines answered 500 (sent again in later provider batches), 2% moderation_blocked (failed
    with the API's code); the worker collecting an output file is SIGKILLed mid-file and a new
    one finishes it. Every job ends succeeded or failed with its reason, each output file is
    written once, the uploads are the distinct input files, the ledger equals the bill."""
    jobs_total = 1000
    rows = small_rows(tmp_path / "in", jobs_total)
    for row in rows[1::2]:
        row["model"] = "gpt-image-2.5-sunburst"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    distinct = {hashlib.sha256((tmp_path / "in" / r["image"]).read_bytes()).digest() for r in rows}
    config = fast_batches(batch_line_error_rate=0.05, batch_line_moderation_rate=0.02, seed=12)
    with stack(tmp_path, redis_url, postgres_server.create_database(), config, **ROUTE_ENV) as st:
        victim = st.worker("a", concurrency=4)
        ticker = beat(st)
        try:
            batch_id = submit_batch_route(st, manifest)

            def reading() -> bool:
                with st.db.session() as s:
                    return bool(
                        s.scalar(
                            select(func.count())
                            .select_from(ProviderBatch)
                            .where(ProviderBatch.state == "collecting", ProviderBatch.booked >= 20)
                        )
                    )

            wait_for(reading, 180, "a worker reading an output file", interval=0.02)
            victim.kill()
            with st.db.session() as s:
                collecting = s.scalars(
                    select(ProviderBatch).where(ProviderBatch.state == "collecting")
                ).all()
                # Another provider batch may be collecting too, not yet started (booked 0) or
                # read to its end but not yet marked: at least one is cut mid-file.
                cut = [pb for pb in collecting if 0 < pb.booked < pb.completed + pb.failed]
                assert cut, [(pb.id, pb.booked, pb.completed + pb.failed) for pb in collecting]
                interrupted = {pb.id for pb in cut}
            st.worker("b", concurrency=4)
            st.wait_finished(batch_id, 240)

            def inputs_deleted() -> bool:  # just after the finish, at the provider too
                with st.db.session() as s:
                    live = select(func.count()).where(ProviderFile.deleted_at.is_(None))
                    return s.scalar(live.select_from(ProviderFile)) == 0

            wait_for(inputs_deleted, 60, "the batch's inputs to be deleted")
        finally:
            ticker.stop()
        result = audit(st.db, batch_id, st.out, st.billing_log)
        stats = st.sandbox.sandbox.snapshot()
        with st.db.session() as s:
            pbs = s.scalars(select(ProviderBatch).where(ProviderBatch.batch_id == batch_id)).all()
            jobs = s.scalars(select(Job).where(Job.batch_id == batch_id)).all()
        with sdk(st) as client:
            left = [f.id for f in client.files.list()]

    print(f"\nbatch route: {result.summary()}; {len(pbs)} provider batches")
    result.assert_clean()
    assert result.mismatch == 0  # no answer is lost on this route: every line is in a file
    assert result.jobs == result.succeeded + result.failed == jobs_total
    assert {pb.model for pb in pbs} == {"gpt-image-2", "gpt-image-2.5-sunburst"}
    assert len(pbs) >= 3 and all(pb.state == "collected" for pb in pbs)
    assert {pb.id for pb in pbs if pb.state == "collected"} >= interrupted
    failed = [j for j in jobs if j.state == "failed"]
    assert failed and all(j.last_error_code and j.last_error_message for j in failed)
    assert {j.last_error_code for j in failed} <= {"moderation_blocked", "server_error"}
    assert 5 <= sum(1 for j in failed if j.last_error_code == "moderation_blocked") <= 50
    assert any(j.attempts > 1 and j.state == "succeeded" for j in jobs)  # a 500, then ok
    assert sum(1 for a in result.attempts if a.outcome == "ok") == result.succeeded
    # One upload per distinct input file, plus one JSONL per provider batch.
    assert stats["uploads"]["count"] == len(distinct) + len(pbs)
    assert left == []  # inputs, JSONL, output and error files: all deleted at the provider


KILL_AFTER_CREATE = """
import os, sys
from pipeline.run.batchroute import api, dispatch
from worker.tasks import route

created = api.BatchAPI.create

def create_then_die(self, *args, **kwargs):
    created(self, *args, **kwargs)
    os._exit(9)  # after batches.create returned, before the commit that records it

api.BatchAPI.create = create_then_die
dispatch.dispatch(route(), int(sys.argv[1]))
"""


def test_a_process_killed_between_create_and_commit_leaves_one_provider_batch(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """The dispatching process dies right after `batches.create`: the provider has a batch our
    database does not know. Beat's tick finds it by the token in its metadata once the lease
    has lapsed and adopts it: exactly one provider batch for those jobs, each billed once."""
    rows = small_rows(tmp_path / "in", 6)
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    with stack(tmp_path, redis_url, database_url, fast_batches(), **ROUTE_ENV) as st:
        batch_id = submit_batch_route(st, manifest)  # its dispatch message waits in Redis
        died = subprocess.run(
            [sys.executable, "-c", KILL_AFTER_CREATE, str(batch_id)],
            env={**__import__("os").environ, **st.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert died.returncode == 9, died.stdout + died.stderr
        with sdk(st) as client:
            assert len(client.batches.list().data) == 1
        with st.db.session() as s:
            pb = s.scalars(select(ProviderBatch)).one()
            assert (pb.state, pb.provider_id) == ("preparing", None)
            token = pb.token

        st.worker("a", concurrency=2)
        ticker = beat(st)
        try:
            st.wait_finished(batch_id, 90)
        finally:
            ticker.stop()
        with sdk(st) as client:
            remote = client.batches.list().data
        with st.db.session() as s:
            pb = s.scalars(select(ProviderBatch)).one()
        result = audit(st.db, batch_id, st.out, st.billing_log)

    assert len(remote) == 1 and (remote[0].metadata or {}).get("editbatch_token") == token
    assert pb.provider_id == remote[0].id and pb.state == "collected"
    result.assert_clean()
    assert (result.succeeded, result.billed_calls) == (6, 6)


def test_the_quick_start_on_the_batch_route_costs_half(tmp_path: Path) -> None:
    """`editbatch run examples/manifest.csv --sandbox --route batch` on a fresh folder, no
    servers: every job succeeds, outputs and report are written, and the bill is half of the
    same run on the sync route (each sync call is rounded to the micro-dollar, each batch line
    is not: they agree to half a micro-dollar per call)."""
    costs: dict[str, Decimal] = {}
    for route in ("sync", "batch"):
        home = tmp_path / route
        env = {"EDITBATCH_HOME": str(home / ".editbatch")}
        out = home / "outputs"
        home.mkdir()
        proc = editbatch(
            [
                "run",
                str(REPO / "examples" / "manifest.csv"),
                "--sandbox",
                "--output",
                str(out),
                "--route",
                route,
            ],
            env,
            home,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = json.loads(editbatch(["status", "1", "--json"], env, home).stdout)
        assert status["state"] == "finished" and status["route"] == route
        assert status["counts"]["succeeded"] == status["jobs_total"] == 12
        assert len([p for p in out.rglob("*") if p.suffix in (".png", ".jpg")]) == 13
        assert (out / "report-1.csv").is_file() and (out / "report-1.json").is_file()
        billed, per_request = billed_total(home / ".editbatch" / "sandbox-billing.jsonl")
        assert len(per_request) == 12
        costs[route] = billed
    print(f"\nquick start: sync ${costs['sync']} | batch ${costs['batch']}")
    assert abs(costs["batch"] - costs["sync"] / 2) <= Decimal("0.0000005") * 12
