"""Retry waits: exponential backoff with full jitter, never shorter than the server asked.

Built on tenacity's wait strategies so the executor's `Retrying` loop can use it directly.
"""

from __future__ import annotations

from typing import Protocol

from tenacity import RetryCallState
from tenacity.wait import wait_random_exponential


class HasRetryAfter(Protocol):
    @property
    def retry_after(self) -> float | None: ...


class wait_api:
    """Full-jitter exponential wait (base, cap) raised to the outcome's `retry_after` if longer."""

    def __init__(self, base: float, cap: float) -> None:
        self._jitter = wait_random_exponential(multiplier=base, max=cap)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self._jitter(retry_state))
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            result: HasRetryAfter = outcome.result()
            retry_after = getattr(result, "retry_after", None)
            if retry_after is not None:
                return max(wait, float(retry_after))
        return wait
