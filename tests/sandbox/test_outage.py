"""Outages: the whole API goes away (connections cut, or 503) while `/sandbox/*` keeps answering."""

from __future__ import annotations

import json
import time

import httpx2
import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import admin, billing_lines, png, upload

IMAGE = upload(png(32, 32))
ADMIN_KEY = "sk-admin-outage"


def _root(server: SandboxServer) -> str:
    return server.base_url.removesuffix("/v1")


def _edit(client: openai.OpenAI) -> int:
    client.images.edit(image=IMAGE, prompt="p", model="gpt-image-2", size="256x256")
    return 200


def _admin_endpoints_answer(server: SandboxServer) -> None:
    root = _root(server)
    for path in ("stats", "config", "requests"):
        assert httpx2.get(f"{root}/sandbox/{path}", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("outage", "error"),
    [("unreachable", openai.APIConnectionError), ("503", openai.InternalServerError)],
)
def test_outage_set_and_ended_through_the_config_endpoint(
    client: openai.OpenAI,
    sandbox: SandboxServer,
    outage: str,
    error: type[openai.OpenAIError],
) -> None:
    """During an outage every edit fails as the SDK sees a dead or overloaded API, the admin
    endpoints keep answering, nothing is billed; once it is ended the next edit succeeds."""
    assert _edit(client) == 200
    assert admin(sandbox.base_url, "config", {"outage": outage})["outage"] == outage
    for _ in range(3):
        with pytest.raises(error):
            _edit(client)
        _admin_endpoints_answer(sandbox)
    stats = admin(sandbox.base_url, "stats")
    outcome = "reset" if outage == "unreachable" else "503"
    assert (stats["billed"], stats["by_status"]) == (1, {"200": 1, outcome: 3})
    assert admin(sandbox.base_url, "config", {"outage": "none"})["outage"] == "none"
    assert _edit(client) == 200
    assert len(billing_lines(sandbox.config.billing_log)) == 2


def test_503_carries_openais_body(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    """A 503 outage answers OpenAI's service_unavailable body, which the SDK raises as
    InternalServerError with status 503."""
    sandbox.config.outage = "503"
    with pytest.raises(openai.InternalServerError) as info:
        _edit(client)
    assert info.value.status_code == 503
    assert json.loads(info.value.response.content) == {
        "error": {
            "message": "The server is overloaded or not ready yet.",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }


def test_the_outage_covers_azure_and_the_usage_endpoints(sandbox: SandboxServer) -> None:
    """Every API path is down, Azure's (with Azure's body) and the organization usage too."""
    sandbox.config.outage = "503"
    root = _root(sandbox)
    azure = httpx2.post(
        f"{root}/openai/deployments/any/images/edits?api-version=2025-04-01-preview",
        files={"image": ("a.png", png(32, 32), "image/png")},
        data={"prompt": "p"},
        headers={"api-key": "k"},
    )
    assert (azure.status_code, azure.json()["error"]["code"]) == (503, "ServiceUnavailable")
    costs = httpx2.get(
        f"{sandbox.base_url}/organization/costs",
        params={"start_time": 0},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert costs.status_code == 503
    sandbox.config.outage = "unreachable"
    with pytest.raises(httpx2.TransportError):
        httpx2.get(
            f"{sandbox.base_url}/organization/costs",
            params={"start_time": 0},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    _admin_endpoints_answer(sandbox)


@pytest.mark.parametrize(
    ("outage", "error"),
    [("unreachable", openai.APIConnectionError), ("503", openai.InternalServerError)],
)
def test_outage_until_ends_it_by_itself(
    client: openai.OpenAI,
    sandbox: SandboxServer,
    outage: str,
    error: type[openai.OpenAIError],
) -> None:
    """With `outage_until` set, the outage ends at that time with no one touching the config."""
    until = time.time() + 1.5  # room for a slow first request on a busy machine
    admin(sandbox.base_url, "config", {"outage": outage, "outage_until": until})
    with pytest.raises(error):
        _edit(client)
    time.sleep(max(0.0, until - time.time()) + 0.05)
    assert _edit(client) == 200
    assert len(billing_lines(sandbox.config.billing_log)) == 1


def test_an_unknown_outage_is_refused(sandbox: SandboxServer) -> None:
    """`outage` takes none, unreachable or 503; anything else is a 400 naming the field."""
    response = httpx2.post(f"{_root(sandbox)}/sandbox/config", json={"outage": "down"})
    assert response.status_code == 400
    assert "outage" in response.json()["error"]["message"]
    assert sandbox.config.outage == "none"


def test_reset_works_during_an_outage(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    """POST /sandbox/reset answers during an outage and clears what the outage counted."""
    sandbox.config.outage = "unreachable"
    with pytest.raises(openai.APIConnectionError):
        _edit(client)
    assert admin(sandbox.base_url, "reset") == {"reset": True}
    assert admin(sandbox.base_url, "stats")["requests"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/models"), ("GET", "/models/gpt-image-2"), ("GET", "/files"), ("GET", "/batches")],
)
def test_the_outage_covers_models_files_and_batches(
    sandbox: SandboxServer, method: str, path: str
) -> None:
    """/v1/models, /v1/files and /v1/batches are API paths too: down with the rest (503 with
    OpenAI's body, or a cut connection), while /sandbox/* answers; up again once it ends."""
    url = f"{sandbox.base_url}{path}"
    headers = {"Authorization": "Bearer sk-outage"}
    sandbox.config.outage = "503"
    down = httpx2.request(method, url, headers=headers, timeout=5)
    assert (down.status_code, down.json()["error"]["code"]) == (503, "service_unavailable")
    sandbox.config.outage = "unreachable"
    with pytest.raises(httpx2.TransportError):
        httpx2.request(method, url, headers=headers, timeout=5)
    _admin_endpoints_answer(sandbox)
    sandbox.config.outage = "none"
    assert httpx2.request(method, url, headers=headers, timeout=5).status_code == 200
    log = httpx2.get(f"{_root(sandbox)}/sandbox/requests", timeout=5).json()
    assert [(e["path"], e["status"]) for e in log["requests"]] == [
        (f"/v1{path}", status) for status in ("503", "reset", "200")
    ]


def test_an_upload_during_an_outage_stores_nothing(sandbox: SandboxServer) -> None:
    """A file sent during a 503 outage is read and refused: nothing is stored or counted."""
    sandbox.config.outage = "503"
    with openai.OpenAI(api_key="sk-outage", base_url=sandbox.base_url, max_retries=0) as sdk:
        with pytest.raises(openai.InternalServerError):
            sdk.files.create(file=("a.png", png(32, 32)), purpose="user_data")
        sandbox.config.outage = "none"
        assert sdk.files.list().data == []
    assert admin(sandbox.base_url, "stats")["uploads"]["count"] == 0
