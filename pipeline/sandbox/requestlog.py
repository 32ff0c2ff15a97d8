"""The request log behind `GET /sandbox/requests`: when each API request came, for whom, and
what it was answered.

Each entry names the provider, the Azure deployment or the model, and a hint of the key (its
last four characters: never the key itself), so a test can check that every deployment or key
stayed within its limit over any window. Counts per deployment and per key are kept for the
whole run; the entries themselves are bounded (the oldest go first, and are counted as dropped).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

MAX_ENTRIES = 50_000
AZURE_PATH_PREFIX = "/openai/"
_SCOPE_KEY = "sandbox_call"


@dataclass
class Call:
    """What is known about one request, filled in while it is read; lives in the ASGI scope."""

    provider: str
    deployment: str | None = None
    model: str | None = None
    key: str | None = None  # a hint, never the key


def call_of(scope: MutableMapping[str, Any]) -> Call:
    """This request's Call (made on first use; the provider follows from the path)."""
    state = scope.setdefault("state", {})
    call = state.get(_SCOPE_KEY)
    if not isinstance(call, Call):
        path = str(scope.get("path", ""))
        call = Call("azure" if path.startswith(AZURE_PATH_PREFIX) else "openai")
        state[_SCOPE_KEY] = call
    return call


@dataclass(frozen=True, slots=True)
class Entry:
    """One answered request (slots: a long benchmark keeps tens of thousands of these)."""

    time: float
    provider: str
    path: str
    deployment: str | None
    model: str | None
    key: str | None
    status: str


def key_hint(key: str | None) -> str | None:
    """How the log names a key: `...` and its last four characters, as dashboards show keys."""
    return f"...{key[-4:]}" if key else None


class RequestLog:
    """Thread-safe, bounded log of API requests with per-deployment and per-key counts."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._lock = threading.Lock()
        self._entries: deque[Entry] = deque(maxlen=max_entries)
        self._dropped = 0
        self._by_deployment: dict[str, Counter[str]] = {}
        self._by_key: dict[str, Counter[str]] = {}

    def record(self, scope: MutableMapping[str, Any], outcome: str) -> None:
        """Log one answered request; `outcome` is its HTTP status, `reset` or `disconnected`."""
        call = call_of(scope)
        path = str(scope.get("path", ""))
        entry = Entry(
            time.time(), call.provider, path, call.deployment, call.model, call.key, outcome
        )
        with self._lock:
            if len(self._entries) == self._entries.maxlen:
                self._dropped += 1
            self._entries.append(entry)
            if call.provider == "azure" and call.deployment is not None:
                self._by_deployment.setdefault(call.deployment, Counter())[outcome] += 1
            if call.provider == "openai" and call.key is not None:
                self._by_key.setdefault(call.key, Counter())[outcome] += 1

    def snapshot(self, since: float | None = None) -> dict[str, Any]:
        """Entries (oldest first, only those at or after `since` if given) and the counts."""
        with self._lock:
            entries = [e for e in self._entries if since is None or e.time >= since]
            return {
                "requests": [asdict(e) for e in entries],
                "dropped": self._dropped,
                "by_deployment": {k: dict(v) for k, v in self._by_deployment.items()},
                "by_key": {k: dict(v) for k, v in self._by_key.items()},
            }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._dropped = 0
            self._by_deployment.clear()
            self._by_key.clear()
