"""Configured faults, the rate limit and the quota, as the SDK sees them."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import admin, billing_lines, png, raw_edit, upload

IMAGE = upload(png(32, 32))


def _status(client: openai.OpenAI, prompt: str = "p", n: int = 1) -> int:
    """Status of a cheap edit (gpt-image-2 at 256x256 renders fast)."""
    try:
        client.images.edit(image=IMAGE, prompt=prompt, n=n, model="gpt-image-2", size="256x256")
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_error_rate_can_change_while_running(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.error_rate = 1.0
    with pytest.raises(openai.InternalServerError) as info:
        client.images.edit(image=IMAGE, prompt="p")
    assert (info.value.type, info.value.code) == ("server_error", "server_error")
    sandbox.config.error_rate = 0.0
    assert _status(client) == 200


def test_random_faults_follow_the_seed(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.error_rate = 0.5
    sandbox.config.seed = 7
    first = [_status(client) for _ in range(12)]
    admin(sandbox.base_url, "reset")
    second = [_status(client) for _ in range(12)]
    assert first == second
    assert set(first) == {200, 500}


def test_burst_429_is_not_counted_as_rate_limited(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.burst_429_rate = 1.0
    with pytest.raises(openai.RateLimitError) as info:
        client.images.edit(image=IMAGE, prompt="p")
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after-ms"] == "200"
    assert info.value.response.headers["retry-after"] == "1"
    stats = admin(sandbox.base_url, "stats")
    assert stats["rate_limited"] == 0
    assert stats["by_status"] == {"429": 1}


def test_rate_limit_counts_images_and_says_when_capacity_returns(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.rate_limit_per_minute = 3
    before = time.monotonic()
    raw = client.images.with_raw_response.edit(image=IMAGE, prompt="p", n=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert _status(client) == 200
    with pytest.raises(openai.RateLimitError) as info:
        client.images.edit(image=IMAGE, prompt="p")
    after = time.monotonic()
    assert info.value.code == "rate_limit_exceeded"
    # Capacity returns 60 s after the first admission, which happened between before and after.
    wait_ms = int(info.value.response.headers["retry-after-ms"])
    assert 60_000 - 1000 * (after - before) - 1 <= wait_ms <= 60_000
    assert info.value.response.headers["retry-after"] == str(-(-wait_ms // 1000))
    stats = admin(sandbox.base_url, "stats")
    assert stats["rate_limited"] == 1
    assert stats["billed"] == 2


def test_quota_after_n_billed_requests(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.quota_after = 2
    assert [_status(client) for _ in range(2)] == [200, 200]
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            client.images.edit(image=IMAGE, prompt="p")
        assert (info.value.type, info.value.code) == ("insufficient_quota", "insufficient_quota")
    assert admin(sandbox.base_url, "stats")["billed"] == 2
    assert len(billing_lines(sandbox.config.billing_log)) == 2


def test_quota_is_never_exceeded_under_concurrency(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.quota_after = 5
    sandbox.config.latency_ms = 100
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: _status(client), range(12)))
    assert statuses.count(200) == 5
    assert statuses.count(429) == 7
    assert admin(sandbox.base_url, "stats")["billed"] == 5


@pytest.mark.parametrize(("field", "billed"), [("reset_rate", 0), ("truncated_rate", 1)])
def test_broken_connections_surface_as_api_connection_error(
    client: openai.OpenAI, sandbox: SandboxServer, field: str, billed: int
) -> None:
    """A reset comes before any answer (not billed); a truncated answer was made (billed)."""
    setattr(sandbox.config, field, 1.0)
    with pytest.raises(openai.APIConnectionError):
        client.images.edit(image=IMAGE, prompt="p")
    assert admin(sandbox.base_url, "stats")["billed"] == billed


def test_bad_b64_rate_is_billed(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.bad_b64_rate = 1.0
    result = client.images.edit(image=IMAGE, prompt="p")
    assert result.data and result.data[0].b64_json and result.data[0].b64_json.endswith("!")
    assert admin(sandbox.base_url, "stats")["billed"] == 1


def test_timeout_rate_hangs_then_500(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.timeout_rate = 1.0
    sandbox.config.hang_seconds = 0.3
    started = time.monotonic()
    assert _status(client) == 500
    assert time.monotonic() - started >= 0.3


def test_latency_lets_many_requests_wait_at_once(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.latency_ms = 400
    started = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda i: _status(client, prompt=f"p{i}"), range(40)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 40
    assert 0.4 <= elapsed < 10  # 40 x 0.4 s one after another would take 16 s
    stats = admin(sandbox.base_url, "stats")
    assert stats["max_in_flight"] >= 20
    assert stats["in_flight"] == 0
    assert stats["images"] == 40


def test_time_scale_shrinks_latency(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.latency_ms = 40_000
    sandbox.config.time_scale = 0.001
    started = time.monotonic()
    assert _status(client) == 200
    assert 0.04 <= time.monotonic() - started < 5  # unscaled: 40 s


def test_billing_log_is_whole_lines_under_concurrency(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: _status(client, prompt=f"p{i}", n=1 + i % 3), range(32)))
    lines = billing_lines(sandbox.config.billing_log)
    assert len(lines) == 32
    assert len({line["request_id"] for line in lines}) == 32
    assert sum(line["n"] for line in lines) == admin(sandbox.base_url, "stats")["images"]


def test_raw_unknown_key_is_refused_when_keys_are_configured(sandbox: SandboxServer) -> None:
    sandbox.config.api_keys = ["sk-a"]
    assert raw_edit(sandbox.base_url, fields={"prompt": "p"}).status_code == 401
    ok = raw_edit(sandbox.base_url, fields={"prompt": "p"}, authorization="Bearer sk-a")
    assert ok.status_code == 200
