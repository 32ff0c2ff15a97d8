"""`editbatch run` as a person runs it: the quick start, and Ctrl-C then the same command again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from sqlalchemy import update

from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.states import BatchState, HoldCode
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import product_rows, write_manifest
from tests.servers import REPO
from tests.unit.helpers import new_batch


def editbatch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quick_start_example_runs_end_to_end(tmp_path: Path) -> None:
    env = {"EDITBATCH_HOME": str(tmp_path / "home")}
    out = tmp_path / "out"
    proc = editbatch(
        ["run", str(REPO / "examples" / "manifest.csv"), "--sandbox", "--output", str(out)],
        env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout and "cost" in proc.stdout
    status = json.loads(editbatch(["status", "1", "--json"], env, tmp_path).stdout)
    assert status["state"] == "finished"
    assert status["counts"]["succeeded"] == status["jobs_total"] == 12
    assert status["cost_usd"] != "0"
    # The example runs on current models, two of them (and shows masks and n=2).
    assert {b["model"] for b in status["cost_breakdown"]} == {
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-flare",
    }
    billed, _ = billed_total(tmp_path / "home" / "sandbox-billing.jsonl")
    assert str(billed) == status["cost_usd"]
    images = sorted(p for p in out.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(images) == 13
    assert (out / "report-1.csv").is_file() and (out / "report-1.json").is_file()
    report = json.loads((out / "report-1.json").read_text())
    assert {j["id"] for j in report["jobs"]} == {f"SKU-{1000 + i}" for i in range(12)}


def test_ctrl_c_then_rerun_continues_without_paying_twice(tmp_path: Path) -> None:
    rows = product_rows(tmp_path / "in", 24)
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), latency_ms=400)
    with SandboxServer(config) as sandbox:
        env = {
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
            "EDITBATCH_CONCURRENCY": "2",
        }
        args = ["run", str(manifest), "--output", str(tmp_path / "out")]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env={**os.environ, **env},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        billing = tmp_path / "billing.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if billing.exists() and len(billing.read_text().splitlines()) >= 4:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "stopping after the calls in flight" in err
        first_calls = len(billing.read_text().splitlines())
        assert 4 <= first_calls < 24
        again = editbatch(args, env, tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "continuing batch 1" in again.stdout
    lines = [json.loads(x) for x in billing.read_text().splitlines()]
    assert len(lines) == 24  # every job paid exactly once across both runs
    status = json.loads(editbatch(["status", "1", "--json"], env, tmp_path).stdout)
    assert status["counts"]["succeeded"] == 24
    assert len(list((tmp_path / "out").glob("*.png"))) == 24


def test_run_continuing_a_held_batch_drops_reservations_a_killed_run_leaked(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    """`run` continues a held batch the way `resume` does: reservations of calls whose process
    died are dropped before anything is sent, so a leak cannot stop the batch under its budget."""
    rows = product_rows(tmp_path / "in", 12)
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    out = str((tmp_path / "out").resolve())
    env = {
        "EDITBATCH_HOME": str(tmp_path / "home"),
        "OPENAI_BASE_URL": sandbox.base_url,
        "OPENAI_API_KEY": FAKE_KEY,
    }
    db = Database(f"sqlite:///{tmp_path / 'home' / 'editbatch.db'}")
    batch_id = new_batch(db, manifest, out, budget_usd=Decimal("2.00")).batch_id
    with db.session() as s:
        # What a run killed mid-call leaves behind: the batch held at its budget by
        # reservations that never settled, and no spend.
        s.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(
                state=BatchState.HELD,
                hold_code=HoldCode.BUDGET,
                hold_reason="budget: batch budget $2.00 reached",
                reserved_usd=Decimal("1.95"),
            )
        )
        s.commit()
    db.dispose()
    proc = editbatch(["run", str(manifest), "--output", out, "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = json.loads(proc.stdout)
    assert status["state"] == "finished"
    assert status["counts"]["succeeded"] == 12
    billed, _ = billed_total(tmp_path / "billing.jsonl")
    assert str(billed) == status["cost_usd"]


def test_models_lists_every_model_with_its_state_on_today(tmp_path: Path) -> None:
    """`editbatch models --json`: every catalogue model, its state computed for today's date,
    its shutdown and replacement, and the price of a 1024x1024 output at each quality."""
    env = {"EDITBATCH_HOME": str(tmp_path / "home")}
    today = json.loads(editbatch(["models", "--json"], env, tmp_path).stdout)
    tomorrow = json.loads(
        editbatch(["models", "--json"], {**env, "EDITBATCH_TODAY": "2026-12-01"}, tmp_path).stdout
    )
    assert today["today"] == "2026-11-30" and tomorrow["today"] == "2026-12-01"
    by_name = {m["model"]: m for m in today["models"]}
    assert set(by_name) >= {"gpt-image-1.5", "gpt-image-2.5-sunburst", "gpt-image-1", "dall-e-2"}
    assert by_name["gpt-image-1.5"]["state"] == "deprecated"
    assert by_name["gpt-image-1.5"]["shutdown_on"] == "2026-12-01"
    assert by_name["gpt-image-1.5"]["replacement"] == "gpt-image-2.5-sunburst"
    assert by_name["gpt-image-2.5-sunburst"]["state"] == "current"
    assert by_name["gpt-image-1"]["state"] == "gone"
    assert by_name["gpt-image-2.5-sunburst"]["usd_per_1024x1024_output"] == {
        "low": "0.008160",  # 272 tokens x $30 / 1M
        "medium": "0.031680",
        "high": "0.124800",
    }
    states_tomorrow = {m["model"]: m["state"] for m in tomorrow["models"]}
    assert states_tomorrow["gpt-image-1.5"] == "gone"
    table = editbatch(["models"], {**env, "COLUMNS": "200"}, tmp_path).stdout
    assert all(name in table for name in by_name)
