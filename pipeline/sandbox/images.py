"""Image handling: sniff uploads, and make the sandbox's deterministic, visible "edit".

The edit is not AI: the first input is cover-cropped to the output size, then every pixel of the
edit area (mask alpha 0, or the whole image without a mask) gets its channels shifted by amounts
derived from a hash of the prompt and the output index, with diagonal stripes shifted the other
way. Outside the edit area the resized input is copied unchanged, except for `drift`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
from dataclasses import dataclass
from typing import IO

from PIL import Image, ImageChops, ImageDraw, ImageOps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SNIFF_BYTES = 16

# Orientations (EXIF tag 0x0112) that swap width and height.
_ORIENTATION_TAG = 0x0112
_TRANSPOSED = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}

DRIFT_STEP = 40
PNG_COMPRESS_LEVEL = 1


def sniff_mimetype(head: bytes) -> str:
    """The MIME type a file's first bytes show, whatever its name or declared type says."""
    if head.startswith(PNG_MAGIC):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:2] == b"BM":
        return "image/bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[:4] == b"%PDF":
        return "application/pdf"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain"


@dataclass(frozen=True)
class ImageInfo:
    """What validation needs to know about an upload, read from its header."""

    mimetype: str
    width: int
    height: int
    has_alpha: bool


class UnreadableImage(Exception):
    """Raised when a file with an image signature cannot be decoded."""


def sniff(fp: IO[bytes]) -> str:
    """The MIME type of an upload's content; rewinds `fp`."""
    fp.seek(0)
    head = fp.read(SNIFF_BYTES)
    fp.seek(0)
    return sniff_mimetype(head) if head else "application/x-empty"


def inspect(fp: IO[bytes], mimetype: str) -> ImageInfo:
    """Measure a sniffed upload from its header (size after EXIF orientation); rewinds `fp`."""
    try:
        with Image.open(fp) as im:
            width, height = im.size
            if im.getexif().get(_ORIENTATION_TAG) in _TRANSPOSED:
                width, height = height, width
            has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(str(exc)) from exc
    finally:
        fp.seek(0)
    return ImageInfo(mimetype, width, height, has_alpha)


def has_transparent_pixel(fp: IO[bytes]) -> bool:
    fp.seek(0)
    try:
        with Image.open(fp) as im:
            extrema = im.convert("RGBA").getchannel("A").getextrema()
    finally:
        fp.seek(0)
    return bool(extrema[0] != 255)


@dataclass(frozen=True)
class EditJob:
    """One request's rendering work. `background` is as requested (transparent|opaque|auto)."""

    image: IO[bytes]
    mask: IO[bytes] | None
    size: tuple[int, int]
    output_format: str
    output_compression: int | None
    background: str
    prompt: str
    n: int
    drift: float
    seed: int
    frame_count: int = 1
    frame_duration_ms: int | None = None


@dataclass(frozen=True)
class Rendered:
    images: list[bytes]
    background: str


def _fit(im: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    if im.size == size:
        return im
    return ImageOps.fit(im, size, method=resample, centering=(0.5, 0.5))


def _open_oriented(fp: IO[bytes]) -> Image.Image:
    fp.seek(0)
    with Image.open(fp) as raw:
        im = ImageOps.exif_transpose(raw)
        im.load()
    return im


def edit_area(mask: IO[bytes] | None, size: tuple[int, int]) -> Image.Image:
    """L image, 255 where the edit happens: mask alpha 0 after the same cover-crop (nearest)."""
    if mask is None:
        return Image.new("L", size, 255)
    alpha = _open_oriented(mask).convert("RGBA").getchannel("A")
    alpha = _fit(alpha, size, Image.Resampling.NEAREST)
    return alpha.point(lambda a: 255 if a == 0 else 0)


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()


def _shift_lut(offsets: tuple[int, int, int], alpha: list[int] | None) -> list[int]:
    lut = [(v + k) % 256 for k in offsets for v in range(256)]
    return lut + alpha if alpha is not None else lut


def _stripes(size: tuple[int, int], period: int, width: int, flip: bool) -> Image.Image:
    w, h = size
    stripes = Image.new("L", size, 0)
    draw = ImageDraw.Draw(stripes)
    for x in range(-h, w, period):
        polygon = [(x, 0), (x + width, 0), (x + width + h, h), (x + h, h)]
        if flip:
            polygon = [(w - px, py) for px, py in polygon]
        draw.polygon(polygon, fill=255)
    return stripes


def _edited(base: Image.Image, prompt: str, index: object, transparent: bool) -> Image.Image:
    """The base with every pixel changed: channel shifts of 64..120, stripes shifted back."""
    d = _digest("edit", prompt, index)
    offsets = (64 + d[0] % 57, 64 + d[1] % 57, 64 + d[2] % 57)
    back = (256 - offsets[0], 256 - offsets[1], 256 - offsets[2])
    alpha = None
    if base.mode == "RGBA":
        alpha = [v // 2 for v in range(256)] if transparent else list(range(256))
    tinted = base.point(_shift_lut(offsets, alpha))
    striped = base.point(_shift_lut(back, alpha))
    period = 16 + d[3] % 32
    stripes = _stripes(base.size, period, max(4, period // 3), flip=bool(d[4] & 1))
    return Image.composite(striped, tinted, stripes)


def _drift_lut(mode: str) -> list[int]:
    channel = [v + DRIFT_STEP if v < 256 - DRIFT_STEP else v - DRIFT_STEP for v in range(256)]
    lut = channel * 3
    return lut + list(range(256)) if mode == "RGBA" else lut


def _drift_selection(size: tuple[int, int], drift: float, seed: bytes) -> Image.Image:
    """L image, 255 on a deterministic share `drift` of pixels (resolution 1/256)."""
    noise = random.Random(seed).randbytes(size[0] * size[1])
    threshold = round(drift * 256)
    return Image.frombytes("L", size, noise).point(lambda v: 255 if v < threshold else 0)


def _encode(im: Image.Image, output_format: str, compression: int | None) -> bytes:
    buf = io.BytesIO()
    if output_format == "png":
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "webp":
        im.save(buf, "WEBP", quality=100 if compression is None else compression)
    else:
        im.save(buf, "JPEG", quality=100 if compression is None else compression)
    return buf.getvalue()


def _gif(frames: list[Image.Image], duration_ms: int) -> bytes:
    buf = io.BytesIO()
    frames[0].save(
        buf,
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=duration_ms,
        loop=0,
        optimize=False,
    )
    return buf.getvalue()


def svg_document(png: bytes, size: tuple[int, int]) -> bytes:
    """An SVG of the output size that shows the edited image (embedded as a PNG data URI)."""
    width, height = size
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
        f'<image width="{width}" height="{height}" href="{uri}"/></svg>'
    ).encode()


def render(job: EditJob) -> Rendered:
    """Make `job.n` output images (CPU-bound: run it in a thread).

    A GIF has `frame_count` frames, each a different edit of the whole image (so the animation
    is visible); an SVG wraps the PNG edit in an <svg> element of the output size.
    """
    source = _open_oriented(job.image)
    source_alpha = source.mode in _ALPHA_MODES or "transparency" in source.info
    if job.output_format in ("jpeg", "gif") or job.background == "opaque":
        mode = "RGB"
    elif job.background == "transparent" or source_alpha:
        mode = "RGBA"
    else:
        mode = "RGB"
    base = _fit(source.convert(mode), job.size, Image.Resampling.LANCZOS)
    del source
    area = edit_area(job.mask, job.size)
    outside = ImageChops.invert(area)
    transparent = job.background == "transparent"

    def output(key: object) -> Image.Image:
        out = Image.composite(_edited(base, job.prompt, key, transparent), base, area)
        if job.drift > 0:
            seed = _digest("drift", job.seed, job.prompt, key)
            chosen = ImageChops.darker(_drift_selection(job.size, job.drift, seed), outside)
            out = Image.composite(base.point(_drift_lut(mode)), out, chosen)
        return out

    images = []
    for index in range(job.n):
        if job.output_format == "gif":
            frames = [output(f"{index}/{frame}") for frame in range(job.frame_count)]
            images.append(_gif(frames, job.frame_duration_ms or 200))
        elif job.output_format == "svg":
            images.append(svg_document(_encode(output(index), "png", None), job.size))
        else:
            images.append(_encode(output(index), job.output_format, job.output_compression))
    return Rendered(images, "transparent" if mode == "RGBA" else "opaque")
