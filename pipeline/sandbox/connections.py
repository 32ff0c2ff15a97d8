"""Reach the TCP transport behind an ASGI request, to cut a connection off on purpose.

ASGI has no way to drop a connection without a response, so the sandbox runs uvicorn with a
small H11Protocol subclass that records each connection's transport under its
(server address, client address) pair, which is also what the request scope carries.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

_Key = tuple[Any, Any]
_lock = threading.Lock()
_transports: dict[_Key, asyncio.Transport] = {}


class SandboxH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a registry entry for the connection's transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        with _lock:
            _transports[(self.server, self.client)] = transport

    def connection_lost(self, exc: Exception | None) -> None:
        with _lock:
            _transports.pop((self.server, self.client), None)
        super().connection_lost(exc)


def _transport(scope: MutableMapping[str, Any]) -> asyncio.Transport | None:
    server, client = scope.get("server"), scope.get("client")
    key = (tuple(server) if server else None, tuple(client) if client else None)
    with _lock:
        return _transports.get(key)


def can_cut(scope: MutableMapping[str, Any]) -> bool:
    """Whether this request's connection can be reset or closed on purpose."""
    return _transport(scope) is not None


async def _let_close_settle() -> None:
    # connection_lost runs on a later loop iteration; let it mark the request as disconnected so
    # uvicorn does not report an incomplete response as an application error.
    for _ in range(3):
        await asyncio.sleep(0)


async def reset(scope: MutableMapping[str, Any]) -> bool:
    """Abort the connection with a TCP RST (SO_LINGER 0). False if the transport is unknown."""
    transport = _transport(scope)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await _let_close_settle()
    return True


async def close(scope: MutableMapping[str, Any]) -> bool:
    """Close the connection after flushing what was written. False if the transport is unknown."""
    transport = _transport(scope)
    if transport is None:
        return False
    transport.close()
    await _let_close_settle()
    return True
