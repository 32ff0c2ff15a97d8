"""The limiter shared by every worker process on every machine, in Redis.

`RedisLimiter` implements `pipeline.run.ratelimit.Limiter`: images (or requests) per minute
(GCRA), a cap on calls in flight and a shared pause after a 429, per lane (one provider's
deployment, or one model on OpenAI: `pipeline.providers.Lane.scope`). Each permit attempt on a
lane is ONE Lua script call that reads Redis server time, so workers with skewed clocks agree;
`permit_any` tries the lanes of a job in turn (`pipeline.run.ratelimit.LaneLimiter`). See
docs/ratelimit.md for the design.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis, RedisError

from pipeline.errors import PermitTimeout
from pipeline.providers import LaneLimit, ProviderSet, account_id, providers_of
from pipeline.run.ratelimit import LaneLimiter, Limiter, LocalLimiter
from pipeline.settings import Settings
from worker.constants import RATE_PAUSE_PREFIX, RATE_SLOTS_PREFIX, RATE_TAT_PREFIX

__all__ = [
    "ModelLimit",
    "RedisLimiter",
    "account_id",
    "build_limiter",
]

log = logging.getLogger("editbatch.limits")

ModelLimit = LaneLimit
"""The limits of one lane (the name from when lanes were models)."""

SLOT_LEASE_MARGIN = 60.0
"""Seconds a slot outlives the request timeout before a crashed holder's slot frees itself."""

# KEYS: tat, slots, pause.
# ARGV: interval_us (0 = no rate limit), burst, cost, cap (0 = no cap), token, lease_ms, poll_ms.
# Returns {1, 0, "granted"} or {0, wait_ms, reason}; reason is "pause", "rate" or "slots".
# "pause" and "rate" waits are exact (nothing can shorten them); "slots" is a hint, since a
# slot frees when its holder releases it, at a time nobody knows in advance.
PERMIT_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local lease = tonumber(ARGV[6]) * 1000
local poll = tonumber(ARGV[7]) * 1000

local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then
  return {0, math.ceil((pause - now) / 1000), 'pause'}
end

local wait = 0
local reason = 'granted'
local new_tat = 0
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  -- A call bigger than the burst waits for an idle bucket, then is charged in full.
  new_tat = tat + interval * cost
  local allow_at = new_tat - interval * math.max(burst, cost)
  if allow_at > now then
    wait = allow_at - now
    reason = 'rate'
  end
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    local hint = math.min(tonumber(first[2]) - now, poll)
    if hint > wait then
      wait = hint
      reason = 'slots'
    end
  end
end
if wait > 0 then
  return {0, math.ceil(wait / 1000), reason}
end

if interval > 0 then
  redis.call('SET', KEYS[1], string.format('%d', new_tat),
             'PX', math.floor((new_tat - now) / 1000) + 1000)
end
if cap > 0 then
  redis.call('ZADD', KEYS[2], string.format('%d', now + lease), ARGV[5])
  redis.call('PEXPIRE', KEYS[2], math.floor(lease / 1000) + 1000)
end
return {1, 0, 'granted'}
"""

# KEYS: pause. ARGV: pause_ms. Never shortens a longer pause; returns the pause in force (ms).
BACKOFF_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ms = tonumber(ARGV[1])
local until_us = now + ms * 1000
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_us > current then
  redis.call('SET', KEYS[1], string.format('%d', until_us), 'PX', ms)
  return ms
end
return math.ceil((current - now) / 1000)
"""


@dataclass(frozen=True)
class _Reply:
    granted: bool
    wait: float  # seconds
    reason: str


class RedisLimiter(LaneLimiter):
    """Images per minute, calls in flight and 429 pauses shared by every worker through Redis.

    A lane's limits come from `limits(scope)` when given (`ProviderSet.limit_for`), else from
    `overrides` by scope, else `default`. Its keys are `<prefix>{<account>:<scope>}`, where
    `<account>` is the lane's `LaneLimit.account` (a hash of its endpoint or key) or, when it
    has none, the hash of `api_key`. `slot_lease` (seconds) bounds how long a slot of a crashed
    worker stays taken: make it the request timeout plus a margin. `max_wait` applies when
    `permit()` is given none. `clock` and `sleep` measure and spend the local wait; rate
    decisions use Redis server time.
    """

    def __init__(
        self,
        redis: Redis,
        api_key: str,
        default: LaneLimit,
        overrides: Mapping[str, LaneLimit] | None = None,
        *,
        limits: Callable[[str], LaneLimit] | None = None,
        slot_lease: float = 300.0 + SLOT_LEASE_MARGIN,
        max_wait: float | None = None,
        slot_poll: float = 0.25,
        jitter: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if slot_lease <= 0 or slot_poll <= 0:
            raise ValueError("slot_lease and slot_poll must be positive")
        super().__init__(max_wait=max_wait, jitter=jitter, clock=clock, sleep=sleep)
        self._redis = redis
        self.account = account_id(api_key)
        self._default = default
        self._overrides = dict(overrides or {})
        self._limits = limits
        self._lease_ms = math.ceil(slot_lease * 1000)
        self._poll_ms = math.ceil(slot_poll * 1000)
        self._permit_script = redis.register_script(PERMIT_SCRIPT)
        self._backoff_script = redis.register_script(BACKOFF_SCRIPT)

    def limit_for(self, scope: str) -> LaneLimit:
        if self._limits is not None:
            return self._limits(scope)
        return self._overrides.get(scope, self._default)

    def keys(self, scope: str) -> tuple[str, str, str]:
        """The (tat, slots, pause) Redis keys of lane `scope`."""
        account = self.limit_for(scope).account or self.account
        tag = f"{{{account}:{scope}}}"
        return (RATE_TAT_PREFIX + tag, RATE_SLOTS_PREFIX + tag, RATE_PAUSE_PREFIX + tag)

    def try_acquire(self, scope: str, images: int, token: str = "") -> tuple[bool, float, str]:
        """One atomic attempt: (granted, seconds to wait, reason). A granted slot holds `token`."""
        reply = self._attempt(scope, images, token)
        return reply.granted, reply.wait, reply.reason

    def _attempt(self, scope: str, images: int, token: str) -> _Reply:
        limit = self.limit_for(scope)
        interval_us = round(60_000_000 / limit.per_minute) if limit.per_minute else 0
        try:
            raw: Any = self._permit_script(
                keys=list(self.keys(scope)),
                args=[
                    interval_us,
                    max(limit.burst, 1),
                    max(images, 1),
                    limit.max_in_flight or 0,
                    token,
                    self._lease_ms,
                    self._poll_ms,
                ],
            )
        except RedisError as exc:
            # No permit without the shared limiter: hand the job back (it is retried later)
            # rather than call the API unlimited or leave the job claimed.
            raise PermitTimeout(f"the rate limiter's Redis is unavailable: {exc}") from exc
        granted, wait_ms, reason = raw
        text = reason.decode() if isinstance(reason, bytes) else str(reason)
        return _Reply(bool(int(granted)), int(wait_ms) / 1000.0, text)

    def release(self, scope: str, token: str) -> None:
        if not self.limit_for(scope).max_in_flight:
            return
        try:
            self._redis.zrem(self.keys(scope)[1], token)
        except RedisError as exc:
            # The slot lease frees it anyway; do not hide the outcome of the call.
            log.warning("could not release an in-flight slot for %s: %s", scope, exc)

    def backoff(self, scope: str, seconds: float) -> None:
        if seconds <= 0:
            return
        ms = math.ceil(seconds * 1000)
        self._backoff_script(keys=[self.keys(scope)[2]], args=[ms])
        log.info("calls on %s paused for %.1f s by every worker", scope, seconds)


def build_limiter(
    settings: Settings, redis: Redis | None = None, providers: ProviderSet | None = None
) -> Limiter:
    """A RedisLimiter when any lane of any provider is limited, else a no-op; the Redis client
    is built once here."""
    lanes = providers if providers is not None else providers_of(settings)
    if not lanes.any_limit():
        return LocalLimiter(None, None)
    client = redis
    if client is None:
        client = Redis.from_url(
            settings.effective_redis_url,
            # One connection per worker thread that may wait for a permit (redis-py caps a
            # pool at 100 by default, which a 200-thread worker exhausts).
            max_connections=max(settings.concurrency * 2, 100),
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
    # Wait + call must end before the job's lease does, or the reaper would start it twice.
    max_wait = max(
        settings.lease_seconds - settings.request_timeout_seconds - SLOT_LEASE_MARGIN, 30.0
    )
    return RedisLimiter(
        client,
        settings.api_key(),
        LaneLimit(),
        limits=lanes.limit_for,
        slot_lease=settings.request_timeout_seconds + SLOT_LEASE_MARGIN,
        max_wait=max_wait,
    )
