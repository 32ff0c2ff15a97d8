"""Pure pieces: token arithmetic, cost rounding, the sliding windows, directive parsing, edit
params, config coercion."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from starlette.datastructures import FormData

from pipeline.sandbox import tokens
from pipeline.sandbox.app import _duration
from pipeline.sandbox.batch_runner import parse_input
from pipeline.sandbox.config import SandboxConfig, coerce_field, dict_value_type
from pipeline.sandbox.errors import ApiError
from pipeline.sandbox.faults import (
    DirectiveError,
    Directives,
    Fault,
    latency_seconds,
    parse_directives,
    random_fault,
)
from pipeline.sandbox.models import MODELS, Access, resolve
from pipeline.sandbox.params import FormParams, JsonParams
from pipeline.sandbox.ratelimit import KeyedWindows, SlidingWindow
from pipeline.sandbox.response import corrupt_b64
from pipeline.sandbox.validation import frame_duration, nearest_standard_size


def test_tables_carry_their_date_and_source() -> None:
    assert (tokens.AS_OF, tokens.SOURCE) == ("2026-11-30", "../shared/API-FACTS.md")
    editing = {name for name, model in MODELS.items() if model.rules is not None}
    assert set(tokens.PRICES) | set(tokens.PER_IMAGE_PRICES) == editing
    assert not set(tokens.PRICES) & set(tokens.PER_IMAGE_PRICES)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), 194),
        ((512, 512), 194),
        ((1024, 1536), 323),
        ((1536, 1024), 323),
        ((100, 300), 452),
        ((2000, 2001), 194),
        ((1000, 1001), 323),
    ],
)
def test_input_image_tokens(size: tuple[int, int], expected: int) -> None:
    assert tokens.input_image_tokens(*size) == expected


@pytest.mark.parametrize(
    ("size", "quality", "expected"),
    [
        ((1024, 1024), "low", 272),
        ((1024, 1536), "medium", 1584),
        ((1536, 1024), "high", 6208),
        ((1536, 864), "medium", 1337),  # 1336.5 rounds half up
        ((2048, 2048), "low", 1088),
        ((1024, 1024), "xhigh", 8320),
        ((1024, 1024), "max", 16640),
    ],
)
def test_output_image_tokens(size: tuple[int, int], quality: str, expected: int) -> None:
    assert tokens.output_image_tokens(*size, quality) == expected


def test_text_tokens_round_up() -> None:
    assert [tokens.text_tokens("x" * k) for k in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_cost_is_rounded_once_half_up() -> None:
    usage = tokens.usage(
        prompt="abcd",
        input_sizes=[(64, 64)],
        input_fidelity=None,
        output_size=(1024, 1024),
        quality="low",
        n=1,
    )
    # mini: 1 x 2.00 + 194 x 2.50 + 272 x 8.00 = 2663 per 1M -> 0.002663
    assert tokens.cost_usd("gpt-image-1-mini", usage) == Decimal("0.002663")
    half = {
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 1},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 0},
    }
    assert tokens.cost_usd("gpt-image-1-mini", half) == Decimal("0.000003")  # 0.0000025 up


def test_sliding_window_says_when_capacity_returns() -> None:
    now = [0.0]
    window = SlidingWindow(60.0, clock=lambda: now[0])
    assert window.try_take(2, 3) == 0.0
    now[0] = 10.0
    assert window.try_take(1, 3) == 0.0
    now[0] = 20.0
    assert window.try_take(1, 3) == pytest.approx(40.0)  # the first 2 leave at t=60
    assert window.try_take(3, 3) == pytest.approx(50.0)  # all three leave by t=70
    assert window.try_take(4, 3) == 60.0  # never fits
    assert window.used() == 3
    now[0] = 60.0
    assert window.used() == 1
    assert window.try_take(2, 3) == 0.0
    assert window.reset_in() == pytest.approx(10.0)


def test_parse_directives() -> None:
    assert parse_directives("plain prompt") == Directives()
    assert parse_directives("x #sandbox:500x3") == Directives(Fault.SERVER_ERROR, 3, None)
    assert parse_directives("#sandbox:latency=250 then #sandbox:timeout.") == Directives(
        Fault.TIMEOUT, None, 250.0
    )
    assert parse_directives("#sandbox:badb64 #sandbox:429").fault is Fault.BAD_B64
    with pytest.raises(DirectiveError):
        parse_directives("#sandbox:5000")


def test_random_faults_take_disjoint_slices() -> None:
    config = SandboxConfig(error_rate=0.1, reset_rate=0.2, burst_429_rate=0.1)
    assert random_fault(config, 0.05) is Fault.SERVER_ERROR
    assert random_fault(config, 0.15) is Fault.RESET
    assert random_fault(config, 0.35) is Fault.RATE_LIMIT
    assert random_fault(config, 0.45) is None


def test_latency_is_lognormal_around_the_median() -> None:
    config = SandboxConfig(latency_ms=1000, latency_sigma=0.5, time_scale=0.1)
    assert latency_seconds(config, 0.0) == pytest.approx(0.1)
    assert latency_seconds(config, 1.0) == pytest.approx(0.1 * 1.6487, rel=1e-3)
    assert latency_seconds(SandboxConfig(), 3.0) == 0.0


def test_corrupt_base64_fails_every_decoder() -> None:
    for length in [*range(1, 12), 200, 201, 202]:
        value = corrupt_b64(base64.b64encode(bytes(range(length))).decode())
        for padding in ("", "=", "=="):
            with pytest.raises(binascii.Error):
                base64.b64decode(value + padding)


def test_duration_format() -> None:
    assert [_duration(s) for s in (0.02, 1.5, 59.9994, 360.0)] == [
        "20ms",
        "1.5s",
        "59.999s",
        "6m0s",
    ]


def test_auto_size_is_the_nearest_aspect() -> None:
    assert nearest_standard_size(100, 100) == (1024, 1024)
    assert nearest_standard_size(130, 100) == (1536, 1024)
    assert nearest_standard_size(100, 115) == (1024, 1024)
    assert nearest_standard_size(100, 300) == (1024, 1536)


def test_config_update_checks_types() -> None:
    config = SandboxConfig()
    config.update({"latency_ms": 5, "api_keys": ["a"], "quota_after": None})
    assert (config.latency_ms, config.api_keys) == (5.0, ["a"])
    for bad in ({"seed": 1.5}, {"drift": -1}, {"hang_seconds": True}, {"nope": 1}):
        with pytest.raises(ValueError):
            config.update(bad)


def test_batch_cost_halves_the_exact_amount_and_is_not_rounded() -> None:
    usage = {
        "input_tokens_details": {"text_tokens": 1, "image_tokens": 1},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 0},
    }
    # mini: 1 x 2.00 + 1 x 2.50 = 4.5 per 1M; sync rounds to 5e-6; a batch line is billed
    # exactly 2.25e-6 (halving the rounded sync cost would give 2.5e-6, rounding it 2e-6).
    assert tokens.cost_usd("gpt-image-1-mini", usage) == Decimal("0.000005")
    line = tokens.cost_usd("gpt-image-1-mini", usage, Decimal("0.5"), exact=True)
    assert line == Decimal("0.00000225")
    # 10,000 such lines bill 0.0225, where rounding each would have billed 0.02.
    assert line * 10_000 == Decimal("0.0225")


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(1, 10), (4, 10), (5, 10), (14, 10), (15, 20), (124, 120), (125, 130), (10**6, 655_350)],
)
def test_gif_frame_duration_rounds_to_10_ms(requested: int, expected: int) -> None:
    assert frame_duration(requested) == expected


def test_parse_input_keeps_positions_not_bodies(tmp_path: Path) -> None:
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/images/edits", "body": {"prompt": "x"}},
        {"custom_id": "b", "method": "POST", "url": "/v1/images/edits", "body": {"n": 2}},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    parsed = parse_input(path, max_bytes=10_000, max_requests=10)
    assert (parsed.errors, parsed.model) == ([], "gpt-image-2.5-sunburst")
    assert [ref.custom_id for ref in parsed.lines] == ["a", "b"]
    raw = path.read_bytes()
    for ref, line in zip(parsed.lines, lines, strict=True):
        assert json.loads(raw[ref.offset : ref.offset + ref.length]) == line
    assert parse_input(path, max_bytes=10, max_requests=10).errors[0]["code"] == "file_too_large"
    assert parse_input(path, max_bytes=10_000, max_requests=1).errors[0]["code"] == (
        "too_many_tasks"
    )


def test_parse_input_reports_at_most_100_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 500)
    errors = parse_input(path, max_bytes=10**6, max_requests=50_000).errors
    assert len(errors) == 100
    assert [e["line"] for e in errors[:3]] == [1, 2, 3]


def test_model_access_precedence() -> None:
    today = date(2026, 12, 1)
    base = Access(today, frozenset(), "404", True, None)
    assert resolve("gpt-image-2", base).name == "gpt-image-2"
    with pytest.raises(ApiError) as unknown:
        resolve("gpt-image-9", replace(base, style="400"))
    assert unknown.value.status == 404
    with pytest.raises(ApiError) as gone:
        resolve("gpt-image-1.5", replace(base, style="400"))
    assert (gone.value.status, gone.value.param) == (400, "model")
    with pytest.raises(ApiError) as not_for_key:
        resolve("gpt-image-1.5", replace(base, style="400", allowed=frozenset({"gpt-image-2"})))
    assert not_for_key.value.status == 404  # a key without access learns nothing more
    with pytest.raises(ApiError) as unverified:
        resolve("gpt-image-2", replace(base, org_verified=False))
    assert unverified.value.status == 403


def test_overridden_params_set_fields_and_share_opened_files(tmp_path: Path) -> None:
    """A copy with some fields set (an Azure deployment's model) reads the other fields as they
    were; a file the copy opens is closed when the original closes."""
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    body = {"model": "edits-a", "prompt": "p", "images": [{"file_id": "file-1"}]}
    with JsonParams(body, lambda file_id: image if file_id == "file-1" else None) as params:
        copy = params.overridden({"model": "gpt-image-2", "quality": "high"})
        assert isinstance(copy, JsonParams)
        assert (copy.text("model"), copy.text("quality"), copy.text("prompt")) == (
            "gpt-image-2",
            "high",
            "p",
        )
        assert params.text("model") == "edits-a"
        sources = copy.images()
        assert sources is not None
        opened = sources[0].opener()
        assert not opened.closed
    assert opened.closed
    form = FormParams(FormData([("model", "edits-a"), ("model", "x"), ("prompt", "p")]))
    replaced = form.overridden({"model": "gpt-image-2"})
    assert isinstance(replaced, FormParams)
    assert replaced.form.getlist("model") == ["gpt-image-2"]
    assert replaced.text("prompt") == "p"


def test_keyed_windows_are_independent() -> None:
    """Each key (Azure deployment) has its own window; clear forgets them all."""
    windows = KeyedWindows()
    assert windows.get("a").try_take(1, 1) == 0
    assert windows.get("a").try_take(1, 1) > 0
    assert windows.get("b").try_take(1, 1) == 0
    windows.clear()
    assert windows.get("a").try_take(1, 1) == 0


@pytest.mark.parametrize(
    ("name", "value", "value_type"),
    [
        ("key_models", {"sk-a": ["gpt-image-2"], "sk-b": []}, list),
        ("azure_deployments", {"edits-a": "gpt-image-2"}, str),
        ("azure_deployment_rpm", {"edits-a": 9}, int),
    ],
)
def test_dict_fields_are_checked_by_their_value_type(
    name: str, value: dict[str, object], value_type: type
) -> None:
    """The dict fields, optional or not, coerce by their declared value type and refuse another."""
    assert dict_value_type(name) is value_type
    assert coerce_field(name, value) == value
    wrong = {"k": 1} if value_type is not int else {"k": "9"}
    with pytest.raises(ValueError, match=name):
        coerce_field(name, wrong)
    with pytest.raises(ValueError, match="keys must be non-empty"):
        coerce_field(name, {"": next(iter(value.values()))})
