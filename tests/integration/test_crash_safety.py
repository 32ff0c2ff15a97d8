"""Crash safety with real processes: a worker SIGKILLed mid-call, and Redis losing every message.

Each test runs the distributed shape for real (redis-server, `celery -A worker.app worker`
processes, the SDK over HTTP to the sandbox) on SQLite and on PostgreSQL, breaks one thing on
purpose, and then checks the three promises of docs/reliability.md: every job ends, each job has
exactly one set of outputs, and the ledger (attempts' cost) equals what the API billed.

The helpers here (`Stack`, `audit`, `small_rows`, ...) are shared by the other reliability
tests (test_db_hiccups, test_storage_failure, test_secrets) and by tests/chaos.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job, Output
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import make_image, write_manifest
from tests.servers import REPO, CeleryWorker

TERMINAL = ("succeeded", "failed", "rejected", "cancelled")


def shortest_lease(wanted: int) -> int:
    """`wanted` seconds, or the shortest lease Settings accepts if that is longer."""
    floors = [getattr(m, "ge", None) for m in Settings.model_fields["lease_seconds"].metadata]
    return max([wanted, *(int(f) for f in floors if f is not None)])


LEASE_SECONDS = shortest_lease(4)


# -- shared helpers ----------------------------------------------------------------------------


def small_rows(folder: Path, count: int, **overrides: Any) -> list[dict[str, Any]]:
    """`count` cheap rows: distinct 64x64 inputs, gpt-image-2 at 256x256, low quality."""
    rows = []
    for i in range(count):
        color = (i % 251, (i * 7) % 253, (i * 13) % 255)
        img = make_image(folder / f"img{i:04d}.png", size=(64, 64), color=color)
        row: dict[str, Any] = {
            "id": f"SKU{i:04d}",
            "image": img.name,
            "prompt": f"white studio background, variant {i}",
            "model": "gpt-image-2",
            "size": "256x256",
            "quality": "low",
        }
        row.update(overrides)
        rows.append(row)
    return rows


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def aware(moment: datetime) -> datetime:
    """A timestamp from the database as an aware UTC datetime (SQLite gives naive UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stack:
    """One test's servers: the sandbox, the database, the environment every process gets."""

    tmp: Path
    env: dict[str, str]
    sandbox: SandboxServer
    db: Database
    out: Path
    billing_log: Path
    workers: list[CeleryWorker] = field(default_factory=list)

    def worker(self, name: str, concurrency: int = 4) -> CeleryWorker:
        """Start a real `celery -A worker.app worker` process (stopped when the test ends)."""
        w = CeleryWorker(self.env, self.tmp / f"worker-{name}.log", concurrency, name=name)
        self.workers.append(w)
        return w

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `editbatch ARGS` as a person would, in its own process."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            env={**os.environ, **self.env},
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a snippet in a fresh process with the stack's environment (e.g. the reaper)."""
        return subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **self.env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, manifest: Path) -> int:
        proc = self.cli("submit", str(manifest), "--json", "--output", str(self.out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return int(json.loads(proc.stdout)["batch_id"])

    def resume(self, batch_id: int) -> None:
        proc = self.cli("resume", str(batch_id))
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def batch_state(self, batch_id: int) -> str:
        with self.db.session() as s:
            return str(s.scalar(select(Batch.state).where(Batch.id == batch_id)))

    def counts(self, batch_id: int) -> dict[str, int]:
        with self.db.session() as s:
            states = s.scalars(select(Job.state).where(Job.batch_id == batch_id)).all()
        out: dict[str, int] = {}
        for state in states:
            out[state] = out.get(state, 0) + 1
        return out

    def done(self, batch_id: int) -> int:
        return sum(n for state, n in self.counts(batch_id).items() if state in TERMINAL)

    @contextmanager
    def beat(self, every: float) -> Iterator[None]:
        """Run the reaper every `every` seconds meanwhile, as `celery beat` does (every 60 s)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                self.python(REAP)

        thread = threading.Thread(target=loop, name="beat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=60)

    def finished(self, batch_id: int) -> bool:
        """The batch is finished and its report written (that comes just after)."""
        with self.db.session() as s:
            row = s.execute(select(Batch.state, Batch.report_uri).where(Batch.id == batch_id)).one()
        return row.state == "finished" and row.report_uri is not None

    def wait_finished(self, batch_id: int, timeout: float) -> None:
        try:
            wait_for(lambda: self.finished(batch_id), timeout, "the batch and its report")
        except AssertionError as exc:
            logs = "\n".join(
                f"--- {w.log.name}\n{w.log.read_text(errors='replace')[-3000:]}"
                for w in self.workers
            )
            raise AssertionError(f"{exc}; jobs by state {self.counts(batch_id)}\n{logs}") from None


@contextmanager
def stack(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    config: SandboxConfig | None = None,
    **env: str,
) -> Iterator[Stack]:
    """The sandbox on a free port, the database, and the environment of every process."""
    billing_log = tmp_path / "billing.jsonl"
    config = config or SandboxConfig(latency_ms=50)
    config.billing_log = str(billing_log)
    with SandboxServer(config) as sandbox:
        full_env = {
            # The code under test, whatever else is installed on the machine.
            "PYTHONPATH": str(REPO),
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": database_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "EDITBATCH_BACKOFF_BASE_SECONDS": "0.05",
            "EDITBATCH_BACKOFF_MAX_SECONDS": "0.2",
            "EDITBATCH_LEASE_SECONDS": str(LEASE_SECONDS),
            "EDITBATCH_REQUEST_TIMEOUT_SECONDS": "3",  # shorter than the lease, as required
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
            **env,
        }
        db = Database(database_url)
        s = Stack(tmp_path, full_env, sandbox, db, (tmp_path / "out").resolve(), billing_log)
        try:
            yield s
        finally:
            for w in s.workers:
                w.stop()
            db.dispose()


@dataclass
class Audit:
    """What a finished batch left behind, measured from the database, the folder and the bill.

    An answer the API made but nobody received (a worker killed mid-call, a body cut off) is
    billed with no request id we know: it is booked at its estimated cost (`answer_lost`, or
    an estimated 200), so the ledger stays within the estimate's error of the bill. Every
    answer we did receive is booked at exactly what it was billed.
    """

    jobs: int
    succeeded: int
    failed: int
    lost: list[int]  # jobs not terminal, or succeeded without a full set of good outputs
    duplicates: list[str]  # outputs beyond one set per job, and unrecorded files in the folder
    ledger_usd: Decimal  # sum of the attempts' cost
    billed_usd: Decimal  # sum of the sandbox's billing log
    billed_calls: int
    unrecorded_bills: set[str]  # billed request ids no attempt carries with its cost
    in_flight: int  # attempts still `in_flight` (the ledger would be incomplete)
    failed_without_message: list[int]
    attempts: list[Attempt]
    unrecorded_usd: Decimal = Decimal(0)  # what the unrecorded bills cost
    estimated_usd: Decimal = Decimal(0)  # attempts booked at an estimate (answers not received)
    estimated_calls: int = 0
    temporaries: list[str] = field(default_factory=list)  # left by a kill mid-write

    @property
    def mismatch(self) -> Decimal:
        return abs(self.ledger_usd - self.billed_usd)

    @property
    def known_mismatch(self) -> Decimal:
        """Answers received against their bills: must be exactly 0."""
        known = self.ledger_usd - self.estimated_usd
        return abs(known - (self.billed_usd - self.unrecorded_usd))

    def summary(self) -> str:
        share = self.mismatch / self.billed_usd if self.billed_usd else Decimal(0)
        return (
            f"jobs {self.jobs}, succeeded {self.succeeded}, failed {self.failed}, "
            f"lost {len(self.lost)}, duplicate outputs {len(self.duplicates)}, "
            f"temporary files left by a kill {len(self.temporaries)}, "
            f"ledger ${self.ledger_usd:.6f} vs bill ${self.billed_usd:.6f}: "
            f"mismatch ${self.mismatch:.6f} ({share:.4%}); answers lost in flight: "
            f"{self.estimated_calls} booked at ${self.estimated_usd:.6f} estimated, "
            f"{len(self.unrecorded_bills)} billed with no trace (${self.unrecorded_usd:.6f}); "
            f"answers received vs their bills ${self.known_mismatch:.6f}"
        )

    def assert_clean(self) -> None:
        """Nothing lost, nothing twice; every answer received is booked at exactly its bill,
        and every answer billed with no trace is one booked at an estimate."""
        assert not self.lost, f"lost jobs {self.lost}"
        assert not self.duplicates, f"duplicate outputs {self.duplicates}"
        assert self.in_flight == 0, f"{self.in_flight} attempts left in_flight"
        assert self.known_mismatch == 0, self.summary()
        assert len(self.unrecorded_bills) <= self.estimated_calls, self.summary()
        if not self.estimated_calls:
            assert self.ledger_usd == self.billed_usd, (self.ledger_usd, self.billed_usd)
        assert not self.failed_without_message, self.failed_without_message


def audit(db: Database, batch_id: int, out_dir: Path, billing_log: Path) -> Audit:
    with db.session() as s:
        jobs = list(s.scalars(select(Job).where(Job.batch_id == batch_id)))
        outputs = list(
            s.scalars(
                select(Output).join(Job, Job.id == Output.job_id).where(Job.batch_id == batch_id)
            )
        )
        attempts = list(
            s.scalars(
                select(Attempt)
                .join(Job, Job.id == Attempt.job_id)
                .where(Job.batch_id == batch_id)
                .order_by(Attempt.job_id, Attempt.number)
            )
        )
    by_job: dict[int, list[Output]] = {}
    for out in outputs:
        by_job.setdefault(out.job_id, []).append(out)
    lost: list[int] = []
    duplicates: list[str] = []
    for job in jobs:
        outs = by_job.get(job.id, [])
        expected = EditSpec.from_json(job.spec).n if job.state == "succeeded" else 0
        duplicates += [f"job {job.id} output {o.index}" for o in outs[expected:]]
        if job.state not in TERMINAL:
            lost.append(job.id)
        elif job.state == "succeeded":
            good = {
                o.index
                for o in outs
                if o.uri and Path(o.uri).is_file() and sha256_file(Path(o.uri)) == o.sha256
            }
            if good != set(range(1, expected + 1)):
                lost.append(job.id)
    recorded = {str(Path(o.uri).resolve()) for o in outputs if o.uri}
    litter: list[str] = []
    if out_dir.is_dir():
        for path in sorted(out_dir.rglob("*")):
            report = path.name.startswith("report-")
            if path.is_file() and not report and str(path.resolve()) not in recorded:
                # A process killed inside an atomic write leaves its temporary file: not an
                # output (the final name is written once, by whoever collects it next).
                (litter if path.name.startswith(".tmp-") else duplicates).append(str(path))
    billed, per_request = billed_total(billing_log)
    paid_ids = {a.request_id for a in attempts if a.cost_usd and a.request_id}
    unrecorded = set(per_request) - paid_ids
    guessed = [a for a in attempts if a.cost_estimated]
    return Audit(
        jobs=len(jobs),
        succeeded=sum(1 for j in jobs if j.state == "succeeded"),
        failed=sum(1 for j in jobs if j.state == "failed"),
        lost=lost,
        duplicates=duplicates,
        ledger_usd=sum((a.cost_usd for a in attempts), start=Decimal(0)),
        billed_usd=billed,
        billed_calls=len(per_request),
        unrecorded_bills=unrecorded,
        in_flight=sum(1 for a in attempts if a.outcome == "in_flight"),
        failed_without_message=[
            j.id for j in jobs if j.state == "failed" and not (j.last_error_message or "").strip()
        ],
        attempts=attempts,
        temporaries=litter,
        unrecorded_usd=sum((per_request[r] for r in unrecorded), start=Decimal(0)),
        estimated_usd=sum((a.cost_usd for a in guessed), start=Decimal(0)),
        estimated_calls=len(guessed),
    )


def flushall(redis_url: str) -> None:
    """Lose every message: the queue, the unacked bookkeeping, the limiter's keys."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()


REAP = "from worker.tasks import reap; print(reap())"
"""What celery beat runs every minute (`editbatch.reap`), run once in a fresh process."""


# -- the tests ---------------------------------------------------------------------------------


def test_worker_sigkilled_mid_call_is_retried_once_and_billed_once(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """SIGKILL a worker while its call hangs in the API; a second worker plus the reaper finish
    the job: one set of outputs, the first attempt `interrupted` and booked at the job's
    estimate as a lost answer (here the API made none: its hang ends in a 500, so the ledger is
    over the bill by exactly that estimate), the second `ok`."""
    config = SandboxConfig(latency_ms=20, hang_seconds=60)
    rows = small_rows(tmp_path / "in", 4)
    # The first request with this prompt hangs (the sandbox's timeout fault); a retry does not.
    rows[0]["prompt"] = "white studio background, slow one #sandbox:timeoutx1"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    lease = shortest_lease(8)
    with stack(
        tmp_path,
        redis_url,
        database_url,
        config,
        EDITBATCH_LEASE_SECONDS=str(lease),
        EDITBATCH_REQUEST_TIMEOUT_SECONDS=str(lease - 2),  # the kill comes long before
    ) as st:
        first = st.worker("w1", concurrency=2)
        batch_id = st.submit(manifest)
        with st.db.session() as s:
            slow_id = s.scalar(select(Job.id).where(Job.batch_id == batch_id, Job.row_number == 1))

        def slow_call_in_flight() -> bool:
            with st.db.session() as s:
                outcomes = s.scalars(select(Attempt.outcome).where(Attempt.job_id == slow_id))
                return list(outcomes) == ["in_flight"] and st.sandbox.sandbox.stats.in_flight == 1

        wait_for(lambda: st.counts(batch_id).get("succeeded") == 3, 60, "the 3 fast jobs")
        wait_for(slow_call_in_flight, 30, "the slow call to be in flight")
        first.kill()

        # The database cannot know yet: the job still looks taken, its attempt still in flight.
        with st.db.session() as s:
            job = s.get(Job, slow_id)
            assert job is not None and job.state == "running" and job.lease_until is not None
            lease_until = aware(job.lease_until)
        # The sandbox sees the client go away and bills nothing for the call.
        wait_for(
            lambda: st.sandbox.sandbox.stats.snapshot()["by_status"].get("disconnected") == 1,
            10,
            "the sandbox to see the dead client",
        )

        st.worker("w2", concurrency=2)
        # Nothing happens on its own: the message sits unacknowledged in Redis until the
        # visibility timeout (the lease + 5 minutes). The reaper (beat, every minute) requeues
        # the job once its lease has expired and sends it again.
        wait_for(
            lambda: datetime.now(UTC) > lease_until + timedelta(seconds=0.2),
            lease + 5,
            "the lease to expire",
        )
        with st.db.session() as s:
            assert s.scalar(select(Job.state).where(Job.id == slow_id)) == "running"
        reaped = st.python(REAP)
        assert reaped.returncode == 0, reaped.stderr
        assert reaped.stdout.strip() == "1", reaped.stdout + reaped.stderr
        st.wait_finished(batch_id, 60)

        result = audit(st.db, batch_id, st.out, st.billing_log)
        result.assert_clean()
        assert (result.jobs, result.succeeded) == (4, 4)
        assert result.billed_calls == 4
        slow = [a for a in result.attempts if a.job_id == slow_id]
        assert [a.outcome for a in slow] == ["interrupted", "ok"]
        with st.db.session() as s:
            job = s.get(Job, slow_id)
            assert job is not None and job.attempts == 2
            assert slow[0].cost_usd == job.estimated_usd and slow[0].cost_estimated
            assert slow[0].error_code == "answer_lost" and slow[0].finished_at is not None
            assert "worker stopped" in (slow[0].error_message or "")
            assert slow[1].cost_usd > 0 and slow[1].request_id
            assert job.cost_usd == slow[0].cost_usd + slow[1].cost_usd
        assert result.ledger_usd - result.billed_usd == slow[0].cost_usd
        files = sorted(p.name for p in st.out.iterdir() if not p.name.startswith("report-"))
        assert files == [f"SKU{i:04d}_1.png" for i in range(4)]


def test_redis_flushall_mid_batch_then_resume_loses_nothing_and_pays_once(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    """FLUSHALL while two workers run a batch: the queued messages are gone. `editbatch resume`
    re-sends the unfinished jobs from the database; none is lost, none is paid twice."""
    jobs_total = 40
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", 40))
    with stack(tmp_path, redis_url, database_url, SandboxConfig(latency_ms=250)) as st:
        st.worker("w1", concurrency=3)
        st.worker("w2", concurrency=3)
        batch_id = st.submit(manifest)
        wait_for(lambda: st.done(batch_id) >= 8, 60, "8 jobs done")
        flushall(redis_url)
        done_at_flush = st.done(batch_id)
        # Nothing is left to deliver: the calls in flight finish, then the batch stalls.
        wait_for(
            lambda: st.counts(batch_id).get("running", 0) == 0, 30, "the calls in flight to end"
        )
        time.sleep(1.0)
        stalled = st.done(batch_id)
        assert stalled < jobs_total, "the flush lost nothing: the test did not test anything"
        assert stalled <= done_at_flush + 6 + 1  # at most the calls in flight finished
        assert st.batch_state(batch_id) == "running"

        st.resume(batch_id)
        st.wait_finished(batch_id, 90)

        result = audit(st.db, batch_id, st.out, st.billing_log)
        result.assert_clean()
        assert (result.jobs, result.succeeded) == (jobs_total, jobs_total)
        assert result.billed_calls == jobs_total  # no job paid twice
        assert len(result.attempts) == jobs_total  # no fault injected: one call per job
    report = json.loads((st.out / f"report-{batch_id}.json").read_text())
    assert [j["state"] for j in report["jobs"]] == ["succeeded"] * jobs_total


def test_reaper_resends_a_lost_message_when_the_broker_queue_is_empty(
    tmp_path: Path, redis_url: str
) -> None:
    """The reaper's own case: Redis lost the message of a queued job and the queue is empty (in
    Redis an empty queue is no key at all). The reaper sends the job again; a worker runs it."""
    import redis

    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", 2))
    with stack(tmp_path, redis_url, database_url) as st:
        batch_id = st.submit(manifest)
        flushall(redis_url)
        with st.db.session() as s:  # waited long enough to count as lost (STALE_QUEUED_SECONDS)
            for job in s.scalars(select(Job).where(Job.batch_id == batch_id)):
                job.updated_at = datetime.now(UTC) - timedelta(minutes=10)
            s.commit()
        reaped = st.python(REAP)
        assert reaped.returncode == 0, reaped.stderr[-2000:]
        assert reaped.stdout.strip() == "2"
        client = redis.Redis.from_url(redis_url)
        assert client.llen("editbatch") == 2
        client.close()
        st.worker("w1", concurrency=2)
        st.wait_finished(batch_id, 30)
        result = audit(st.db, batch_id, st.out, st.billing_log)
        result.assert_clean()
        assert result.succeeded == result.billed_calls == 2
