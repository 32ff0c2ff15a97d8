"""Every name editbatch uses in Redis: the Celery queue and the rate-limiter key prefixes.

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
