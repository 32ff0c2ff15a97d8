"""The limiter shared by every worker process; see pipeline.ratelimit for the contract."""

from __future__ import annotations

from pipeline.ratelimit import Limiter, LocalLimiter
from pipeline.settings import Settings


def build_limiter(settings: Settings) -> Limiter:
    return LocalLimiter(settings.images_per_minute, settings.max_in_flight)
