"""Pure parts of the gateway and the retry policy: classification, retry-after, usage."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image
from tenacity import RetryCallState, Retrying

from pipeline.errors import PermitTimeout
from pipeline.run.gateway import CallOutcome, decode_images, usage_from_response
from pipeline.run.ratelimit import LocalLimiter, gcra_wait, parse_reset
from pipeline.run.retry import classify, hold_code, parse_retry_after, wait_api
from pipeline.states import HoldCode


def test_a_model_that_is_gone_holds_in_both_shapes_the_api_has_used() -> None:
    """404 model_not_found and 400 with param "model" both mean "this model is not available":
    the batch holds once (hold code model_unavailable) instead of failing every job."""
    assert classify(404, "invalid_request_error", "model_not_found") == "hold"
    assert classify(400, "invalid_request_error", "invalid_value", "model") == "hold"
    assert classify(400, "invalid_request_error", "invalid_value", "size") == "failed"
    assert hold_code(404, "model_not_found", None) == HoldCode.MODEL_UNAVAILABLE
    assert hold_code(400, "invalid_value", "model") == HoldCode.MODEL_UNAVAILABLE
    assert hold_code(429, "insufficient_quota", None) == HoldCode.QUOTA
    assert hold_code(401, "invalid_api_key", None) == HoldCode.AUTH


@pytest.mark.parametrize("code", ["contentFilter", "content_filter", "content_policy_violation"])
def test_a_content_filter_fails_the_job_whatever_else_the_answer_says(code: str) -> None:
    """Azure's content filter (in each spelling reported) is this job's content: failed, never
    retried, never a hold, even when its param is the model's."""
    assert classify(400, None, code, "prompt") == "failed"
    assert classify(400, None, code, "model") == "failed"


def test_an_azure_setting_the_resource_does_not_know_holds_the_batch() -> None:
    """A deployment or api-version Azure does not know fails every call on it the same way:
    hold (hold code provider) for a person to fix the setting, rather than fail each job."""
    assert classify(404, None, "DeploymentNotFound") == "hold"
    assert hold_code(404, "DeploymentNotFound", None) == HoldCode.PROVIDER
    assert classify(404, None, "404", None, "Resource not found") == "hold"
    version = "API version not supported"
    assert classify(400, None, "BadRequest", None, version) == "hold"
    assert hold_code(400, "BadRequest", None, version) == HoldCode.PROVIDER
    assert classify(400, None, "BadRequest", None, "Invalid image") == "failed"
    assert classify(429, None, "429", None, "exceeded call rate limit") == "transient"


@pytest.mark.parametrize(
    ("status", "etype", "code", "kind"),
    [
        (429, "requests", "rate_limit_exceeded", "transient"),
        (429, "insufficient_quota", "insufficient_quota", "hold"),
        (429, "invalid_request_error", "credit_balance_exhausted", "hold"),
        (429, None, "project_spend_limit_exceeded", "hold"),
        (401, "invalid_request_error", "invalid_api_key", "hold"),
        (403, None, None, "hold"),
        (400, "invalid_request_error", "unsupported_file_mimetype", "failed"),
        (400, "image_generation_user_error", "moderation_blocked", "failed"),
        (404, "invalid_request_error", "model_not_found", "hold"),
        (404, "invalid_request_error", "not_found", "failed"),
        (408, None, None, "transient"),
        (409, None, None, "transient"),
        (500, "server_error", None, "transient"),
        (503, None, None, "transient"),
        (None, None, None, "transient"),
    ],
)
def test_classify(status: int | None, etype: str | None, code: str | None, kind: str) -> None:
    assert classify(status, etype, code) == kind


def test_retry_after_prefers_ms_and_rejects_nonsense() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert parse_retry_after({"retry-after": "100000"}) is None
    assert parse_retry_after({}) is None


def test_usage_split() -> None:
    u = SimpleNamespace(
        input_tokens=400,
        output_tokens=1056,
        input_tokens_details=SimpleNamespace(image_tokens=388, text_tokens=12),
        output_tokens_details=None,
    )
    usage = usage_from_response(u)
    assert usage is not None
    assert (usage.text_input, usage.image_input, usage.image_output) == (12, 388, 1056)
    assert usage_from_response(None) is None


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_decode_images() -> None:
    ok = decode_images([SimpleNamespace(b64_json=_png())])
    assert isinstance(ok, tuple) and len(ok) == 1
    assert decode_images([SimpleNamespace(b64_json="!!notb64")]) == "image 1: invalid base64"
    bad = base64.b64encode(b"not an image").decode()
    assert "not a readable image" in str(decode_images([SimpleNamespace(b64_json=bad)]))
    assert decode_images([]) == "the response contained no images"


def test_wait_honours_retry_after_and_jitters() -> None:
    wait = wait_api(base=0.1, cap=2.0)
    outcomes = iter([CallOutcome(kind="transient", latency_ms=1, retry_after=5.0)])

    def attempt() -> CallOutcome:
        return next(outcomes)

    state = RetryCallState(Retrying(), attempt, (), {})
    state.set_result(attempt())
    assert wait(state) == 5.0  # longer than the cap: the server asked for it
    state2 = RetryCallState(Retrying(), attempt, (), {})
    state2.set_result(CallOutcome(kind="transient", latency_ms=1))
    waits = {wait(state2) for _ in range(50)}
    assert all(0 <= w <= 2.0 for w in waits)
    assert len(waits) > 1  # jittered


def test_gcra_spacing() -> None:
    interval = 60 / 120  # 120 images per minute
    tat, now, granted = 0.0, 100.0, 0
    for _ in range(10):
        wait, new_tat = gcra_wait(tat, now, interval, burst=1, cost=1)
        if wait == 0:
            granted += 1
            tat = new_tat
        else:
            now += wait
            wait2, tat = gcra_wait(tat, now, interval, 1, 1)
            assert wait2 == 0
            granted += 1
    assert granted == 10
    assert now == pytest.approx(100.0 + 9 * interval)


def test_local_limiter_paces_and_times_out() -> None:
    clock = {"t": 0.0}
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock["t"] += s

    lim = LocalLimiter(60, 2, clock=lambda: clock["t"], sleep=sleep)
    for _ in range(3):
        with lim.permit("m", 1):
            pass
    assert clock["t"] == pytest.approx(2.0)  # one image per second
    lim.backoff("m", 10)
    with pytest.raises(PermitTimeout), lim.permit("m", 1, max_wait=1.0):
        pass
    lim.observe("m", {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"})
    start = clock["t"]
    with lim.permit("m", 1):
        pass
    assert clock["t"] - start == pytest.approx(20.0)


def test_parse_reset() -> None:
    assert parse_reset("1m30s") == 90.0
    assert parse_reset("120ms") == pytest.approx(0.12)
    assert parse_reset("garbage") is None


def test_a_body_cut_off_is_an_answer_made_a_reset_is_not() -> None:
    """httpx2's words for a connection closed inside the body (the answer was made: billed)
    against one reset before any answer (nothing made)."""
    import httpx2

    from pipeline.run.gateway import answer_cut_off

    cut = httpx2.RemoteProtocolError(
        "peer closed connection without sending complete message body (received 2440 bytes, "
        "expected 4880)"
    )
    assert answer_cut_off(cut)
    assert not answer_cut_off(httpx2.ReadError("[Errno 104] Connection reset by peer"))
    assert not answer_cut_off(httpx2.RemoteProtocolError("Server disconnected"))
    assert not answer_cut_off(None)
