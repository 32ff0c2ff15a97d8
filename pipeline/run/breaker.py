"""The outage breaker: when every call fails the way an outage fails, stop spending attempts,
hold the batch, probe the API one call at a time, and resume by itself when it answers.

    closed    calls go out. The breaker hears each call's outcome (`Breaker.hear`): an outage
              failure (`is_outage`: no connection, a timeout, any 5xx) adds one to the streak;
              any answer (images, a 4xx, a 429, an unreadable 200) ends it.
    open      the streak reached EDITBATCH_BREAKER_THRESHOLD (20) calls in a row, across every
              worker. No call starts: a worker that would call, or whose call just failed,
              holds its batch (`hold_code` api_unreachable, saying since when and why) and parks
              its job, giving back the attempts the outage cost it (`attempt_base`), so no job
              fails because of the outage. A job that used up its attempts on outage failures
              before the trip is not failed either when a free call (a model lookup) fails too:
              it is handed back (`confirms_outage`).
    probing   one prober at a time (`probe`) retrieves a model, which costs nothing, after
              EDITBATCH_BREAKER_PROBE_SECONDS (5 s), doubling up to ..._PROBE_MAX_SECONDS (60 s).
    resumed   the API answered: the breaker closes and every batch held api_unreachable is
              resumed (`pipeline.batch.controls.resume`); the caller sends their jobs again.
    given up  no answer EDITBATCH_BREAKER_GIVE_UP_SECONDS (1 h) after the outage began (a trip
              within FLAP_SECONDS of a resume continues the same outage): the breaker closes
              and those batches stay held with hold_code `outage`, for a person to resume.

The state (streak, trip, probe lease) is shared by every worker through Redis
(`worker.breaker.RedisBreakerStore`) or kept in this process for `editbatch run`
(`LocalBreakerStore`); what a person reads (when a batch was held, why, when it resumed) is in
the database (`pipeline.db.events`). It is keyed by a scope, one per provider (`scope_of`), so
each provider can have its own breaker.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select

from pipeline.batch import controls
from pipeline.db import events, jobs
from pipeline.db.events import EventKind
from pipeline.db.models import Batch, BatchEvent, utcnow
from pipeline.db.session import Database
from pipeline.settings import Settings
from pipeline.states import BatchState, HoldCode

__all__ = [
    "FLAP_SECONDS",
    "Breaker",
    "BreakerPolicy",
    "BreakerStore",
    "LocalBreakerStore",
    "ProbeResult",
    "Trip",
    "hold_for_outage",
    "is_outage",
    "outage_since",
    "probe",
    "scope_of",
]

log = logging.getLogger("editbatch.breaker")

FLAP_SECONDS = 600.0
"""A trip this soon after the API came back continues the same outage (for the give-up time)."""
PROBE_TIMEOUT_SECONDS = 10.0
"""A probe that gets no answer within this long counts as no answer."""


def is_outage(http_status: int | None, error_type: str | None) -> bool:
    """A failure that says nothing about the request, only that the API is not there: no
    connection, a timeout, or any 5xx (pure)."""
    if http_status is None:
        return error_type in ("connection", "timeout")
    return http_status >= 500


def scope_of(settings: Settings, provider: str = "openai") -> str:
    """The breaker's key for a provider and endpoint (never the API key)."""
    base = settings.openai_base_url or "https://api.openai.com/v1"
    return f"{provider}:{hashlib.sha256(base.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class Trip:
    """An open breaker: when it tripped, why (the last failure), probes made so far."""

    tripped_at: float  # epoch seconds
    reason: str
    probes: int = 0


@dataclass(frozen=True)
class BreakerPolicy:
    """The thresholds and timings (EDITBATCH_BREAKER_*)."""

    threshold: int = 20
    probe_first: float = 5.0
    probe_max: float = 60.0
    give_up: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        return cls(
            settings.breaker_threshold,
            settings.breaker_probe_seconds,
            settings.breaker_probe_max_seconds,
            settings.breaker_give_up_seconds,
        )

    def probe_wait(self, probes: int) -> float:
        """Seconds before probe number `probes + 1`: first, then doubled, capped (pure)."""
        return float(min(self.probe_first * 2 ** min(probes, 30), self.probe_max))


class BreakerStore(Protocol):
    """Where the breaker's state lives: this process, or Redis for every worker."""

    def record(self, scope: str, outage: bool, threshold: int, reason: str) -> Trip | None:
        """Count one call's outcome atomically; the trip if the breaker is open afterwards
        (tripping it when an outage failure makes the streak reach `threshold`)."""
        ...

    def trip(self, scope: str) -> Trip | None:
        """The open trip, or None when calls may go out."""
        ...

    def streak(self, scope: str) -> int:
        """Outage failures in a row so far."""
        ...

    def probed(self, scope: str) -> int:
        """Count one failed probe of an open breaker; probes so far."""
        ...

    def close(self, scope: str) -> None:
        """Calls may go out again; the streak starts from 0."""
        ...

    def lease_probe(self, scope: str, token: str, seconds: float) -> bool:
        """Take or extend the right to probe (one prober at a time) for `seconds`; False if
        another holder has it."""
        ...

    def release_probe(self, scope: str, token: str) -> None: ...


@dataclass
class LocalBreakerStore:
    """The breaker's state for one process (`editbatch run`); thread-safe."""

    clock: Callable[[], float] = time.time
    _streaks: dict[str, int] = field(default_factory=dict)
    _trips: dict[str, Trip] = field(default_factory=dict)
    _leases: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, scope: str, outage: bool, threshold: int, reason: str) -> Trip | None:
        with self._lock:
            if not outage:
                self._streaks[scope] = 0
                return self._trips.get(scope)
            streak = self._streaks.get(scope, 0) + 1
            self._streaks[scope] = streak
            if streak >= threshold and scope not in self._trips:
                self._trips[scope] = Trip(self.clock(), reason)
            return self._trips.get(scope)

    def trip(self, scope: str) -> Trip | None:
        with self._lock:
            return self._trips.get(scope)

    def streak(self, scope: str) -> int:
        with self._lock:
            return self._streaks.get(scope, 0)

    def probed(self, scope: str) -> int:
        with self._lock:
            trip = self._trips.get(scope)
            if trip is None:
                return 0
            self._trips[scope] = replace(trip, probes=trip.probes + 1)
            return trip.probes + 1

    def close(self, scope: str) -> None:
        with self._lock:
            self._trips.pop(scope, None)
            self._streaks[scope] = 0

    def lease_probe(self, scope: str, token: str, seconds: float) -> bool:
        with self._lock:
            holder = self._leases.get(scope)
            now = self.clock()
            if holder is not None and holder[0] != token and holder[1] > now:
                return False
            self._leases[scope] = (token, now + seconds)
            return True

    def release_probe(self, scope: str, token: str) -> None:
        with self._lock:
            if self._leases.get(scope, ("", 0.0))[0] == token:
                self._leases.pop(scope, None)


@dataclass
class Breaker:
    """One scope's breaker: the policy, the shared state, and what the executor asks of it."""

    store: BreakerStore
    policy: BreakerPolicy
    scope: str

    def open(self) -> Trip | None:
        """The trip in force, or None when calls may go out."""
        return self.store.trip(self.scope)

    def hear(self, http_status: int | None, error_type: str | None, detail: str) -> Trip | None:
        """Count one call's outcome; the trip if this was an outage failure and the breaker is
        open (now, or already)."""
        outage = is_outage(http_status, error_type)
        trip = self.store.record(self.scope, outage, self.policy.threshold, detail)
        if trip is not None and outage:
            return trip
        return None

    def streak(self) -> int:
        return self.store.streak(self.scope)


# -- holding a batch ----------------------------------------------------------------------------


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")


def hold_for_outage(db: Database, batch_id: int, trip: Trip, policy: BreakerPolicy) -> bool:
    """Hold a running batch as api_unreachable, saying since when and why (its event and a log
    line). True for the one caller that held it."""
    reason = (
        f"API unreachable since {_clock(trip.tripped_at)}: {policy.threshold} calls in a row "
        f"failed (last: {trip.reason}); probing it, resumes by itself when it answers"
    )
    with db.session() as session:
        held = jobs.hold_batch(session, batch_id, HoldCode.API_UNREACHABLE, reason)
        if held:
            events.record(session, batch_id, EventKind.OUTAGE_HELD, reason)
        session.commit()
    if held:
        log.warning("batch %s held: %s", batch_id, reason)
    return held


# -- probing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What one probe did: batches resumed (send their jobs), batches given up, and when to
    probe again (None: nothing is held for an outage any more)."""

    resumed: list[int] = field(default_factory=list)
    gave_up: list[int] = field(default_factory=list)
    retry_in: float | None = None


def outage_since(history: list[tuple[datetime, str]]) -> datetime | None:
    """When the outage a batch is held for began, from its events (oldest first, pure): the
    last trip, or an earlier one when the batch was resumed less than FLAP_SECONDS before it
    tripped again (an API that answers probes but still fails the calls)."""
    since: datetime | None = None
    resumed_at: datetime | None = None
    for at, kind in history:
        if kind == EventKind.OUTAGE_HELD:
            flapping = (
                since is not None
                and resumed_at is not None
                and (at - resumed_at).total_seconds() < FLAP_SECONDS
            )
            if not flapping:
                since = at
            resumed_at = None
        elif kind == EventKind.OUTAGE_RESUMED:
            resumed_at = at
        elif kind == EventKind.OUTAGE_GAVE_UP:
            since = resumed_at = None
    return since


def _held(db: Database) -> dict[int, datetime]:
    """Batches held for an outage, with when their outage began."""
    with db.session() as session:
        ids = list(
            session.scalars(
                select(Batch.id).where(
                    Batch.state == BatchState.HELD, Batch.hold_code == HoldCode.API_UNREACHABLE
                )
            )
        )
        out: dict[int, datetime] = {}
        for batch_id in ids:
            rows = session.execute(
                select(BatchEvent.at, BatchEvent.kind)
                .where(BatchEvent.batch_id == batch_id)
                .order_by(BatchEvent.id)
            ).all()
            history = [(_aware(at), str(kind)) for at, kind in rows]
            out[batch_id] = outage_since(history) or utcnow()
    return out


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def probe(breaker: Breaker, db: Database, ask: Callable[[], str | None]) -> ProbeResult:
    """One probe: give up on outages older than the give-up time, then ask the API (`ask()`: a
    free call; None when it answered, else why not). On an answer, close the breaker and
    resume every batch held for the outage; otherwise say when to probe again."""
    now = utcnow()
    held = _held(db)
    give_up = breaker.policy.give_up
    gave_up = [b for b, since in held.items() if (now - since).total_seconds() >= give_up]
    for batch_id in gave_up:
        _give_up(db, batch_id, held.pop(batch_id), breaker.policy)
    if gave_up and not held:
        breaker.store.close(breaker.scope)  # a person's resume tries the API again
    trip = breaker.open()
    if trip is None and not held:
        return ProbeResult(gave_up=gave_up)
    why_not = ask()
    if why_not is not None:
        probes = breaker.store.probed(breaker.scope)
        wait = breaker.policy.probe_wait(probes)
        log.info("probe %d: the API does not answer (%s); next in %.0f s", probes, why_not, wait)
        return ProbeResult(gave_up=gave_up, retry_in=wait)
    breaker.store.close(breaker.scope)
    resumed = []
    for batch_id, since in held.items():
        seconds = (now - since).total_seconds()
        message = f"the API answers again; resumed after {seconds:.0f} s held"
        with db.session() as session:
            code = session.scalar(select(Batch.hold_code).where(Batch.id == batch_id))
            if code != HoldCode.API_UNREACHABLE:
                continue  # a person resumed or cancelled it meanwhile
            controls.resume(session, batch_id, note=message)
        log.warning("batch %s: %s", batch_id, message)
        resumed.append(batch_id)
    return ProbeResult(resumed=resumed, gave_up=gave_up)


def _give_up(db: Database, batch_id: int, since: datetime, policy: BreakerPolicy) -> None:
    reason = (
        f"the API did not answer for {policy.give_up / 60:.0f} min (since "
        f"{since.strftime('%H:%M:%S UTC')}): probing stopped; once it is back: "
        f"editbatch resume {batch_id}"
    )
    with db.session() as session:
        if jobs.change_hold(session, batch_id, HoldCode.API_UNREACHABLE, HoldCode.OUTAGE, reason):
            events.record(session, batch_id, EventKind.OUTAGE_GAVE_UP, reason)
        session.commit()
    log.warning("batch %s: %s", batch_id, reason)
