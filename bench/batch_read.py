"""Benchmark: reading a batch output file of several GB, as the batch route collects it.

    python bench/batch_read.py                 # a 2.1 GB output file, ~1,300 lines of ~1.6 MB
    python bench/batch_read.py --gb 4 --side 640

Writes an output file of the Batch API's shape (one JSON line per finished request: custom_id,
status 200, request id, `usage`, one base64 PNG of random pixels, so nothing compresses) and
serves it from the sandbox, in a process of its own, as the output file of a completed
provider batch. Then, each in a fresh process whose peak RSS (the kernel's VmHWM) and CPU time
are measured:

  read      the file streamed over HTTP through the SDK (`BatchAPI.content`), split into
            lines (`lines.split_lines`), each parsed, decoded and its PNG verified
            (`lines.read_answer`): the reading alone.
  collect   `collect.collect` on a provider batch of that many jobs (SQLite): every line booked
            in its transaction, its image spooled then written to its final name, as a real
            collection does.

Prints lines/s, MB/s of the file, MB/s per core (bytes / CPU seconds) and the peak RSS of each,
held to the issue's bound: under 300 MB however large the file (it is never held whole).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from _common import FAKE_KEY, REPO, noise_image

RSS_BOUND = 300 * 1024 * 1024
MODEL = "gpt-image-2"
USAGE = {
    "input_tokens": 210,
    "input_tokens_details": {"image_tokens": 194, "text_tokens": 16},
    "output_tokens": 1056,
    "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0},
    "total_tokens": 1266,
}


def write_output_file(folder: Path, gigabytes: float, side: int) -> tuple[Path, int]:
    """An output file of at least `gigabytes` GB: (its path, its lines). Four distinct noise
    PNGs are cycled (making 1,300 of them would take longer than the bench)."""
    images = []
    for seed in range(4):
        path = noise_image(folder / f"noise{seed}.png", side, seed)
        images.append(base64.b64encode(path.read_bytes()).decode())
    target = int(gigabytes * 1e9)
    out = folder / "output.jsonl"
    written = lines = 0
    with out.open("w", encoding="utf-8") as fh:
        while written < target:
            lines += 1
            entry = {
                "id": f"batch_req_{lines}",
                "custom_id": f"b1-j{lines}-a1",
                "response": {
                    "status_code": 200,
                    "request_id": f"req_{lines:08d}",
                    "body": {
                        "created": 1,
                        "data": [{"b64_json": images[lines % 4]}],
                        "usage": USAGE,
                    },
                },
                "error": None,
            }
            line = json.dumps(entry, separators=(",", ":")) + "\n"
            fh.write(line)
            written += len(line)
    return out, lines


SERVE = """
import sys, time
from pathlib import Path
from pipeline.sandbox import SandboxConfig, SandboxServer

with SandboxServer(SandboxConfig()) as server:
    files = server.sandbox.files
    files.register(Path(sys.argv[1]), "file-bench", "out.jsonl", "batch_output", None)
    print(server.base_url, flush=True)
    sys.stdin.read()
"""


def _measure(phase: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--phase", phase, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed: {proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def phase_read(base_url: str) -> dict[str, Any]:
    import openai

    from pipeline.run.batchroute.api import BatchAPI
    from pipeline.run.batchroute.lines import read_answer, split_lines

    api = BatchAPI(openai.OpenAI(api_key=FAKE_KEY, base_url=base_url, max_retries=0))
    started, cpu = time.perf_counter(), time.process_time()
    count = size = 0
    with api.content("file-bench") as chunks:
        for raw, end in split_lines(chunks):
            answer = read_answer(raw)
            assert answer.images, answer.error_message
            count, size = count + 1, end
    return {
        "lines": count,
        "bytes": size,
        "seconds": time.perf_counter() - started,
        "cpu": time.process_time() - cpu,
        "peak_rss": _peak_rss(),
    }


def phase_collect(base_url: str, work: Path, lines: int) -> dict[str, Any]:
    from sqlalchemy import insert

    from pipeline.db.models import Attempt, Batch, Job, ProviderBatch, utcnow
    from pipeline.db.session import Database
    from pipeline.run.batchroute import collect
    from pipeline.run.batchroute.context import RouteContext
    from pipeline.run.deps import build_deps
    from pipeline.run.ratelimit import LocalLimiter
    from pipeline.settings import Settings
    from pipeline.spec import EditSpec

    settings = Settings(
        home=work / "home",
        database_url=f"sqlite:///{work / 'bench.db'}",
        openai_base_url=base_url,
        openai_api_key=FAKE_KEY,
    )
    db = Database(settings.effective_database_url)
    source = noise_image(work / "source.png", 64, 9)
    spec = EditSpec(row=1, key=None, images=(str(source),), prompt="x", model=MODEL)
    now = utcnow()
    with db.session() as s:
        batch = Batch(
            name="bench",
            manifest_uri="bench",
            manifest_sha256="0" * 64,
            output_uri=str(work / "outputs"),
            route="batch",
            settings={"keep_provider_files": True},
        )
        s.add(batch)
        s.flush()
        assert batch.id == 1
        s.execute(
            insert(Job),
            [
                {
                    "id": i,
                    "batch_id": 1,
                    "row_number": i,
                    "external_key": f"SKU{i}",
                    "spec": EditSpec(**{**spec.__dict__, "row": i, "key": f"SKU{i}"}).to_json(),
                    "model": MODEL,
                    "state": "submitted",
                    "attempts": 1,
                    "estimated_usd": Decimal("0.01"),
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(1, lines + 1)
            ],
        )
        pb = ProviderBatch(
            batch_id=1,
            token="bench",
            model=MODEL,
            state="open",
            provider_id="batch_bench",
            provider_status="completed",
            lines=lines,
            output_file_id="file-bench",
            completed=lines,
        )
        s.add(pb)
        s.flush()
        s.execute(
            insert(Attempt),
            [
                {
                    "job_id": i,
                    "number": 1,
                    "started_at": now,
                    "outcome": "in_flight",
                    "provider_batch_id": pb.id,
                    "cost_usd": Decimal(0),
                }
                for i in range(1, lines + 1)
            ],
        )
        s.commit()
        pb_id = pb.id
    ctx = RouteContext.build(build_deps(settings, LocalLimiter(None, None), db))
    started, cpu = time.perf_counter(), time.process_time()
    done = collect.collect(ctx, pb_id)
    assert done is not None and done.booked == lines, done
    return {
        "lines": done.booked,
        "bytes": Path(sys.argv[sys.argv.index("--file") + 1]).stat().st_size,
        "seconds": time.perf_counter() - started,
        "cpu": time.process_time() - cpu,
        "peak_rss": _peak_rss(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.1, help="size of the output file (GB)")
    parser.add_argument("--side", type=int, default=640, help="side of each image (px)")
    parser.add_argument("--phase", choices=("read", "collect"))
    parser.add_argument("--base-url")
    parser.add_argument("--work")
    parser.add_argument("--lines", type=int)
    parser.add_argument("--file")
    args = parser.parse_args()
    if args.phase == "read":
        print(json.dumps(phase_read(args.base_url)))
        return
    if args.phase == "collect":
        print(json.dumps(phase_collect(args.base_url, Path(args.work), args.lines)))
        return

    with tempfile.TemporaryDirectory(prefix="editbatch-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        path, lines = write_output_file(folder, args.gb, args.side)
        size = path.stat().st_size
        print(
            f"output file: {size / 1e9:.2f} GB, {lines} lines of ~{size / lines / 1e6:.2f} MB "
            f"(written in {time.perf_counter() - t0:.0f} s)"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(path)],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().strip()
            common = ["--base-url", base_url, "--file", str(path)]
            results = {
                "read": _measure("read", common, env),
                "collect": _measure(
                    "collect", [*common, "--work", str(folder), "--lines", str(lines)], env
                ),
            }
        finally:
            if server.stdin:
                server.stdin.close()
            server.wait(30)
    ok = True
    for name, r in results.items():
        mb = r["bytes"] / 1e6
        within = r["peak_rss"] < RSS_BOUND
        ok &= within
        print(
            f"{name:8s} {r['lines']} lines, {mb:,.0f} MB in {r['seconds']:.1f} s: "
            f"{r['lines'] / r['seconds']:.1f} lines/s, {mb / r['seconds']:.1f} MB/s, "
            f"{mb / r['cpu']:.1f} MB/s per core ({r['cpu']:.1f} CPU s); "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MB "
            f"({'under' if within else 'OVER'} {RSS_BOUND // 2**20} MB)"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
