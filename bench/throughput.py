"""Benchmark: the whole distributed pipeline against the sandbox, next to two baselines.

    python bench/throughput.py                 # the issue's case: R=300/min, L=2 s, K=20, N=1000
    python bench/throughput.py --mode memory   # 200 calls in flight, ~2 MB outputs, 1 worker

Starts a real redis-server, the sandbox in its own process (lognormal latency with median L,
`rate_limit_per_minute` R enforced with 429s) and W real `celery -A worker.app worker`
processes (threads pool) sharing the Redis limiter (EDITBATCH_IMAGES_PER_MINUTE=R,
EDITBATCH_MAX_IN_FLIGHT=K), submits N jobs with `editbatch submit --json` and waits for the
batch to finish. Then, on the same sandbox (counters and rate window reset between runs):

  asyncio     one process, `openai.AsyncOpenAI`, a semaphore of K and the same R pacing, 429s
              waited out and re-paced: the best a hand-written script does.
  sequential  `client.images.edit` one call after another, on a subset, extrapolated to N.

Prints throughput against the ceiling min(R, K/L) (L = mean latency), makespan against the
ideal N/ceiling + L, 429s and wasted attempts, worker CPU seconds per job and peak RSS per
worker, and editbatch's ratio to each baseline. docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
from _common import (
    FAKE_KEY,
    REPO,
    Latency,
    SandboxProcess,
    cpu_seconds,
    env_with,
    fmt_s,
    mb,
    noise_image,
    peak_rss_bytes,
    product_image,
    steady_rate,
    write_csv,
)
from sqlalchemy import func, select

from pipeline.db.models import Attempt, Batch, Job, Output
from pipeline.db.session import Database
from tests.servers import PostgresServer, RedisServer, start_workers

MODEL = "gpt-image-1.5"
LOCKED = b"database is locked"
LIMITER_POOL_DEFAULT = 100  # redis-py's default max_connections per client (>= 6)

# Mode defaults; every one can be overridden by its flag.
MODES: dict[str, dict[str, Any]] = {
    # The target case.
    "throughput": dict(
        rate=300,
        latency_ms=2000.0,
        sigma=0.25,
        in_flight=20,
        jobs=1000,
        workers=2,
        size="1024x1024",
        output_format="png",
        input="product",
        input_side=256,
        baselines=True,
    ),
    # 200 calls in flight in ONE worker, each answered with a ~2 MB image (a 1024x1024 JPEG at
    # quality 100 of an upscaled noise picture: 2.0 MB; see docs/performance.md).
    "memory": dict(
        rate=600,
        latency_ms=20000.0,
        sigma=0.1,
        in_flight=200,
        jobs=600,
        workers=1,
        size="1024x1024",
        output_format="jpeg",
        input="noise",
        input_side=512,
        baselines=False,
    ),
}


@dataclass
class Edit:
    """One manifest row, as the baselines send it."""

    image: Path
    prompt: str


@dataclass
class RunResult:
    """What one client (editbatch or a baseline) did on the sandbox."""

    label: str
    jobs: int
    makespan: float
    steady_per_s: float
    succeeded: int
    requests: int
    rate_limited_429: int
    by_status: dict[str, int]
    max_in_flight: int
    cpu_s: float
    notes: list[str] = field(default_factory=list)
    extrapolated_from: int | None = None


# -- inputs ----------------------------------------------------------------------------------


def make_inputs(folder: Path, args: argparse.Namespace) -> tuple[Path, list[Edit]]:
    """N manifest rows over a few images; every prompt differs, so no two jobs are identical
    (editbatch would otherwise reuse one job's outputs for its twin and skip the call)."""
    maker = noise_image if args.input == "noise" else product_image
    images = [maker(folder / f"img{i}.png", args.input_side, seed=i) for i in range(8)]
    jobs = [
        Edit(images[i % len(images)], f"white studio background, variant {i}")
        for i in range(args.jobs)
    ]
    manifest = write_csv(
        folder / "manifest.csv",
        ["id", "image", "prompt", "model", "size", "quality", "output_format"],
        (
            [f"SKU{i:06d}", j.image.name, j.prompt, MODEL, args.size, "low", args.output_format]
            for i, j in enumerate(jobs)
        ),
    )
    return manifest, jobs


# -- editbatch -------------------------------------------------------------------------------


def _ts(value: datetime) -> float:
    """A DB timestamp as epoch seconds (SQLite hands back naive UTC)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def run_editbatch(
    args: argparse.Namespace,
    sandbox: SandboxProcess,
    redis: RedisServer,
    db_url: str,
    manifest: Path,
    tmp: Path,
) -> tuple[RunResult, dict[str, Any]]:
    env = {
        "EDITBATCH_BROKER_URL": redis.url,
        "EDITBATCH_DATABASE_URL": db_url,
        "EDITBATCH_HOME": str(tmp / "home"),
        "EDITBATCH_IMAGES_PER_MINUTE": str(args.rate),
        "EDITBATCH_MAX_IN_FLIGHT": str(args.in_flight),
        "EDITBATCH_CONCURRENCY": str(args.concurrency),
        "OPENAI_BASE_URL": sandbox.base_url,
        "OPENAI_API_KEY": FAKE_KEY,
    }
    if args.pool_workaround and args.concurrency > LIMITER_POOL_DEFAULT - 10:
        # redis-py >= 6 caps a client's pool at 100 connections; the limiter's client is built
        # without a size, so > ~100 threads waiting on permits fail with MaxConnectionsError
        # and leave their jobs `running` (docs/performance.md). redis-py reads the pool size
        # from the URL.
        env["EDITBATCH_REDIS_URL"] = f"{redis.url}?max_connections={args.concurrency + 20}"
    db = Database(db_url)  # migrates once, before the workers race to do it
    workers = start_workers(env, tmp, args.workers, args.concurrency)
    extra: dict[str, Any] = {}
    try:
        sandbox.reset()
        cpu0 = {w.proc.pid: cpu_seconds(w.proc.pid) for w in workers}
        redis_cpu0 = cpu_seconds(redis.proc.pid)
        t0 = time.time()
        submit = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "submit",
                str(manifest),
                "--json",
                "--output",
                str(tmp / "out"),
            ],
            cwd=REPO,
            env=env_with(env),
            capture_output=True,
            text=True,
            timeout=600,
        )
        submit_s = time.time() - t0
        if submit.returncode != 0:
            raise RuntimeError(f"editbatch submit failed: {submit.stderr[-3000:]}")
        batch_id = int(json.loads(submit.stdout)["batch_id"])
        extra["submit_s"] = submit_s

        ceiling = min(args.rate / 60.0, args.in_flight / args.latency.mean_s)
        deadline = time.monotonic() + 3 * (args.jobs / ceiling + args.latency.mean_s) + 120
        rss_samples: dict[int, int] = {}
        while True:
            with db.session() as s:
                state = s.scalar(select(Batch.state).where(Batch.id == batch_id))
            for w in workers:
                rss_samples[w.proc.pid] = peak_rss_bytes(w.proc.pid)
            if state == "finished":
                break
            if time.monotonic() > deadline or any(w.proc.poll() is not None for w in workers):
                with db.session() as s:
                    counts = dict(
                        s.execute(
                            select(Job.state, func.count())
                            .where(Job.batch_id == batch_id)
                            .group_by(Job.state)
                        ).all()
                    )
                for w in workers:  # kept for a look after the temporary folder is gone
                    (Path(tempfile.gettempdir()) / f"editbatch-bench-{w.log.name}").write_bytes(
                        w.log.read_bytes()
                    )
                tails = "\n".join(
                    f"--- {w.log.name}\n" + "\n".join(w.log.read_text().splitlines()[-15:])
                    for w in workers
                )
                raise RuntimeError(
                    f"batch {batch_id} did not finish: {state}, jobs {counts}, "
                    f"sandbox {sandbox.stats()}\n{tails}"
                )
            time.sleep(0.25)
        cpu = sum(cpu_seconds(pid) - before for pid, before in cpu0.items())
        extra["redis_cpu"] = cpu_seconds(redis.proc.pid) - redis_cpu0
        extra["peak_rss"] = [peak_rss_bytes(w.proc.pid) for w in workers]
        stats = sandbox.stats()
    finally:
        for w in workers:
            w.stop()
    extra["locked"] = sum(w.log.read_bytes().count(LOCKED) for w in workers)
    # RedisLimiter.backoff logs this line: after a 429, or when a response said
    # x-ratelimit-remaining-requests: 0 (observe), every worker pauses.
    extra["pauses"] = sum(w.log.read_bytes().count(b"by every worker") for w in workers)
    extra["threads"] = args.concurrency
    extra["pool_workaround"] = "EDITBATCH_REDIS_URL" in env
    extra["errors"] = sum(w.log.read_bytes().count(b"Traceback") for w in workers)

    with db.session() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None and batch.finished_at is not None
        counts = dict(
            s.execute(
                select(Job.state, func.count()).where(Job.batch_id == batch_id).group_by(Job.state)
            ).all()
        )
        attempts = s.execute(
            select(Attempt.started_at, Attempt.finished_at, Attempt.outcome, Attempt.http_status)
            .join(Job, Job.id == Attempt.job_id)
            .where(Job.batch_id == batch_id)
        ).all()
        out_bytes = s.scalar(
            select(func.avg(Output.bytes))
            .join(Job, Job.id == Output.job_id)
            .where(Job.batch_id == batch_id)
        )
        finished = _ts(batch.finished_at)
    db.dispose()
    ok_times = [_ts(a.finished_at) for a in attempts if a.outcome == "ok" and a.finished_at]
    starts = sorted(_ts(a.started_at) for a in attempts)
    by_outcome = Counter(a.outcome for a in attempts)
    extra["counts"] = counts
    extra["attempts"] = len(attempts)
    extra["attempts_by_outcome"] = dict(by_outcome)
    extra["attempt_429"] = sum(1 for a in attempts if a.http_status == 429)
    extra["out_bytes"] = float(out_bytes or 0)
    extra["first_call_s"] = starts[0] - t0 if starts else float("nan")
    extra["timeline"] = timeline(ok_times, t0)
    result = RunResult(
        label="editbatch",
        jobs=args.jobs,
        makespan=finished - t0,
        steady_per_s=steady_rate(ok_times),
        succeeded=counts.get("succeeded", 0),
        requests=int(stats["requests"]),
        rate_limited_429=int(stats["by_status"].get("429", 0)),
        by_status=stats["by_status"],
        max_in_flight=int(stats["max_in_flight"]),
        cpu_s=cpu,
    )
    extra["sandbox_rate_limited"] = int(stats["rate_limited"])
    return result, extra


def timeline(times: list[float], t0: float, bucket: float = 10.0) -> str:
    """Successes per `bucket` seconds since t0, e.g. `0-10s:12 10-20s:50 ...`."""
    if not times:
        return "(none)"
    counts = Counter(int((t - t0) // bucket) for t in times)
    return " ".join(str(counts.get(i, 0)) for i in range(max(counts) + 1))


# -- baselines -------------------------------------------------------------------------------


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=MODEL, size=args.size, quality="low", output_format=args.output_format)


def _save(folder: Path, i: int, b64: str | None, ext: str) -> None:
    if b64:
        (folder / f"{i}.{ext}").write_bytes(base64.b64decode(b64))


def run_sequential(
    args: argparse.Namespace, sandbox: SandboxProcess, jobs: list[Edit], out: Path
) -> RunResult:
    """The naive script: the SDK with its defaults, one call after another."""
    sandbox.reset()
    out.mkdir(parents=True, exist_ok=True)
    subset = jobs[: args.sequential_jobs]
    client = openai.OpenAI(api_key=FAKE_KEY, base_url=sandbox.base_url)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    done = 0
    for i, job in enumerate(subset):
        with job.image.open("rb") as fh:
            response = client.images.edit(image=fh, prompt=job.prompt, **_params(args))
        _save(out, i, (response.data or [None])[0].b64_json, args.output_format)  # type: ignore[union-attr]
        done += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    client.close()
    stats = sandbox.stats()
    per_job = wall / len(subset)
    # It cannot go faster than the rate limit either (it never reaches it when L > 60/R).
    per_job_limited = max(per_job, 60.0 / args.rate)
    return RunResult(
        label="sequential",
        jobs=args.jobs,
        makespan=per_job_limited * args.jobs,
        steady_per_s=1.0 / per_job_limited,
        succeeded=done,
        requests=int(stats["requests"]),
        rate_limited_429=int(stats["by_status"].get("429", 0)),
        by_status=stats["by_status"],
        max_in_flight=int(stats["max_in_flight"]),
        cpu_s=cpu * args.jobs / len(subset),
        extrapolated_from=len(subset),
    )


async def _async_run(
    args: argparse.Namespace, base_url: str, jobs: list[Edit], out: Path
) -> tuple[float, list[float], int, int]:
    """Semaphore K + an exact pacer at R; 429s wait `retry-after`, then queue for a new slot."""
    client = openai.AsyncOpenAI(api_key=FAKE_KEY, base_url=base_url, max_retries=0, timeout=300)
    sem = asyncio.Semaphore(args.in_flight)
    interval = 60.0 / args.rate
    next_at = time.monotonic()
    lock = asyncio.Lock()
    done: list[float] = []
    seen_429 = failed = 0

    async def pace() -> None:
        nonlocal next_at
        async with lock:
            now = time.monotonic()
            at = max(next_at, now)
            next_at = at + interval
        if at > now:
            await asyncio.sleep(at - now)

    async def one(i: int, job: Edit) -> None:
        nonlocal seen_429, failed
        async with sem:
            for _ in range(10):
                await pace()
                try:
                    response = await client.images.edit(
                        image=(job.image.name, job.image.read_bytes(), "image/png"),
                        prompt=job.prompt,
                        **_params(args),
                    )
                except openai.RateLimitError as exc:
                    seen_429 += 1
                    wait = float(exc.response.headers.get("retry-after-ms", 1000)) / 1000
                    await asyncio.sleep(wait)
                    continue
                except (openai.APIConnectionError, openai.InternalServerError):
                    await asyncio.sleep(1.0)
                    continue
                _save(out, i, (response.data or [None])[0].b64_json, args.output_format)  # type: ignore[union-attr]
                done.append(time.time())
                return
            failed += 1

    t0 = time.time()
    await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    await client.close()
    return t0, done, seen_429, failed


def run_asyncio(
    args: argparse.Namespace, sandbox: SandboxProcess, jobs: list[Edit], out: Path
) -> RunResult:
    sandbox.reset()
    out.mkdir(parents=True, exist_ok=True)
    subset = jobs[: args.async_jobs]
    cpu0 = time.process_time()
    t0, done, seen_429, failed = asyncio.run(_async_run(args, sandbox.base_url, subset, out))
    cpu = time.process_time() - cpu0
    makespan = max(done) - t0 if done else float("nan")
    stats = sandbox.stats()
    scale = args.jobs / len(subset)
    return RunResult(
        label="asyncio",
        jobs=args.jobs,
        makespan=makespan * scale,
        steady_per_s=steady_rate(done),
        succeeded=len(done),
        requests=int(stats["requests"]),
        rate_limited_429=int(stats["by_status"].get("429", 0)),
        by_status=stats["by_status"],
        max_in_flight=int(stats["max_in_flight"]),
        cpu_s=cpu * scale,
        notes=[f"{seen_429} 429s seen by the client", *([f"{failed} gave up"] if failed else [])],
        extrapolated_from=len(subset) if len(subset) < args.jobs else None,
    )


# -- report ----------------------------------------------------------------------------------


def report(
    args: argparse.Namespace,
    eb: RunResult,
    extra: dict[str, Any],
    baselines: list[RunResult],
) -> None:
    lat = args.latency
    r_s = args.rate / 60.0
    k_over_l = args.in_flight / lat.mean_s
    ceiling = min(r_s, k_over_l)
    ideal = args.jobs / ceiling + lat.mean_s
    w = args.workers
    print()
    print(
        f"editbatch throughput bench ({args.mode}): N={args.jobs} jobs, R={args.rate}/min, "
        f"L median {lat.median_s * lat.time_scale:.2f} s (lognormal sigma {lat.sigma}, "
        f"time_scale {lat.time_scale}; mean {lat.mean_s:.2f} s), K={args.in_flight}, "
        f"{w} worker process{'es' if w > 1 else ''} x {extra['threads']} threads, {args.db}"
    )
    print(
        f"outputs {args.size} {args.output_format}, mean {extra['out_bytes'] / 1e6:.2f} MB; "
        f"inputs {args.input} {args.input_side}x{args.input_side} PNG"
    )
    print(
        f"ceiling = min(R, K/L) = min({args.rate}, {k_over_l * 60:,.0f}) = {ceiling * 60:,.0f}/min;"
        f" ideal makespan N/ceiling + L = {fmt_s(ideal)}"
    )
    print()
    print("editbatch")
    print(
        f"  steady-state throughput   {eb.steady_per_s * 60:7.1f}/min = "
        f"{eb.steady_per_s / ceiling:.3f} of ceiling"
    )
    print(
        f"  makespan                  {fmt_s(eb.makespan)} = {eb.makespan / ideal:.3f} x ideal "
        f"(incl. submit {extra['submit_s']:.1f} s; first call at +{extra['first_call_s']:.1f} s)"
    )
    print(f"  jobs                      {extra['counts']}")
    print(
        f"  429s                      {eb.rate_limited_429} (sandbox rate_limited "
        f"{extra['sandbox_rate_limited']}); recorded 429 attempts {extra['attempt_429']}"
    )
    wasted = extra["attempts"] - eb.succeeded
    print(
        f"  wasted attempts           {wasted} ({extra['attempts']} attempts for "
        f"{eb.succeeded} jobs; sandbox saw {eb.requests} requests {eb.by_status})"
    )
    print(f"  peak in flight (sandbox)  {eb.max_in_flight} (cap K={args.in_flight})")
    print(
        f"  CPU per job               {eb.cpu_s / args.jobs * 1000:.1f} ms "
        f"(sum of {w} workers, user+sys: {eb.cpu_s:.1f} s; redis-server "
        f"{extra['redis_cpu'] / args.jobs * 1000:.2f} ms/job)"
    )
    print(f"  peak RSS per worker       {', '.join(mb(x) for x in extra['peak_rss'])}")
    print(f"  limiter pauses            {extra['pauses']} (after a 429 or remaining-requests 0)")
    print(f"  'database is locked'      {extra['locked']} in worker logs")
    print(f"  tracebacks in worker logs {extra['errors']}")
    if extra["pool_workaround"]:
        print("  note                      limiter Redis pool sized by URL (?max_connections=)")
    print(f"  successes per 10 s        {extra['timeline']}")
    for b in baselines:
        print()
        sub = f" (measured on {b.extrapolated_from} jobs, extrapolated to {b.jobs})"
        print(f"{b.label}{sub if b.extrapolated_from else ''}")
        print(
            f"  throughput                {b.steady_per_s * 60:7.1f}/min = "
            f"{b.steady_per_s / ceiling:.3f} of ceiling"
        )
        print(f"  makespan                  {fmt_s(b.makespan)} = {b.makespan / ideal:.3f} x ideal")
        print(
            f"  429s                      {b.rate_limited_429}; requests {b.requests} for "
            f"{b.succeeded} jobs; peak in flight {b.max_in_flight}"
        )
        print(f"  CPU per job               {b.cpu_s / b.jobs * 1000:.1f} ms (the client process)")
        for note in b.notes:
            print(f"  note                      {note}")
    if baselines:
        print()
        print("editbatch vs baselines")
        for b in baselines:
            print(
                f"  vs {b.label:<11} throughput x{eb.steady_per_s / b.steady_per_s:.2f}, "
                f"makespan x{eb.makespan / b.makespan:.3f} "
                f"({'shorter' if eb.makespan < b.makespan else 'longer'}), "
                f"CPU per job x{eb.cpu_s / max(b.cpu_s, 1e-9):.2f}"
            )
    if args.mode == "memory":
        peak = max(extra["peak_rss"])
        print()
        print(
            f"memory: {eb.max_in_flight} calls in flight, outputs "
            f"{extra['out_bytes'] / 1e6:.2f} MB: peak RSS of one worker {mb(peak)} "
            f"(target < 1,536 MB: {'met' if peak < 1.5 * 2**30 else 'MISSED'})"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="throughput")
    parser.add_argument("--rate", type=int, help="R: images/min, enforced by the sandbox")
    parser.add_argument("--latency-ms", type=float, help="L: median sandbox latency, ms")
    parser.add_argument("--sigma", type=float, help="lognormal sigma of the latency")
    parser.add_argument("--time-scale", type=float, default=1.0, help="sandbox time_scale")
    parser.add_argument("--in-flight", type=int, help="K: EDITBATCH_MAX_IN_FLIGHT")
    parser.add_argument("--jobs", type=int, help="N: jobs in the batch")
    parser.add_argument("--workers", type=int, help="celery worker processes")
    parser.add_argument(
        "--concurrency", type=int, help="threads per worker (default: ceil(K/workers) + 2)"
    )
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--size", help="output size asked of the API")
    parser.add_argument("--output-format", choices=("png", "jpeg", "webp"))
    parser.add_argument("--input", choices=("product", "noise"), help="input picture kind")
    parser.add_argument("--input-side", type=int, help="side of the square input pictures")
    parser.add_argument(
        "--pool-workaround",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="size the limiter's Redis pool by URL when threads > 90 (see docs/performance.md)",
    )
    parser.add_argument("--sequential-jobs", type=int, default=20, help="subset for sequential")
    parser.add_argument("--async-jobs", type=int, help="subset for asyncio (default: N)")
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the asyncio and sequential baselines (default: in throughput mode)",
    )
    args = parser.parse_args(argv)
    for name, value in MODES[args.mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.concurrency is None:
        args.concurrency = math.ceil(args.in_flight / args.workers) + 2
    if args.async_jobs is None:
        args.async_jobs = args.jobs
    args.latency = Latency(args.latency_ms / 1000.0, args.sigma, args.time_scale)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="editbatch-bench-") as name:
        tmp = Path(name)
        manifest, jobs = make_inputs(tmp / "in", args)
        redis = RedisServer(tmp)
        pg: PostgresServer | None = None
        sandbox = SandboxProcess(
            tmp / "sandbox.log",
            latency_ms=args.latency_ms,
            latency_sigma=args.sigma,
            time_scale=args.time_scale,
            rate_limit_per_minute=args.rate,
        )
        try:
            if args.db == "postgresql":
                pg = PostgresServer(tmp)
                db_url = pg.create_database()
            else:
                db_url = f"sqlite:///{tmp / 'editbatch.db'}"
            print(f"running editbatch on {args.jobs} jobs ...", flush=True)
            eb, extra = run_editbatch(args, sandbox, redis, db_url, manifest, tmp)
            baselines = []
            if args.baselines:
                print(f"running the asyncio baseline on {args.async_jobs} jobs ...", flush=True)
                baselines.append(run_asyncio(args, sandbox, jobs, tmp / "async"))
                print(
                    f"running the sequential baseline on {args.sequential_jobs} jobs ...",
                    flush=True,
                )
                baselines.append(run_sequential(args, sandbox, jobs, tmp / "seq"))
            report(args, eb, extra, baselines)
        finally:
            sandbox.stop()
            redis.stop()
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    main()
