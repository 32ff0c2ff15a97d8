"""`#sandbox:` directives in the prompt: a chosen fault for the first K identical prompts."""

from __future__ import annotations

import base64
import binascii
import time

import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import admin, billing_lines, png, upload

IMAGE = upload(png(32, 32))

REJECTIONS = [
    ("500", openai.InternalServerError, 500, "server_error", "server_error"),
    ("429", openai.RateLimitError, 429, "requests", "rate_limit_exceeded"),
    ("quota", openai.RateLimitError, 429, "insufficient_quota", "insufficient_quota"),
    (
        "moderation",
        openai.BadRequestError,
        400,
        "image_generation_user_error",
        "moderation_blocked",
    ),
    ("400", openai.BadRequestError, 400, "invalid_request_error", None),
    ("401", openai.AuthenticationError, 401, "invalid_request_error", "invalid_api_key"),
    ("403", openai.PermissionDeniedError, 403, "invalid_request_error", None),
]


@pytest.mark.parametrize(
    ("code", "exception", "status", "error_type", "error_code"),
    REJECTIONS,
    ids=[r[0] for r in REJECTIONS],
)
def test_error_directives(
    client: openai.OpenAI,
    sandbox: SandboxServer,
    code: str,
    exception: type[openai.APIStatusError],
    status: int,
    error_type: str,
    error_code: str | None,
) -> None:
    with pytest.raises(exception) as info:
        client.images.edit(image=IMAGE, prompt=f"edit #sandbox:{code}")
    error = info.value
    assert error.status_code == status
    assert error.type == error_type
    assert error.code == error_code
    assert error.message
    assert error.response.headers["x-request-id"].startswith("req_")
    if code == "429":
        assert error.response.headers["retry-after-ms"] == "50"
    if code == "moderation":
        assert isinstance(error.body, dict) and "moderation_details" in error.body
    assert billing_lines(sandbox.config.billing_log) == []
    assert admin(sandbox.base_url, "stats")["billed"] == 0


def test_xk_fails_only_the_first_k_identical_prompts(client: openai.OpenAI) -> None:
    prompt = "retry me #sandbox:500x2"
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.images.edit(image=IMAGE, prompt=prompt)
    assert client.images.edit(image=IMAGE, prompt=prompt).data
    # A different prompt text has its own counter.
    with pytest.raises(openai.InternalServerError):
        client.images.edit(image=IMAGE, prompt=prompt + " again")


def test_directives_apply_after_validation(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p #sandbox:500", n=11)
    assert info.value.param == "n"


def test_latency_directive(client: openai.OpenAI) -> None:
    started = time.monotonic()
    client.images.edit(image=IMAGE, prompt="slow #sandbox:latency=300")
    assert time.monotonic() - started >= 0.3


def test_timeout_directive_hangs_until_the_client_gives_up(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.hang_seconds = 20
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).images.edit(image=IMAGE, prompt="p #sandbox:timeout")
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while admin(sandbox.base_url, "stats")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = admin(sandbox.base_url, "stats")
    assert stats["by_status"] == {"disconnected": 1}
    assert stats["in_flight"] == 0


def test_timeout_directive_answers_500_after_hang_seconds(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.hang_seconds = 0.2
    with pytest.raises(openai.InternalServerError):
        client.images.edit(image=IMAGE, prompt="p #sandbox:timeout")


def test_reset_directive_is_a_connection_error(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    with pytest.raises(openai.APIConnectionError) as info:
        client.images.edit(image=IMAGE, prompt="p #sandbox:reset")
    assert not isinstance(info.value, openai.APITimeoutError)
    assert "reset" in repr(info.value.__cause__).lower()
    stats = admin(sandbox.base_url, "stats")
    assert stats["by_status"] == {"reset": 1}
    assert stats["billed"] == 0
    assert billing_lines(sandbox.config.billing_log) == []


@pytest.mark.parametrize("bill_undelivered", [True, False])
def test_truncated_directive_is_a_connection_error(
    client: openai.OpenAI, sandbox: SandboxServer, bill_undelivered: bool
) -> None:
    """A cut-off answer was made, so it is billed (undelivered) unless bill_undelivered is off."""
    sandbox.config.bill_undelivered = bill_undelivered
    with pytest.raises(openai.APIConnectionError) as info:
        client.images.edit(image=IMAGE, prompt="p #sandbox:truncated")
    assert "complete message body" in str(info.value.__cause__)
    stats = admin(sandbox.base_url, "stats")
    lines = billing_lines(sandbox.config.billing_log)
    if bill_undelivered:
        assert (stats["billed"], stats["billed_undelivered"]) == (1, 1)
        assert [line["delivered"] for line in lines] == [False]
    else:
        assert (stats["billed"], stats["billed_undelivered"], lines) == (0, 0, [])


def test_badb64_directive_is_billed_and_does_not_decode(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    result = client.images.edit(image=IMAGE, prompt="p #sandbox:badb64", n=2)
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        with pytest.raises(binascii.Error):
            base64.b64decode(item.b64_json)
        with pytest.raises(binascii.Error):
            base64.b64decode(item.b64_json, validate=True)
    assert result.usage is not None
    assert len(billing_lines(sandbox.config.billing_log)) == 1
    assert admin(sandbox.base_url, "stats")["billed"] == 1
