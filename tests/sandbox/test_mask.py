"""The edit area: mask alpha 0 is edited, everything else is the resized input (or drifts)."""

from __future__ import annotations

import io

import openai
from PIL import Image, ImageChops, ImageOps

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import changed_share, channel_differences, decode, mask_png, png, upload

BOX = (64, 64, 192, 160)


def _area(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    area = Image.new("L", size, 0)
    area.paste(255, box)
    return area


def _edit(client: openai.OpenAI, prompt: str = "replace the sky", **kwargs: object) -> Image.Image:
    result = client.images.edit(
        image=upload(png(256, 256)),
        mask=upload(mask_png(256, 256, BOX), name="mask.png"),
        prompt=prompt,
        size="1024x1024",
        **kwargs,  # type: ignore[arg-type]
    )
    return decode(result.data[0].b64_json if result.data else None)


def _resized_input() -> Image.Image:
    return ImageOps.fit(
        Image.open(io.BytesIO(png(256, 256))).convert("RGB"),
        (1024, 1024),
        method=Image.Resampling.LANCZOS,
    )


def test_without_drift_only_the_edit_area_changes(client: openai.OpenAI) -> None:
    out = _edit(client)
    expected = _resized_input()
    edit_area = _area((1024, 1024), tuple(4 * v for v in BOX))  # type: ignore[arg-type]
    outside = ImageChops.invert(edit_area)
    assert changed_share(out, expected, outside) == 0.0
    assert changed_share(out, expected, edit_area) == 1.0


def test_same_size_input_is_returned_exactly_outside_the_mask(client: openai.OpenAI) -> None:
    source = png(1024, 1024)
    result = client.images.edit(
        image=upload(source),
        mask=upload(mask_png(1024, 1024, (0, 0, 100, 100)), name="mask.png"),
        prompt="p",
    )
    out = decode(result.data[0].b64_json if result.data else None)
    original = Image.open(io.BytesIO(source)).convert("RGB")
    outside = ImageChops.invert(_area((1024, 1024), (0, 0, 100, 100)))
    assert changed_share(out, original, outside) == 0.0


def test_drift_changes_that_share_of_pixels_outside_by_40(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    sandbox.config.drift = 0.3
    out = _edit(client)
    expected = _resized_input()
    outside = ImageChops.invert(_area((1024, 1024), tuple(4 * v for v in BOX)))  # type: ignore[arg-type]
    share = changed_share(out, expected, outside)
    assert 0.27 < share < 0.33
    for channel in channel_differences(out, expected):
        outside_diff = ImageChops.darker(channel, outside).histogram()
        assert {v for v, count in enumerate(outside_diff) if count} == {0, 40}


def test_drift_directive_changes_half(client: openai.OpenAI) -> None:
    out = _edit(client, prompt="replace the sky #sandbox:drift")
    outside = ImageChops.invert(_area((1024, 1024), tuple(4 * v for v in BOX)))  # type: ignore[arg-type]
    assert 0.47 < changed_share(out, _resized_input(), outside) < 0.53


def test_transparent_background_keeps_outside_opaque(client: openai.OpenAI) -> None:
    out = _edit(client, background="transparent")
    assert out.mode == "RGBA"
    alpha = out.getchannel("A")
    assert alpha.getpixel((0, 0)) == 255
    assert alpha.getpixel((4 * 100, 4 * 100)) == 127
