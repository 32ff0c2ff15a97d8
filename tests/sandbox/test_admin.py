"""Admin endpoints, the server's life cycle and the command line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx2
import openai
import pytest

from pipeline import sandbox as sandbox_package
from pipeline.sandbox import SandboxConfig, SandboxServer, create_app
from pipeline.sandbox.__main__ import build_parser, config_from_args
from pipeline.sandbox.config import FIELD_NAMES
from tests.sandbox.helpers import admin, png, upload

IMAGE = upload(png(32, 32))


def test_public_surface() -> None:
    assert sorted(sandbox_package.__all__) == [
        "SandboxConfig",
        "SandboxServer",
        "create_app",
        "serve",
    ]
    assert create_app(SandboxConfig()).state.sandbox.config == SandboxConfig()


def test_stats_count_requests_by_outcome(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    client.images.edit(image=IMAGE, prompt="p", n=3)
    with pytest.raises(openai.BadRequestError):
        client.images.edit(image=IMAGE, prompt="p", n=0)
    with pytest.raises(openai.RateLimitError):
        client.images.edit(image=IMAGE, prompt="p #sandbox:429")
    stats = admin(sandbox.base_url, "stats")
    assert stats == {
        "requests": 3,
        "billed": 1,
        "by_status": {"200": 1, "400": 1, "429": 1},
        "in_flight": 0,
        "max_in_flight": 1,
        "rate_limited": 0,
        "images": 3,
        "faults": {"429": 1},
    }


def test_config_endpoint_updates_the_running_server(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    updated = admin(sandbox.base_url, "config", {"error_rate": 1, "rate_limit_per_minute": 50})
    assert updated["error_rate"] == 1.0 and updated["rate_limit_per_minute"] == 50
    assert sandbox.config.error_rate == 1.0
    with pytest.raises(openai.InternalServerError):
        client.images.edit(image=IMAGE, prompt="p")


@pytest.mark.parametrize(
    "body",
    [{"error_rat": 1}, {"error_rate": 2}, {"error_rate": "high"}, {"api_keys": "sk"}, [1]],
)
def test_config_endpoint_refuses_bad_values(sandbox: SandboxServer, body: object) -> None:
    root = sandbox.base_url.removesuffix("/v1")
    response = httpx2.post(f"{root}/sandbox/config", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"]
    assert sandbox.config.error_rate == 0.0


def test_reset_clears_stats_and_directive_counters(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    prompt = "p #sandbox:500x1"
    with pytest.raises(openai.InternalServerError):
        client.images.edit(image=IMAGE, prompt=prompt)
    assert client.images.edit(image=IMAGE, prompt=prompt).data
    assert admin(sandbox.base_url, "reset") == {"reset": True}
    assert admin(sandbox.base_url, "stats")["requests"] == 0
    with pytest.raises(openai.InternalServerError):
        client.images.edit(image=IMAGE, prompt=prompt)


def test_server_starts_on_a_free_port_and_stops() -> None:
    server = SandboxServer(SandboxConfig(latency_ms=1))
    server.start()
    try:
        assert server.port > 0
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        with socket.create_connection(("127.0.0.1", server.port), timeout=1):
            pass
        assert admin(server.base_url, "stats")["requests"] == 0
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_every_config_field_has_a_command_line_flag() -> None:
    args = build_parser().parse_args(
        [
            "--port=9",
            "--latency-ms=2000",
            "--latency-sigma=0.3",
            "--time-scale=0.5",
            "--rate-limit=50",
            "--error-rate=0.1",
            "--timeout-rate=0.01",
            "--hang-seconds=5",
            "--reset-rate=0.02",
            "--truncated-rate=0.03",
            "--bad-b64-rate=0.04",
            "--burst-429-rate=0.05",
            "--quota-after=100",
            "--drift=0.2",
            "--api-keys",
            "sk-a",
            "sk-b",
            "--seed=3",
            "--billing-log=/tmp/b.jsonl",
            "--azure-deployments",
            "edits-a=gpt-image-1.5",
            "edits-b=gpt-image-2",
            "--azure-api-versions",
            "2025-04-01-preview",
            "2026-01-01-preview",
            "--azure-api-keys",
            "az-1",
            "--azure-ad-tokens",
            "tok-1",
            "--azure-deployment-rpm",
            "edits-a=9",
            "edits-b=12",
            "--azure-content-filter-rate=0.1",
            "--admin-keys",
            "sk-admin-1",
            "--outage=503",
            "--outage-until=1800000000",
        ]
    )
    config = config_from_args(args)
    assert config == SandboxConfig(
        latency_ms=2000,
        latency_sigma=0.3,
        time_scale=0.5,
        rate_limit_per_minute=50,
        error_rate=0.1,
        timeout_rate=0.01,
        hang_seconds=5,
        reset_rate=0.02,
        truncated_rate=0.03,
        bad_b64_rate=0.04,
        burst_429_rate=0.05,
        quota_after=100,
        drift=0.2,
        api_keys=["sk-a", "sk-b"],
        seed=3,
        billing_log="/tmp/b.jsonl",
        azure_deployments={"edits-a": "gpt-image-1.5", "edits-b": "gpt-image-2"},
        azure_api_versions=["2025-04-01-preview", "2026-01-01-preview"],
        azure_api_keys=["az-1"],
        azure_ad_tokens=["tok-1"],
        azure_deployment_rpm={"edits-a": 9, "edits-b": 12},
        azure_content_filter_rate=0.1,
        admin_keys=["sk-admin-1"],
        outage="503",
        outage_until=1_800_000_000,
    )
    assert args.port == 9
    assert len(FIELD_NAMES) == 25
    assert config_from_args(build_parser().parse_args([])) == SandboxConfig()


def test_python_dash_m_serves(tmp_path: object) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sandbox", "--port", str(port), "--error-rate", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                config = httpx2.get(f"http://127.0.0.1:{port}/sandbox/config").json()
                break
            except httpx2.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        assert config["error_rate"] == 1.0
    finally:
        process.terminate()
        process.wait(timeout=10)
