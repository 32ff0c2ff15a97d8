"""EditSpec: the request it makes, its fingerprint, and specs stored before a field existed."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest

from pipeline.spec import EditSpec

DIGESTS = {"/in/a.png": "aa"}


def base(**kw: object) -> EditSpec:
    return EditSpec(row=1, key="k", images=("/in/a.png",), prompt="p", model="m", **kw)  # type: ignore[arg-type]


def test_new_parameters_stay_out_of_the_request_until_set() -> None:
    params = base().api_params()
    for name in ("complexity", "frame_count", "frame_duration_ms", "svg"):
        assert name not in params


def test_svg_fields_become_the_sdks_nested_object() -> None:
    assert base(output_format="svg", svg_model="x").api_params()["svg"] == {"model": "x"}
    assert base(output_format="svg", svg_effort="low").api_params()["svg"] == {
        "reasoning": {"effort": "low"}
    }


@pytest.mark.parametrize(
    "change",
    [
        {"complexity": "high"},
        {"output_format": "gif"},
        {"output_format": "gif", "frame_count": 4},
        {"output_format": "gif", "frame_duration_ms": 100},
        {"output_format": "svg"},
        {"output_format": "svg", "svg_model": "x"},
        {"output_format": "svg", "svg_effort": "low"},
    ],
)
def test_every_new_parameter_changes_the_fingerprint(change: dict[str, object]) -> None:
    """Two jobs that ask the API for different things never share an output (no false reuse)."""
    assert base().fingerprint(DIGESTS) != replace(base(), **change).fingerprint(DIGESTS)  # type: ignore[arg-type]


def test_a_spec_stored_before_the_new_fields_loads_with_them_omitted() -> None:
    spec = base(mask_mode="guide")
    stored = json.loads(spec.to_json())
    for name in ("complexity", "frame_count", "frame_duration_ms", "svg_model", "svg_effort"):
        del stored[name]
    old = EditSpec.from_json(json.dumps(stored))
    assert old == spec
    assert old.fingerprint(DIGESTS) == spec.fingerprint(DIGESTS)
    assert {f.name for f in fields(EditSpec)} >= {"complexity", "svg_effort"}
