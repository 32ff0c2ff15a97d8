"""Fixtures shared by every test: a temporary database, a sandbox API, settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from pipeline.db.session import Database
from pipeline.sandbox import SandboxConfig, SandboxServer
from pipeline.settings import Settings

FAKE_KEY = "sk-test-editbatch-0000000000000000"
# Tests run on a fixed date, in this process and in every process they start (EDITBATCH_TODAY),
# and the sandboxes they start use it too: which models are available does not depend on the
# day CI runs. Tests of model life cycles move the date themselves.
TEST_TODAY = "2026-11-30"


@pytest.fixture(autouse=True)
def pinned_today(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITBATCH_TODAY", TEST_TODAY)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SandboxServer]:
    config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), today=TEST_TODAY)
    with SandboxServer(config) as server:
        yield server


def make_settings(tmp_path: Path, base_url: str) -> Settings:
    """Settings of a test: a SQLite file and a home in `tmp_path`, the API at `base_url`, short
    backoffs."""
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'editbatch.db'}",
        openai_base_url=base_url,
        openai_api_key=FAKE_KEY,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
        request_timeout_seconds=10,
    )


@pytest.fixture
def settings(tmp_path: Path, sandbox: SandboxServer) -> Settings:
    return make_settings(tmp_path, sandbox.base_url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.effective_database_url)
    yield database
    database.dispose()


def billed_total(billing_log: Path) -> tuple[Decimal, dict[str, Decimal]]:
    """Total and per-request cost from the sandbox's billing log."""
    total = Decimal(0)
    per_request: dict[str, Decimal] = {}
    if not billing_log.exists():
        return total, per_request
    for line in billing_log.read_text().splitlines():
        entry = json.loads(line)
        cost = Decimal(entry["cost_usd"])
        total += cost
        per_request[entry["request_id"]] = cost
    return total, per_request
