"""In-process fakes for unit tests: the sandbox answering the real openai SDK with no socket.

`InProcessAPI` puts an `httpx2.MockTransport` in front of the sandbox's ASGI app: every request
the SDK makes is run through the app on an event loop in a background thread (an anyio blocking
portal, as Starlette's TestClient does), so unit tests exercise the real SDK, the real sandbox
rules and the real gateway without a server or a port. Faults that need a real connection
(reset, truncated) answer 500 here; integration tests keep the sandbox over HTTP for those.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType
from typing import Any

import anyio
import anyio.from_thread
import httpx2

from pipeline.sandbox import SandboxConfig
from pipeline.sandbox.app import Sandbox, create_app

BASE_URL = "http://sandbox.test/v1"


class InProcessAPI:
    """The sandbox app behind an in-process transport; use as a context manager."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.app = create_app(config or SandboxConfig())
        self.sandbox: Sandbox = self.app.state.sandbox
        self.base_url = BASE_URL
        self._stack = ExitStack()
        self._portal: anyio.from_thread.BlockingPortal | None = None

    def __enter__(self) -> InProcessAPI:
        self._portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    @property
    def config(self) -> SandboxConfig:
        return self.sandbox.config

    @property
    def requests(self) -> int:
        """Edit requests the sandbox has seen."""
        return int(self.sandbox.stats.snapshot()["requests"])

    def client(self) -> httpx2.Client:
        """An httpx2 client for `openai.OpenAI(http_client=...)` that never opens a socket."""
        return httpx2.Client(transport=httpx2.MockTransport(self._handle))

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        assert self._portal is not None, "use InProcessAPI as a context manager"
        return self._portal.call(self._asgi, request)

    async def _asgi(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "server": (request.url.host, request.url.port or 80),
            "client": ("127.0.0.1", 50000),
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await anyio.sleep_forever()  # the client stays connected until it has its answer
            raise AssertionError("unreachable")

        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return httpx2.Response(status, headers=headers, content=b"".join(chunks))
