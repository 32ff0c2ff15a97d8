"""The rate-limit contract the executor calls, the permit loop over lanes, and the in-process
limiter.

Limits apply per lane (`pipeline.providers.Lane.scope`: one provider's deployment, or one model
on OpenAI). A permit covers one call: it waits for rate (GCRA: images, or requests on Azure, per
minute) and for an in-flight slot. `permit_any` takes the first of several lanes with capacity
(the deployments of one model), so a batch runs near the sum of their limits.
`worker.limits.RedisLimiter` implements the same contract for many processes and machines.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.errors import PermitTimeout
from pipeline.providers import LaneLimit

log = logging.getLogger("editbatch.limits")


class Limiter(Protocol):
    """Rate and concurrency limits for edit calls, per lane (one process, or every worker)."""

    def permit(
        self, scope: str, images: int, max_wait: float | None = None
    ) -> AbstractContextManager[None]:
        """Block until a call on lane `scope` may start (or raise PermitTimeout); release the
        slot on exit."""
        ...

    def permit_any(
        self, scopes: Sequence[str], images: int, max_wait: float | None = None
    ) -> AbstractContextManager[str]:
        """Block until a call may start on one of `scopes` (the first with capacity, tried in a
        random order); yields that scope."""
        ...

    def backoff(self, scope: str, seconds: float) -> None:
        """The API said 429: nobody sends calls on lane `scope` for `seconds`."""
        ...

    def observe(self, scope: str, headers: Mapping[str, str]) -> None:
        """Learn from `x-ratelimit-*` response headers (may pause the lane until the reset)."""
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


EXPLAIN = {
    "pause": "paused after a 429 from the API",
    "rate": "images-per-minute (requests-per-minute on Azure) limit",
    "slots": "every in-flight slot is taken",
}


class LaneLimiter(ABC):
    """The permit loop shared by both limiters: try each lane once (one atomic step each),
    take the first that grants, else sleep the shortest wait any lane named and try again.

    "pause" and "rate" waits are exact (nothing can shorten them), so a wait that ends after
    the deadline gives the job back at once; "slots" is a hint (a slot frees when its holder
    releases it, at a time nobody knows in advance).
    """

    def __init__(
        self,
        *,
        max_wait: float | None,
        jitter: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self._max_wait = max_wait
        self._jitter = jitter
        self._clock = clock
        self._sleep = sleep

    @abstractmethod
    def try_acquire(self, scope: str, images: int, token: str = "") -> tuple[bool, float, str]:
        """One atomic attempt: (granted, seconds to wait, reason). A granted slot holds
        `token`."""

    @abstractmethod
    def release(self, scope: str, token: str) -> None:
        """Give back the in-flight slot `token` holds on `scope` (if the lane counts slots)."""

    @abstractmethod
    def backoff(self, scope: str, seconds: float) -> None: ...

    @contextmanager
    def permit(self, scope: str, images: int, max_wait: float | None = None) -> Iterator[None]:
        token = uuid.uuid4().hex
        self._acquire((scope,), images, max_wait, token)
        try:
            yield
        finally:
            self.release(scope, token)

    @contextmanager
    def permit_any(
        self, scopes: Sequence[str], images: int, max_wait: float | None = None
    ) -> Iterator[str]:
        if len(scopes) == 1:  # one lane: the plain permit (which a subclass may refine)
            with self.permit(scopes[0], images, max_wait):
                yield scopes[0]
            return
        token = uuid.uuid4().hex
        scope = self._acquire(scopes, images, max_wait, token)
        try:
            yield scope
        finally:
            self.release(scope, token)

    def _acquire(
        self, scopes: Sequence[str], images: int, max_wait: float | None, token: str
    ) -> str:
        if not scopes:
            raise ValueError("a permit needs at least one lane")
        limit_wait = self._max_wait if max_wait is None else max_wait
        deadline = None if limit_wait is None else self._clock() + limit_wait
        order = list(scopes)
        random.shuffle(order)  # no lane is everyone's first choice
        while True:
            best: tuple[float, str, str] | None = None
            for scope in order:
                granted, wait, reason = self.try_acquire(scope, images, token)
                if granted:
                    return scope
                if best is None or wait < best[0]:
                    best = (wait, reason, scope)
            assert best is not None
            wait, reason, scope = best
            pause = wait + random.uniform(0.0, self._jitter) if self._jitter else wait
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0 or (reason != "slots" and wait > left):
                    lanes = scope if len(scopes) == 1 else f"any of {', '.join(scopes)}"
                    raise PermitTimeout(
                        f"no permit for {lanes} within {limit_wait:g} s "
                        f"({EXPLAIN.get(reason, reason)}, next try in {wait:.1f} s); the job "
                        "can be retried later"
                    )
                pause = min(pause, left)
            log.debug("permit %s waits %.3f s (%s)", scope, pause, reason)
            self._sleep(pause)

    def observe(self, scope: str, headers: Mapping[str, str]) -> None:
        lower = {k.lower(): v for k, v in headers.items()}
        remaining = lower.get("x-ratelimit-remaining-requests")
        reset = parse_reset(lower.get("x-ratelimit-reset-requests"))
        if remaining is not None and remaining.strip() == "0" and reset:
            self.backoff(scope, reset)


@dataclass
class _LaneState:
    limit: LaneLimit
    tat: float = 0.0
    paused_until: float = 0.0
    holders: set[str] = field(default_factory=set)


SLOT_POLL_SECONDS = 0.05
"""How often a call waiting for a free in-flight slot in this process looks again."""


class LocalLimiter(LaneLimiter):
    """Thread-safe limiter for one process (`editbatch run`).

    Without `limits`, every lane shares one bucket with the given limits (one process, one
    account). With `limits` (a lane's scope -> its limits, e.g. `ProviderSet.limit_for`),
    each lane has its own.
    """

    def __init__(
        self,
        images_per_minute: int | None,
        max_in_flight: int | None,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        limits: Callable[[str], LaneLimit] | None = None,
    ) -> None:
        super().__init__(max_wait=None, jitter=0.0, clock=clock, sleep=sleep)
        self._default = LaneLimit(images_per_minute, max_in_flight, max(burst, 1))
        self._limits = limits
        self._lock = threading.Lock()
        self._states: dict[str, _LaneState] = {}

    def _state(self, scope: str) -> _LaneState:
        key = scope if self._limits is not None else ""
        state = self._states.get(key)
        if state is None:
            limit = self._limits(scope) if self._limits is not None else self._default
            state = self._states[key] = _LaneState(limit)
        return state

    def try_acquire(self, scope: str, images: int, token: str = "") -> tuple[bool, float, str]:
        with self._lock:
            now = self._clock()
            state = self._state(scope)
            pause = state.paused_until - now
            if pause > 0:
                return False, pause, "pause"
            limit = state.limit
            wait, reason, new_tat = 0.0, "granted", state.tat
            if limit.per_minute:
                interval = 60.0 / limit.per_minute
                # A call for more images than the burst waits for an idle bucket, then pays in
                # full (the same rule as the Redis limiter's script).
                burst = max(float(limit.burst), float(images))
                wait, new_tat = gcra_wait(state.tat, now, interval, burst, float(images))
                if wait > 0:
                    reason = "rate"
            full = limit.max_in_flight and len(state.holders) >= limit.max_in_flight
            if full and wait < SLOT_POLL_SECONDS:
                wait, reason = SLOT_POLL_SECONDS, "slots"
            if wait > 0:
                return False, wait, reason
            state.tat = new_tat
            if limit.max_in_flight:
                state.holders.add(token)
            return True, 0.0, "granted"

    def release(self, scope: str, token: str) -> None:
        with self._lock:
            self._state(scope).holders.discard(token)

    def backoff(self, scope: str, seconds: float) -> None:
        with self._lock:
            state = self._state(scope)
            state.paused_until = max(state.paused_until, self._clock() + seconds)


def local_limiter(limits: Callable[[str], LaneLimit]) -> LocalLimiter:
    """The in-process limiter of `editbatch run`, with each lane's own limits."""
    return LocalLimiter(None, None, limits=limits)


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
