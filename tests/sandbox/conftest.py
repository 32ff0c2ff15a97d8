from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.sandbox.helpers import API_KEY, TODAY


@pytest.fixture(scope="session")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig(today=TODAY)) as running:
        yield running


@pytest.fixture
def sandbox(server: SandboxServer, tmp_path: Path) -> SandboxServer:
    """The shared server with a fresh config (billing log in tmp_path, the calendar pinned to
    TODAY so the tests do not change when a model shuts down) and cleared state."""
    server.config = SandboxConfig(billing_log=str(tmp_path / "billing.jsonl"), today=TODAY)
    server.sandbox.reset()
    return server


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key=API_KEY, base_url=sandbox.base_url, max_retries=0) as sdk:
        yield sdk
