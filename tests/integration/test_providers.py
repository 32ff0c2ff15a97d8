"""Providers end to end (issue 15): Azure OpenAI through the real `AzureOpenAI` client against the
sandbox over HTTP, two providers and two deployments under real Redis and celery workers, the
content filter, and preflight by provider. Each test's docstring is the promise it holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from pipeline.db.models import Attempt, Batch, Job
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY, TEST_TODAY, billed_total
from tests.factories import product_rows, write_manifest
from tests.servers import start_workers, wait_until

pytestmark = pytest.mark.integration

AZURE_KEY = "azure-key-0000000000000042"
VERSION = "2025-04-01-preview"


def editbatch(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The CLI as a person runs it, with only the given provider variables set."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "AZURE_OPENAI_", "EDITBATCH_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**base, "COLUMNS": "200", "EDITBATCH_TODAY": TEST_TODAY, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def root(server: SandboxServer) -> str:
    return server.base_url.removesuffix("/v1")


def billing_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def azure_env(server: SandboxServer, tmp_path: Path, deployments: str) -> dict[str, str]:
    """The simplest Azure setup: the SDK's own variables plus one mapping."""
    return {
        "EDITBATCH_HOME": str(tmp_path / "home"),
        "EDITBATCH_PROVIDER": "azure",
        "AZURE_OPENAI_ENDPOINT": root(server),
        "AZURE_OPENAI_API_KEY": AZURE_KEY,
        "OPENAI_API_VERSION": VERSION,
        "EDITBATCH_AZURE_DEPLOYMENTS": deployments,
    }


@pytest.fixture
def azure_sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    config = SandboxConfig(
        billing_log=str(tmp_path / "billing.jsonl"),
        today=TEST_TODAY,
        latency_ms=50,
        azure_deployments={"my-deployment": "gpt-image-2"},
        azure_api_keys=[AZURE_KEY],
    )
    with SandboxServer(config) as server:
        yield server


def test_azure_with_the_sdks_variables_and_one_mapping_runs_a_batch_billed_to_the_cent(
    tmp_path: Path, azure_sandbox: SandboxServer
) -> None:
    """EDITBATCH_PROVIDER=azure, AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, OPENAI_API_VERSION
    and EDITBATCH_AZURE_DEPLOYMENTS (no OPENAI_API_KEY at all): `editbatch run` sends every
    edit through AzureOpenAI to the deployment path with the api-version and the api-key,
    collects the outputs under their names, and its ledger equals the sandbox's bill; the
    report and the bill name the provider and the deployment."""
    rows = product_rows(tmp_path / "in", 8, model="gpt-image-2")
    rows[3]["n"] = 2
    rows[5]["output_format"] = "jpeg"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    out = tmp_path / "out"
    env = azure_env(azure_sandbox, tmp_path, "gpt-image-2=my-deployment")
    proc = editbatch(["run", str(manifest), "--output", str(out), "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "finished"
    assert status["counts"]["succeeded"] == 8

    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("report-"))
    expected = [f"SKU{i:04d}_1.{'jpg' if i == 5 else 'png'}" for i in range(8)]
    assert names == sorted([*expected, "SKU0003_2.png"])

    billed, _ = billed_total(tmp_path / "billing.jsonl")
    assert Decimal(status["cost_usd"]) == billed > 0
    lines = billing_lines(tmp_path / "billing.jsonl")
    assert {(x["provider"], x["deployment"], x["model"]) for x in lines} == {
        ("azure", "my-deployment", "gpt-image-2")
    }
    log = azure_sandbox.sandbox.requests.snapshot()
    edits = [r for r in log["requests"] if r["path"].endswith("/images/edits")]
    assert {r["path"] for r in edits} == {"/openai/deployments/my-deployment/images/edits"}
    assert {r["key"] for r in edits} == {"..." + AZURE_KEY[-4:]}  # the api-key, not a bearer
    assert log["by_deployment"] == {"my-deployment": {"200": 8}}

    report = json.loads((out / "report-1.json").read_text())
    assert {(j["provider"], j["deployment"]) for j in report["jobs"]} == {
        ("azure", "my-deployment")
    }
    assert report["summary"]["providers"] == {
        "azure": {"jobs": 8, "succeeded": 8, "attempts": 8, "cost_usd": str(billed)}
    }
    db = Database(f"sqlite:///{tmp_path / 'home' / 'editbatch.db'}")
    with db.session() as s:
        attempts = s.scalars(select(Attempt)).all()
    db.dispose()
    assert sum(a.cost_usd for a in attempts) == billed
    assert {(a.provider, a.deployment) for a in attempts} == {("azure", "my-deployment")}


def test_a_content_filter_answer_fails_its_job_and_the_batch_goes_on(
    tmp_path: Path, azure_sandbox: SandboxServer
) -> None:
    """Azure's 400 contentFilter fails that job with Azure's code and message (and what was
    filtered), after one call; the batch is never held, the other jobs succeed."""
    rows = product_rows(tmp_path / "in", 4, model="gpt-image-2")
    rows[2]["prompt"] = "a red bag on a beach #sandbox:moderation"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    env = azure_env(azure_sandbox, tmp_path, "gpt-image-2=my-deployment")
    proc = editbatch(
        ["run", str(manifest), "--output", str(tmp_path / "out"), "--json"], env, tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "finished" and status["hold_code"] is None
    assert (status["counts"]["succeeded"], status["counts"]["failed"]) == (3, 1)
    [failure] = status["failures"]
    assert (failure["row"], failure["id"], failure["code"]) == (3, "SKU0002", "contentFilter")
    assert failure["message"] == (
        "Your task failed as a result of our safety system. (filtered: violence (medium))"
    )
    assert azure_sandbox.sandbox.requests.snapshot()["by_deployment"] == {
        "my-deployment": {"200": 3, "400": 1}
    }


def test_a_model_the_provider_does_not_deploy_is_refused_at_preflight(
    tmp_path: Path, azure_sandbox: SandboxServer
) -> None:
    """`editbatch check` refuses a row whose provider (its `provider` column, or the batch's)
    has no deployment of its model, naming the provider and the row; the same model through
    OpenAI passes. Nothing is sent."""
    rows = product_rows(tmp_path / "in", 3, model="gpt-image-2")
    rows[1]["model"] = "gpt-image-1.5"  # the batch's provider (azure) has no deployment of it
    rows[2]["model"] = "gpt-image-1.5"
    rows[2]["provider"] = "openai"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    env = azure_env(azure_sandbox, tmp_path, "gpt-image-2=my-deployment")
    proc = editbatch(["check", str(manifest), "--json"], env, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert (result["accepted"], result["rejected"]) == (2, 1)
    [error] = result["errors"]
    assert (error["row"], error["key"], error["field"]) == (2, "SKU0001", "model")
    assert error["reason"].startswith(
        "provider azure has no deployment of gpt-image-1.5 (it deploys gpt-image-2)"
    )
    table = editbatch(["check", str(manifest)], env, tmp_path)
    assert table.returncode == 1
    assert "provider azure has no deployment of gpt-image-1.5" in table.stderr
    assert azure_sandbox.sandbox.requests.snapshot()["requests"] == []


# -- lanes under real workers ------------------------------------------------------------------

RATE = 120  # per lane, per minute: one call every 0.5 s
PER_LANE = 24  # ~12 s of work per lane
WINDOW = 5.0  # every WINDOW seconds a lane may start at most RATE * WINDOW / 60 (+2) calls

PROVIDERS_TOML = """
provider = "openai"

[providers.openai]
images_per_minute = {rate}

[providers.azure]
endpoint = "{root}"
api_version = "{version}"
api_key_env = "EAST_AZURE_KEY"
requests_per_minute = {rate}

[providers.azure.deployments]
"gpt-image-2.5-flare" = "flare-a"
"gpt-image-2" = ["img-a", "img-b"]
"""


def lane_of(entry: dict[str, Any]) -> str:
    return f"azure:{entry['deployment']}" if entry["provider"] == "azure" else "openai"


def check_lanes(entries: list[dict[str, Any]], lanes: set[str]) -> float:
    """Every lane kept to RATE in every WINDOW; the rate of all calls together (per minute)."""
    assert {e["status"] for e in entries} == {"200"}, entries  # no 429: nobody over a limit
    by_lane: dict[str, list[float]] = {}
    for e in entries:
        by_lane.setdefault(lane_of(e), []).append(e["time"])
    assert set(by_lane) == lanes
    allowed = RATE * WINDOW / 60 + 2  # +1 for GCRA's burst of one, +1 for timing jitter
    for lane, times in by_lane.items():
        assert len(times) == PER_LANE, (lane, len(times))
        busiest = max(sum(1 for t in times[i:] if t < s + WINDOW) for i, s in enumerate(times))
        assert busiest <= allowed, f"{lane}: {busiest} calls within {WINDOW} s (max {allowed})"
        own = (len(times) - 1) / (times[-1] - times[0]) * 60
        print(f"{lane}: {len(times)} calls, {own:.0f}/min, busiest {WINDOW:g} s: {busiest}")
    times = sorted(e["time"] for e in entries)
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60
    print(f"together: {rate:.0f}/min of {RATE * len(lanes)}")
    return rate


def test_two_providers_and_two_deployments_each_keep_their_limit_and_add_up(
    tmp_path: Path, redis_url: str
) -> None:
    """Real Redis and two celery workers (4 threads each) under a TOML with two providers:
    a batch split by its `provider` column runs on OpenAI and on an Azure deployment at once,
    and a batch sent to Azure (`--provider azure`) spreads its one model over its two
    deployments. From the sandbox's request
    log: every lane stays within its own limit in every 5 s, no call is refused, and each batch
    runs near the sum of its lanes' limits. The ledger equals the bill."""
    db_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    db = Database(db_url)
    config = SandboxConfig(
        billing_log=str(tmp_path / "billing.jsonl"),
        today=TEST_TODAY,
        latency_ms=200,
        rate_limit_per_minute=RATE,
        azure_deployments={
            "flare-a": "gpt-image-2.5-flare",
            "img-a": "gpt-image-2",
            "img-b": "gpt-image-2",
        },
        azure_deployment_rpm={"flare-a": RATE, "img-a": RATE, "img-b": RATE},
        azure_api_keys=[AZURE_KEY],
    )
    with SandboxServer(config) as sandbox:
        toml = tmp_path / "editbatch.toml"
        toml.write_text(PROVIDERS_TOML.format(rate=RATE, root=root(sandbox), version=VERSION))
        env = {
            "EDITBATCH_CONFIG": str(toml),
            "EDITBATCH_BROKER_URL": redis_url,
            "EDITBATCH_DATABASE_URL": db_url,
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "EDITBATCH_CONCURRENCY": "4",
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
            "EAST_AZURE_KEY": AZURE_KEY,
        }

        def submit(manifest: Path, out: str, *options: str) -> int:
            args = ["submit", str(manifest), "--json", "--output", str(tmp_path / out), *options]
            proc = editbatch(args, env, tmp_path)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return int(json.loads(proc.stdout)["batch_id"])

        def finished(batch_id: int) -> bool:
            with db.session() as s:
                return s.scalar(select(Batch.state).where(Batch.id == batch_id)) == "finished"

        split = product_rows(tmp_path / "a", 2 * PER_LANE, model="gpt-image-2.5-flare")
        for i, row in enumerate(split):
            row["provider"] = "azure" if i % 2 else "openai"
        spread = product_rows(tmp_path / "b", 2 * PER_LANE, model="gpt-image-2")
        spread = [{**row, "prompt": f"{row['prompt']} (b)"} for row in spread]
        first = write_manifest(tmp_path / "a" / "split.csv", split)
        second = write_manifest(tmp_path / "b" / "spread.csv", spread)

        workers = start_workers(env, tmp_path, 2, prefix="p")
        try:
            mark = time.time()
            batch_split = submit(first, "out-a")
            wait_until(lambda: finished(batch_split), timeout=90, interval=0.25)
            between = time.time()
            batch_spread = submit(second, "out-b", "--provider", "azure")  # the batch's choice
            wait_until(lambda: finished(batch_spread), timeout=90, interval=0.25)
            log = sandbox.sandbox.requests.snapshot(since=mark)
        finally:
            for worker in workers:
                worker.stop()

    edits = [e for e in log["requests"] if e["path"].endswith("/images/edits")]
    split_rate = check_lanes([e for e in edits if e["time"] < between], {"openai", "azure:flare-a"})
    spread_rate = check_lanes(
        [e for e in edits if e["time"] >= between], {"azure:img-a", "azure:img-b"}
    )
    assert split_rate >= 0.8 * 2 * RATE, f"split batch: {split_rate:.0f}/min of {2 * RATE}"
    assert spread_rate >= 0.8 * 2 * RATE, f"spread batch: {spread_rate:.0f}/min of {2 * RATE}"

    billed, per_request = billed_total(tmp_path / "billing.jsonl")
    with db.session() as s:
        attempts = s.scalars(select(Attempt)).all()
        jobs = s.execute(select(Job.batch_id, Job.provider, Job.state)).all()
    db.dispose()
    assert all(state == "succeeded" for _, _, state in jobs)
    assert sorted({(b, p) for b, p, _ in jobs}) == [
        (batch_split, "azure"),
        (batch_split, "openai"),
        (batch_spread, "azure"),
    ]
    assert len(attempts) == 4 * PER_LANE
    assert sum(a.cost_usd for a in attempts) == billed
    assert all(a.cost_usd == per_request[str(a.request_id)] for a in attempts)
    lines = {line["request_id"]: line for line in billing_lines(tmp_path / "billing.jsonl")}
    for a in attempts:
        line = lines[str(a.request_id)]
        assert line["provider"] == a.provider
        assert a.provider == "openai" or line["deployment"] == a.deployment


def test_run_sandbox_sends_every_provider_to_the_sandbox_never_to_the_real_endpoints(
    tmp_path: Path,
) -> None:
    """`editbatch run --sandbox` with Azure and a gateway configured (real endpoints, real key
    variables, Entra ID): every call goes to the bundled sandbox with throwaway keys (its
    Azure paths serve the configured deployments, a regional one as a lane of its own), so a
    rehearsal never spends; the bill names each provider and deployment."""
    toml = tmp_path / "editbatch.toml"
    toml.write_text(
        """
[providers.azure-east]
kind = "azure"
endpoint = "https://east.invalid"
api_version = "2025-04-01-preview"
auth = "entra_id"
deployments = { "gpt-image-2" = ["img2", { name = "img2", endpoint = "https://west.invalid" }] }

[providers.gateway]
kind = "compatible"
base_url = "https://gateway.invalid/v1"
api_key_env = "GATEWAY_KEY"
""",
        encoding="utf-8",
    )
    rows = product_rows(tmp_path / "in", 6, model="gpt-image-2")
    for i, row in enumerate(rows):
        row["provider"] = ("azure-east", "gateway", "openai")[i % 3]
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    env = {
        "EDITBATCH_HOME": str(tmp_path / "home"),
        "EDITBATCH_CONFIG": str(toml),
        "GATEWAY_KEY": "gw-real-key-0000000001",
        "OPENAI_API_KEY": "sk-real-key-0000000001",
    }
    proc = editbatch(
        ["run", str(manifest), "--sandbox", "--output", str(tmp_path / "out"), "--json"],
        env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["counts"]["succeeded"] == 6
    lines = billing_lines(tmp_path / "home" / "sandbox-billing.jsonl")
    assert sorted(x["provider"] for x in lines) == ["azure"] * 2 + ["openai"] * 4
    assert {x.get("deployment") for x in lines if x["provider"] == "azure"} == {"img2"}
    db = Database(f"sqlite:///{tmp_path / 'home' / 'editbatch.db'}")
    with db.session() as s:
        used = sorted(str(p) for p in s.scalars(select(Attempt.provider)))
    db.dispose()
    assert used == ["azure-east"] * 2 + ["gateway"] * 2 + ["openai"] * 2
