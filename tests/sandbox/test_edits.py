"""Successful edits through the real openai SDK: images, usage, headers, billing, contract."""

from __future__ import annotations

import io
import json
from decimal import Decimal

import openai
from PIL import Image

from pipeline.sandbox import SandboxServer
from tests.sandbox import schema
from tests.sandbox.helpers import billing_lines, decode, png, upload


def test_edit_returns_n_images_usage_headers_and_a_billing_line(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    prompt = "put the bag on a white studio sweep"
    raw = client.images.with_raw_response.edit(
        image=upload(png(1024, 1024)), prompt=prompt, n=2, quality="low", size="1024x1024"
    )
    result = raw.parse()

    assert len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert all(im.format == "PNG" and im.size == (1024, 1024) for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    assert (result.size, result.quality, result.output_format, result.background) == (
        "1024x1024",
        "low",
        "png",
        "opaque",
    )
    assert result.usage is not None
    text = -(-len(prompt) // 4)
    assert result.usage.input_tokens_details.image_tokens == 194
    assert result.usage.input_tokens_details.text_tokens == text
    assert result.usage.input_tokens == 194 + text
    assert result.usage.output_tokens == 2 * 272
    assert result.usage.output_tokens_details is not None
    assert result.usage.output_tokens_details.image_tokens == 2 * 272
    assert result.usage.output_tokens_details.text_tokens == 0
    assert result.usage.total_tokens == 194 + text + 544

    headers = raw.headers
    assert headers["x-request-id"].startswith("req_")
    assert int(headers["openai-processing-ms"]) >= 0
    for name in ("requests", "tokens"):
        for part in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{part}-{name}" in headers

    [line] = billing_lines(sandbox.config.billing_log)
    assert line["request_id"] == headers["x-request-id"]
    assert (line["model"], line["size"], line["quality"], line["n"]) == (
        "gpt-image-2.5-sunburst",  # the default model
        "1024x1024",
        "low",
        2,
    )
    assert line["usage"] == result.usage.model_dump()
    expected = (Decimal(text) * 5 + Decimal(194) * 8 + Decimal(544) * 30) / 1_000_000
    assert line["cost_usd"] == f"{expected:.6f}"
    assert line["time"].endswith("Z")


def test_defaults_size_auto_quality_auto(client: openai.OpenAI) -> None:
    result = client.images.edit(image=upload(png(300, 200)), prompt="wider")
    assert (result.size, result.quality, result.output_format) == ("1536x1024", "medium", "png")
    assert decode(result.data[0].b64_json).size == (1536, 1024)
    assert result.usage is not None
    # 300x200 scaled to a 512 short side is 768x512: two tiles.
    assert result.usage.input_tokens_details.image_tokens == 65 + 2 * 129
    assert result.usage.output_tokens == 1568


def test_several_images_count_each_and_edit_the_first(client: openai.OpenAI) -> None:
    images = [upload(png(1024, 1024)), upload(png(512, 1024)), upload(png(100, 300))]
    result = client.images.edit(image=images, prompt="combine", size="1024x1536", quality="high")
    assert result.usage is not None
    assert result.usage.input_tokens_details.image_tokens == 194 + 323 + 452
    assert result.usage.output_tokens == 6240
    assert decode(result.data[0].b64_json).size == (1024, 1536)


def test_high_input_fidelity_adds_tokens_for_the_first_image(client: openai.OpenAI) -> None:
    square = client.images.edit(image=upload(png(64, 64)), prompt="p", input_fidelity="high")
    wide = client.images.edit(image=upload(png(128, 64)), prompt="p", input_fidelity="high")
    assert square.usage is not None and wide.usage is not None
    assert square.usage.input_tokens_details.image_tokens == 194 + 4096
    assert wide.usage.input_tokens_details.image_tokens == 323 + 6144


def test_output_formats_and_compression(client: openai.OpenAI) -> None:
    def edit(fmt: str, **extra: int) -> str:
        result = client.images.edit(
            image=upload(png(256, 256)),
            prompt="p",
            output_format=fmt,  # type: ignore[arg-type]
            size="1024x1024",
            **extra,  # type: ignore[arg-type]
        )
        assert result.output_format == fmt
        assert result.data is not None and result.data[0].b64_json is not None
        return result.data[0].b64_json

    assert decode(edit("webp")).format == "WEBP"
    small, large = edit("jpeg", output_compression=5), edit("jpeg", output_compression=100)
    assert decode(small).format == decode(large).format == "JPEG"
    assert len(small) < len(large)


def test_transparent_background_lowers_alpha_in_the_edit_area(client: openai.OpenAI) -> None:
    result = client.images.edit(
        image=upload(png(1024, 1024)), prompt="cut out", background="transparent"
    )
    assert result.background == "transparent"
    im = decode(result.data[0].b64_json)
    assert im.mode == "RGBA"
    assert im.getchannel("A").getextrema() == (127, 127)


def test_custom_size_on_gpt_image_2_scales_output_tokens(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    result = client.images.edit(
        image=upload(png(160, 90)), prompt="p", model="gpt-image-2", size="1536x864"
    )
    assert result.size == "1536x864"
    assert decode(result.data[0].b64_json).size == (1536, 864)
    assert result.usage is not None
    # 1056 x (1536*864)/(1024*1024) = 1336.5 -> 1337 (half up)
    assert result.usage.output_tokens == 1337
    [line] = billing_lines(sandbox.config.billing_log)
    u = result.usage
    cost = (
        Decimal(u.input_tokens_details.text_tokens) * 5
        + Decimal(u.input_tokens_details.image_tokens) * 8
        + Decimal(1337) * 30
    ) / 1_000_000
    assert line["cost_usd"] == f"{cost:.6f}"


def test_same_request_gives_the_same_bytes(client: openai.OpenAI) -> None:
    first = client.images.edit(image=upload(png(200, 200)), prompt="same", n=2)
    second = client.images.edit(image=upload(png(200, 200)), prompt="same", n=2)
    assert [d.b64_json for d in first.data] == [d.b64_json for d in second.data]
    assert first.usage == second.usage


def test_response_matches_the_contract_schema(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(image=upload(png(64, 64)), prompt="p", n=2)
    assert schema.check(json.loads(raw.http_response.content), "ImagesResponse") == []


def test_error_body_matches_the_contract_schema(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response
    try:
        raw.edit(image=upload(png(64, 64)), prompt="p", n=11)
    except openai.BadRequestError as exc:
        assert schema.check(json.loads(exc.response.content), "ErrorResponse") == []
    else:
        raise AssertionError("expected a 400")


def test_contract_copy_is_current() -> None:
    if schema.SHARED_CONTRACT.exists():
        assert schema.CONTRACT.read_bytes() == schema.SHARED_CONTRACT.read_bytes()


def test_webp_and_jpeg_inputs_are_accepted(client: openai.OpenAI) -> None:
    for fmt, mimetype in (("WEBP", "image/webp"), ("JPEG", "image/jpeg")):
        buf = io.BytesIO()
        Image.new("RGB", (64, 32), (1, 2, 3)).save(buf, fmt)
        result = client.images.edit(
            image=("photo.bin", buf.getvalue(), mimetype), prompt="p", size="auto"
        )
        assert result.size == "1536x1024"


def test_exif_orientation_is_applied(client: openai.OpenAI) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 300x200 landscape file shows as 200x300 portrait
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (5, 6, 7)).save(buf, "JPEG", exif=exif)
    result = client.images.edit(image=("r.jpg", buf.getvalue(), "image/jpeg"), prompt="p")
    assert result.size == "1024x1536"
