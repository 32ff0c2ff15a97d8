"""Admin endpoints, the server's life cycle and the command line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

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
        "billed_undelivered": 0,
        "by_status": {"200": 1, "400": 1, "429": 1},
        "in_flight": 0,
        "max_in_flight": 1,
        "rate_limited": 0,
        "images": 3,
        "faults": {"429": 1},
        "uploads": {"count": 0, "bytes": 0, "distinct_sha256": 0},
        "batches": {"by_status": {}, "lines_done": 0, "lines_billed": 0},
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
    [
        {"error_rat": 1},
        {"error_rate": 2},
        {"error_rate": "high"},
        {"api_keys": "sk"},
        [1],
        {"today": "2026-13-01"},
        {"unavailable_style": "500"},
        {"org_verified": "no"},
        {"key_models": {"sk": "gpt-image-2"}},
        {"batch_lines_per_second": 0},
        {"batch_line_error_rate": 1.5},
        {"key_models": {"sk": [""]}},
        {"azure_deployments": {"edits-a": 1}},
        {"azure_deployment_rpm": {"edits-a": -1}},
        {"azure_deployment_rpm": {"edits-a": "9"}},
        {"outage": "down"},
    ],
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
            "--bill-undelivered=false",
            "--today=2026-12-01",
            "--unavailable-style=400",
            "--unavailable-models",
            "gpt-image-2",
            "--org-verified=false",
            '--key-models={"sk-a": ["gpt-image-2.5-flare"]}',
            "--files-dir=/tmp/files",
            "--batch-validating-seconds=2",
            "--batch-lines-per-second=50",
            "--batch-finalizing-seconds=3",
            "--batch-line-error-rate=0.1",
            "--batch-line-moderation-rate=0.05",
            "--batch-expire-after-seconds=600",
            "--batch-max-requests=100",
            "--batch-max-file-bytes=1000000",
            "--gif-models",
            "gpt-image-2",
            "--svg-models",
            "gpt-image-2",
            "gpt-image-2.6-flare",
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
        bill_undelivered=False,
        today="2026-12-01",
        unavailable_style="400",
        unavailable_models=["gpt-image-2"],
        org_verified=False,
        key_models={"sk-a": ["gpt-image-2.5-flare"]},
        files_dir="/tmp/files",
        batch_validating_seconds=2,
        batch_lines_per_second=50,
        batch_finalizing_seconds=3,
        batch_line_error_rate=0.1,
        batch_line_moderation_rate=0.05,
        batch_expire_after_seconds=600,
        batch_max_requests=100,
        batch_max_file_bytes=1_000_000,
        gif_models=["gpt-image-2"],
        svg_models=["gpt-image-2", "gpt-image-2.6-flare"],
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
    assert len(FIELD_NAMES) == 42
    assert config_from_args(build_parser().parse_args([])) == SandboxConfig()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--key-models", "sk-a=gpt-image-2,gpt-image-2.5-flare", "sk-b="],
            {"key_models": {"sk-a": ["gpt-image-2", "gpt-image-2.5-flare"], "sk-b": []}},
        ),
        (
            ["--key-models", '{"sk-a": ["gpt-image-2"]}'],
            {"key_models": {"sk-a": ["gpt-image-2"]}},
        ),
        (
            [
                "--azure-deployment-rpm",
                '{"edits-a": 9}',
                "--azure-deployments",
                "edits-a=gpt-image-2",
            ],
            {
                "azure_deployment_rpm": {"edits-a": 9},
                "azure_deployments": {"edits-a": "gpt-image-2"},
            },
        ),
    ],
)
def test_dict_flags_take_pairs_or_one_json_object(
    args: list[str], expected: dict[str, object]
) -> None:
    """A dict field is given as NAME=VALUE pairs (a list value comma-separated) or as one JSON
    object; the fields not given keep their defaults."""
    config = config_from_args(build_parser().parse_args(args))
    assert config == SandboxConfig(**expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--org-verified", "maybe"),
        ("--key-models", "[1]"),
        ("--key-models", "{not json"),
        ("--today", "soon"),
        ("--azure-deployment-rpm", "edits-a=many"),
        ("--azure-deployments", "edits-a"),
        ("--outage", "down"),
    ],
)
def test_bad_command_line_values_name_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag value stops the command with a message naming the flag, not a traceback."""
    with pytest.raises(SystemExit) as info:
        config_from_args(build_parser().parse_args([f"{flag}={value}"]))
    said = f"{info.value.code} {capsys.readouterr().err}".replace("-", "_")
    assert flag.removeprefix("--").replace("-", "_") in said


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


def test_python_dash_m_runs_batches(tmp_path: Path) -> None:
    """The batch runner lives in the app: `python -m pipeline.sandbox` (and so `editbatch
    sandbox`) runs a batch to completion, and keeps files where --files-dir says."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    files_dir = tmp_path / "files"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.sandbox",
            f"--port={port}",
            "--batch-validating-seconds=0",
            "--batch-lines-per-second=1000",
            "--batch-finalizing-seconds=0",
            f"--files-dir={files_dir}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = openai.OpenAI(
            api_key="sk-t", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                image = client.files.create(file=("a.png", png(32, 32)), purpose="user_data")
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        line = {
            "custom_id": "only",
            "method": "POST",
            "url": "/v1/images/edits",
            "body": {"model": "gpt-image-2", "images": [{"file_id": image.id}], "prompt": "p"},
        }
        batch_input = client.files.create(
            file=("in.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=batch_input.id, endpoint="/v1/images/edits", completion_window="24h"
        )
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline + 15:
            time.sleep(0.05)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed"
        assert batch.output_file_id is not None
        assert (files_dir / image.id).exists()
        [answer] = client.files.content(batch.output_file_id).text.splitlines()
        assert json.loads(answer)["response"]["status_code"] == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
