"""Requests the real endpoint refuses: status, error type, code and param."""

from __future__ import annotations

import io
from typing import Any

import openai
import pytest
from PIL import Image

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import billing_lines, encoded, mask_png, png, raw_edit, upload

IMAGE = ("image", upload(png(64, 64)))


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buf, "JPEG")
    return buf.getvalue()


def _transparent_png(width: int, height: int) -> bytes:
    return encoded(Image.new("RGBA", (width, height), (0, 0, 0, 0)))


CASES: list[tuple[str, dict[str, str], list[Any], int, str | None, str | None]] = [
    # (id, fields, files, status, code, param)
    ("missing prompt", {}, [IMAGE], 400, "missing_required_parameter", "prompt"),
    ("empty prompt", {"prompt": ""}, [IMAGE], 400, "empty_string", "prompt"),
    ("missing image", {"prompt": "p"}, [], 400, "missing_required_parameter", "image"),
    (
        "prompt too long",
        {"prompt": "x" * 32_001},
        [IMAGE],
        400,
        "string_above_max_length",
        "prompt",
    ),
    (
        "text file named .png",
        {"prompt": "p"},
        [("image", ("cat.png", b"hello, not an image", "image/png"))],
        400,
        "unsupported_file_mimetype",
        "image",
    ),
    (
        "gif",
        {"prompt": "p"},
        [("image", ("a.gif", encoded(Image.new("RGB", (8, 8)), "GIF"), "image/gif"))],
        400,
        "unsupported_file_mimetype",
        "image",
    ),
    (
        "second image unsupported",
        {"prompt": "p"},
        [IMAGE, ("image[]", ("b.png", b"GIF89a....", "image/png"))],
        400,
        "unsupported_file_mimetype",
        "image[1]",
    ),
    (
        "17 images",
        {"prompt": "p"},
        [("image[]", upload(png(8, 8)))] * 17,
        400,
        "array_above_max_length",
        "image",
    ),
    (
        "mask not png",
        {"prompt": "p"},
        [IMAGE, ("mask", ("m.jpg", _jpeg(64, 64), "image/jpeg"))],
        400,
        "unsupported_file_mimetype",
        "mask",
    ),
    (
        "mask size differs",
        {"prompt": "p"},
        [IMAGE, ("mask", upload(mask_png(32, 64, (0, 0, 8, 8)), "m.png"))],
        400,
        "invalid_value",
        "mask",
    ),
    (
        "mask without alpha",
        {"prompt": "p"},
        [IMAGE, ("mask", upload(png(64, 64), "m.png"))],
        400,
        "invalid_value",
        "mask",
    ),
    (
        "mask and markup",
        {"prompt": "p", "model": "gpt-image-2.5-flare"},
        [
            IMAGE,
            ("mask", upload(mask_png(64, 64, (0, 0, 8, 8)), "m.png")),
            ("markup", upload(_transparent_png(64, 64), "k.png")),
        ],
        400,
        "invalid_value",
        "markup",
    ),
    (
        "markup on gpt-image-1.5",
        {"prompt": "p", "model": "gpt-image-1.5"},
        [IMAGE, ("markup", upload(_transparent_png(64, 64), "k.png"))],
        400,
        "unsupported_parameter",
        "markup",
    ),
    ("n 0", {"prompt": "p", "n": "0"}, [IMAGE], 400, "integer_below_min_value", "n"),
    ("n 11", {"prompt": "p", "n": "11"}, [IMAGE], 400, "integer_above_max_value", "n"),
    ("n text", {"prompt": "p", "n": "two"}, [IMAGE], 400, "invalid_type", "n"),
    ("quality", {"prompt": "p", "quality": "ultra"}, [IMAGE], 400, "invalid_value", "quality"),
    (
        "xhigh on gpt-image-1.5",
        {"prompt": "p", "model": "gpt-image-1.5", "quality": "xhigh"},
        [IMAGE],
        400,
        "invalid_value",
        "quality",
    ),
    (
        "legacy size",
        {"prompt": "p", "model": "gpt-image-1.5", "size": "512x512"},
        [IMAGE],
        400,
        "invalid_value",
        "size",
    ),
    (
        "custom size on gpt-image-1.5",
        {"prompt": "p", "model": "gpt-image-1.5", "size": "1536x864"},
        [IMAGE],
        400,
        "invalid_value",
        "size",
    ),
    (
        "size not multiple of 16",
        {"prompt": "p", "model": "gpt-image-2", "size": "1000x1000"},
        [IMAGE],
        400,
        "invalid_value",
        "size",
    ),
    (
        "aspect beyond 3:1",
        {"prompt": "p", "model": "gpt-image-2", "size": "3200x1024"},
        [IMAGE],
        400,
        "invalid_value",
        "size",
    ),
    (
        "above 3840x2160",
        {"prompt": "p", "model": "gpt-image-2.6-flare", "size": "2560x2560"},
        [IMAGE],
        400,
        "invalid_value",
        "size",
    ),
    (
        "high fidelity on mini",
        {"prompt": "p", "model": "gpt-image-1-mini", "input_fidelity": "high"},
        [IMAGE],
        400,
        "invalid_value",
        "input_fidelity",
    ),
    (
        "fidelity on gpt-image-2",
        {"prompt": "p", "model": "gpt-image-2", "input_fidelity": "low"},
        [IMAGE],
        400,
        "unsupported_parameter",
        "input_fidelity",
    ),
    (
        "transparent jpeg",
        {"prompt": "p", "background": "transparent", "output_format": "jpeg"},
        [IMAGE],
        400,
        "invalid_value",
        "background",
    ),
    (
        "compression with png",
        {"prompt": "p", "output_compression": "50"},
        [IMAGE],
        400,
        "invalid_value",
        "output_compression",
    ),
    (
        "compression 101",
        {"prompt": "p", "output_format": "webp", "output_compression": "101"},
        [IMAGE],
        400,
        "integer_above_max_value",
        "output_compression",
    ),
    (
        "output format gif on gpt-image-1.5",
        {"prompt": "p", "model": "gpt-image-1.5", "output_format": "gif"},
        [IMAGE],
        400,
        "invalid_value",
        "output_format",
    ),
    ("stream", {"prompt": "p", "stream": "true"}, [IMAGE], 400, "unsupported_value", "stream"),
    ("unknown field", {"prompt": "p", "styel": "x"}, [IMAGE], 400, "unknown_parameter", "styel"),
    (
        "model gpt-image-1",
        {"prompt": "p", "model": "gpt-image-1"},
        [IMAGE],
        404,
        "model_not_found",
        None,
    ),
    ("model dall-e-2", {"prompt": "p", "model": "dall-e-2"}, [IMAGE], 404, "model_not_found", None),
    ("model dall-e-3", {"prompt": "p", "model": "dall-e-3"}, [IMAGE], 404, "model_not_found", None),
    (
        "model unknown",
        {"prompt": "p", "model": "gpt-5-image"},
        [IMAGE],
        404,
        "model_not_found",
        None,
    ),
    (
        "unknown directive",
        {"prompt": "p #sandbox:explode"},
        [IMAGE],
        400,
        "invalid_value",
        "prompt",
    ),
]


@pytest.mark.parametrize(
    ("fields", "files", "status", "code", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_invalid_requests_are_refused(
    sandbox: SandboxServer,
    fields: dict[str, str],
    files: list[Any],
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    response = raw_edit(sandbox.base_url, fields=fields, files=files)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert response.headers["x-request-id"].startswith("req_")
    assert billing_lines(sandbox.config.billing_log) == []


def test_model_not_found_message(sandbox: SandboxServer) -> None:
    response = raw_edit(sandbox.base_url, fields={"prompt": "p", "model": "gpt-image-1"})
    assert response.json()["error"]["message"] == (
        "The model `gpt-image-1` does not exist or you do not have access to it."
    )


def test_image_of_50_mb_is_refused(sandbox: SandboxServer) -> None:
    big = b"\x89PNG\r\n\x1a\n" + bytes(50 * 1024 * 1024)
    response = raw_edit(sandbox.base_url, fields={"prompt": "p"}, files=[("image", upload(big))])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"
    assert "50MB" in response.json()["error"]["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer", "Basic c2stdGVzdA=="])
def test_missing_api_key_is_401(sandbox: SandboxServer, authorization: str | None) -> None:
    response = raw_edit(sandbox.base_url, fields={"prompt": "p"}, authorization=authorization)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_only_configured_keys_are_accepted(sandbox: SandboxServer) -> None:
    sandbox.config.api_keys = ["sk-the-right-one"]
    bad = openai.OpenAI(api_key="sk-wrong", base_url=sandbox.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.edit(image=upload(png(8, 8)), prompt="p")
    assert info.value.code == "invalid_api_key"
    good = openai.OpenAI(api_key="sk-the-right-one", base_url=sandbox.base_url, max_retries=0)
    assert good.images.edit(image=upload(png(8, 8)), prompt="p").data


def test_sdk_raises_the_matching_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(image=upload(png(8, 8)), prompt="p", n=11)
    assert (bad.value.code, bad.value.param) == ("integer_above_max_value", "n")
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.edit(image=upload(png(8, 8)), prompt="p", model="dall-e-3")
    assert missing.value.code == "model_not_found"


def test_json_bodies_take_file_ids_and_data_urls(sandbox: SandboxServer) -> None:
    """The contract's other request shape: `images: [{"file_id"} | {"image_url"}]`."""
    import base64

    import httpx2

    headers = {"Authorization": "Bearer sk-test"}
    uploaded = httpx2.post(
        f"{sandbox.base_url}/files",
        data={"purpose": "user_data"},
        files={"file": ("a.png", png(64, 64), "image/png")},
        headers=headers,
    ).json()
    data_url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
    for ref in ({"file_id": uploaded["id"]}, {"image_url": data_url}):
        response = httpx2.post(
            f"{sandbox.base_url}/images/edits",
            json={"prompt": "p", "images": [ref], "n": 2, "size": "1024x1024"},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 2
    assert len(billing_lines(sandbox.config.billing_log)) == 2

    refused = [
        (
            {"prompt": "p", "images": [{"image_url": "https://example.com/a.png"}]},
            "images[0].image_url",
        ),
        ({"prompt": "p", "images": [{"file_id": "file-nope"}]}, "images[0].file_id"),
        ({"prompt": "p", "images": []}, "images"),
        ({"prompt": "p"}, "images"),
        ({"prompt": "p", "images": [{"file_id": uploaded["id"]}], "n": "2"}, "n"),
        ({"prompt": "p", "image": "x"}, "image"),
    ]
    for body, param in refused:
        response = httpx2.post(f"{sandbox.base_url}/images/edits", json=body, headers=headers)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param, response.json()


def test_other_bodies_are_refused(sandbox: SandboxServer) -> None:
    import httpx2

    response = httpx2.post(
        f"{sandbox.base_url}/images/edits",
        content=b"prompt=p",
        headers={"Authorization": "Bearer sk-test", "content-type": "text/plain"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_content_type"


def test_unknown_path_is_openai_shaped_404(sandbox: SandboxServer) -> None:
    import httpx2

    response = httpx2.post(f"{sandbox.base_url}/images/variations", data={})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (POST /v1/images/variations)"


def test_image_whose_body_does_not_decode_is_refused(sandbox: SandboxServer) -> None:
    broken = png(64, 64)[:60]  # signature and IHDR intact, pixel data cut off
    response = raw_edit(sandbox.base_url, fields={"prompt": "p"}, files=[("image", upload(broken))])
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == (
        "invalid_image",
        "image",
    )
    assert billing_lines(sandbox.config.billing_log) == []
