"""Counters behind `GET /sandbox/stats`, and the quota reservations that depend on them."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Stats:
    """Thread-safe request counters. `billed` counts answers made and billed, `billed_undelivered`
    those among them the client never received (it left, or the body was cut off)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved = 0  # in-flight requests that may still be billed (kept across clear())
        self._zero()

    def _zero(self) -> None:
        self.requests = 0
        self.billed = 0
        self.billed_undelivered = 0
        self.images = 0
        self.rate_limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.by_status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def begin(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def end(self, outcome: str) -> None:
        """`outcome`: an HTTP status, `reset` (closed with no response) or `disconnected`."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.by_status[outcome] += 1

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def count_rate_limited(self) -> None:
        with self._lock:
            self.rate_limited += 1

    def reserve_quota(self, quota_after: int | None) -> bool:
        """Hold one billable slot; False once billed + held slots reach `quota_after`."""
        with self._lock:
            if quota_after is not None and self.billed + self._reserved >= quota_after:
                return False
            self._reserved += 1
            return True

    def release_quota(self, *, billed: bool, images: int, delivered: bool = True) -> None:
        with self._lock:
            self._reserved -= 1
            if billed:
                self.billed += 1
                self.images += images
                if not delivered:
                    self.billed_undelivered += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "billed": self.billed,
                "billed_undelivered": self.billed_undelivered,
                "by_status": dict(self.by_status),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "rate_limited": self.rate_limited,
                "images": self.images,
                "faults": dict(self.faults),
            }

    def clear(self) -> None:
        with self._lock:
            in_flight = self.in_flight
            self._zero()
            self.in_flight = self.max_in_flight = in_flight
