"""Helpers shared by the benches: a sandbox process, process metrics, inputs and timing.

The benches run from the repository root (`python bench/throughput.py`); this module puts the
root on `sys.path` so that `tests.servers` (real redis-server, PostgreSQL, celery workers) and
the `pipeline` package import the same way they do under pytest.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402  (after the sys.path fix, like the imports below)
from PIL import Image, ImageDraw  # noqa: E402

from tests.servers import free_port  # noqa: E402

FAKE_KEY = "sk-bench-editbatch-00000000000000000000"


# -- the sandbox, in its own process ---------------------------------------------------------


class SandboxProcess:
    """`python -m pipeline.sandbox` on a free port, in its own process (its own GIL and CPU).

    In-process (`SandboxServer`) the sandbox would share a GIL with whatever client the bench
    runs in the same process, and slow the asyncio baseline down unfairly.
    """

    def __init__(self, log: Path, **config: Any) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "pipeline.sandbox", "--port", str(self.port)]
        for name, value in config.items():
            if value is not None:
                args += ["--" + name.replace("_", "-"), str(value)]
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandbox exited: {log.read_text()[-2000:]}")
            try:
                self.stats()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("sandbox did not start") from None
                time.sleep(0.1)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method="GET" if body is None else "POST",
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def stats(self) -> dict[str, Any]:
        return self._call("/sandbox/stats")

    def reset(self) -> None:
        """Clear counters AND the rate window, so the next client starts with a fresh minute."""
        self._call("/sandbox/reset", {})

    def configure(self, **values: Any) -> None:
        self._call("/sandbox/config", values)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()


# -- process metrics -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all of its live descendants."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of resident memory (VmHWM) of one process, in bytes."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(psutil.Process(pid).memory_info().rss)  # not Linux: the current RSS


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# -- inputs ----------------------------------------------------------------------------------


def product_image(path: Path, side: int, seed: int) -> Path:
    """A product-shot-like PNG: light backdrop, a coloured object, a label."""
    rng = random.Random(seed)
    img = Image.new("RGB", (side, side), tuple(rng.randint(220, 250) for _ in range(3)))  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    c = side // 2
    r = rng.randint(side // 6, side // 3)
    draw.ellipse((c - r, c - r, c + r, c + r), fill=tuple(rng.randint(20, 200) for _ in range(3)))  # type: ignore[arg-type]
    draw.rectangle((c - r // 2, c - r // 6, c + r // 2, c + r // 6), fill=(250, 250, 245))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path


def noise_image(path: Path, side: int, seed: int) -> Path:
    """A PNG of RGB noise: it compresses to nothing, so the sandbox's outputs stay large."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG", compress_level=1)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterator[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def encoded_size(image: bytes) -> str:
    with Image.open(io.BytesIO(image)) as im:
        return f"{im.format} {im.size[0]}x{im.size[1]}"


# -- numbers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """The sandbox's lognormal latency: median `median_s`, shape `sigma`, times `time_scale`."""

    median_s: float
    sigma: float
    time_scale: float = 1.0

    @property
    def mean_s(self) -> float:
        return self.median_s * self.time_scale * math.exp(self.sigma**2 / 2)


def steady_rate(times: Sequence[float], low: float = 0.1, high: float = 0.9) -> float:
    """Events per second between the `low` and `high` quantiles of sorted event times.

    Leaves out the ramp-up (calls start, nothing has finished yet) and the drain at the end.
    """
    ts = sorted(times)
    if len(ts) < 3:
        return float("nan")
    i, j = int(low * (len(ts) - 1)), int(high * (len(ts) - 1))
    span = ts[j] - ts[i]
    return (j - i) / span if span > 0 else float("nan")


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def fmt_s(seconds: float) -> str:
    return f"{seconds:,.1f} s" if seconds < 600 else f"{seconds / 60:,.1f} min"


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def env_with(values: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **values}
