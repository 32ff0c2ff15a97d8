"""Notice within seconds that Redis lost the queue, and send the queued jobs again.

A Redis restart without persistence, a FLUSHALL or a failover loses the messages of queued jobs;
the database still says `queued`, so nothing would run them until the reaper's slow path
(queued and untouched for two minutes, broker queue empty). Every worker runs a `BrokerWatch`
thread instead: every EDITBATCH_BROKER_CHECK_SECONDS (2 s) it compares the mark key
(`BROKER_MARK`) with the `run_id` of the Redis server holding the queue. The mark is set to the
run_id after every recovery, so a missing mark (a flush, a restart without persistence) or
another run_id (any restart, a failover) means the messages may be gone: one worker (a lock,
`BROKER_RECOVERY_LOCK`) sends every queued job of every running batch again, then sets the mark.

A job sent twice is claimed once (`pipeline.db.jobs.claim`): the second message finds it taken
or finished and does nothing, so nothing is paid twice. Jobs claimed by a live worker at the
time are not queued and not sent again; their calls finish as before.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from redis import Redis, RedisError

from worker.constants import BROKER_MARK, BROKER_RECOVERY_LOCK

__all__ = ["RECOVERY_LOCK_MS", "BrokerWatch", "check_once"]

log = logging.getLogger("editbatch.watch")

RECOVERY_LOCK_MS = 60_000
"""One worker re-sends; if it dies doing so, another takes over after this long."""

# KEYS: lock. ARGV: token. Drop the lock if it is ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_once(client: Redis, resend: Callable[[], int]) -> int | None:
    """One check of the broker's Redis: the number of jobs sent again after a lost queue, or
    None when the queue was not lost (or another worker is re-sending it)."""
    run_id = _text(client.info("server")["run_id"])
    mark = client.get(BROKER_MARK)
    if mark is not None and _text(mark) == run_id:
        return None
    token = uuid.uuid4().hex
    if not client.set(BROKER_RECOVERY_LOCK, token, nx=True, px=RECOVERY_LOCK_MS):
        return None
    try:
        sent = resend()
        # Set after the messages are in: a worker dying half-way leaves the mark unset, and the
        # next check (here or in another worker) sends them again.
        client.set(BROKER_MARK, run_id)
    finally:
        client.eval(_RELEASE, 1, BROKER_RECOVERY_LOCK, token)
    return sent


class BrokerWatch(threading.Thread):
    """The check of `check_once`, every `interval` seconds, in a daemon thread of a worker."""

    def __init__(self, client: Redis, resend: Callable[[], int], interval: float) -> None:
        super().__init__(name="editbatch-broker-watch", daemon=True)
        self.client = client
        self.resend = resend
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                sent = check_once(self.client, self.resend)
            except RedisError:
                continue  # Redis is down or restarting: the next check sees what came back
            except Exception:  # a database error: log it, try again at the next check
                log.exception("broker check failed")
                continue
            if sent is not None:
                log.warning(
                    "the broker's Redis lost its queue (restarted or flushed): "
                    "%d queued jobs sent again",
                    sent,
                )

    def stop(self) -> None:
        self.stopped.set()
