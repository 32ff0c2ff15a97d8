"""Sliding-window accounting: units (images, tokens) taken in the last `window` seconds."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class SlidingWindow:
    """Admissions of the last `window` seconds; an admission leaves exactly `window` s later."""

    def __init__(
        self, window: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._events: deque[tuple[float, int]] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] + self._window <= now:
            self._used -= self._events.popleft()[1]

    def try_take(self, amount: int, limit: int | None) -> float:
        """Take `amount` units if that keeps the window within `limit`: return 0.0. Otherwise take
        nothing and return the seconds until enough units have left the window."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            if limit is None or self._used + amount <= limit:
                self._events.append((now, amount))
                self._used += amount
                return 0.0
            if amount > limit:
                return self._window
            to_free = self._used + amount - limit
            for at, units in self._events:
                to_free -= units
                if to_free <= 0:
                    return at + self._window - now
            return self._window

    def add(self, amount: int) -> None:
        """Record units without a limit (e.g. tokens, reported but not enforced)."""
        self.try_take(amount, None)

    def used(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return self._used

    def reset_in(self) -> float:
        """Seconds until the oldest admission leaves the window (0 if empty)."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            return self._events[0][0] + self._window - now if self._events else 0.0

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
            self._used = 0


class KeyedWindows:
    """One SlidingWindow per key (e.g. per Azure deployment), made on first use."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self._window_seconds = window
        self._lock = threading.Lock()
        self._windows: dict[str, SlidingWindow] = {}

    def get(self, key: str) -> SlidingWindow:
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = SlidingWindow(self._window_seconds)
            return window

    def clear(self) -> None:
        with self._lock:
            self._windows.clear()
