"""What happened to a batch as a whole, kept for `status` and the report of a night.

A hold clears its reason when the batch resumes (`pipeline.db.jobs.move_batch`), so the outage
breaker writes its trips, resumes and give-ups here as well: in the morning `editbatch status`
still says when the API went away, why, and when the batch carried on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.db.models import BatchEvent, utcnow

__all__ = ["Event", "EventKind", "recent", "record"]


class EventKind(StrEnum):
    OUTAGE_HELD = "outage_held"  # the breaker tripped: the batch is held api_unreachable
    OUTAGE_RESUMED = "outage_resumed"  # the API answers again (or a person resumed it)
    OUTAGE_GAVE_UP = "outage_gave_up"  # probing stopped: the batch waits for a person


@dataclass(frozen=True)
class Event:
    at: datetime
    kind: str
    message: str

    def to_json(self) -> dict[str, str]:
        at = self.at.isoformat(timespec="seconds")
        return {"at": at, "kind": self.kind, "message": self.message}


def record(
    session: Session, batch_id: int, kind: EventKind, message: str, provider: str | None = None
) -> None:
    """Add an event to the batch (caller commits); `provider`: the one an outage is about."""
    session.add(
        BatchEvent(batch_id=batch_id, at=utcnow(), kind=kind, message=message, provider=provider)
    )


def recent(session: Session, batch_id: int, limit: int = 20) -> list[Event]:
    """The batch's latest events, oldest first."""
    rows = session.execute(
        select(BatchEvent.at, BatchEvent.kind, BatchEvent.message)
        .where(BatchEvent.batch_id == batch_id)
        .order_by(BatchEvent.id.desc())
        .limit(limit)
    ).all()
    return [Event(at, kind, message) for at, kind, message in reversed(rows)]
