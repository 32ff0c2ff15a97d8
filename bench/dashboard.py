"""Benchmark: the dashboard's pages on a batch of 1,000,000 jobs (PostgreSQL by default).

    python bench/dashboard.py [--jobs 1000000 --db postgresql sqlite --runs 5]

Fills a fresh database like bench/status.py (one batch in a realistic mix of states, attempts,
one output per succeeded job, through the counters' triggers), with a `category` metadata
column on every row (100 values, so migration 0007's trigger fills job_metadata too), plus
review decisions on 10% of the outputs (90% approved), and a few other batches. VACUUM
ANALYZE afterwards (autovacuum's steady state: PostgreSQL's index-only scans need the
visibility map). Then serves the dashboard with uvicorn on a free port and prints, for each
page, the server's own time (the `Server-Timing: app;dur=` header the app sets): the first
request (cold) and the median of --runs more (warm). Target: each page under 100 ms.

Last, the gallery's first page of 200 outputs with real images: 200 outputs (1024x1024 PNGs
of noise, ~3 MB each: the worst case to decode) and their inputs get thumbnails made on the
first request (cold) and read from the cache after (warm), fetched one by one and with six
connections at a time as a browser does. Also: the cost of the metadata trigger on an
`INSERT ... SELECT` of --jobs/10 jobs (PostgreSQL: the trigger disabled for comparison).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import status as status_bench
from _common import Timer, noise_image, product_image
from sqlalchemy import text

from pipeline.db.session import Database
from pipeline.settings import Settings
from pipeline.web import Dashboard
from tests.servers import PostgresServer
from tests.web.conftest import DashboardServer

TARGET_MS = 100.0
GALLERY = 200
CATEGORIES = 100
# jobs.spec of the bench rows, with a metadata column (n is the row number).
SPEC_SQL = (
    '\'{"row": \' || n || \', "key": "SKU-\' || n || \'",'
    '"images":["/data/catalogue/img/p00042.png"],"prompt":"Replace the background '
    'with a seamless white studio sweep","model":"gpt-image-1.5","size":"1024x1024",'
    '"quality":"low","n": 1,"output_format":"png","output":"{id}_{index}.{ext}",'
    '"mask_mode":"guide","metadata":{"category":"c\' || (n % ' + str(CATEGORIES) + ") || '\"}}'"
)


_plain_jobs_sql = status_bench.jobs_sql


def jobs_sql_with_metadata(pg: bool) -> str:
    """bench/status.py's INSERT ... SELECT of jobs, with a spec that has a metadata column."""
    return _plain_jobs_sql(pg).replace(":spec", SPEC_SQL)


def fill(db: Database, jobs: int) -> int:
    """The big batch (+ reviews, + three small batches listed before it on the batches page)."""
    status_bench.jobs_sql = jobs_sql_with_metadata  # what status_bench.fill inserts
    try:
        with Timer() as t:
            batch_id, seconds = status_bench.fill(db, jobs)
    finally:
        status_bench.jobs_sql = _plain_jobs_sql
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    print(f"  filled {jobs:,} jobs (metadata trigger included) in {t.seconds:.1f} s ({parts})")
    pg = not db.is_sqlite
    ts = "now()" if pg else "CURRENT_TIMESTAMP"
    with Timer() as t, db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO reviews (output_id, batch_id, job_id, decision, note, decided_at) "
                "SELECT o.id, :b, o.job_id, CASE WHEN o.id % 100 < 9 THEN 'approved' "
                f"ELSE 'rejected' END, NULL, {ts} FROM outputs o WHERE o.id % 100 < 10"
            ),
            {"b": batch_id},
        )
        for i in range(3):
            conn.execute(
                text(
                    "INSERT INTO batches (name, created_at, manifest_uri, manifest_sha256, "
                    "output_uri, state, reserved_usd, settings) VALUES (:n, "
                    f"{ts}, '', '', '', 'finished', 0, '{{}}')"
                ),
                {"n": f"small-{i}"},
            )
    print(f"  review decisions on 10% of the outputs: {t.seconds:.1f} s")
    with Timer() as t:
        if pg:
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))
        else:
            with db.engine.begin() as conn:
                conn.execute(text("ANALYZE"))
    print(f"  {'VACUUM ANALYZE' if pg else 'ANALYZE'}: {t.seconds:.1f} s")
    return batch_id


def trigger_cost(db: Database, jobs: int) -> None:
    """INSERT ... SELECT of another batch with metadata, with and without the trigger (PG)."""
    count = max(jobs // 10, 1)

    def insert() -> float:
        with Timer() as t, db.engine.begin() as conn:
            other = conn.execute(
                text(
                    "INSERT INTO batches (name, created_at, manifest_uri, manifest_sha256, "
                    "output_uri, state, reserved_usd, settings) VALUES ('other', now(), '', "
                    "'', '', 'finished', 0, '{}') RETURNING id"
                )
            ).scalar_one()
            conn.execute(
                text(jobs_sql_with_metadata(True)),
                {"batch": other, "count": count},
            )
        return t.seconds

    def disabled() -> float:
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE jobs DISABLE TRIGGER jobs_metadata_ins"))
        try:
            return insert()
        finally:
            with db.engine.begin() as conn:
                conn.execute(text("ALTER TABLE jobs ENABLE TRIGGER jobs_metadata_ins"))

    # Alternated, best of two each: the first insert into a grown table pays for extending it.
    runs = [(disabled(), insert()) for _ in range(2)]
    without = min(r[0] for r in runs)
    with_trigger = min(r[1] for r in runs)
    print(
        f"  INSERT ... SELECT of {count:,} jobs with a metadata column: {without:.2f} s without "
        f"the job_metadata trigger, {with_trigger:.2f} s with it"
    )


def get(port: int, path: str) -> tuple[int, float, int]:
    """(status, server ms from Server-Timing, body bytes) of one GET on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", path, headers={"accept": "text/html", "host": "127.0.0.1"})
        response = conn.getresponse()
        body = response.read()
        timing = response.getheader("server-timing", "app;dur=nan")
        return response.status, float(timing.split("dur=")[1]), len(body)
    finally:
        conn.close()


def measure(port: int, label: str, path: str, runs: int) -> None:
    status, cold, size = get(port, path)
    if status != 200:
        raise RuntimeError(f"{path}: HTTP {status}")
    warm = statistics.median(get(port, path)[1] for _ in range(runs))
    verdict = "ok" if warm < TARGET_MS else "OVER"
    print(
        f"    {label:<44} cold {cold:7.1f} ms  warm {warm:7.1f} ms  "
        f"({size / 1024:6.1f} KiB)  {verdict}"
    )


def images(db: Database, batch_id: int, work: Path) -> list[str]:
    """Real files for the gallery's first page: 200 outputs and their inputs."""
    out_dir, in_dir = work / "out", work / "in"
    noise = noise_image(work / "noise.png", 1024, 1)
    source = product_image(work / "source.png", 1024, 2)
    with db.engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT o.id, o.job_id FROM jobs j JOIN outputs o ON o.job_id = j.id "
                "WHERE j.batch_id = :b AND j.state = 'succeeded' ORDER BY j.id, o.id LIMIT :n"
            ),
            {"b": batch_id, "n": GALLERY},
        ).all()
        conn.execute(
            text("UPDATE batches SET output_uri = :u WHERE id = :b"),
            {"u": str(out_dir), "b": batch_id},
        )
        for output_id, job_id in rows:
            target = out_dir / f"SKU-{job_id}_1.png"
            picture = in_dir / f"p{job_id}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(noise, target)
            shutil.copyfile(source, picture)
            conn.execute(
                text("UPDATE outputs SET uri = :u WHERE id = :o"),
                {"u": str(target), "o": output_id},
            )
            conn.execute(
                text(
                    "UPDATE jobs SET spec = replace(spec, '/data/catalogue/img/p00042.png', :p) "
                    "WHERE id = :j"
                ),
                {"p": str(picture), "j": job_id},
            )
    urls = []
    for output_id, job_id in rows:
        urls.append(f"/batches/{batch_id}/outputs/{output_id}/image")
        urls.append(f"/batches/{batch_id}/jobs/{job_id}/inputs/0/image?size=thumb")
    return urls


def fetch_all(port: int, urls: list[str], parallel: int) -> tuple[float, float]:
    """(wall seconds, summed server seconds) to fetch every URL, `parallel` at a time."""
    one: Callable[[str], tuple[int, float, int]] = lambda u: get(port, u)  # noqa: E731
    with Timer() as t, ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(one, urls))
    bad = [u for u, r in zip(urls, results, strict=True) if r[0] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} images failed, first {bad[0]}")
    return t.seconds, sum(r[1] for r in results) / 1000


def run(kind: str, url: str, jobs: int, runs: int, work: Path) -> None:
    db = Database(url)
    print(f"{kind}:")
    batch_id = fill(db, jobs)
    settings = Settings(home=work / "home", database_url=url)
    with DashboardServer(Dashboard(db, settings)) as server:
        port = server.port
        b = f"/batches/{batch_id}"
        print(f"  server time per page (target < {TARGET_MS:.0f} ms), {jobs:,} jobs:")
        for label, path in (
            ("batches page", "/"),
            ("batch page", b),
            ("batch page, live part (polled)", f"{b}/live"),
            ("batch page, reuse savings (fetched after)", f"{b}/reuse"),
            ("jobs: first page", f"{b}/jobs"),
            ("jobs: after row 900,000", f"{b}/jobs?after=900000"),
            ("jobs: state=failed", f"{b}/jobs?state=failed"),
            ("jobs: state=retrying after row 500,000", f"{b}/jobs?state=retrying&after=500000"),
            ("jobs: code=moderation_blocked", f"{b}/jobs?code=moderation_blocked"),
            (
                "jobs: model=gpt-image-1.5, previous page",
                f"{b}/jobs?model=gpt-image-1.5&before=700000",
            ),
            ("jobs: id SKU-123457", f"{b}/jobs?key=SKU-123457"),
            ("jobs: category=c7", f"{b}/jobs?meta=category&value=c7"),
            ("jobs: category=c7 and state=failed", f"{b}/jobs?meta=category&value=c7&state=failed"),
            ("gallery: 200 outputs", f"{b}/gallery"),
            ("gallery: 200 rejected", f"{b}/gallery?review=rejected"),
            ("gallery: 200 unreviewed", f"{b}/gallery?review=unreviewed"),
            ("gallery: category=c7", f"{b}/gallery?meta=category&value=c7"),
            ("re-run form (rejected rows, first 500)", f"{b}/rerun"),
        ):
            measure(port, label, path, runs)
        urls = images(db, batch_id, work / "files")
        print(f"  gallery thumbnails: {GALLERY} outputs (1024x1024 PNG, ~3 MB) + {GALLERY} inputs")
        for label, parallel in (("one at a time", 1), ("6 connections", 6)):
            cache = settings.home / "thumbs"
            shutil.rmtree(cache, ignore_errors=True)
            cold_wall, cold_server = fetch_all(port, urls, parallel)
            warm_wall, warm_server = fetch_all(port, urls, parallel)
            print(
                f"    {label:<15} cold {cold_wall:6.2f} s wall ({cold_server:6.2f} s server), "
                f"warm {warm_wall:6.2f} s wall ({warm_server:6.2f} s server)"
            )
        cached = sum(p.stat().st_size for p in (settings.home / "thumbs").glob("*.webp"))
        print(f"    thumbnail cache: {cached / 1024 / (2 * GALLERY):.1f} KiB per image")
    if not db.is_sqlite:
        trigger_cost(db, jobs)
    db.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", nargs="+", choices=("sqlite", "postgresql"), default=["postgresql"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="editbatch-dashboard-") as name:
        tmp = Path(name)
        for kind in args.db:
            pg = PostgresServer(tmp) if kind == "postgresql" else None
            try:
                url = pg.create_database() if pg else f"sqlite:///{tmp / 'dashboard.db'}"
                run(kind, url, args.jobs, args.runs, tmp / kind)
            finally:
                if pg is not None:
                    pg.stop()
            time.sleep(0.1)
            print()


if __name__ == "__main__":
    main()
