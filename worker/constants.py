"""Every name editbatch uses in Redis: the Celery queue, the rate limiter, the outage breaker and
the broker check.

A limiter key is `<prefix>{<account>:<model>}`. The braces are a Redis Cluster hash tag: the
three keys of one (account, model) scope land in one slot, so one script may touch them all.
`<account>` is a short sha256 prefix of the API key, never the key itself.
"""

from __future__ import annotations

QUEUE = "editbatch"
"""The Celery queue every `editbatch.edit` message goes to."""

RATE_TAT_PREFIX = "editbatch:rate:tat:"
"""String: GCRA theoretical arrival time, integer microseconds of Redis server time."""

RATE_SLOTS_PREFIX = "editbatch:rate:slots:"
"""Sorted set: in-flight slot token -> lease expiry (microseconds of Redis server time)."""

RATE_PAUSE_PREFIX = "editbatch:rate:pause:"
"""String with a PX expiry: nobody starts a call until this time (microseconds), set on a 429."""

BREAKER_STREAK_PREFIX = "editbatch:breaker:streak:"
"""String (integer): outage failures in a row of a scope's calls, across every worker."""

BREAKER_TRIP_PREFIX = "editbatch:breaker:trip:"
"""Hash (tripped_at, reason, probes): present while a scope's outage breaker is open."""

BREAKER_PROBE_PREFIX = "editbatch:breaker:probe:"
"""String with a PX expiry: the token of the one probe chain of a scope (probe lease)."""

BROKER_MARK = "editbatch:broker:mark"
"""String: the `run_id` of the Redis server that holds the queue. Missing or different means
Redis restarted or was flushed: the queued jobs' messages may be gone and are sent again."""

BROKER_RECOVERY_LOCK = "editbatch:broker:recovery"
"""String with a PX expiry: one worker re-sends the queued jobs after a lost queue."""
