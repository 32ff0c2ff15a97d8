"""The in-process limiter per lane, and permits taken from whichever lane has capacity."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from pipeline.errors import PermitTimeout
from pipeline.providers import LaneLimit
from pipeline.run.ratelimit import LocalLimiter

A, B = "azure:img-a", "azure:img-b"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def lanes(limits: dict[str, LaneLimit]) -> tuple[LocalLimiter, Clock]:
    clock = Clock()
    limiter = LocalLimiter(
        None, None, clock=clock.time, sleep=clock.sleep, limits=lambda s: limits.get(s, LaneLimit())
    )
    return limiter, clock


def test_two_lanes_of_one_model_run_at_the_sum_of_their_limits() -> None:
    """Two deployments of 60 requests/min each: 10 calls take 4 s spread over both lanes (each
    keeping its own one-per-second pace), where one lane alone would take 9 s."""
    limiter, clock = lanes({A: LaneLimit(60), B: LaneLimit(60)})
    taken: dict[str, list[float]] = {A: [], B: []}
    for _ in range(10):
        with limiter.permit_any([A, B], 1) as scope:
            taken[scope].append(clock.now)
    assert clock.now == pytest.approx(4.0)
    assert len(taken[A]) == len(taken[B]) == 5
    for starts in taken.values():
        assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(starts))

    alone, clock2 = lanes({A: LaneLimit(60)})
    for _ in range(10):
        with alone.permit_any([A], 1):
            pass
    assert clock2.now == pytest.approx(9.0)


def test_a_paused_lane_is_skipped_without_waiting() -> None:
    """After a 429 on one deployment (its lane paused), calls take the other at once."""
    limiter, clock = lanes({A: LaneLimit(600), B: LaneLimit(600)})
    limiter.backoff(A, 30.0)
    used = []
    for _ in range(3):
        with limiter.permit_any([A, B], 1) as scope:
            used.append(scope)
    assert used == [B, B, B]
    assert clock.now == pytest.approx(0.2)  # B's own pace (0.1 s per call), not A's pause


def test_lanes_keep_their_own_in_flight_slots() -> None:
    limiter = LocalLimiter(
        None, None, limits=lambda s: LaneLimit(max_in_flight=1) if s in (A, B) else LaneLimit()
    )
    with limiter.permit_any([A, B], 1) as first, limiter.permit_any([A, B], 1) as second:
        assert {first, second} == {A, B}  # the second call found A's one slot taken
        full = pytest.raises(PermitTimeout, match=f"any of {A}, {B}.*in-flight slot")
        with full, limiter.permit_any([A, B], 1, max_wait=0.2):
            pass
    with limiter.permit_any([A, B], 1, max_wait=0.2):
        pass  # both slots were given back


def test_a_wait_longer_than_the_deadline_gives_up_at_once() -> None:
    limiter, clock = lanes({A: LaneLimit(1), B: LaneLimit(1)})
    for _ in range(2):
        with limiter.permit_any([A, B], 1):
            pass
    with pytest.raises(PermitTimeout, match="per-minute"), limiter.permit_any([A, B], 1, 5.0):
        pass
    assert clock.now == 0.0


def test_without_lane_limits_every_lane_shares_one_bucket() -> None:
    """LocalLimiter(ipm, cap) with no table: one bucket for the process (the old behaviour)."""
    clock = Clock()
    limiter = LocalLimiter(60, None, clock=clock.time, sleep=clock.sleep)
    for scope in (A, B, A):
        with limiter.permit(scope, 1):
            pass
    assert clock.now == pytest.approx(2.0)


def test_threads_waiting_on_one_full_lane_get_the_slot_when_it_frees() -> None:
    limiter = LocalLimiter(None, None, limits=lambda s: LaneLimit(max_in_flight=1))
    order: list[str] = []

    def call(name: str) -> None:
        with limiter.permit(A, 1):
            order.append(name)
            time.sleep(0.1)

    threads = [threading.Thread(target=call, args=(str(i),)) for i in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == ["0", "1", "2"]
    assert time.monotonic() - started >= 0.3  # one at a time
