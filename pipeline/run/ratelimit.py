"""The rate-limit contract the executor calls, and the in-process implementation.

`worker.limits.RedisLimiter` implements the same contract for many processes and machines.
A permit covers one call: it waits for rate (images per minute, GCRA) and for an in-flight slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from pipeline.errors import PermitTimeout


class Limiter(Protocol):
    """Rate and concurrency limits for edit calls (one process, or every worker via Redis)."""

    def permit(
        self, model: str, images: int, max_wait: float | None = None
    ) -> AbstractContextManager[None]:
        """Block until the call may start (or raise PermitTimeout); release the slot on exit."""
        ...

    def backoff(self, model: str, seconds: float) -> None:
        """The API said 429: nobody sends calls for `model` for `seconds`."""
        ...

    def observe(self, model: str, headers: Mapping[str, str]) -> None:
        """Learn from `x-ratelimit-*` response headers (may pause until the reset)."""
        ...


def gcra_wait(
    tat: float, now: float, interval: float, burst: float, cost: float
) -> tuple[float, float]:
    """Generic cell rate algorithm (pure). Returns (seconds to wait, new theoretical arrival time).

    `interval` is seconds per image; `burst` is how many images may go at once; `cost` is the
    images this call makes. The caller commits the new TAT only when the wait is 0.
    """
    tat = max(tat, now)
    new_tat = tat + interval * cost
    allow_at = new_tat - interval * burst
    wait = allow_at - now
    if wait > 0:
        return wait, tat
    return 0.0, new_tat


class LocalLimiter:
    """Thread-safe limiter for one process (`editbatch run`)."""

    def __init__(
        self,
        images_per_minute: int | None,
        max_in_flight: int | None,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 60.0 / images_per_minute if images_per_minute else 0.0
        self._burst = float(max(burst, 1))
        self._slots = threading.BoundedSemaphore(max_in_flight) if max_in_flight else None
        self._lock = threading.Lock()
        self._tat = 0.0
        self._paused_until = 0.0
        self._clock = clock
        self._sleep = sleep

    def _wait_rate(self, images: int, deadline: float | None) -> None:
        while True:
            with self._lock:
                now = self._clock()
                pause = self._paused_until - now
                if pause <= 0:
                    if not self._interval:
                        return
                    # A call for more images than the burst waits for an idle bucket, then pays
                    # in full (the same rule as the Redis limiter's script).
                    burst = max(self._burst, float(images))
                    wait, tat = gcra_wait(self._tat, now, self._interval, burst, float(images))
                    if wait <= 0:
                        self._tat = tat
                        return
                    pause = wait
                if deadline is not None and now + pause > deadline:
                    raise PermitTimeout(f"no rate permit within the wait limit ({pause:.1f} s)")
            self._sleep(pause)

    @contextmanager
    def permit(self, model: str, images: int, max_wait: float | None = None) -> Iterator[None]:
        deadline = None if max_wait is None else self._clock() + max_wait
        if self._slots is not None and not self._slots.acquire(timeout=max_wait):
            raise PermitTimeout(f"no free in-flight slot within {max_wait} s")
        try:
            self._wait_rate(images, deadline)
            yield
        finally:
            if self._slots is not None:
                self._slots.release()

    def backoff(self, model: str, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def observe(self, model: str, headers: Mapping[str, str]) -> None:
        remaining = headers.get("x-ratelimit-remaining-requests")
        reset = parse_reset(headers.get("x-ratelimit-reset-requests"))
        if remaining is not None and remaining.strip() == "0" and reset:
            self.backoff(model, reset)


def parse_reset(value: str | None) -> float | None:
    """Seconds from an `x-ratelimit-reset-*` header such as "1s", "250ms", "6m0s" or "0.5"."""
    if not value:
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.0
    number = ""
    i = 0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            return None
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    return total if not number else None
