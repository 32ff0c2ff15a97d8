"""An outage of the whole API, to test the pipeline's outage breaker against a sandbox that goes
away.

`outage` in the config: `none`; `unreachable`, every API request's connection is reset with no
answer (the SDK raises APIConnectionError); or `503`, every API request is answered 503 with
OpenAI's body for an overloaded server (the SDK raises InternalServerError). It covers every path
but `/sandbox/*`, which keep answering so a test can end the outage. `outage_until` (epoch
seconds), if set, ends it by itself. Nothing is billed: the requests never reach an endpoint.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.sandbox import connections
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.requestlog import AZURE_PATH_PREFIX

if TYPE_CHECKING:
    from pipeline.sandbox.app import Sandbox

ADMIN_PREFIX = "/sandbox/"
OVERLOADED = "The server is overloaded or not ready yet."


def active(config: SandboxConfig, now: float) -> str | None:
    """The outage in force at `now` (`unreachable` or `503`), or None."""
    if config.outage == "none":
        return None
    if config.outage_until is not None and now >= config.outage_until:
        return None
    return config.outage


def unavailable_body(path: str) -> dict[str, Any]:
    """The 503 body: Azure's shape on its paths, OpenAI's everywhere else."""
    if path.startswith(AZURE_PATH_PREFIX):
        return {"error": {"code": "ServiceUnavailable", "message": OVERLOADED}}
    return {
        "error": {
            "message": OVERLOADED,
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        }
    }


async def _drain(receive: Receive) -> None:
    """Read the request body, so the client sees the 503 rather than a broken upload."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


class OutageMiddleware:
    """ASGI middleware: during an outage, answers every API request itself."""

    def __init__(self, app: ASGIApp, sandbox: Sandbox) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        outage = None
        if scope["type"] == "http" and not path.startswith(ADMIN_PREFIX):
            outage = active(self.sandbox.config, time.time())
        if outage is None:
            await self.app(scope, receive, send)
            return
        # Without SandboxServer/serve there is no transport to reset: answer 503 instead.
        cut = outage == "unreachable" and connections.can_cut(scope)
        outcome = "reset" if cut else "503"
        if not cut:
            await _drain(receive)
        # Settled before the answer leaves, like every other reply.
        self.sandbox.stats.begin()
        self.sandbox.stats.end(outcome)
        self.sandbox.requests.record(scope, outcome)
        if cut:
            await connections.reset(scope)
            return
        body = json.dumps(unavailable_body(path)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
