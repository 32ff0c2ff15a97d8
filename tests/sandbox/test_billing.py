"""Billing as the real API bills: an answer is paid for once it is made, whether or not the
client is still there to receive it ("a call lost in flight is still paid for")."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import admin, billing_lines, png, upload

IMAGE = upload(png(32, 32))
LATENCY_MS = 600
CLIENT_TIMEOUT = 0.15


def _settled(sandbox: SandboxServer) -> dict[str, Any]:
    """Stats once no request is in flight (the server finishes work the client gave up on)."""
    deadline = time.monotonic() + 10
    while True:
        stats: dict[str, Any] = admin(sandbox.base_url, "stats")
        if stats["in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def _give_up(client: openai.OpenAI, prompt: str = "p") -> None:
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=CLIENT_TIMEOUT).images.edit(
            image=IMAGE, prompt=prompt, model="gpt-image-2", size="1024x1024", quality="low"
        )


def test_an_answer_the_client_left_before_is_still_made_and_billed(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.latency_ms = LATENCY_MS
    started = time.monotonic()
    _give_up(client)
    assert time.monotonic() - started < LATENCY_MS / 1000  # the client did leave early
    stats = _settled(sandbox)
    assert stats["by_status"] == {"disconnected": 1}
    assert (stats["billed"], stats["billed_undelivered"], stats["images"]) == (1, 1, 1)
    [line] = billing_lines(sandbox.config.billing_log)
    assert (line["route"], line["delivered"], line["model"]) == ("sync", False, "gpt-image-2")
    usage = line["usage"]
    expected = (
        Decimal(usage["input_tokens_details"]["text_tokens"]) * 5
        + Decimal(usage["input_tokens_details"]["image_tokens"]) * 8
        + Decimal(272) * 30
    ) / 1_000_000
    assert line["cost_usd"] == f"{expected:.6f}"


def test_the_old_behaviour_bills_only_answers_sent(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.latency_ms = LATENCY_MS
    sandbox.config.bill_undelivered = False
    _give_up(client)
    stats = _settled(sandbox)
    assert stats["by_status"] == {"disconnected": 1}
    assert (stats["billed"], stats["billed_undelivered"]) == (0, 0)
    assert billing_lines(sandbox.config.billing_log) == []


def test_a_delivered_answer_is_logged_as_delivered(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    raw = client.images.with_raw_response.edit(image=IMAGE, prompt="p")
    [line] = billing_lines(sandbox.config.billing_log)
    assert (line["request_id"], line["route"], line["delivered"]) == (
        raw.headers["x-request-id"],
        "sync",
        True,
    )
    assert "batch_id" not in line
    assert admin(sandbox.base_url, "stats")["billed_undelivered"] == 0


@pytest.mark.parametrize("directive", ["500", "reset", "timeout"])
def test_failures_before_an_answer_is_made_are_not_billed(
    client: openai.OpenAI, sandbox: SandboxServer, directive: str
) -> None:
    sandbox.config.hang_seconds = 0.1
    with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
        client.images.edit(image=IMAGE, prompt=f"p #sandbox:{directive}")
    stats = _settled(sandbox)
    assert (stats["billed"], stats["billed_undelivered"]) == (0, 0)
    assert billing_lines(sandbox.config.billing_log) == []


def test_undelivered_answers_count_against_the_quota(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.latency_ms = LATENCY_MS
    sandbox.config.quota_after = 1
    _give_up(client)
    _settled(sandbox)
    with pytest.raises(openai.RateLimitError) as info:
        client.images.edit(image=IMAGE, prompt="p")
    assert info.value.code == "insufficient_quota"


def test_several_clients_leaving_are_each_billed_once(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.latency_ms = LATENCY_MS
    for index in range(3):
        _give_up(client, prompt=f"p{index}")
    client.images.edit(image=IMAGE, prompt="kept")
    stats = _settled(sandbox)
    assert (stats["billed"], stats["billed_undelivered"]) == (4, 3)
    lines = billing_lines(sandbox.config.billing_log)
    assert sorted(line["delivered"] for line in lines) == [False, False, False, True]
    assert len({line["request_id"] for line in lines}) == 4
