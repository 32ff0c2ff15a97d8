"""The parameters new in SDK 3.57: complexity, GIF and SVG output, and quality `standard`."""

from __future__ import annotations

import base64
import io
import re
from decimal import Decimal
from typing import Any

import openai
import pytest
from PIL import Image, ImageSequence

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import billing_lines, decode, mask_png, png, raw_edit, upload

IMAGE = upload(png(64, 64))
GIF_MODEL = "gpt-image-2.5-flare"


def _error(excinfo: pytest.ExceptionInfo[openai.BadRequestError]) -> tuple[str | None, str | None]:
    return excinfo.value.code, excinfo.value.param


@pytest.mark.parametrize("model", ["gpt-image-2", "gpt-image-2.5-sunburst", "gpt-image-2.6-flare"])
@pytest.mark.parametrize("complexity", ["low", "medium", "high"])
def test_complexity_is_accepted_by_the_2x_models(
    client: openai.OpenAI, model: str, complexity: str
) -> None:
    result = client.images.edit(
        image=IMAGE,
        prompt="p",
        model=model,
        complexity=complexity,  # type: ignore[call-overload]
        size="1024x1024",
    )
    assert result.data


def test_complexity_is_refused_elsewhere_and_for_bad_values(client: openai.OpenAI) -> None:
    for model in ("gpt-image-1.5", "gpt-image-1-mini", "chatgpt-image-latest"):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=IMAGE, prompt="p", model=model, complexity="low")
        assert _error(info) == ("invalid_value", "complexity")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", complexity="extreme")  # type: ignore[call-overload]
    assert _error(info) == ("invalid_value", "complexity")


def _frame_count(gif: Image.Image) -> int:
    return sum(1 for _ in ImageSequence.Iterator(gif))


def _gif(result: Any) -> Image.Image:
    assert result.output_format == "gif"
    return decode(result.data[0].b64_json)


def test_gif_output_is_an_animation_with_the_default_frames(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    result = client.images.edit(
        image=IMAGE, prompt="spin", model=GIF_MODEL, output_format="gif", size="512x512", n=2
    )
    assert result.data is not None and len(result.data) == 2
    gif = _gif(result)
    frames = [frame.convert("RGB").tobytes() for frame in ImageSequence.Iterator(gif)]
    assert (gif.format, gif.size, len(frames)) == ("GIF", (512, 512), 9)
    assert gif.info["duration"] == 200
    assert len(set(frames)) == 9, "every frame shows a different edit"
    # Billing: every frame is one output image (nothing is published on GIF billing).
    assert result.usage is not None
    assert result.usage.output_tokens == 2 * 9 * 264  # 1056 x 512^2 / 1024^2 per frame
    [line] = billing_lines(sandbox.config.billing_log)
    u = result.usage
    expected = (
        Decimal(u.input_tokens_details.text_tokens) * 5
        + Decimal(u.input_tokens_details.image_tokens) * 8
        + Decimal(2 * 9 * 264) * 30
    ) / 1_000_000
    assert line["cost_usd"] == f"{expected:.6f}"


def test_gif_frame_count_and_duration(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=IMAGE,
        prompt="p",
        model="gpt-image-2.6-sunburst",
        output_format="gif",
        frame_count=4,
        frame_duration_ms=124,  # rounded to the nearest 10 ms
        size="1024x1024",
        quality="low",
    )
    gif = _gif(result)
    assert (_frame_count(gif), gif.info["duration"]) == (4, 120)
    assert result.usage is not None and result.usage.output_tokens == 4 * 272


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"frame_count": 1}, "integer_below_min_value", "frame_count"),
        ({"frame_count": 17}, "integer_above_max_value", "frame_count"),
        ({"frame_duration_ms": 0}, "integer_below_min_value", "frame_duration_ms"),
        ({"output_compression": 50}, "invalid_value", "output_compression"),
        ({"background": "transparent"}, "invalid_value", "background"),
        ({"size": "2048x2048"}, "invalid_value", "size"),
        ({"partial_images": 1}, "unsupported_parameter", "partial_images"),
        (
            {"mask": upload(mask_png(64, 64, (0, 0, 8, 8)), "m.png")},
            "unsupported_parameter",
            "mask",
        ),
        ({"model": "gpt-image-2"}, "invalid_value", "output_format"),
        ({"model": "gpt-image-1.5"}, "invalid_value", "output_format"),
    ],
)
def test_gif_rules(
    client: openai.OpenAI, sandbox: SandboxServer, extra: dict[str, Any], code: str, param: str
) -> None:
    kwargs: dict[str, Any] = {"model": GIF_MODEL, "output_format": "gif", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", **kwargs)
    assert _error(info) == (code, param)
    assert billing_lines(sandbox.config.billing_log) == []


def test_frame_options_need_gif_output(client: openai.OpenAI) -> None:
    for name in ("frame_count", "frame_duration_ms"):
        with pytest.raises(openai.BadRequestError) as info:
            client.images.edit(image=IMAGE, prompt="p", model=GIF_MODEL, **{name: 4})  # type: ignore[call-overload]
        assert _error(info) == ("unsupported_parameter", name)


def test_gif_models_is_configurable(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.gif_models = ["gpt-image-2"]
    result = client.images.edit(
        image=IMAGE, prompt="p", model="gpt-image-2", output_format="gif", size="256x256"
    )
    assert _frame_count(_gif(result)) == 9
    with pytest.raises(openai.BadRequestError):
        client.images.edit(image=IMAGE, prompt="p", model=GIF_MODEL, output_format="gif")


def _svg_text(result: Any) -> str:
    assert result.output_format == "svg"
    assert result.data[0].b64_json is not None
    return base64.b64decode(result.data[0].b64_json, validate=True).decode()


def test_svg_output_is_an_svg_document_of_the_right_size(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    result = client.images.edit(
        image=upload(png(300, 200)),
        prompt="logo",
        model="gpt-image-2.5-sunburst",
        output_format="svg",
        svg={"model": "gpt-5.2", "reasoning": {"effort": "low"}},
        size="1536x1024",
        quality="low",
    )
    text = _svg_text(result)
    assert text.startswith("<svg ") and text.endswith("</svg>")
    assert 'width="1536"' in text and 'height="1024"' in text
    match = re.search(r'href="data:image/png;base64,([^"]+)"', text)
    assert match is not None
    embedded = Image.open(io.BytesIO(base64.b64decode(match[1])))
    assert (embedded.format, embedded.size) == ("PNG", (1536, 1024))
    assert result.usage is not None and result.usage.output_tokens == 400
    assert len(billing_lines(sandbox.config.billing_log)) == 1


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"n": 2}, "invalid_value", "n"),
        ({"output_compression": 80}, "invalid_value", "output_compression"),
        ({"partial_images": 2}, "unsupported_parameter", "partial_images"),
        ({"svg": {"reasoning": {"effort": "huge"}}}, "invalid_value", "svg.reasoning.effort"),
        ({"model": "gpt-image-2.6-sunburst"}, "invalid_value", "output_format"),
        ({"output_format": "png", "svg": {"model": "m"}}, "unsupported_parameter", "svg"),
    ],
)
def test_svg_rules(client: openai.OpenAI, extra: dict[str, Any], code: str, param: str) -> None:
    kwargs: dict[str, Any] = {"model": "gpt-image-2.5-flare", "output_format": "svg", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", **kwargs)
    assert _error(info) == (code, param)


def test_unknown_svg_field_is_refused(sandbox: SandboxServer) -> None:
    response = raw_edit(
        sandbox.base_url,
        fields={
            "prompt": "p",
            "model": "gpt-image-2.5-flare",
            "output_format": "svg",
            "svg[colour]": "red",
        },
    )
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (
        "unknown_parameter",
        "svg[colour]",
    )


def test_quality_standard_is_only_for_dall_e_2(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=IMAGE, prompt="p", quality="standard")
    assert _error(info) == ("invalid_value", "quality")
    sandbox.config.today = "2026-05-11"  # dall-e-2's last day
    result = client.images.edit(
        image=IMAGE, prompt="p", model="dall-e-2", quality="standard", size="512x512", n=2
    )
    assert decode(result.data[0].b64_json if result.data else None).size == (512, 512)
    assert result.usage is None  # priced per image, answered without usage
    [line] = billing_lines(sandbox.config.billing_log)
    assert (line["usage"], line["cost_usd"]) == (None, "0.036000")


@pytest.mark.parametrize(
    ("extra", "code", "param"),
    [
        ({"quality": "high"}, "invalid_value", "quality"),
        ({"background": "opaque"}, "unsupported_parameter", "background"),
        ({"size": "1536x1024"}, "invalid_value", "size"),
        ({"size": "auto"}, "invalid_value", "size"),
        ({"image": upload(png(64, 32))}, "invalid_value", "image"),
        ({"prompt": "x" * 1001}, "string_above_max_length", "prompt"),
    ],
)
def test_dall_e_2_rules_before_its_retirement(
    client: openai.OpenAI, sandbox: SandboxServer, extra: dict[str, Any], code: str, param: str
) -> None:
    sandbox.config.today = "2026-05-11"
    kwargs: dict[str, Any] = {"image": IMAGE, "prompt": "p", "model": "dall-e-2", **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(**kwargs)
    assert _error(info) == (code, param)
