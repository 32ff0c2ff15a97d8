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
the database (`pipeline.db.events`). It is keyed by a scope, one per provider (`scope_of`: the
provider's name and a hash of where its calls go): each provider has its own breaker
(`Breaker.of`), the executor counts a call on its job's provider's, and an outage event names
the provider, so an outage of Azure holds the batches whose calls go to Azure, and only Azure's
probe resumes them, while OpenAI's batches run on.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy import select

from pipeline.batch import controls
from pipeline.db import events, jobs
from pipeline.db.events import EventKind
from pipeline.db.models import Batch, BatchEvent, utcnow
from pipeline.db.session import Database
from pipeline.providers import DEFAULT_PROVIDER, providers_of
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
    "breaker_of",
    "held_for",
    "hold_for_outage",
    "is_outage",
    "outage_since",
    "probe",
    "scope_of",
    "scopes_of",
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


def _scope(provider: str, where: str) -> str:
    return f"{provider}:{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def scopes_of(settings: Settings) -> dict[str, str]:
    """The breaker's key of every configured provider: its name and a hash of where its calls
    go (never a key). OpenAI's is the same as before providers (a hash of its base URL)."""
    providers = providers_of(settings)
    return {
        name: _scope(name, provider.connection.describe())
        for name, provider in providers.providers.items()
    }


def scope_of(settings: Settings, provider: str = DEFAULT_PROVIDER) -> str:
    """The breaker's key for `provider` (see `scopes_of`)."""
    return scopes_of(settings).get(provider) or _scope(provider, provider)


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
    """One provider's breaker (one scope): the policy, the shared state, and what the executor
    asks of it. `of(name)` is another provider's breaker on the same store and policy."""

    store: BreakerStore
    policy: BreakerPolicy
    scope: str
    provider: str = DEFAULT_PROVIDER
    scopes: Mapping[str, str] = field(default_factory=dict)  # every provider's scope

    def of(self, provider: str | None) -> Breaker:
        """The breaker of `provider` (None: this one)."""
        if provider is None or provider == self.provider:
            return self
        scope = self.scopes.get(provider) or _scope(provider, provider)
        return replace(self, scope=scope, provider=provider)

    def every(self) -> list[Breaker]:
        """One breaker per configured provider (this one first)."""
        others = sorted(name for name in self.scopes if name != self.provider)
        return [self, *(self.of(name) for name in others)]

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


def breaker_of(store: BreakerStore, settings: Settings) -> Breaker:
    """The default provider's breaker on `store`, knowing every provider's scope."""
    scopes = scopes_of(settings)
    default = settings.provider.strip() or DEFAULT_PROVIDER
    return Breaker(
        store,
        BreakerPolicy.from_settings(settings),
        scopes.get(default) or _scope(default, default),
        default,
        scopes,
    )


# -- holding a batch ----------------------------------------------------------------------------


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S UTC")


def _who(provider: str) -> str:
    return "API" if provider == DEFAULT_PROVIDER else f"provider {provider}"


def hold_for_outage(
    db: Database,
    batch_id: int,
    trip: Trip,
    policy: BreakerPolicy,
    provider: str = DEFAULT_PROVIDER,
) -> bool:
    """Hold a running batch as api_unreachable for `provider`'s outage, saying since when and
    why (its event, naming the provider, and a log line). True for the one caller that held
    it."""
    reason = (
        f"{_who(provider)} unreachable since {_clock(trip.tripped_at)}: {policy.threshold} "
        f"calls in a row failed (last: {trip.reason}); probing it, resumes by itself when it "
        "answers"
    )
    with db.session() as session:
        held = jobs.hold_batch(session, batch_id, HoldCode.API_UNREACHABLE, reason)
        if held:
            events.record(session, batch_id, EventKind.OUTAGE_HELD, reason, provider)
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


def held_for(db: Database, batch_id: int) -> str | None:
    """The provider whose outage holds `batch_id` (its last trip's), or None when the batch is
    not held api_unreachable."""
    with db.session() as session:
        code = session.scalar(select(Batch.hold_code).where(Batch.id == batch_id))
        if code != HoldCode.API_UNREACHABLE:
            return None
        provider = session.scalar(
            select(BatchEvent.provider)
            .where(BatchEvent.batch_id == batch_id, BatchEvent.kind == EventKind.OUTAGE_HELD)
            .order_by(BatchEvent.id.desc())
            .limit(1)
        )
    return provider or DEFAULT_PROVIDER


def _held(db: Database, provider: str) -> dict[int, datetime]:
    """Batches held for an outage of `provider` (their last trip's), with when it began."""
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
                select(BatchEvent.at, BatchEvent.kind, BatchEvent.provider)
                .where(BatchEvent.batch_id == batch_id)
                .order_by(BatchEvent.id)
            ).all()
            trips = [p or DEFAULT_PROVIDER for _, kind, p in rows if kind == EventKind.OUTAGE_HELD]
            if (trips[-1] if trips else DEFAULT_PROVIDER) != provider:
                continue  # held for another provider's outage: its own probe resumes it
            history = [(_aware(at), str(kind)) for at, kind, _ in rows]
            out[batch_id] = outage_since(history) or utcnow()
    return out


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def probe(breaker: Breaker, db: Database, ask: Callable[[], str | None]) -> ProbeResult:
    """One probe of `breaker`'s provider: give up on its outages older than the give-up time,
    then ask it (`ask()`: a free call; None when it answered, else why not). On an answer,
    close the breaker and resume every batch held for this provider's outage; otherwise say
    when to probe again."""
    now = utcnow()
    held = _held(db, breaker.provider)
    give_up = breaker.policy.give_up
    gave_up = [b for b, since in held.items() if (now - since).total_seconds() >= give_up]
    for batch_id in gave_up:
        _give_up(db, batch_id, held.pop(batch_id), breaker.policy, breaker.provider)
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
        message = f"the {_who(breaker.provider)} answers again; resumed after {seconds:.0f} s held"
        with db.session() as session:
            code = session.scalar(select(Batch.hold_code).where(Batch.id == batch_id))
            if code != HoldCode.API_UNREACHABLE:
                continue  # a person resumed or cancelled it meanwhile
            controls.resume(session, batch_id, note=message)
        log.warning("batch %s: %s", batch_id, message)
        resumed.append(batch_id)
    return ProbeResult(resumed=resumed, gave_up=gave_up)


def _give_up(
    db: Database, batch_id: int, since: datetime, policy: BreakerPolicy, provider: str
) -> None:
    reason = (
        f"the {_who(provider)} did not answer for {policy.give_up / 60:.0f} min (since "
        f"{since.strftime('%H:%M:%S UTC')}): probing stopped; once it is back: "
        f"editbatch resume {batch_id}"
    )
    with db.session() as session:
        if jobs.change_hold(session, batch_id, HoldCode.API_UNREACHABLE, HoldCode.OUTAGE, reason):
            events.record(session, batch_id, EventKind.OUTAGE_GAVE_UP, reason, provider)
        session.commit()
    log.warning("batch %s: %s", batch_id, reason)
