"""Run the sandbox: in a background thread for tests (SandboxServer), or blocking (serve)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from pipeline.sandbox.app import Sandbox, create_app
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.connections import SandboxH11Protocol

START_TIMEOUT = 10.0
GRACEFUL_SHUTDOWN_SECONDS = 2
BACKLOG = 4096


def _uvicorn_config(app: Starlette, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=SandboxH11Protocol,
        ws="none",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


def serve(config: SandboxConfig, host: str = "127.0.0.1", port: int = 8089) -> None:
    """Serve the sandbox until interrupted (Ctrl-C). Base URL: http://HOST:PORT/v1."""
    uvicorn.Server(_uvicorn_config(create_app(config), host, port, log_level="info")).run()


class SandboxServer:
    """The sandbox on a background thread, for tests: `with SandboxServer(cfg) as server: ...`.

    `base_url` is what `openai.OpenAI(base_url=...)` needs; `port=0` picks a free port.
    `config` stays live: changing a field affects the next request.
    """

    def __init__(
        self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.host = host
        self.port = port
        app = create_app(config or SandboxConfig())
        self._sandbox: Sandbox = app.state.sandbox
        self._uv_config = _uvicorn_config(app, host, port, log_level="warning")
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SandboxConfig:
        return self._sandbox.config

    @config.setter
    def config(self, config: SandboxConfig) -> None:
        self._sandbox.config = config

    @property
    def sandbox(self) -> Sandbox:
        """The app's state (stats, windows, counters), for tests that look inside."""
        return self._sandbox

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> None:
        """Start serving; returns once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("SandboxServer already started")
        # proto must say TCP: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
        # IPPROTO_TCP, and without it every keep-alive response stalls ~40 ms on delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = self._server = uvicorn.Server(self._uv_config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sandbox server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        with socket.create_connection((self.host, self.port), timeout=START_TIMEOUT):
            pass

    def stop(self) -> None:
        """Stop serving; in-flight requests get a short grace period, then are cancelled."""
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=GRACEFUL_SHUTDOWN_SECONDS + 5)
        self._thread = self._server = None

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
