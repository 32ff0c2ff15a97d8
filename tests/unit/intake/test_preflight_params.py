"""Preflight of the parameters openai 3.57 added: complexity, GIF output and SVG output.

The promise: where the catalogue knows a model does not take a parameter, the row is rejected
naming the row and the field; where it does not know (the key is left out), the row passes with
a note saying so, and the value is sent as given rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.intake.catalog import Catalog, _builtin_data, build_catalog, load_catalog
from pipeline.intake.preflight import Preflight, PreflightOptions, PreflightResult
from pipeline.spec import EditSpec

ROW = 12
KEY = "SKU-9"
MODEL = "gpt-image-2.5-sunburst"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "manifest"
    folder.mkdir()
    return folder


@pytest.fixture
def image(root: Path) -> Path:
    path = root / "shoe.png"
    Image.new("RGB", (64, 64), (200, 120, 40)).save(path)
    return path


@pytest.fixture
def mask(root: Path) -> Path:
    path = root / "mask.png"
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 32, 32))
    img.save(path)
    return path


def catalog_with(**models: dict[str, Any]) -> Catalog:
    """The built-in catalogue with these models' keys overridden (as a catalogue file would)."""
    return build_catalog(_builtin_data(), {"models": models}, "test override")


def check(root: Path, spec: EditSpec, catalog: Catalog | None = None) -> PreflightResult:
    options = PreflightOptions(
        allowed_roots=(root,), catalog=catalog or load_catalog(), work_dir=root.parent / "work"
    )
    return Preflight(options).check(spec)


def spec(image: Path, **kw: Any) -> EditSpec:
    values: dict[str, Any] = {
        "row": ROW,
        "key": KEY,
        "images": (str(image),),
        "prompt": "the shoe on a white sweep",
        "model": MODEL,
    }
    values.update(kw)
    if isinstance(values.get("mask"), Path):
        values["mask"] = str(values["mask"])
    return EditSpec(**values)


def only_error(result: PreflightResult, field: str, *fragments: str) -> str:
    """Exactly one error, on `field`, for our row and key, whose reason has every fragment."""
    assert result.spec is None
    assert [(e.row, e.key, e.field) for e in result.errors] == [(ROW, KEY, field)], result.errors
    reason = result.errors[0].reason
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


def passes(result: PreflightResult) -> EditSpec:
    assert result.errors == (), result.errors
    assert result.spec is not None
    return result.spec


# --- complexity ------------------------------------------------------------------------------


def test_complexity_unknown_to_the_catalogue_is_noted_and_sent(root: Path, image: Path) -> None:
    result = check(root, spec(image, complexity="high"))
    sent = passes(result)
    assert any("does not know whether" in n and "complexity" in n for n in result.notes)
    assert sent.api_params()["complexity"] == "high"


def test_complexity_a_model_does_not_take_is_rejected(root: Path, image: Path) -> None:
    catalog = catalog_with(**{MODEL: {"complexity": []}})
    only_error(
        check(root, spec(image, complexity="low"), catalog),
        "complexity",
        f"{MODEL} does not take complexity",
        "omit it",
    )


def test_complexity_value_outside_the_models_list(root: Path, image: Path) -> None:
    catalog = catalog_with(**{MODEL: {"complexity": ["low", "medium"]}})
    only_error(
        check(root, spec(image, complexity="high"), catalog),
        "complexity",
        "'high' is not available",
        "low, medium",
    )
    result = check(root, spec(image, complexity="medium"), catalog)
    passes(result)
    assert not any("complexity" in n for n in result.notes)


def test_complexity_not_a_value_of_the_api(root: Path, image: Path) -> None:
    only_error(check(root, spec(image, complexity="extreme")), "complexity", "low, medium, high")


def test_without_new_parameters_no_note_about_them(root: Path, image: Path) -> None:
    result = check(root, spec(image))
    passes(result)
    assert result.notes == ()


# --- GIF ---------------------------------------------------------------------------------------


def test_gif_unknown_to_the_catalogue_is_noted_and_sent(root: Path, image: Path) -> None:
    result = check(root, spec(image, output_format="gif", frame_count=4, frame_duration_ms=120))
    sent = passes(result)
    assert any("does not know whether" in n and "GIF" in n for n in result.notes), result.notes
    params = sent.api_params()
    assert (params["output_format"], params["frame_count"], params["frame_duration_ms"]) == (
        "gif",
        4,
        120,
    )


def test_gif_a_model_does_not_make_is_rejected(root: Path, image: Path) -> None:
    catalog = catalog_with(**{MODEL: {"gif": False}, "gpt-image-2": {"gif": True}})
    only_error(
        check(root, spec(image, output_format="gif"), catalog),
        "output_format",
        f"{MODEL} does not make GIF output",
        "models known to make GIF: gpt-image-2",
    )


def test_gif_the_catalogue_says_yes_to_passes_without_note(root: Path, image: Path) -> None:
    catalog = catalog_with(**{MODEL: {"gif": True}})
    result = check(root, spec(image, output_format="gif"), catalog)
    passes(result)
    assert result.notes == ()


@pytest.mark.parametrize("frames", [1, 17, 0])
def test_frame_count_outside_2_to_16(root: Path, image: Path, frames: int) -> None:
    only_error(
        check(root, spec(image, output_format="gif", frame_count=frames)),
        "frame_count",
        "2..16",
    )


@pytest.mark.parametrize("name", ["frame_count", "frame_duration_ms"])
def test_gif_fields_without_gif_output(root: Path, image: Path, name: str) -> None:
    only_error(
        check(root, spec(image, output_format="png", **{name: 5})),
        name,
        "only to output_format gif",
        "png",
    )


def test_frame_duration_rounding_is_noted(root: Path, image: Path) -> None:
    result = check(root, spec(image, output_format="gif", frame_duration_ms=123))
    passes(result)
    assert any("frame_duration_ms 123 becomes 120 ms" in n for n in result.notes), result.notes
    only_error(
        check(root, spec(image, output_format="gif", frame_duration_ms=0)),
        "frame_duration_ms",
        "1 or more",
    )


def test_gif_takes_no_mask(root: Path, image: Path, mask: Path) -> None:
    only_error(
        check(root, spec(image, output_format="gif", mask=mask)), "mask", "GIF output takes no mask"
    )


def test_gif_takes_no_compression_nor_transparency(root: Path, image: Path) -> None:
    only_error(
        check(root, spec(image, output_format="gif", output_compression=50)),
        "output_compression",
        "only to jpeg or webp",
    )
    only_error(
        check(root, spec(image, output_format="gif", background="transparent")),
        "background",
        "png or webp",
    )


# --- SVG ---------------------------------------------------------------------------------------


def test_svg_unknown_to_the_catalogue_is_noted_and_sent(root: Path, image: Path) -> None:
    result = check(
        root, spec(image, output_format="svg", svg_model="gpt-5.2", svg_effort="minimal")
    )
    sent = passes(result)
    assert any("does not know whether" in n and "SVG" in n for n in result.notes), result.notes
    assert sent.api_params()["svg"] == {"model": "gpt-5.2", "reasoning": {"effort": "minimal"}}


def test_svg_a_model_does_not_make_is_rejected(root: Path, image: Path) -> None:
    catalog = catalog_with(**{MODEL: {"svg": False}})
    only_error(
        check(root, spec(image, output_format="svg"), catalog),
        "output_format",
        f"{MODEL} does not make SVG output",
        "none in the catalogue",
    )


def test_svg_needs_n_1(root: Path, image: Path) -> None:
    only_error(check(root, spec(image, output_format="svg", n=2)), "n", "n = 1")


def test_svg_refuses_strict_masks(root: Path, image: Path, mask: Path) -> None:
    only_error(
        check(root, spec(image, output_format="svg", mask=mask, mask_mode="strict")),
        "mask_mode",
        "use mask_mode guide",
    )
    # A guiding mask is the API's business: allowed.
    passes(check(root, spec(image, output_format="svg", mask=mask)))


def test_svg_fields_without_svg_output(root: Path, image: Path) -> None:
    only_error(
        check(root, spec(image, output_format="gif", svg_model="gpt-5.2")),
        "svg_model",
        "only to output_format svg",
    )
    only_error(check(root, spec(image, svg_effort="high")), "svg_effort", "output_format svg")


def test_svg_effort_outside_the_sdk_values(root: Path, image: Path) -> None:
    only_error(
        check(root, spec(image, output_format="svg", svg_effort="huge")),
        "svg_effort",
        "none, minimal, low, medium, high, xhigh, max",
    )


# --- the catalogue's keys ------------------------------------------------------------------------


def test_built_in_catalogue_leaves_unknown_facts_out() -> None:
    """No GPT image model's complexity / GIF / SVG support is published: none is guessed."""
    catalog = load_catalog()
    for info in catalog:
        if info.name.startswith("dall-e"):
            assert (info.complexity, info.gif, info.svg) == ((), False, False)
            assert info.params_source
        else:
            assert (info.complexity, info.gif, info.svg) == (None, None, None), info.name


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"complexity": ["low", "extreme"]}, "drawn from low, medium, high"),
        ({"complexity": "low"}, "a list of strings"),
        ({"gif": "yes"}, "true or false"),
        ({"output_formats": ["png", "svg"]}, "svg = true"),
    ],
)
def test_bad_parameter_keys_name_the_file_model_and_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        catalog_with(**{MODEL: keys})
    assert "test override" in str(info.value) and MODEL in str(info.value)


def test_an_override_cannot_rewrite_the_sdk_review() -> None:
    with pytest.raises(ConfigError, match=r"\[sdk\] is only read from the built-in"):
        build_catalog(_builtin_data(), {"sdk": {"version": "9.9.9"}}, "mine.toml")


# --- providers: the row's provider must exist, serve its model, make and take its formats ------

AZURE_ENV = {
    "AZURE_OPENAI_ENDPOINT": "https://east.openai.azure.com",
    "AZURE_OPENAI_API_KEY": "azure-key-0001",
    "OPENAI_API_VERSION": "2025-04-01-preview",
    "EDITBATCH_AZURE_DEPLOYMENTS": "gpt-image-2=img2-east",
}


@pytest.fixture
def with_providers(root: Path, monkeypatch: pytest.MonkeyPatch) -> Preflight:
    from pipeline.providers import providers_of
    from pipeline.settings import Settings

    for name, value in AZURE_ENV.items():
        monkeypatch.setenv(name, value)
    return Preflight(
        PreflightOptions(
            allowed_roots=(root,),
            catalog=load_catalog(),
            work_dir=root / ".work",
            providers=providers_of(Settings()),
        )
    )


def provider_spec(image: Path, **fields: Any) -> EditSpec:
    values: dict[str, Any] = {"model": "gpt-image-2", "provider": "azure", "quality": "low"}
    return EditSpec(row=ROW, key=KEY, images=(str(image),), prompt="p", **{**values, **fields})


def test_a_model_the_provider_does_not_deploy_is_refused_naming_provider_and_row(
    with_providers: Preflight, image: Path
) -> None:
    result = with_providers.check(provider_spec(image, model="gpt-image-1.5"))
    [error] = result.errors
    assert (error.row, error.key, error.field) == (ROW, KEY, "model")
    assert error.reason.startswith(
        "provider azure has no deployment of gpt-image-1.5 (it deploys gpt-image-2)"
    )
    assert with_providers.check(provider_spec(image, provider="openai", model="gpt-image-1.5")).ok
    assert with_providers.check(provider_spec(image)).ok


def test_an_unknown_provider_is_refused_with_the_configured_ones(
    with_providers: Preflight, image: Path
) -> None:
    [error] = with_providers.check(provider_spec(image, provider="azur")).errors
    assert error.field == "provider"
    assert error.reason.startswith("unknown provider 'azur': the configured providers are azure, ")


def test_azure_makes_no_webp_and_takes_no_webp(
    with_providers: Preflight, root: Path, image: Path
) -> None:
    [error] = with_providers.check(provider_spec(image, output_format="webp")).errors
    assert error.field == "output_format"
    assert error.reason == "provider azure does not make webp output: use one of png, jpeg"
    webp = root / "shoe.webp"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(webp)
    [error] = with_providers.check(provider_spec(webp)).errors
    assert error.field == "image"
    assert error.reason.startswith("image 1: shoe.webp is WEBP; provider azure takes PNG or JPEG")
    assert with_providers.check(provider_spec(webp, provider="openai")).ok


def test_a_row_without_quality_is_checked_at_azures_default_high(
    with_providers: Preflight, image: Path
) -> None:
    """Azure makes quality high when none is given: the row is sent, estimated and budgeted as
    high there; on OpenAI "auto" stays (the model decides); a quality given stays as given."""
    azure = with_providers.check(provider_spec(image, quality="auto"))
    assert azure.spec is not None and azure.spec.quality == "high"
    openai = with_providers.check(provider_spec(image, provider="openai", quality="auto"))
    assert openai.spec is not None and openai.spec.quality == "auto"
    low = with_providers.check(provider_spec(image, quality="low"))
    assert low.spec is not None and low.spec.quality == "low"
