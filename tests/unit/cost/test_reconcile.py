"""How reconcile names a difference between the ledger and the provider (pure), and how it reads
the provider's figures (a fake usage API with the shapes of the contract)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.cost.reconcile import Figures, compare, explain, ledger_figures, provider_figures
from pipeline.db import jobs
from pipeline.db.models import Attempt, Job, utcnow
from pipeline.db.session import Database
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch

LEDGER = Figures(calls=10, images=10, input_tokens=2000, output_tokens=2720, usd=Decimal("0.1"))


def same(**changes: Any) -> Figures:
    values = {**LEDGER.__dict__, **changes}
    return Figures(**values)


def test_equal_sides_match() -> None:
    assert explain(LEDGER, same()) == "match"


def test_extra_provider_calls_are_lost_answers_up_to_the_unsure_calls_then_outside() -> None:
    text = explain(LEDGER, same(calls=13, usd=Decimal("0.13")), unsure=1)
    assert text.startswith("1 lost answer(s)")
    assert "2 call(s) made outside editbatch" in text
    assert text.endswith("the provider's extra: $0.030000")
    only_lost = explain(LEDGER, same(calls=11, usd=Decimal("0.11")), unsure=3)
    assert "outside editbatch" not in only_lost and only_lost.startswith("1 lost answer(s)")


def test_unsure_calls_the_provider_did_not_bill_are_a_difference() -> None:
    """Same answered calls on both sides, but the ledger booked estimates for calls of unknown
    fate: they never reached the provider, so the ledger is above the bill by that much."""
    text = explain(LEDGER, same(), unsure=2, unsure_usd=Decimal("0.08"))
    assert text.startswith("2 call(s) of unknown fate were not billed by the provider")
    assert "$0.080000" in text
    assert explain(LEDGER, same(), unsure=0) == "match"


def test_more_ledger_calls_mean_the_provider_lags() -> None:
    assert "does not show yet" in explain(LEDGER, same(calls=8))


def test_same_calls_other_tokens_then_other_prices() -> None:
    tokens = explain(LEDGER, same(output_tokens=2700), estimated=2)
    assert tokens.startswith("token counts differ: input 2000 vs 2000, output 2720 vs 2700")
    assert "2 cost(s) were estimated" in tokens
    price = explain(LEDGER, same(usd=Decimal("0.05")))
    assert price.startswith("a price difference: the same usage costs $0.050000 at the provider")
    assert "EDITBATCH_PRICES_FILE" in price


class FakeBilling:
    """Two models on one day, line items as the sandbox (and the contract) name them."""

    def __init__(self, day: date) -> None:
        self.start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())

    def usage_images(self, start: int, end: int) -> list[dict[str, Any]]:
        assert start == self.start and end == self.start + 86400
        return [
            {"start_time": start, "model": "gpt-image-2", "images": 4, "num_model_requests": 3},
            {"start_time": start, "model": "gpt-image-1.5", "images": 1, "num_model_requests": 1},
        ]

    def costs(self, start: int, end: int) -> list[dict[str, Any]]:
        item = {"start_time": start, "quantity_unit": "tokens"}
        return [
            {**item, "line_item": "gpt-image-2, input_tokens", "quantity": 600,
             "amount": {"value": 0.003, "currency": "usd"}},
            {**item, "line_item": "gpt-image-2, output_tokens", "quantity": 1088,
             "amount": {"value": 0.032641, "currency": "usd"}},
            {**item, "line_item": "gpt-image-1.5, output_tokens", "quantity": 272,
             "amount": {"value": 0.008704, "currency": "usd"}},
        ]  # fmt: skip


def test_provider_figures_per_model_with_exact_dollars() -> None:
    day = date(2026, 11, 30)
    figures = provider_figures(FakeBilling(day), day)
    assert figures[(day, "gpt-image-2")] == Figures(3, 4, 600, 1088, Decimal("0.035641"))
    assert figures[(day, "gpt-image-1.5")] == Figures(1, 1, 0, 272, Decimal("0.008704"))


def test_calls_of_unknown_fate_are_kept_apart_at_what_the_ledger_booked(
    tmp_path: Path, db: Database
) -> None:
    """An answered call is on the ledger's side; a dead worker's call and a timeout (both booked
    at their estimate, the timeout with estimated tokens) are calls of unknown fate, counted
    and summed apart, so a lost answer is never mistaken for a call the provider lags on. A
    call sent to another provider (Azure) is not on OpenAI's side at all."""
    manifest = write_manifest(tmp_path / "in" / "m.csv", product_rows(tmp_path / "in", 3))
    batch_id = new_batch(db, manifest, str(tmp_path / "out")).batch_id
    now = utcnow()
    with db.session() as s:
        rows = s.execute(
            select(Job.id, Job.model).where(Job.batch_id == batch_id).order_by(Job.id)
        ).all()
        (answered, model), (timed_out, _), (killed, _) = rows
        tokens = {"text_input_tokens": 20, "image_input_tokens": 65, "image_output_tokens": 272}
        s.add(
            Attempt(
                job_id=answered, number=1, started_at=now, finished_at=now, outcome="ok",
                cost_usd=Decimal("0.011"), **tokens,
            )
        )  # fmt: skip
        s.add(
            Attempt(
                job_id=timed_out, number=1, started_at=now, finished_at=now,
                outcome="transient", error_type="timeout", error_code="timeout",
                cost_usd=Decimal("0.02"), cost_estimated=True, **tokens,
            )
        )  # fmt: skip
        s.add(Attempt(job_id=killed, number=1, started_at=now, outcome="in_flight"))
        # A call that went to Azure is on Azure's bill, not in OpenAI's usage: left out.
        s.add(
            Attempt(
                job_id=answered, number=2, started_at=now, finished_at=now, outcome="ok",
                cost_usd=Decimal("0.5"), provider="azure", deployment="img2", **tokens,
            )
        )  # fmt: skip
        s.commit()
        assert jobs.mark_interrupted(s, [killed]) == 1
        s.commit()
        estimate = Decimal(s.scalar(select(Job.estimated_usd).where(Job.id == killed)) or 0)
    assert estimate > 0
    day = now.date()
    key = (day, str(model))
    ledger = ledger_figures(db, day)
    assert ledger.figures[key] == Figures(1, 1, 85, 272, Decimal("0.011"))
    assert ledger.unsure[key] == 2
    assert ledger.unsure_usd[key] == Decimal("0.02") + estimate
    # The provider billed the answered call and one of the two: a lost answer, no lag.
    billed = Figures(2, 2, 170, 544, Decimal("0.031"))
    (line,) = compare(ledger, {key: billed}, day)
    assert line.verdict.startswith("1 lost answer(s)") and "does not show yet" not in line.verdict
    assert line.to_json()["unsure_usd"] == str(
        (Decimal("0.02") + estimate).quantize(Decimal("0.000001"))
    )
