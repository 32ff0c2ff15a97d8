"""`editbatch doctor` against a real setup: redis-server, a `celery -A worker.app worker`, the
sandbox over HTTP, SQLite. Healthy, it prints only ✓ and exits 0; each thing broken on purpose
gives the matching ✗ with its fix, and exit status 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2

from pipeline.sandbox import SandboxConfig
from tests.conftest import FAKE_KEY
from tests.factories import write_manifest
from tests.integration.test_crash_safety import Stack, small_rows, stack
from tests.servers import free_port

MODEL = "gpt-image-2"


def doctor(st: Stack, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    """`editbatch doctor ARGS --json` in its own process; (exit status, its JSON)."""
    saved = dict(st.env)
    st.env.update(env)
    try:
        proc = st.cli("doctor", *args, "--json", timeout=120)
    finally:
        st.env.clear()
        st.env.update(saved)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def failing(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"] if not c["ok"] and not c["skipped"]}


def sandbox_config(st: Stack, **fields: Any) -> None:
    root = st.sandbox.base_url.removesuffix("/v1")
    httpx2.post(f"{root}/sandbox/config", json=fields, timeout=10).raise_for_status()


def test_doctor_healthy_then_each_fault_names_its_fix(tmp_path: Path, redis_url: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", 3))
    out = tmp_path / "out"
    with stack(tmp_path, redis_url, database_url) as st:
        st.worker("w1", concurrency=3)

        # Healthy: every line ✓, exit 0, in words too.
        proc = st.cli("doctor", str(manifest), "--output", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        marks = [line[0] for line in lines if not line.startswith(("    fix:", "all checks"))]
        assert marks and set(marks) == {"✓"}, proc.stdout
        assert lines[-1] == "all checks passed"
        code, report = doctor(st, str(manifest), "--output", str(out))
        assert code == 0 and report["ok"] is True
        names = [c["name"] for c in report["checks"]]
        for expected in ("settings", "manifest", "database", "redis", "workers", "output",
                         "spool", "provider openai", "api key", f"model {MODEL}", "prices",
                         "catalogue"):  # fmt: skip
            assert expected in names, names
        workers = next(c for c in report["checks"] if c["name"] == "workers")
        assert (
            workers["detail"].startswith("1 alive, 3 threads: w1@")
            and "threads" in workers["detail"]
        )

        # Redis down: the broker does not answer.
        dead = f"redis://127.0.0.1:{free_port()}/0"
        code, report = doctor(st, str(manifest), "-o", str(out), EDITBATCH_BROKER_URL=dead)
        bad = failing(report)
        assert code == 1 and "redis" in bad, report
        assert "does not answer" in bad["redis"]["detail"]
        assert bad["redis"]["fix"] == "start Redis or correct EDITBATCH_BROKER_URL"

        # An unwritable output: a file where the folder should be.
        blocked = tmp_path / "a-file"
        blocked.write_text("x")
        code, report = doctor(st, str(manifest), "-o", str(blocked / "outputs"))
        bad = failing(report)
        assert code == 1 and set(bad) == {"output"}, bad
        assert "not writable" in bad["output"]["detail"]

        # A bad key: the API answers 401.
        sandbox_config(st, api_keys=[FAKE_KEY])
        code, report = doctor(st, str(manifest), "-o", str(out), OPENAI_API_KEY="sk-wrong-key-1")
        bad = failing(report)
        assert code == 1 and set(bad) == {"api key"}, bad
        assert "401" in bad["api key"]["detail"]
        assert "OPENAI_API_KEY" in bad["api key"]["fix"]
        sandbox_config(st, api_keys=None)

        # An organization that is not verified: 403 on GPT Image models.
        sandbox_config(st, org_verified=False)
        code, report = doctor(st, str(manifest), "-o", str(out))
        bad = failing(report)
        assert code == 1 and set(bad) == {f"model {MODEL}"}, bad
        assert "organization must be verified" in bad[f"model {MODEL}"]["detail"]
        assert "platform.openai.com/settings/organization" in bad[f"model {MODEL}"]["fix"]
        sandbox_config(st, org_verified=True)

        # A model this key may not use: 404 for it.
        sandbox_config(st, key_models={FAKE_KEY: ["gpt-image-1.5"]})
        code, report = doctor(st, str(manifest), "-o", str(out))
        bad = failing(report)
        assert code == 1 and set(bad) == {f"model {MODEL}"}, bad
        assert "not available to this key" in bad[f"model {MODEL}"]["detail"]
        assert "404" in bad[f"model {MODEL}"]["detail"]
        sandbox_config(st, key_models=None)

        # No worker: nothing answers the ping.
        for w in st.workers:
            w.stop()
        st.workers.clear()
        code, report = doctor(st, str(manifest), "-o", str(out))
        bad = failing(report)
        assert code == 1 and set(bad) == {"workers"}, bad
        assert "celery -A worker.app worker" in bad["workers"]["fix"]

        # A bad setting: the other checks cannot run.
        code, report = doctor(st, EDITBATCH_MAX_ATTEMPTS="many")
        bad = failing(report)
        assert code == 1 and set(bad) == {"settings"}, bad
        assert bad["settings"]["detail"].startswith("EDITBATCH_MAX_ATTEMPTS='many'")
        assert all(c["skipped"] for c in report["checks"] if c["name"] != "settings")


def test_probe_reads_the_rate_limit_and_compares_the_setting(
    tmp_path: Path, redis_url: str
) -> None:
    """`--probe` makes one paid low-quality edit (billed, shown) and compares the account's
    limit from the headers with EDITBATCH_IMAGES_PER_MINUTE: above it, a ✗ saying the figure."""
    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    with stack(tmp_path, redis_url, database_url, SandboxConfig(rate_limit_per_minute=50)) as st:
        st.worker("w1", concurrency=1)
        code, report = doctor(
            st, "--probe", "--yes", "-o", str(tmp_path / "o"), EDITBATCH_IMAGES_PER_MINUTE="60"
        )
        bad = failing(report)
        assert code == 1 and set(bad) == {"rate limit"}, bad
        assert (
            "EDITBATCH_IMAGES_PER_MINUTE=60 is above the account's 50"
            in bad["rate limit"]["detail"]
        )
        assert bad["rate limit"]["fix"].startswith("set EDITBATCH_IMAGES_PER_MINUTE=50")
        assert "paid $" in bad["rate limit"]["detail"]
        code, report = doctor(
            st, "--probe", "--yes", "-o", str(tmp_path / "o"), EDITBATCH_IMAGES_PER_MINUTE="40"
        )
        assert code == 0, failing(report)
        assert st.sandbox.sandbox.stats.snapshot()["billed"] == 2
        declined = st.cli("doctor", "--probe", "-o", str(tmp_path / "o"), timeout=120)
        assert "one paid edit" in declined.stderr  # asked first; no answer on stdin: declined
        assert "- rate limit  not probed (declined)" in declined.stdout
        assert st.sandbox.sandbox.stats.snapshot()["billed"] == 2


AZURE_KEY = "azure-key-0000000001"
AZURE_VERSION = "2025-04-01-preview"


def test_doctor_checks_each_azure_deployment_and_names_the_setting_to_fix(
    tmp_path: Path, redis_url: str
) -> None:
    """Azure as the default provider (the SDK's variables and one mapping, two deployments),
    OpenAI beside it: healthy, `doctor` passes every check, one per provider and one per
    deployment (a free probe: nothing billed). A wrong deployment, a wrong key and an
    api-version the resource refuses each fail exactly the deployments they break, with
    Azure's answer and the variable to change; exit status 1."""
    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", small_rows(tmp_path / "in", 2))
    out = tmp_path / "out"
    config = SandboxConfig(
        latency_ms=50,
        azure_deployments={"img-a": MODEL, "img-b": MODEL},
        azure_api_keys=[AZURE_KEY],
    )
    with stack(tmp_path, redis_url, database_url, config) as st:
        st.env.update(
            EDITBATCH_PROVIDER="azure",
            AZURE_OPENAI_ENDPOINT=st.sandbox.base_url.removesuffix("/v1"),
            AZURE_OPENAI_API_KEY=AZURE_KEY,
            OPENAI_API_VERSION=AZURE_VERSION,
            EDITBATCH_AZURE_DEPLOYMENTS=f"{MODEL}=img-a,{MODEL}=img-b",
            EDITBATCH_DEFAULT_MODEL=MODEL,
        )
        st.worker("w1", concurrency=2)  # reads the same providers at its start

        code, report = doctor(st, str(manifest), "--output", str(out))
        assert code == 0 and report["ok"] is True, failing(report)
        names = [c["name"] for c in report["checks"]]
        for expected in ("provider azure", "provider openai", "api key",
                         f"model {MODEL} on azure", "deployment azure:img-a",
                         "deployment azure:img-b"):  # fmt: skip
            assert expected in names, names
        assert names.index("provider azure") < names.index("provider openai")  # the default
        assert st.sandbox.sandbox.stats.snapshot()["billed"] == 0

        code, report = doctor(
            st,
            str(manifest),
            "-o",
            str(out),
            EDITBATCH_AZURE_DEPLOYMENTS=f"{MODEL}=img-a,{MODEL}=img-typo",
        )
        bad = failing(report)
        assert code == 1 and set(bad) == {"deployment azure:img-typo"}, bad
        assert "has no deployment img-typo" in bad["deployment azure:img-typo"]["detail"]
        assert "DeploymentNotFound" in bad["deployment azure:img-typo"]["detail"]
        assert "EDITBATCH_AZURE_DEPLOYMENTS" in bad["deployment azure:img-typo"]["fix"]

        code, report = doctor(st, str(manifest), "-o", str(out), AZURE_OPENAI_API_KEY="wrong-1234")
        bad = failing(report)
        assert code == 1 and set(bad) == {"deployment azure:img-a", "deployment azure:img-b"}
        assert "refused the credential: 401" in bad["deployment azure:img-a"]["detail"]
        assert bad["deployment azure:img-a"]["fix"].startswith("set AZURE_OPENAI_API_KEY")

        code, report = doctor(st, str(manifest), "-o", str(out), OPENAI_API_VERSION="2023-01-01")
        bad = failing(report)
        assert code == 1 and set(bad) == {"deployment azure:img-a", "deployment azure:img-b"}
        assert "API version not supported" in bad["deployment azure:img-b"]["detail"]
        assert bad["deployment azure:img-b"]["fix"].startswith("set OPENAI_API_VERSION")
        assert st.sandbox.sandbox.stats.snapshot()["billed"] == 0
