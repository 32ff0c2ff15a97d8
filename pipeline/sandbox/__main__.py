"""`python -m pipeline.sandbox --port 8089 [--latency-ms 2000 --rate-limit 50 ...]`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pipeline.sandbox.config import (
    FIELD_NAMES,
    SandboxConfig,
    coerce_field,
    dict_value_type,
    field_kind,
)
from pipeline.sandbox.server import serve

HELP = {
    "latency_ms": "median simulated latency per request, ms",
    "latency_sigma": "lognormal sigma of the latency (0 = fixed)",
    "time_scale": "multiply every simulated latency by this",
    "rate_limit_per_minute": "images (n summed) per sliding minute; over it -> 429",
    "error_rate": "fraction of requests answered 500 server_error",
    "timeout_rate": "fraction of requests that hang for --hang-seconds, then 500",
    "hang_seconds": "how long a timeout fault hangs",
    "reset_rate": "fraction of requests whose connection is reset with no response",
    "truncated_rate": "fraction of 200 bodies cut off half way",
    "bad_b64_rate": "fraction of 200 bodies with invalid base64 (billed)",
    "burst_429_rate": "fraction of requests answered 429 rate_limit_exceeded regardless of rate",
    "quota_after": "after this many billed requests, answer 429 insufficient_quota",
    "drift": "fraction of pixels outside the edit area that are changed too",
    "api_keys": "accept only these bearer keys (default: any non-empty key)",
    "seed": "seed of the fault and latency draws",
    "billing_log": "append one JSON line per billed request to this file",
    "azure_deployments": "Azure deployments, as NAME=MODEL pairs",
    "azure_api_versions": "api-version values the Azure deployment paths accept",
    "azure_api_keys": "accept only these Azure api-key values (default: any non-empty key)",
    "azure_ad_tokens": "accept only these Entra ID bearer tokens (default: any non-empty token)",
    "azure_deployment_rpm": "requests per minute per Azure deployment, as NAME=N pairs",
    "azure_content_filter_rate": "fraction of Azure edits answered 400 contentFilter",
    "admin_keys": "admin keys for /v1/organization/* (default: any key starting sk-admin-)",
    "outage": "none, unreachable (connections cut) or 503, for every API request",
    "outage_until": "epoch seconds at which the outage ends by itself",
}
ALIASES = {"rate_limit_per_minute": ["--rate-limit"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sandbox",
        description="OpenAI-compatible image edit sandbox (not AI: a deterministic visible edit).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    defaults = SandboxConfig()
    for name in FIELD_NAMES:
        base, _ = field_kind(name)
        flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, [])]
        default = getattr(defaults, name)
        help_text = f"{HELP[name]} (default: {default})"
        if base is list or base is dict:
            parser.add_argument(*flags, dest=name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=base, default=default, help=help_text)
    return parser


def _pairs(name: str, items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` arguments of a dict field, values converted to the field's value type."""
    value_type = dict_value_type(name)
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--{name.replace('_', '-')} expects NAME=VALUE pairs, got {item!r}")
        try:
            pairs[key] = value_type(value)
        except ValueError as exc:
            raise ValueError(f"{name}[{key!r}] must be an integer, got {value!r}") from exc
    return pairs


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    config = SandboxConfig()
    values: dict[str, Any] = {}
    try:
        for name in FIELD_NAMES:
            value = getattr(args, name)
            base, optional = field_kind(name)
            if value is None and not optional:
                continue  # a list or dict flag not given: keep the config's default
            if base is dict:
                value = _pairs(name, value)
            values[name] = coerce_field(name, value)
        config.update(values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return config


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    serve(config_from_args(args), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
