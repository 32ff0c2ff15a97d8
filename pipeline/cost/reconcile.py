"""The ledger against the provider's own figures, per UTC day and model, with the difference
named (`editbatch reconcile`).

    ledger     attempts the API answered (their tokens were recorded), by the day they
               finished: calls, images (the job's n), input and output tokens, cost. Only
               the calls sent to OpenAI (provider `openai`; NULL before providers, and the
               batch route): the usage API is OpenAI's, and an Azure or gateway call is on
               another bill
    provider   `/organization/usage/images` grouped by model (calls = num_model_requests,
               images) and `/organization/costs` grouped by line item (`MODEL, input_tokens` and
               `MODEL, output_tokens`: tokens and dollars), read with OPENAI_ADMIN_KEY
    unsure     attempts whose fate is unknown: the worker died during the call (interrupted),
               the client gave up (timeout), or the answer was cut off. The provider may have
               billed them; the ledger books each at its estimate (`unsure_usd`), kept apart
               from the answered calls so that each side's calls can be compared.

How a difference is named (`explain`, pure):

    provider has more calls   up to `unsure` of them are lost answers (billed, never received);
                              the rest were made outside editbatch (another script or key of the
                              organization, `doctor --probe`)
    ledger has more calls     the provider has not counted them yet (its usage lags)
    same calls, unsure ones   the calls of unknown fate never reached the provider: the ledger
                              booked their estimate for nothing
    same calls, other tokens  token counts differ (estimated usage for answers without one)
    same usage, other dollars a price difference: the price table is not the provider's
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import func, or_, select

from pipeline.db.jobs import ANSWER_LOST
from pipeline.db.models import Attempt, Batch, Job, utcnow
from pipeline.db.session import Database
from pipeline.output.storage import Storage
from pipeline.providers import DEFAULT_PROVIDER
from pipeline.spec import EditSpec
from pipeline.states import AttemptOutcome

__all__ = [
    "UNSURE_CODES",
    "Billing",
    "Figures",
    "Line",
    "after_batch",
    "compare",
    "explain",
    "ledger_figures",
    "provider_figures",
    "reconcile_day",
]

log = logging.getLogger("editbatch.reconcile")

MICRO = Decimal("0.000001")
# Error codes of calls whose answer may have been made and billed without reaching us: a dead
# worker's call, a timeout, an answer cut off mid-body (each booked at its estimate).
UNSURE_CODES = (ANSWER_LOST, "timeout", "truncated_response")
NOT_BY_MODEL = "(not by model)"

Key = tuple[date, str]


class Billing(Protocol):
    """The provider's usage and costs (`pipeline.run.gateway.BillingGateway`)."""

    def usage_images(self, start: int, end: int) -> list[dict[str, Any]]: ...

    def costs(self, start: int, end: int) -> list[dict[str, Any]]: ...


@dataclass
class Figures:
    calls: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Decimal = Decimal(0)

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "images": self.images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "usd": str(self.usd.quantize(MICRO)),
        }


@dataclass(frozen=True)
class Line:
    """One day and model: both sides, the calls of unknown fate, and the verdict in words."""

    day: date
    model: str
    ledger: Figures
    provider: Figures
    unsure: int = 0
    estimated: int = 0
    verdict: str = "match"
    unsure_usd: Decimal = Decimal(0)  # what the ledger booked for the unsure calls (estimates)

    @property
    def matches(self) -> bool:
        return self.verdict == "match"

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "model": self.model,
            "ledger": self.ledger.to_json(),
            "provider": self.provider.to_json(),
            "unsure_calls": self.unsure,
            "unsure_usd": str(self.unsure_usd.quantize(MICRO)),
            "estimated_calls": self.estimated,
            "match": self.matches,
            "difference": self.verdict,
        }


@dataclass
class _Ledger:
    figures: dict[Key, Figures] = field(default_factory=lambda: defaultdict(Figures))
    unsure: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    unsure_usd: dict[Key, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    estimated: dict[Key, int] = field(default_factory=lambda: defaultdict(int))


def _bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), UTC)
    return start, start + timedelta(days=1)


def _day(moment: datetime) -> date:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).date()


def ledger_figures(db: Database, day: date) -> _Ledger:
    """The ledger's side for one UTC day (attempts by the time they finished), of the calls
    sent to OpenAI."""
    start, end = _bounds(day)
    when = func.coalesce(Attempt.finished_at, Attempt.started_at)
    out = _Ledger()
    with db.session() as session:
        rows = session.execute(
            select(
                when,
                Job.model,
                Job.spec,
                Attempt.text_input_tokens,
                Attempt.image_input_tokens,
                Attempt.image_output_tokens,
                Attempt.text_output_tokens,
                Attempt.cost_usd,
                Attempt.cost_estimated,
                Attempt.outcome,
                Attempt.error_code,
            )
            .join(Job, Job.id == Attempt.job_id)
            .where(
                when >= start,
                when < end,
                or_(Attempt.provider.is_(None), Attempt.provider == DEFAULT_PROVIDER),
                or_(
                    Attempt.text_input_tokens.is_not(None),
                    Attempt.outcome == AttemptOutcome.INTERRUPTED,
                    Attempt.error_code.in_(UNSURE_CODES),
                ),
            )
        )
        for at, model, spec, t_in, i_in, i_out, t_out, cost, est, outcome, code in rows:
            name = model or EditSpec.from_json(spec).model
            key = (_day(at), name)
            if outcome == AttemptOutcome.INTERRUPTED or code in UNSURE_CODES:
                # Billed or not, nobody knows: booked at its estimate (tokens estimated too).
                out.unsure[key] += 1
                out.unsure_usd[key] += Decimal(str(cost or 0))
                continue
            figures = out.figures[key]
            figures.calls += 1
            figures.images += EditSpec.from_json(spec).n
            figures.input_tokens += int(t_in or 0) + int(i_in or 0)
            figures.output_tokens += int(i_out or 0) + int(t_out or 0)
            figures.usd += Decimal(str(cost or 0))
            if est:
                out.estimated[key] += 1
    return out


def provider_figures(billing: Billing, day: date) -> dict[Key, Figures]:
    """The provider's side for one UTC day."""
    start, end = (int(moment.timestamp()) for moment in _bounds(day))
    out: dict[Key, Figures] = defaultdict(Figures)
    for result in billing.usage_images(start, end):
        key = (
            datetime.fromtimestamp(result["start_time"], UTC).date(),
            result.get("model") or NOT_BY_MODEL,
        )
        out[key].calls += int(result.get("num_model_requests") or 0)
        out[key].images += int(result.get("images") or 0)
    for result in billing.costs(start, end):
        bucket = datetime.fromtimestamp(result["start_time"], UTC).date()
        item = str(result.get("line_item") or "")
        model, _, kind = item.rpartition(", ")
        key = (bucket, model or NOT_BY_MODEL)
        amount = (result.get("amount") or {}).get("value") or 0
        # A JSON number of at most 6 decimals: its shortest repr is the exact amount.
        out[key].usd += Decimal(str(amount)).quantize(MICRO)
        quantity = int(result.get("quantity") or 0)
        if "input" in kind:
            out[key].input_tokens += quantity
        elif "output" in kind:
            out[key].output_tokens += quantity
    return out


def explain(
    ledger: Figures,
    provider: Figures,
    unsure: int = 0,
    estimated: int = 0,
    unsure_usd: Decimal = Decimal(0),
) -> str:
    """The difference between the two sides in words, or "match" (pure). `ledger` holds the
    answered calls; `unsure` calls of unknown fate were booked at `unsure_usd` of estimates."""
    if ledger == provider:
        if unsure and unsure_usd:
            return (
                f"{unsure} call(s) of unknown fate were not billed by the provider (they never "
                f"reached it): the ledger booked ${unsure_usd:.6f} of estimates for them"
            )
        return "match"
    parts = []
    if provider.calls > ledger.calls:
        extra = provider.calls - ledger.calls
        lost = min(extra, unsure)
        usd = provider.usd - ledger.usd
        if lost:
            parts.append(
                f"{lost} lost answer(s): calls the provider billed whose answer never reached "
                "editbatch (a worker died or gave up during the call; the ledger booked "
                f"${unsure_usd:.6f} of estimates for the {unsure} call(s) of unknown fate)"
            )
        if extra - lost:
            parts.append(
                f"{extra - lost} call(s) made outside editbatch (another script or key of this "
                "organization, or doctor --probe)"
            )
        parts.append(f"the provider's extra: ${usd:.6f}")
    elif ledger.calls > provider.calls:
        parts.append(
            f"{ledger.calls - provider.calls} call(s) in the ledger the provider does not show "
            "yet (its usage lags: run reconcile again later)"
        )
    elif (ledger.input_tokens, ledger.output_tokens) != (
        provider.input_tokens,
        provider.output_tokens,
    ):
        note = f"; {estimated} cost(s) were estimated (answers without usage)" if estimated else ""
        parts.append(
            f"token counts differ: input {ledger.input_tokens} vs {provider.input_tokens}, "
            f"output {ledger.output_tokens} vs {provider.output_tokens}{note}"
        )
    elif ledger.usd != provider.usd:
        parts.append(
            f"a price difference: the same usage costs ${provider.usd:.6f} at the provider and "
            f"${ledger.usd:.6f} in the ledger (prices changed? editbatch prices; "
            "EDITBATCH_PRICES_FILE)"
        )
    elif ledger.images != provider.images:
        parts.append(f"images differ: {ledger.images} vs {provider.images}")
    return "; ".join(parts) or "match"


def compare(ledger: _Ledger, provider: dict[Key, Figures], day: date | None = None) -> list[Line]:
    """One line per day and model found on either side (and with calls of unknown fate)."""
    keys = set(ledger.figures) | set(provider) | set(ledger.unsure)
    if day is not None:
        keys = {k for k in keys if k[0] == day}
    lines = []
    for key in sorted(keys):
        mine = ledger.figures.get(key, Figures())
        theirs = provider.get(key, Figures())
        unsure = ledger.unsure.get(key, 0)
        unsure_usd = ledger.unsure_usd.get(key, Decimal(0))
        estimated = ledger.estimated.get(key, 0)
        if mine == theirs == Figures() and not unsure:
            continue
        lines.append(
            Line(
                key[0],
                key[1],
                mine,
                theirs,
                unsure,
                estimated,
                explain(mine, theirs, unsure, estimated, unsure_usd),
                unsure_usd,
            )
        )
    return lines


def reconcile_day(db: Database, billing: Billing, day: date) -> list[Line]:
    """The ledger against the provider for one UTC day."""
    return compare(ledger_figures(db, day), provider_figures(billing, day), day)


def after_batch(db: Database, billing: Billing, batch_id: int, storage: Storage) -> str:
    """Reconcile the days a (nightly) batch ran, log one line per model, and write
    `reconcile-<batch>.json` beside its report; the file's URI."""
    with db.session() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        first = _day(batch.created_at)
        last = _day(batch.finished_at or utcnow())
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    lines = [line for day in days for line in reconcile_day(db, billing, day)]
    for line in lines:
        level = logging.INFO if line.matches else logging.WARNING
        log.log(level, "reconcile %s %s: %s", line.day, line.model, line.verdict)
    body = {
        "batch_id": batch_id,
        "days": [d.isoformat() for d in days],
        "match": all(line.matches for line in lines),
        "models": [line.to_json() for line in lines],
    }
    return storage.write(f"reconcile-{batch_id}.json", json.dumps(body, indent=2).encode())
