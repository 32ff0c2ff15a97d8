"""`python -m pipeline.sandbox --port 8089 [--latency-ms 2000 --rate-limit 50 ...]`."""

from __future__ import annotations

import argparse
import json
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
    "bill_undelivered": "bill answers made after the client left or cut off (as the API does); "
    "false: bill only answers sent whole",
    "today": "the sandbox's date, YYYY-MM-DD: models shut down on or before it are gone "
    "(none: the real UTC date)",
    "unavailable_style": "how a gone model is refused: 404 model_not_found or 400 invalid_value",
    "unavailable_models": "models to treat as gone from now on",
    "org_verified": "false: GPT Image models answer 403 (organization must be verified)",
    "key_models": "the models each key may use, as KEY=MODEL,MODEL pairs or one JSON object "
    '{"KEY": ["MODEL", ...]} (none: every key may use every model)',
    "files_dir": "folder for Files API uploads and batch output files "
    "(none: a temporary folder, deleted at exit)",
    "batch_validating_seconds": "how long a new batch stays `validating`",
    "batch_lines_per_second": "pace of a batch's lines while `in_progress`",
    "batch_finalizing_seconds": "how long a batch stays `finalizing`",
    "batch_line_error_rate": "fraction of batch lines answered 500 server_error",
    "batch_line_moderation_rate": "fraction of batch lines answered 400 moderation_blocked",
    "batch_expire_after_seconds": "a batch expires this long after its creation (none: never)",
    "batch_max_requests": "most requests in one batch input file",
    "batch_max_file_bytes": "largest batch input file, in bytes",
    "gif_models": "models with access to GIF output (output_format=gif)",
    "svg_models": "models with access to SVG output (output_format=svg)",
    "azure_deployments": "Azure deployments, as NAME=MODEL pairs (or one JSON object)",
    "azure_api_versions": "api-version values the Azure deployment paths accept",
    "azure_api_keys": "accept only these Azure api-key values (none: any non-empty key)",
    "azure_ad_tokens": "accept only these Entra ID bearer tokens (none: any non-empty token)",
    "azure_deployment_rpm": "requests per minute per Azure deployment, as NAME=N pairs "
    "(or one JSON object)",
    "azure_content_filter_rate": "fraction of Azure edits answered 400 contentFilter",
    "admin_keys": "admin keys for /v1/organization/* (none: any key starting sk-admin-)",
    "outage": "none, unreachable (connections cut) or 503, for every API request",
    "outage_until": "epoch seconds at which the outage ends by itself",
}
ALIASES = {"rate_limit_per_minute": ["--rate-limit"]}


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        flags = [_flag(name), *ALIASES.get(name, [])]
        default = getattr(defaults, name)
        help_text = f"{HELP[name]} (default: {default})"
        if base is list or base is dict:
            # Not given: None, and the config keeps its own default (see config_from_args).
            parser.add_argument(*flags, dest=name, nargs="+", default=None, help=help_text)
        elif base is bool:
            parser.add_argument(*flags, dest=name, type=_boolean, default=default, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=base, default=default, help=help_text)
    return parser


def _mapping(name: str, items: list[str]) -> dict[str, Any]:
    """A dict field's arguments: one JSON object, or `NAME=VALUE` pairs whose values are
    converted to the field's value type (a list value is comma-separated: `KEY=a,b`)."""
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            value = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{_flag(name)} expects a JSON object: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{_flag(name)} expects a JSON object, got {items[0]!r}")
        return value
    value_type = dict_value_type(name)
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(
                f"{_flag(name)} expects NAME=VALUE pairs or one JSON object, got {item!r}"
            )
        if value_type is int:
            try:
                pairs[key] = int(text)
            except ValueError:
                raise ValueError(f"{name}[{key!r}] must be an integer, got {text!r}") from None
        elif value_type is list:
            pairs[key] = [part.strip() for part in text.split(",") if part.strip()]
        else:
            pairs[key] = text
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
            if base is dict and value is not None:
                value = _mapping(name, value)
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
