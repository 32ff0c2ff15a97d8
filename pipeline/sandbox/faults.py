"""Which fault, if any, a request gets: prompt directives first, then seeded random draws.

Directives: `#sandbox:CODE` (every request with that exact prompt) or `#sandbox:CODExK` (the first
K requests with that exact prompt), and `#sandbox:latency=MS`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import threading
from dataclasses import dataclass
from enum import StrEnum

from pipeline.sandbox.config import SandboxConfig


class Fault(StrEnum):
    SERVER_ERROR = "500"
    RATE_LIMIT = "429"
    QUOTA = "quota"
    MODERATION = "moderation"
    BAD_REQUEST = "400"
    UNAUTHORIZED = "401"
    FORBIDDEN = "403"
    TIMEOUT = "timeout"
    RESET = "reset"
    TRUNCATED = "truncated"
    BAD_B64 = "badb64"
    DRIFT = "drift"


# Answered at once, before the rate limiter and without simulated latency.
REJECTIONS = frozenset(
    {
        Fault.RATE_LIMIT,
        Fault.QUOTA,
        Fault.MODERATION,
        Fault.BAD_REQUEST,
        Fault.UNAUTHORIZED,
        Fault.FORBIDDEN,
    }
)

DIRECTIVE_RETRY_AFTER_MS = 50
BURST_RETRY_AFTER_MS = 200
DIRECTIVE_DRIFT = 0.5

_DIRECTIVE = re.compile(r"#sandbox:(\S+)")
_FAULT_TOKEN = re.compile(
    r"(?P<code>" + "|".join(re.escape(f.value) for f in Fault) + r")(?:x(?P<times>\d+))?"
)
_LATENCY_TOKEN = re.compile(r"latency=(?P<ms>\d+(?:\.\d+)?)")


class DirectiveError(ValueError):
    """Raised when a prompt holds a `#sandbox:` directive the sandbox does not know."""


@dataclass(frozen=True)
class Directives:
    fault: Fault | None = None
    times: int | None = None
    latency_ms: float | None = None


def parse_directives(prompt: str) -> Directives:
    """The directives in a prompt; the first fault directive wins."""
    fault: Fault | None = None
    times: int | None = None
    latency: float | None = None
    for raw in _DIRECTIVE.findall(prompt):
        token = raw.rstrip(".,;:!?)]}'\"")
        latency_match = _LATENCY_TOKEN.fullmatch(token)
        if latency_match:
            latency = float(latency_match["ms"])
            continue
        fault_match = _FAULT_TOKEN.fullmatch(token)
        if not fault_match:
            known = ", ".join(f.value for f in Fault)
            raise DirectiveError(
                f"Unknown sandbox directive '#sandbox:{token}'. Known: {known}, each optionally "
                "followed by xK (first K requests only), and latency=MS."
            )
        if fault is None:
            fault = Fault(fault_match["code"])
            times = int(fault_match["times"]) if fault_match["times"] else None
    return Directives(fault, times, latency)


class DirectiveCounter:
    """How many requests each distinct directive prompt has had."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[bytes, int] = {}

    def fires(self, prompt: str, times: int | None) -> bool:
        """Count this request; True while it is among the first `times` (or always if None)."""
        key = hashlib.sha256(prompt.encode()).digest()
        with self._lock:
            count = self._counts.get(key, 0) + 1
            self._counts[key] = count
        return times is None or count <= times

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()


@dataclass(frozen=True)
class Draw:
    """One request's random numbers: `u` picks the fault, `z` scales the latency."""

    u: float
    z: float


class FaultDice:
    """One random.Random(seed) for all requests, under a lock: request k gets the k-th draw."""

    def __init__(self, seed: int) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._rng = random.Random(seed)

    def draw(self, seed: int) -> Draw:
        with self._lock:
            if seed != self._seed:
                self._seed = seed
                self._rng = random.Random(seed)
            return Draw(self._rng.random(), self._rng.gauss(0.0, 1.0))

    def reseed(self, seed: int) -> None:
        with self._lock:
            self._seed = seed
            self._rng = random.Random(seed)


def random_fault(config: SandboxConfig, u: float) -> Fault | None:
    """Map a uniform draw onto the configured fault rates (disjoint slices, in this order)."""
    edge = 0.0
    for rate, fault in (
        (config.error_rate, Fault.SERVER_ERROR),
        (config.timeout_rate, Fault.TIMEOUT),
        (config.reset_rate, Fault.RESET),
        (config.truncated_rate, Fault.TRUNCATED),
        (config.bad_b64_rate, Fault.BAD_B64),
        (config.burst_429_rate, Fault.RATE_LIMIT),
    ):
        edge += rate
        if u < edge:
            return fault
    return None


def latency_seconds(config: SandboxConfig, z: float) -> float:
    """Lognormal with median `latency_ms` and shape `latency_sigma`, times `time_scale`."""
    if config.latency_ms <= 0:
        return 0.0
    return config.latency_ms * math.exp(config.latency_sigma * z) * config.time_scale / 1000.0
