"""Image and HTTP helpers for the sandbox tests."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx2
from PIL import Image, ImageChops

API_KEY = "sk-test-sandbox"
# The sandbox's calendar in these tests: the last day of gpt-image-1.5, gpt-image-1-mini and
# chatgpt-image-latest (they shut down on 2026-12-01).
TODAY = "2026-11-30"


def png(
    width: int, height: int, color: tuple[int, ...] = (200, 120, 40), mode: str = "RGB"
) -> bytes:
    """A PNG with a horizontal gradient, so a resize or an edit is visible pixel by pixel."""
    im = Image.new(mode, (width, height), color)
    for x in range(0, width, max(1, width // 64)):
        im.paste((x * 255 // width,) * len(color), (x, 0, x + 1, height))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def encoded(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def mask_png(width: int, height: int, box: tuple[int, int, int, int]) -> bytes:
    """RGBA mask: opaque everywhere except `box` (alpha 0 = edit here)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return encoded(mask)


def decode(b64: str | None) -> Image.Image:
    assert b64 is not None
    im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    im.load()
    return im


def upload(
    data: bytes, name: str = "image.png", mimetype: str = "image/png"
) -> tuple[str, bytes, str]:
    return (name, data, mimetype)


def raw_edit(
    base_url: str,
    *,
    fields: dict[str, str] | None = None,
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None,
    authorization: str | None = f"Bearer {API_KEY}",
) -> httpx2.Response:
    """POST /images/edits without the SDK, for requests the SDK would refuse to build."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx2.post(
        f"{base_url}/images/edits",
        data=fields or {},
        files=[("image", upload(png(64, 64)))] if files is None else files,
        headers=headers,
        timeout=30,
    )


def admin(base_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    root = base_url.removesuffix("/v1")
    if body is None and path == "stats":
        response = httpx2.get(f"{root}/sandbox/{path}", timeout=10)
    else:
        response = httpx2.post(f"{root}/sandbox/{path}", json=body or {}, timeout=10)
    response.raise_for_status()
    return response.json()


def billing_lines(path: str | None) -> list[dict[str, Any]]:
    assert path is not None
    file = Path(path)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text().splitlines()]


def channel_differences(a: Image.Image, b: Image.Image) -> list[Image.Image]:
    """Per-channel absolute differences of two same-sized images (L images)."""
    return list(ImageChops.difference(a, b).split())


def changed_share(a: Image.Image, b: Image.Image, region: Image.Image | None = None) -> float:
    """Share of pixels (inside `region`, an L image 255 = counted) where a and b differ."""
    channels = channel_differences(a, b)
    largest = channels[0]
    for channel in channels[1:]:
        largest = ImageChops.lighter(largest, channel)
    changed = largest.point(lambda v: 255 if v else 0)
    if region is None:
        return changed.histogram()[255] / (a.width * a.height)
    return ImageChops.darker(changed, region).histogram()[255] / region.histogram()[255]
