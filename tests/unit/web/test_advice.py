"""pipeline.web.advice: the fix the batch page shows for each reason a batch stops."""

from __future__ import annotations

from pipeline.states import BatchState, HoldCode, JobState
from pipeline.web.advice import REJECTED_ADVICE, failure_advice, hold_advice


def test_every_hold_code_has_its_own_fix() -> None:
    """Each HoldCode names a different fix; a 403 is told apart from a 401; a batch that is
    neither held nor paused shows none."""
    held = {code: hold_advice(code, None, "held") for code in HoldCode if code != HoldCode.PAUSED}
    assert len(set(held.values())) == len(held), held
    assert "higher budget" in str(held[HoldCode.BUDGET])
    assert "EDITBATCH_DAILY_BUDGET_USD" in str(held[HoldCode.DAILY_BUDGET])
    assert "billing" in str(held[HoldCode.QUOTA])
    assert "OPENAI_API_KEY" in str(held[HoldCode.AUTH])
    assert "--model-map" in str(held[HoldCode.MODEL_UNAVAILABLE])
    assert "resumes the batch by itself" in str(held[HoldCode.API_UNREACHABLE])
    assert "then Resume" in str(held[HoldCode.OUTAGE])
    assert "docs/providers.md" in str(held[HoldCode.PROVIDER])
    forbidden = hold_advice(HoldCode.AUTH, "403 permission_denied: verify the org", "held")
    assert forbidden != held[HoldCode.AUTH] and "organisation" in str(forbidden)
    assert "Resume" in str(hold_advice(HoldCode.PAUSED, "paused by a person", "paused"))
    assert hold_advice(None, "an old reason", BatchState.HELD) is not None
    for state in (BatchState.RUNNING, BatchState.FINISHED, BatchState.CANCELLED):
        assert hold_advice(HoldCode.BUDGET, "budget: x", state) is None


def test_failure_advice_by_code_and_for_rejected_rows() -> None:
    assert "prompt" in failure_advice("moderation_blocked", JobState.FAILED)
    assert "content filter" in failure_advice("contentFilter", JobState.FAILED)
    assert failure_advice("invalid_size", JobState.REJECTED) == REJECTED_ADVICE
    assert failure_advice("something_new", JobState.FAILED).startswith("Read the message")
