"""Benchmark: a night through a Redis restart, with the workers' broker check off and on.

    python bench/redis_restart.py                      # 2,400 jobs, 600/min, 3 workers + beat
    python bench/redis_restart.py --kill-at 0.66       # and a worker SIGKILLed (replaced) later

Starts a private redis-server (no persistence), the sandbox in its own process (lognormal latency
with median L, `rate_limit_per_minute` R enforced with 429s), PostgreSQL (or SQLite), W real
`celery -A worker.app worker` processes and a real `celery -A worker.app beat` (the reaper every
60 s), submits N jobs with `editbatch submit --json`, and restarts Redis empty when a third of
the jobs are done (the queue, the unacknowledged deliveries and the limiter's keys are lost).
The same night runs three times: without a restart (what this machine reaches at all), with
EDITBATCH_BROKER_CHECK_SECONDS=0 (before issue 14: only the reaper re-sends, for jobs queued
and untouched for 120 s), and with the default check (2 s).

Prints, per run: makespan, throughput N/makespan against the ceiling min(R, K/L), the longest
stretch with no edit answered after the restart, attempts, billed calls (= N: nothing paid
twice). docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    FAKE_KEY,
    REPO,
    Latency,
    SandboxProcess,
    env_with,
    fmt_s,
    product_image,
    write_csv,
)
from sqlalchemy import func, select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from tests.servers import CeleryBeat, CeleryWorker, PostgresServer, RedisServer

MODEL = "gpt-image-1.5"
TERMINAL = ("succeeded", "failed", "rejected", "cancelled")


@dataclass
class Night:
    label: str
    makespan: float
    of_ceiling: float
    gap_after_restart: float
    back_after: float | None
    attempts: int
    billed: int
    succeeded: int
    requests_429: int


def _ts(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def make_manifest(folder: Path, jobs: int) -> Path:
    images = [product_image(folder / f"img{i}.png", 256, seed=i) for i in range(8)]
    return write_csv(
        folder / "manifest.csv",
        ["id", "image", "prompt", "model", "size", "quality"],
        (
            [
                f"SKU{i:06d}",
                images[i % 8].name,
                f"white studio background, variant {i}",
                MODEL,
                "1024x1024",
                "low",
            ]
            for i in range(jobs)
        ),
    )


def run_night(
    args: argparse.Namespace,
    label: str,
    check_seconds: str,
    tmp: Path,
    pg: PostgresServer | None,
    restart: bool = True,
) -> Night:
    tmp.mkdir(parents=True)
    (tmp / "redis").mkdir()
    redis = RedisServer(tmp / "redis")
    sandbox = SandboxProcess(
        tmp / "sandbox.log",
        latency_ms=args.latency_ms,
        latency_sigma=args.latency.sigma,
        rate_limit_per_minute=args.rate,
        billing_log=str(tmp / "billing.jsonl"),
    )
    db_url = pg.create_database() if pg else f"sqlite:///{tmp / 'editbatch.db'}"
    env = {
        "PYTHONPATH": str(REPO),
        "EDITBATCH_BROKER_URL": redis.url,
        "EDITBATCH_DATABASE_URL": db_url,
        "EDITBATCH_HOME": str(tmp / "home"),
        "EDITBATCH_IMAGES_PER_MINUTE": str(args.rate),
        "EDITBATCH_MAX_IN_FLIGHT": str(args.in_flight),
        "EDITBATCH_CONCURRENCY": str(args.concurrency),
        "EDITBATCH_LEASE_SECONDS": str(args.lease),
        "EDITBATCH_REQUEST_TIMEOUT_SECONDS": str(args.timeout),
        "EDITBATCH_BROKER_CHECK_SECONDS": check_seconds,
        "OPENAI_BASE_URL": sandbox.base_url,
        "OPENAI_API_KEY": FAKE_KEY,
    }
    manifest = make_manifest(tmp / "in", args.jobs)
    db = Database(db_url)
    workers = [
        CeleryWorker(env, tmp / f"w{i}.log", args.concurrency, name=f"w{i}")
        for i in range(args.workers)
    ]
    beat = CeleryBeat(env, tmp / "beat.log")
    restarted = 0.0
    try:
        sandbox.reset()
        t0 = time.time()
        submit = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "submit", str(manifest), "--json",
             "--output", str(tmp / "out")],
            cwd=REPO, env=env_with(env), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if submit.returncode != 0:
            raise RuntimeError(submit.stderr[-3000:])
        batch_id = int(json.loads(submit.stdout)["batch_id"])

        def done() -> int:
            with db.session() as s:
                return int(
                    s.scalar(
                        select(func.count()).where(
                            Job.batch_id == batch_id, Job.state.in_(TERMINAL)
                        )
                    )
                    or 0
                )

        killed = False
        deadline = time.monotonic() + 3600
        while True:
            finished = done()
            if restart and not restarted and finished >= args.restart_at * args.jobs:
                redis.restart()
                restarted = time.time()
                print(f"  {label}: Redis restarted empty at {restarted - t0:.0f} s", flush=True)
            if args.kill_at and not killed and finished >= args.kill_at * args.jobs:
                workers[0].kill()
                workers[0] = CeleryWorker(env, tmp / "w0b.log", args.concurrency, name="w0b")
                killed = True
                print(f"  {label}: worker w0 killed at {time.time() - t0:.0f} s", flush=True)
            with db.session() as s:
                state = s.scalar(select(Batch.state).where(Batch.id == batch_id))
            if state == "finished":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: the batch did not finish ({finished} done)")
            time.sleep(0.25)
        stats = sandbox.stats()
        with db.session() as s:
            batch = s.get(Batch, batch_id)
            assert batch is not None and batch.finished_at is not None
            end = _ts(batch.finished_at)
            ok = sorted(
                _ts(t)
                for t in s.scalars(
                    select(Attempt.finished_at)
                    .join(Job, Job.id == Attempt.job_id)
                    .where(Job.batch_id == batch_id, Attempt.outcome == "ok")
                )
            )
            attempts = s.scalar(
                select(func.count()).select_from(Attempt).join(Job, Job.id == Attempt.job_id)
            )
            succeeded = s.scalar(
                select(func.count()).where(Job.batch_id == batch_id, Job.state == "succeeded")
            )
    finally:
        beat.stop()
        for w in workers:
            w.stop()
        db.dispose()
        sandbox.stop()
        redis.stop()
    billed = sum(1 for line in (tmp / "billing.jsonl").read_text().splitlines() if line)
    ceiling = min(args.rate / 60.0, args.in_flight / args.latency.mean_s)
    makespan = end - t0
    if not restarted:  # no restart: measure around the same point of the night
        restarted = ok[int(len(ok) * args.restart_at)] if ok else t0
    after = [t for t in ok if t >= restarted]
    gaps = [b - a for a, b in zip([restarted, *after], after, strict=False)]
    window = 3.0
    before = [t for t in ok if restarted - 10 <= t < restarted]
    rate_before = len(before) / 10
    back_after = next(
        (
            t - restarted
            for t in after
            if t >= restarted + window
            and sum(1 for u in after if t - window <= u < t) / window >= rate_before / 2
        ),
        None,
    )
    return Night(
        label=label,
        makespan=makespan,
        of_ceiling=args.jobs / makespan / ceiling,
        gap_after_restart=max(gaps, default=0.0),
        back_after=back_after,
        attempts=int(attempts or 0),
        billed=billed,
        succeeded=int(succeeded or 0),
        requests_429=int(stats["by_status"].get("429", 0)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2400)
    parser.add_argument("--rate", type=int, default=600, help="images per minute (R)")
    parser.add_argument("--latency-ms", type=float, default=2000.0, help="median latency (L)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10, help="threads per worker")
    parser.add_argument("--in-flight", type=int, default=28, help="EDITBATCH_MAX_IN_FLIGHT (K)")
    parser.add_argument("--lease", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--restart-at", type=float, default=1 / 3)
    parser.add_argument("--kill-at", type=float, default=0.0, help="also kill a worker (0: no)")
    parser.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument(
        "--check",
        choices=("all", "none", "on", "off"),
        default="all",
        help="none: no restart; off/on: a restart with the broker check off/on; all: the three",
    )
    args = parser.parse_args()
    args.latency = Latency(args.latency_ms / 1000.0, args.sigma)
    ceiling = min(args.rate / 60.0, args.in_flight / args.latency.mean_s)
    print(
        f"N={args.jobs}, R={args.rate}/min, L={args.latency_ms:.0f} ms (mean "
        f"{args.latency.mean_s:.2f} s), K={args.in_flight}, {args.workers} workers x "
        f"{args.concurrency} threads + beat, {args.db}; ceiling {ceiling * 60:.0f}/min, ideal "
        f"{fmt_s(args.jobs / ceiling + args.latency.mean_s)}; Redis restarted empty at "
        f"{args.restart_at:.0%} of the jobs"
        + (f", a worker killed at {args.kill_at:.0%}" if args.kill_at else ""),
        flush=True,
    )
    variants = {"none": "2", "off": "0", "on": "2"}
    labels = {"none": "no restart", "off": "restart, broker check off", "on": "restart, check on"}
    chosen = list(variants) if args.check == "all" else [args.check]
    pg = PostgresServer() if args.db == "postgresql" else None
    nights = []
    try:
        with tempfile.TemporaryDirectory(prefix="editbatch-bench-redis-") as folder:
            for name in chosen:
                nights.append(
                    run_night(
                        args,
                        labels[name],
                        variants[name],
                        Path(folder) / name,
                        pg,
                        restart=name != "none",
                    )
                )
    finally:
        if pg:
            pg.stop()
    print()
    base = next((n for n in nights if n.label == labels["none"]), None)
    print(
        "| run | makespan | N/makespan of ceiling | of the no-restart night | longest gap after "
        "restart | back to half rate | attempts | billed calls | succeeded | 429s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in nights:
        back = "never" if n.back_after is None else f"{n.back_after:.1f} s"
        relative = f"{n.of_ceiling / base.of_ceiling:.3f}" if base else "-"
        print(
            f"| {n.label} | {fmt_s(n.makespan)} | {n.of_ceiling:.3f} | {relative} "
            f"| {n.gap_after_restart:.1f} s | {back} | {n.attempts} | {n.billed} | {n.succeeded} "
            f"| {n.requests_429} |"
        )


if __name__ == "__main__":
    main()
