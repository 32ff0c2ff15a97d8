"""Benchmark: `editbatch submit` of 100,000 rows into the database and onto the Redis queue.

    python bench/submit.py [--rows 100000 --images 1000 --db sqlite|postgresql --profile]

Builds `--images` product pictures (half PNG, half JPEG, 512 px) and 20 masks, and a CSV
manifest of `--rows` rows over them (every 5th row masked, every 7th with a second image).
Starts a private redis-server (and PostgreSQL with `--db postgresql`), then:

  phases   the producer functions the CLI calls, in this process, timed phase by phase:
           manifest parse + preflight (time spent inside `check_rows`), DB insert (the rest of
           `create_batch`: rows to dicts, spec JSON, INSERTs, commit), then enqueue (reading
           the queued ids back + `worker.tasks.enqueue`, one `apply_async` per job).
  enqueue  the same 100,000 ids sent again in other ways, to find the cheap one:
           `celery`  = worker.tasks.enqueue as it is;
           `batch`   = the same apply_async calls inside kombu's `Producer.batch()` (kombu >=
                       5.7: the Redis transport buffers LPUSHes in a non-transactional pipeline).
  cli      the real `editbatch submit --json` in a fresh process on a fresh database: the
           headline figure (includes interpreter start, imports and migrations).

Every run checks the queue length against the number of accepted jobs.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import REPO, Timer, env_with, write_csv
from PIL import Image, ImageDraw

from tests.servers import PostgresServer, RedisServer

TARGET_S = 60.0
MASKS = 20


def build(folder: Path, rows: int, images: int, side: int) -> Path:
    rng = random.Random(20261121)
    names = []
    for i in range(images):
        jpeg = i % 2 == 1
        name = f"img/p{i:05d}.{'jpg' if jpeg else 'png'}"
        img = Image.new("RGB", (side, side), tuple(rng.randint(220, 250) for _ in range(3)))  # type: ignore[arg-type]
        draw = ImageDraw.Draw(img)
        c, r = side // 2, rng.randint(side // 6, side // 3)
        colour = tuple(rng.randint(20, 220) for _ in range(3))
        draw.ellipse((c - r, c - r, c + r, c + r), fill=colour)  # type: ignore[arg-type]
        draw.text((c - r // 2, c), f"SKU {i}", fill=(20, 20, 20))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(folder / name, "JPEG" if jpeg else "PNG", **({"quality": 88} if jpeg else {}))
        names.append(name)
    masks = []
    for i in range(MASKS):
        name = f"masks/m{i:03d}.png"
        mask = Image.new("RGBA", (side, side), (0, 0, 0, 255))
        ImageDraw.Draw(mask).rectangle((0, 0, side, rng.randrange(side)), fill=(0, 0, 0, 0))
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        mask.save(folder / name, "PNG")
        masks.append(name)

    def lines() -> Iterator[list[Any]]:
        for r in range(rows):
            image = names[r % images]
            if r % 7 == 3:
                image += "|" + names[(r * 31) % images]
            yield [
                f"SKU-{r:06d}",
                image,
                masks[(r // 5) % MASKS] if r % 5 == 0 else "",
                f"Replace the background with a seamless white studio sweep, take {r}",
                "gpt-image-1.5" if r % 3 else "gpt-image-2",
                "1024x1024" if r % 2 else "auto",
                ("low", "medium", "high")[r % 3],
            ]

    return write_csv(
        folder / "manifest.csv",
        ["id", "image", "mask", "prompt", "model", "size", "quality"],
        lines(),
    )


def queue_length(redis_url: str) -> int:
    from redis import Redis

    from worker.constants import QUEUE

    client = Redis.from_url(redis_url)
    try:
        return int(client.llen(QUEUE))
    finally:
        client.close()


def flush(redis_url: str) -> None:
    from redis import Redis

    client = Redis.from_url(redis_url)
    client.flushall()
    client.close()


def timed_generator(func: Callable[..., Iterator[Any]], spent: list[float]) -> Callable[..., Any]:
    """Wrap a generator function so that the time spent producing its items adds to spent[0]."""

    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        it = func(*args, **kwargs)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                spent[0] += time.perf_counter() - start
                return
            spent[0] += time.perf_counter() - start
            yield item

    return wrapper


def phases(folder: Path, manifest: Path, db_url: str, profile: bool) -> dict[str, Any]:
    """The CLI's submit path in this process, phase by phase."""
    from pipeline.batch import submit as producer
    from pipeline.cost.pricing import load_prices
    from pipeline.db.session import Database
    from pipeline.intake.catalog import load_catalog
    from pipeline.intake.manifest import Defaults
    from pipeline.intake.preflight import Preflight, PreflightOptions
    from worker import tasks

    db = Database(db_url)  # migrations: not part of any phase
    pre = Preflight(
        PreflightOptions(
            allowed_roots=(folder,), catalog=load_catalog(), work_dir=folder / "home" / "conv"
        )
    )
    spent = [0.0]
    original = producer.check_rows
    producer.check_rows = timed_generator(original, spent)  # type: ignore[assignment]
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler:
            profiler.enable()
        with Timer() as create:
            result = producer.store(
                db,
                producer.Prepared.local(manifest, Defaults(), pre),
                producer.BatchOptions(output_uri=str(folder / "out"), name="bench"),
                load_prices(),
            )
        broker = [0.0]

        def enqueue(ids: list[int]) -> None:
            start = time.perf_counter()
            tasks.enqueue(ids)
            broker[0] += time.perf_counter() - start

        with Timer() as enq:
            sent = producer.send(db, result.batch_id, enqueue)
        if profiler:
            profiler.disable()
    finally:
        producer.check_rows = original  # type: ignore[assignment]
    db.dispose()
    out = {
        "accepted": result.accepted,
        "rejected": result.rejected,
        "sent": sent,
        "parse_preflight": spent[0],
        "insert": create.seconds - spent[0],
        "enqueue": enq.seconds,
        "enqueue_broker": broker[0],
        "files_read": pre.stats.files_read,
        "batch_id": result.batch_id,
    }
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime")
        out["profile"] = stats
    return out


def batched_enqueue(ids: list[int]) -> None:
    """Prototype for worker.tasks.celery_enqueue: the same `apply_async` messages, but inside
    kombu's `Producer.batch()`, so the Redis transport LPUSHes them through one pipeline (and
    one redis client) per 1,000 instead of building a client and a round trip per message."""
    from worker.tasks import app, edit

    if not ids:
        return
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for job_id in ids:
            edit.apply_async((job_id,), producer=producer)


# `python -c BOOT submit ...`: the real CLI in a fresh process, with the prototype enqueue.
BOOT = (
    "import sys; sys.path.insert(0, {bench!r}); import submit as bench; "
    "import worker.tasks as tasks; tasks.enqueue = bench.batched_enqueue; "
    "from pipeline.cli import main; sys.argv[0] = 'editbatch'; main()"
)


def enqueue_variants(db_url: str, batch_id: int, redis_url: str) -> dict[str, float]:
    """Send the batch's ids again with each enqueue strategy; seconds per strategy."""
    from pipeline.db.jobs import queued_job_ids
    from pipeline.db.session import Database
    from worker.tasks import celery_enqueue

    db = Database(db_url)
    all_ids = [i for chunk in queued_job_ids(db, batch_id) for i in chunk]
    db.dispose()
    results = {}
    for name, send in (("celery", celery_enqueue), ("batch", batched_enqueue)):
        flush(redis_url)
        with Timer() as t:
            for start in range(0, len(all_ids), 1000):
                send(all_ids[start : start + 1000])
        length = queue_length(redis_url)
        if length != len(all_ids):
            raise AssertionError(f"{name}: {length} messages on the queue, {len(all_ids)} sent")
        results[name] = t.seconds
    return results


def same_message(redis_url: str) -> bool:
    """The batched publish sends byte-for-byte the message apply_async sends (but the ids)."""
    from redis import Redis

    from worker.constants import QUEUE
    from worker.tasks import celery_enqueue

    flush(redis_url)
    celery_enqueue([7])
    batched_enqueue([7])
    client = Redis.from_url(redis_url)
    a, b = (json.loads(m) for m in client.lrange(QUEUE, 0, -1))
    client.close()
    flush(redis_url)
    for m in (a, b):
        for key in ("id", "root_id", "correlation_id", "delivery_tag"):
            m["headers"].pop(key, None)
            m["properties"].pop(key, None)
            m["properties"].get("delivery_info", {}).pop(key, None)
    return bool(a == b)


def cli_submit(
    manifest: Path, env: dict[str, str], out: Path, prototype: bool = False
) -> tuple[float, dict[str, Any]]:
    """`editbatch submit --json` in a fresh process; `prototype`: with `batched_enqueue`."""
    if prototype:
        command = ["-c", BOOT.format(bench=str(Path(__file__).parent))]
    else:
        command = ["-m", "pipeline.cli"]
    with Timer() as t:
        proc = subprocess.run(
            [sys.executable, *command, "submit", str(manifest), "--json", "--output", str(out)],
            cwd=REPO,
            env=env_with(env),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"editbatch submit failed: {proc.stderr[-3000:]}")
    return t.seconds, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1_000)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", action="store_true", help="cProfile the phases run")
    parser.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI run")
    parser.add_argument(
        "--no-variants", dest="variants", action="store_false", help="skip enqueue variants"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="editbatch-submit-") as name:
        tmp = Path(name)
        folder = tmp / "in"
        with Timer() as t:
            manifest = build(folder, args.rows, args.images, args.side)
        print(f"made {args.images} images, {MASKS} masks, {args.rows:,} rows in {t.seconds:.1f} s")
        redis = RedisServer(tmp)
        pg = PostgresServer(tmp) if args.db == "postgresql" else None

        def new_db(label: str) -> str:
            if pg is not None:
                return pg.create_database()
            return f"sqlite:///{tmp / f'{label}.db'}"

        os.environ["EDITBATCH_BROKER_URL"] = redis.url  # read by worker.app at import
        os.environ["EDITBATCH_HOME"] = str(tmp / "home")
        try:
            db_url = new_db("phases")
            r = phases(folder, manifest, db_url, args.profile)
            length = queue_length(redis.url)
            total = r["parse_preflight"] + r["insert"] + r["enqueue"]
            print()
            print(f"submit of {args.rows:,} rows ({args.db}), in process, by phase")
            print(
                f"  manifest parse + preflight {r['parse_preflight']:7.1f} s  "
                f"({args.rows / r['parse_preflight']:,.0f} rows/s; {r['files_read']} files read)"
            )
            print(
                f"  DB insert                  {r['insert']:7.1f} s  "
                f"({r['accepted'] + r['rejected']:,} job rows; {r['rejected']} rejected)"
            )
            print(
                f"  enqueue                    {r['enqueue']:7.1f} s  "
                f"(broker {r['enqueue_broker']:.1f} s, reading ids "
                f"{r['enqueue'] - r['enqueue_broker']:.1f} s; {r['sent']:,} messages, "
                f"queue length {length:,})"
            )
            print(
                f"  total                      {total:7.1f} s  "
                f"(target < {TARGET_S:.0f} s: {'met' if total < TARGET_S else 'MISSED'})"
            )
            if "profile" in r:
                print("  (under cProfile: every phase is inflated, the enqueue about 2.5x)")
                print()
                print("profile (top 25 by own time)")
                r["profile"].stream = sys.stdout
                r["profile"].print_stats(25)
                print("profile (pipeline/ and worker/ functions, top 25 by cumulative time)")
                r["profile"].sort_stats("cumulative").print_stats(r"main/(pipeline|worker)/", 25)
            if args.variants:
                v = enqueue_variants(db_url, r["batch_id"], redis.url)
                print()
                print(
                    f"enqueue {r['sent']:,} ids, by strategy (same messages: "
                    f"{'yes' if same_message(redis.url) else 'NO'})"
                )
                for label, seconds in v.items():
                    print(f"  {label:<8} {seconds:6.1f} s  ({r['sent'] / seconds:,.0f} msg/s)")
            if args.cli:
                print()
                for label, prototype in (("as is", False), ("with batched_enqueue", True)):
                    flush(redis.url)
                    env = {
                        "EDITBATCH_BROKER_URL": redis.url,
                        "EDITBATCH_DATABASE_URL": new_db(f"cli{int(prototype)}"),
                        "EDITBATCH_HOME": str(tmp / f"home-cli{int(prototype)}"),
                    }
                    seconds, out = cli_submit(
                        manifest, env, tmp / f"out-cli{int(prototype)}", prototype
                    )
                    length = queue_length(redis.url)
                    verdict = "met" if seconds < TARGET_S else "MISSED"
                    print(
                        f"editbatch submit --json, {label} (fresh process, fresh {args.db} "
                        f"database): {seconds:.1f} s for {args.rows:,} rows; "
                        f"accepted {out['accepted']:,}, queue length {length:,} "
                        f"(target < {TARGET_S:.0f} s: {verdict})"
                    )
        finally:
            redis.stop()
            if pg is not None:
                pg.stop()


if __name__ == "__main__":
    main()
