"""The outage breaker's state in Redis, shared by every worker process on every machine.

`RedisBreakerStore` implements `pipeline.run.breaker.BreakerStore`: one script call per call
outcome (count it, trip at the threshold), one read before each call. Keys are
`<prefix>{<scope>}` (worker/constants.py); the braces keep a scope's keys in one cluster slot.
A Redis error never stops a job: the breaker then counts as closed (calls go out, and fail or
succeed on their own), and the reaper restarts a probe chain that Redis lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from redis import Redis, RedisError

from pipeline.run.breaker import Breaker, Trip, breaker_of
from pipeline.settings import Settings
from worker.constants import BREAKER_PROBE_PREFIX, BREAKER_STREAK_PREFIX, BREAKER_TRIP_PREFIX

__all__ = ["RedisBreakerStore", "build_breaker"]

log = logging.getLogger("editbatch.breaker")

# KEYS: streak, trip. ARGV: outage (1|0), threshold, now (epoch s), reason.
# Returns the trip's {tripped_at, reason, probes} (nils when closed).
RECORD_SCRIPT = """
if ARGV[1] == '1' then
  local n = redis.call('INCR', KEYS[1])
  if n >= tonumber(ARGV[2]) and redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[2], 'tripped_at', ARGV[3], 'reason', ARGV[4], 'probes', '0')
  end
elseif redis.call('GET', KEYS[1]) ~= '0' then
  redis.call('SET', KEYS[1], '0')
end
return redis.call('HMGET', KEYS[2], 'tripped_at', 'reason', 'probes')
"""

# KEYS: trip. Counts a probe of an open breaker only (never creates a half trip).
PROBED_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], 'probes', 1)
end
return 0
"""

# KEYS: lease. ARGV: token, ms. Take a free lease or extend our own.
LEASE_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token. Drop the lease if it is ours.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _trip(raw: Any) -> Trip | None:
    tripped_at, reason, probes = raw
    if tripped_at is None:
        return None
    return Trip(float(_text(tripped_at)), _text(reason or ""), int(_text(probes or 0)))


class RedisBreakerStore:
    """`BreakerStore` in Redis (see the module docstring)."""

    def __init__(self, redis: Redis, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._clock = clock
        self._record = redis.register_script(RECORD_SCRIPT)
        self._probed = redis.register_script(PROBED_SCRIPT)
        self._lease = redis.register_script(LEASE_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    @staticmethod
    def keys(scope: str) -> tuple[str, str, str]:
        """The (streak, trip, probe lease) keys of `scope`."""
        tag = f"{{{scope}}}"
        return (
            BREAKER_STREAK_PREFIX + tag,
            BREAKER_TRIP_PREFIX + tag,
            BREAKER_PROBE_PREFIX + tag,
        )

    def record(self, scope: str, outage: bool, threshold: int, reason: str) -> Trip | None:
        streak, trip, _ = self.keys(scope)
        try:
            raw = self._record(
                keys=[streak, trip], args=[int(outage), threshold, self._clock(), reason]
            )
        except RedisError as exc:
            log.warning("outage breaker: Redis unavailable, call not counted: %s", exc)
            return None
        return _trip(raw)

    def trip(self, scope: str) -> Trip | None:
        try:
            raw = self._redis.hmget(self.keys(scope)[1], ["tripped_at", "reason", "probes"])
        except RedisError as exc:
            log.warning("outage breaker: Redis unavailable, taken as closed: %s", exc)
            return None
        return _trip(raw)

    def streak(self, scope: str) -> int:
        try:
            value = self._redis.get(self.keys(scope)[0])
        except RedisError:
            return 0
        return int(_text(value)) if value is not None else 0

    def probed(self, scope: str) -> int:
        try:
            return int(self._probed(keys=[self.keys(scope)[1]]))
        except RedisError:
            return 0

    def close(self, scope: str) -> None:
        streak, trip, _ = self.keys(scope)
        try:
            pipe = self._redis.pipeline()
            pipe.delete(trip)
            pipe.set(streak, 0)
            pipe.execute()
        except RedisError as exc:
            log.warning("outage breaker: could not close (Redis unavailable): %s", exc)

    def lease_probe(self, scope: str, token: str, seconds: float) -> bool:
        try:
            return bool(self._lease(keys=[self.keys(scope)[2]], args=[token, int(seconds * 1000)]))
        except RedisError:
            return False

    def release_probe(self, scope: str, token: str) -> None:
        try:
            self._release(keys=[self.keys(scope)[2]], args=[token])
        except RedisError as exc:
            log.warning("outage breaker: could not release the probe lease: %s", exc)


def build_breaker(settings: Settings, redis: Redis | None = None) -> Breaker:
    """The outage breakers (one per provider) every worker shares, on the limiter's Redis
    (EDITBATCH_REDIS_URL)."""
    client = redis or Redis.from_url(
        settings.effective_redis_url, socket_timeout=5, socket_connect_timeout=5
    )
    return breaker_of(RedisBreakerStore(client), settings)
