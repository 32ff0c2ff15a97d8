"""The one clock for dates that decide things (which models are still available).

`today()` is the current UTC date, or `EDITBATCH_TODAY` (YYYY-MM-DD) when it is set: a person can
rehearse tomorrow's night ("will this manifest still run after the shutdown?") and tests can pin
the date in a subprocess. In-process tests use `frozen(day)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime

from pipeline.errors import ConfigError

ENV = "EDITBATCH_TODAY"
_frozen: date | None = None


def today() -> date:
    """Today's date in UTC (or the pinned one)."""
    if _frozen is not None:
        return _frozen
    pinned = os.environ.get(ENV)
    if pinned:
        try:
            return date.fromisoformat(pinned)
        except ValueError:
            raise ConfigError(
                f"{ENV}={pinned!r} is not a date: give YYYY-MM-DD, or unset it to use today's"
            ) from None
    return datetime.now(UTC).date()


@contextmanager
def frozen(day: date) -> Iterator[None]:
    """Within the block, `today()` is `day` (tests)."""
    global _frozen
    previous, _frozen = _frozen, day
    try:
        yield
    finally:
        _frozen = previous
