"""The catalogue and the pipeline held against the installed openai SDK, so that drift is noticed
by the project, not by a user's failed night.

Every model of `openai.types.ImageModel` is in `pipeline/data/catalog.toml` or in its
`[sdk.ignored_models]` (with the reason); every field of `ImageEditParams` (all its TypedDict
variants, nested `svg` fields by dotted name) is sent by the pipeline (`pipeline.spec.API_PARAMS`)
or in `[sdk.ignored_params]`; the values of the SDK's Literal types the pipeline checks
(output_format, quality, complexity, background, input_fidelity, svg.reasoning.effort) are all
known; and `[sdk] version` names the installed SDK. Each failure says what to add, and where.
docs/dependencies.md: how to bump the SDK.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Union

import openai
import openai.types
import pytest
import typing_extensions
from openai.types import image_edit_params

from pipeline.intake.catalog import Catalog, SdkReview, load_catalog
from pipeline.intake.preflight import BACKGROUNDS, INPUT_FIDELITIES
from pipeline.spec import API_PARAMS, COMPLEXITIES, OUTPUT_FORMATS, SVG_EFFORTS

CATALOG_FILE = "pipeline/data/catalog.toml"


@dataclass(frozen=True)
class Sdk:
    """What the installed SDK says about image edits."""

    version: str
    models: tuple[str, ...]
    fields: Mapping[str, tuple[str, ...]]  # dotted field name -> its Literal values (or ())


def _literals(tp: Any) -> list[Any]:
    """Every Literal value in a type (through Optional / Union / type aliases)."""
    if typing.get_origin(tp) in (Literal, typing_extensions.Literal):
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [v for arg in typing.get_args(tp) for v in _literals(arg)]
    return []


def _typeddicts(tp: Any) -> list[Any]:
    if typing_extensions.is_typeddict(tp):
        return [tp]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [d for arg in typing.get_args(tp) for d in _typeddicts(arg)]
    return []


def _walk(td: Any, prefix: str, out: dict[str, tuple[str, ...]]) -> None:
    for name, tp in typing.get_type_hints(td).items():
        dotted = prefix + name
        values = tuple(str(v) for v in _literals(tp))
        out[dotted] = tuple(dict.fromkeys((*out.get(dotted, ()), *values)))
        for nested in _typeddicts(tp):
            _walk(nested, dotted + ".", out)


def installed_sdk() -> Sdk:
    """Read at call time, so a test can monkeypatch the SDK's types."""
    fields: dict[str, tuple[str, ...]] = {}
    for variant in typing.get_args(image_edit_params.ImageEditParams):
        _walk(variant, "", fields)
    models = tuple(str(m) for m in typing.get_args(openai.types.ImageModel))
    return Sdk(openai.__version__, models, fields)


def pipeline_values(catalog: Catalog) -> dict[str, tuple[str, ...]]:
    """The values the pipeline knows for each Literal-typed field it checks."""
    qualities = {q for info in catalog for q in info.qualities}
    return {
        "output_format": OUTPUT_FORMATS,
        "quality": tuple(sorted(qualities)),
        "complexity": COMPLEXITIES,
        "background": BACKGROUNDS,
        "input_fidelity": INPUT_FIDELITIES,
        "svg.reasoning.effort": SVG_EFFORTS,
    }


# Where a new value of each field must be taught to the pipeline.
VALUE_HOMES = {
    "output_format": "pipeline/spec.py OUTPUT_FORMATS, a rule in pipeline/intake/preflight.py "
    "and the collector (pipeline/output/formats.py)",
    "quality": f"the `qualities` of the models that take it in {CATALOG_FILE}, and its token "
    "figure in pipeline/cost/estimate.py",
    "complexity": "pipeline/spec.py COMPLEXITIES",
    "background": "pipeline/intake/preflight.py BACKGROUNDS",
    "input_fidelity": "pipeline/intake/preflight.py INPUT_FIDELITIES (and the models' "
    f"`input_fidelity` in {CATALOG_FILE})",
    "svg.reasoning.effort": "pipeline/spec.py SVG_EFFORTS",
}


def drift(sdk: Sdk, catalog: Catalog, sent: tuple[str, ...] = API_PARAMS) -> list[str]:
    """What the installed SDK has that the project does not know, each with what to do."""
    review = catalog.sdk or SdkReview("(none)", {}, {})
    problems: list[str] = []
    if sdk.version != review.version:
        problems.append(
            f"openai {sdk.version} is installed, but {CATALOG_FILE} [sdk] was reviewed against "
            f"{review.version}: fix what else this test lists, read the SDK's "
            f'image_edit_params.py docstrings for changed rules, then set version = "{sdk.version}"'
        )
    for model in sdk.models:
        if model not in catalog and model not in review.ignored_models:
            problems.append(
                f"openai {sdk.version} knows the image model {model!r}, which the catalogue does "
                f'not: add [models."{model}"] to {CATALOG_FILE} (what it accepts, with `source`), '
                f'or list it under [sdk.ignored_models] as "{model}" = "why"'
            )
    for model in review.ignored_models:
        if model not in sdk.models:
            problems.append(
                f"[sdk.ignored_models] in {CATALOG_FILE} lists {model!r}, which openai "
                f"{sdk.version} no longer has: remove it"
            )
    for name in sdk.fields:
        if name not in sent and name not in review.ignored_params:
            problems.append(
                f"openai {sdk.version}'s ImageEditParams has the field {name!r}, which the "
                "pipeline neither sends nor ignores: support it (pipeline/spec.py EditSpec and "
                "API_PARAMS, a manifest column in pipeline/intake/manifest.py, its rule in "
                f"pipeline/intake/preflight.py and per-model keys in {CATALOG_FILE}) or list it "
                f'under [sdk.ignored_params] in {CATALOG_FILE} as {name} = "why"'
            )
    for name in (*review.ignored_params, *sent):
        if name not in sdk.fields:
            where = (
                f"[sdk.ignored_params] in {CATALOG_FILE}"
                if name in review.ignored_params
                else "pipeline/spec.py API_PARAMS (and the EditSpec field that sends it)"
            )
            problems.append(
                f"{where} names {name!r}, which openai {sdk.version}'s ImageEditParams no "
                "longer has: remove it"
            )
    for name, known in pipeline_values(catalog).items():
        for value in sdk.fields.get(name, ()):
            if value not in known:
                problems.append(
                    f"openai {sdk.version} allows {name}={value!r}, unknown to the pipeline: "
                    f"add it to {VALUE_HOMES[name]}"
                )
    return problems


def fails_with(problems: list[str], *fragments: str) -> None:
    """Exactly one problem, holding every fragment."""
    assert len(problems) == 1, problems
    for fragment in fragments:
        assert fragment in problems[0], problems[0]


# --- the pinned SDK ----------------------------------------------------------------------------


def test_the_installed_sdk_holds_nothing_the_project_does_not_know() -> None:
    problems = drift(installed_sdk(), load_catalog())
    assert not problems, "\n".join(["The openai SDK drifted from the catalogue:", *problems])


def test_the_reading_of_the_sdk_sees_what_is_there() -> None:
    """Guards the guard: the walk finds nested fields and Literal values, not an empty set."""
    sdk = installed_sdk()
    assert {"image", "svg", "svg.model", "svg.reasoning.effort", "stream"} <= set(sdk.fields)
    assert "gif" in sdk.fields["output_format"] and "max" in sdk.fields["svg.reasoning.effort"]
    assert "gpt-image-2.5-sunburst" in sdk.models


# --- drift is caught -------------------------------------------------------------------------


def with_variant(monkeypatch: pytest.MonkeyPatch, **annotations: Any) -> None:
    """Make the SDK's ImageEditParams grow a variant with these fields."""
    extra = typing_extensions.TypedDict("ImageEditParamsFuture", annotations, total=False)  # type: ignore[operator]
    variants = (*typing.get_args(image_edit_params.ImageEditParams), extra)
    monkeypatch.setattr(image_edit_params, "ImageEditParams", Union[variants])  # noqa: UP007


def test_a_new_sdk_field_fails_naming_where_to_add_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with_variant(monkeypatch, sparkle=int | None)
    fails_with(
        drift(installed_sdk(), load_catalog()),
        "'sparkle'",
        "pipeline/spec.py EditSpec and API_PARAMS",
        "[sdk.ignored_params]",
        CATALOG_FILE,
    )


def test_a_new_nested_field_is_caught_too(monkeypatch: pytest.MonkeyPatch) -> None:
    class SvgFuture(typing_extensions.TypedDict, total=False):
        palette: int

    with_variant(monkeypatch, svg=SvgFuture | None)
    fails_with(drift(installed_sdk(), load_catalog()), "'svg.palette'")


def test_a_new_sdk_model_fails_naming_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    models = (*typing.get_args(openai.types.ImageModel), "gpt-image-3")
    monkeypatch.setattr(openai.types, "ImageModel", Literal[models])  # type: ignore[valid-type]
    fails_with(
        drift(installed_sdk(), load_catalog()),
        "'gpt-image-3'",
        '[models."gpt-image-3"]',
        "[sdk.ignored_models]",
    )


@pytest.mark.parametrize(
    ("field", "value", "home"),
    [
        ("output_format", "avif", "OUTPUT_FORMATS"),
        ("quality", "ultra", "qualities"),
        ("complexity", "extreme", "COMPLEXITIES"),
    ],
)
def test_a_new_value_of_a_checked_field_is_caught(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, home: str
) -> None:
    with_variant(monkeypatch, **{field: Literal[value] | None})
    fails_with(drift(installed_sdk(), load_catalog()), f"{field}={value!r}", home)


def test_a_new_sdk_version_must_be_reviewed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai, "__version__", "3.58.0")
    fails_with(drift(installed_sdk(), load_catalog()), "3.58.0", 'version = "3.58.0"')


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda r: replace(r, ignored_params={**r.ignored_params, "gone": "x"}), "'gone'"),
        (lambda r: replace(r, ignored_models={"dall-e-1": "x"}), "'dall-e-1'"),
    ],
)
def test_what_the_sdk_dropped_is_named_for_removal(
    change: Callable[[SdkReview], SdkReview], fragment: str
) -> None:
    catalog = load_catalog()
    assert catalog.sdk is not None
    stale = Catalog(catalog.as_of, catalog.models, catalog.source, change(catalog.sdk))
    fails_with(drift(installed_sdk(), stale), fragment, "no longer has: remove it")


def test_a_parameter_the_pipeline_stops_knowing_is_caught() -> None:
    sent = tuple(p for p in API_PARAMS if p != "frame_count")
    fails_with(drift(installed_sdk(), load_catalog(), sent), "'frame_count'", "ignored_params")
