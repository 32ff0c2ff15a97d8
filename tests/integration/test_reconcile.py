"""`editbatch reconcile` after a night with a killed worker: the ledger and the provider's own
figures (the sandbox's usage and costs endpoints, read with an admin key) side by side per
model, and the difference named: a lost answer (billed, never received) and a call made outside
editbatch."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import openai
from sqlalchemy import select

from pipeline.cost.reconcile import after_batch
from pipeline.db.models import Attempt, Job
from pipeline.output.storage import Storage
from pipeline.run.gateway import BillingGateway
from pipeline.sandbox import SandboxConfig
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import make_image, write_manifest
from tests.integration.test_crash_safety import (
    REAP,
    shortest_lease,
    small_rows,
    stack,
    wait_for,
)

ADMIN_KEY = "sk-admin-reconcile-test-0001"


def test_reconcile_names_a_lost_answer_and_a_call_outside_editbatch(
    tmp_path: Path, redis_url: str
) -> None:
    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    rows = small_rows(tmp_path / "in", 6)
    for row in rows[:3]:
        row.update(model="gpt-image-1.5", size="1024x1024")  # a model whose night goes well
    rows[3]["prompt"] = "slow one #sandbox:latency=6000"  # in flight when its worker dies
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", rows)
    lease = shortest_lease(10)
    with stack(
        tmp_path,
        redis_url,
        database_url,
        SandboxConfig(latency_ms=20),
        EDITBATCH_LEASE_SECONDS=str(lease),
        EDITBATCH_REQUEST_TIMEOUT_SECONDS=str(lease - 2),
        OPENAI_ADMIN_KEY=ADMIN_KEY,
    ) as st:
        first = st.worker("w1", concurrency=2)
        batch_id = st.submit(manifest)
        with st.db.session() as s:
            slow = s.scalar(select(Job.id).where(Job.batch_id == batch_id, Job.row_number == 4))
        wait_for(lambda: st.done(batch_id) == 5, 60, "the 5 fast jobs")

        def slow_in_flight() -> bool:
            with st.db.session() as s:
                outcomes = list(s.scalars(select(Attempt.outcome).where(Attempt.job_id == slow)))
            return outcomes == ["in_flight"]

        wait_for(slow_in_flight, 30, "the slow call in flight")
        first.kill()  # during the API's latency: the answer is made, and billed, anyway
        wait_for(
            lambda: st.sandbox.sandbox.stats.snapshot()["billed_undelivered"] == 1,
            15,
            "the sandbox to bill the answer nobody received",
        )
        st.worker("w2", concurrency=2)
        wait_for(lambda: st.python(REAP).stdout.strip() == "1", lease + 10, "the reaper", 1.0)
        st.wait_finished(batch_id, 60)

        # Another script of the same organization makes one edit with the job key.
        client = openai.OpenAI(api_key=FAKE_KEY, base_url=st.sandbox.base_url, max_retries=0)
        with open(make_image(tmp_path / "other.png", size=(64, 64)), "rb") as image:
            client.images.edit(
                image=image, prompt="elsewhere", model="gpt-image-2", size="256x256", quality="low"
            )

        proc = st.cli("reconcile", "--json")
        human = st.cli("reconcile")
        billed, _ = billed_total(st.billing_log)
        with st.db.session() as s:
            ledger = sum((a.cost_usd for a in s.scalars(select(Attempt))), start=Decimal(0))
        written = after_batch(
            st.db,
            BillingGateway(ADMIN_KEY, st.sandbox.base_url),
            batch_id,
            Storage(str(st.out)),
        )

    assert proc.returncode == 1, proc.stdout + proc.stderr  # they differ
    report = json.loads(proc.stdout)
    assert report["day"] == datetime.now(UTC).date().isoformat() and report["match"] is False
    lines = {line["model"]: line for line in report["models"]}
    assert set(lines) == {"gpt-image-1.5", "gpt-image-2"}

    calm = lines["gpt-image-1.5"]
    assert calm["match"] and calm["difference"] == "match"
    assert calm["ledger"] == calm["provider"]
    assert calm["ledger"]["calls"] == 3 and calm["ledger"]["images"] == 3

    rough = lines["gpt-image-2"]
    assert rough["unsure_calls"] == 1  # the interrupted attempt
    assert rough["ledger"]["calls"] == 3  # the slow job's second call, and two clean ones
    assert rough["provider"]["calls"] == 5  # + its lost first answer + the outside call
    assert rough["difference"].startswith("1 lost answer(s): calls the provider billed")
    assert "1 call(s) made outside editbatch" in rough["difference"]
    extra = Decimal(rough["provider"]["usd"]) - Decimal(rough["ledger"]["usd"])
    assert extra > 0 and f"the provider's extra: ${extra:.6f}" in rough["difference"]
    # Both sides in full: the provider's total is the bill; the ledger's is the attempts'.
    # The lost answer is booked at its estimate, shown apart from the answered calls.
    provider_total = sum(Decimal(line["provider"]["usd"]) for line in lines.values())
    ledger_total = sum(Decimal(line["ledger"]["usd"]) for line in lines.values())
    unsure_total = sum(Decimal(line["unsure_usd"]) for line in lines.values())
    assert provider_total == billed and ledger_total + unsure_total == ledger
    assert Decimal(rough["unsure_usd"]) > 0
    assert rough["provider"]["input_tokens"] > rough["ledger"]["input_tokens"] > 0

    assert human.returncode == 1
    assert "Ledger against the provider" in human.stdout
    assert "✓ gpt-image-1.5: match" in human.stdout
    assert "✗ gpt-image-2: 1 lost answer(s)" in human.stdout

    saved = json.loads(Path(written).read_text())
    assert saved["batch_id"] == batch_id and saved["match"] is False
    assert [m["model"] for m in saved["models"]] == ["gpt-image-1.5", "gpt-image-2"]


def test_reconcile_without_an_admin_key_says_which_to_set(tmp_path: Path, redis_url: str) -> None:
    database_url = f"sqlite:///{tmp_path / 'editbatch.db'}"
    with stack(tmp_path, redis_url, database_url) as st:
        proc = st.cli("reconcile")
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: reconcile reads the provider's usage with an admin")
        st.env["OPENAI_ADMIN_KEY"] = FAKE_KEY
        proc = st.cli("reconcile")
        assert proc.returncode == 2
        assert "OPENAI_ADMIN_KEY is the job key" in proc.stderr
        st.env["OPENAI_ADMIN_KEY"] = "sk-not-an-admin-key"
        proc = st.cli("reconcile")
        assert proc.returncode == 2
        assert "401" in proc.stderr and "api.usage.read" in proc.stderr
