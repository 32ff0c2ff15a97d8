"""Sandbox settings: one mutable dataclass, read afresh by every request."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from pipeline.sandbox.models import DEFAULT_GIF_MODELS, DEFAULT_SVG_MODELS

UNAVAILABLE_STYLES: tuple[str, ...] = ("404", "400")
# api-version values the classic Azure path accepts by default (API-FACTS, 2026-11-30).
AZURE_API_VERSIONS: tuple[str, ...] = ("2025-04-01-preview",)
OUTAGES: tuple[str, ...] = ("none", "unreachable", "503")
# Fields whose strings must be one of a few values.
CHOICES: dict[str, tuple[str, ...]] = {
    "unavailable_style": UNAVAILABLE_STYLES,
    "outage": OUTAGES,
}


@dataclass
class SandboxConfig:
    """Behaviour of a sandbox server; changing a field on a running server takes effect at once."""

    latency_ms: float = 0.0
    latency_sigma: float = 0.0
    time_scale: float = 1.0
    rate_limit_per_minute: int | None = None
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_seconds: float = 30.0
    reset_rate: float = 0.0
    truncated_rate: float = 0.0
    bad_b64_rate: float = 0.0
    burst_429_rate: float = 0.0
    quota_after: int | None = None
    drift: float = 0.0
    api_keys: list[str] | None = None
    seed: int = 0
    billing_log: str | None = None
    # True (the real API): an answer is billed once made, even if the client has left.
    bill_undelivered: bool = True
    # The sandbox's own calendar: models whose shutdown date is <= today are gone.
    today: str | None = None
    unavailable_style: str = "404"
    unavailable_models: list[str] = field(default_factory=list)
    org_verified: bool = True
    key_models: dict[str, list[str]] | None = None
    # Files API storage (None: a temporary folder, deleted when the server stops).
    files_dir: str | None = None
    # The Batch API: pace (times time_scale), per-line faults, expiry and input limits.
    batch_validating_seconds: float = 1.0
    batch_lines_per_second: float = 10.0
    batch_finalizing_seconds: float = 1.0
    batch_line_error_rate: float = 0.0
    batch_line_moderation_rate: float = 0.0
    batch_expire_after_seconds: float | None = None
    batch_max_requests: int = 50_000
    batch_max_file_bytes: int = 200 * 1024 * 1024
    # Models with access to the GIF preview and to SVG output.
    gif_models: list[str] = field(default_factory=lambda: list(DEFAULT_GIF_MODELS))
    svg_models: list[str] = field(default_factory=lambda: list(DEFAULT_SVG_MODELS))
    # Azure OpenAI mode (azure.py): deployment name -> model, and the deployments' limits.
    azure_deployments: dict[str, str] = field(default_factory=dict)
    azure_api_versions: list[str] = field(default_factory=lambda: list(AZURE_API_VERSIONS))
    azure_api_keys: list[str] | None = None
    azure_ad_tokens: list[str] | None = None
    azure_deployment_rpm: dict[str, int] = field(default_factory=dict)
    azure_content_filter_rate: float = 0.0
    # `GET /v1/organization/usage/images` and `/costs` (usage.py).
    admin_keys: list[str] | None = None
    # An outage of the whole API (outage.py); `outage_until` is epoch seconds.
    outage: str = "none"
    outage_until: float | None = None

    def current_date(self) -> date:
        """`today` as a date, or the real UTC date when it is None."""
        if self.today is None:
            return datetime.now(UTC).date()
        return date.fromisoformat(self.today)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set fields from plain values (e.g. JSON); raise ValueError naming a bad field."""
        checked = {name: coerce_field(name, value) for name, value in values.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HINTS: dict[str, Any] = typing.get_type_hints(SandboxConfig)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SandboxConfig))


def field_kind(name: str) -> tuple[type, bool]:
    """The base type of a config field (float, int, bool, str, list or dict) and whether it may
    be None."""
    hint = _HINTS[name]
    optional = False
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    base = typing.get_origin(hint) or hint
    return base, optional


def coerce_field(name: str, value: Any) -> Any:
    """Check one field's value against its declared type; raise ValueError if it does not fit."""
    if name not in _HINTS:
        raise ValueError(f"unknown sandbox config field {name!r}; known: {', '.join(FIELD_NAMES)}")
    base, optional = field_kind(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} cannot be null")
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if number < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        if name.endswith("_rate") and number > 1:
            raise ValueError(f"{name} is a fraction of requests and must be <= 1, got {value!r}")
        if name == "batch_lines_per_second" and number == 0:
            raise ValueError("batch_lines_per_second must be > 0")
        if name == "drift" and number > 1:
            raise ValueError(f"drift is a fraction of pixels and must be <= 1, got {value!r}")
        return number
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return _checked_text(name, value)
    if base is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if base is dict and isinstance(value, dict):
        return _coerce_mapping(name, value)
    raise ValueError(
        f"{name} expects {base.__name__}{' or null' if optional else ''}, got {value!r}"
    )


def _checked_text(name: str, value: str) -> str:
    if name == "today":
        try:
            date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"today must be an ISO date (YYYY-MM-DD), got {value!r}") from None
    allowed = CHOICES.get(name)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def dict_value_type(name: str) -> type:
    """The value type of a dict field: str, int or list (of str); keys are always strings."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):  # `dict[...] | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    value_hint = typing.get_args(hint)[1]
    value_type: type = typing.get_origin(value_hint) or value_hint
    return value_type


def _coerce_mapping(name: str, value: dict[Any, Any]) -> dict[str, Any]:
    value_type = dict_value_type(name)
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} keys must be non-empty strings, got {key!r}")
        if value_type is int:
            if not isinstance(item, int) or isinstance(item, bool) or item < 0:
                raise ValueError(f"{name}[{key!r}] must be an integer >= 0, got {item!r}")
        elif value_type is list:
            if not isinstance(item, list) or not all(isinstance(v, str) and v for v in item):
                raise ValueError(
                    f"{name}[{key!r}] must be a list of non-empty strings, got {item!r}"
                )
            item = list(item)
        elif not isinstance(item, str) or not item:
            raise ValueError(f"{name}[{key!r}] must be a non-empty string, got {item!r}")
        checked[key] = item
    return checked
