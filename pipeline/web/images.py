"""Images for the dashboard: outputs by their database id, inputs by (job id, index), and
thumbnails made lazily with Pillow and cached on disk.

Nothing here takes a path from a request. An output's file is the URI the collector recorded,
read only if it lies under its batch's output root (or, before collection, under the spool);
an input is one of the files its job's spec names. Thumbnails are WebP (alpha kept), at most
THUMB_SIDE pixels on the long side, cached as `<home>/thumbs/<key>.webp` where the key holds
the output's sha256 (or the input's size and mtime), so a changed file gets a new thumbnail.
A GIF's thumbnail is its first frame; an SVG is served as it is (a browser scales it, and runs
no script of an SVG shown by <img>; opened on its own it gets a sandboxing CSP, see app.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
from PIL import Image

from pipeline.db.models import Output
from pipeline.errors import ImageMissing
from pipeline.files import write_atomic
from pipeline.output.storage import Storage
from pipeline.spec import EditSpec

SVG = "image/svg+xml"
THUMB_SIDE = 384
LARGE_SIDE = 1024
MEDIA_TYPES = {
    "png": "image/png",
    "webp": "image/webp",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "gif": "image/gif",
    "svg": SVG,
}
WEBP = "image/webp"
# The edit area of a mask (alpha 0) is tinted with this colour on the job page.
TINT = (236, 0, 140)
TINT_OPACITY = 0.45


@dataclass(frozen=True)
class Served:
    data: bytes
    media_type: str


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def output_source(out: Output, output_root: str, spool_dir: Path) -> str:
    """Where the output's bytes are: its collected URI or its spool file, if allowed."""
    if out.uri:
        storage = Storage(output_root)
        if storage.is_local:
            if not _inside(Path(out.uri), Path(storage.root)):
                raise ImageMissing(f"output {out.id} is outside its batch's output root")
            return str(Path(out.uri).resolve())
        if not out.uri.startswith(storage.uri("x")[:-1]):
            raise ImageMissing(f"output {out.id} is outside its batch's output root")
        return out.uri
    if out.spool_path and _inside(Path(out.spool_path), spool_dir):
        return str(Path(out.spool_path).resolve())
    raise ImageMissing(f"output {out.id} has no file yet")


def read(source: str) -> bytes:
    """The bytes of a local path or an fsspec URL (s3://...)."""
    try:
        if "://" in source:
            with fsspec.open(source, "rb") as fh:
                return bytes(fh.read())
        return Path(source).read_bytes()
    except (OSError, ValueError) as exc:  # missing file, bucket or permission
        raise ImageMissing(str(exc)) from exc


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """A WebP of at most `side` px on the long side (JPEGs are decoded at a reduced scale; a
    GIF gives its first frame). ImageMissing for bytes Pillow cannot read."""
    try:
        return _thumbnail(data, side)
    except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ImageMissing(f"not an image Pillow can read: {exc}") from exc


def _thumbnail(data: bytes, side: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (side, side))
        img.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
        small = img.convert("RGBA" if has_alpha else "RGB")
    buf = io.BytesIO()
    small.save(buf, format="WEBP", quality=80, method=2)
    return buf.getvalue()


def mask_overlay(image: bytes, mask: bytes, side: int = LARGE_SIDE) -> bytes:
    """The input image with the mask's edit area (alpha 0) tinted, as a WebP."""
    with Image.open(io.BytesIO(image)) as img, Image.open(io.BytesIO(mask)) as m:
        img.draft("RGB", (side, side))
        img.thumbnail((side, side), Image.Resampling.BILINEAR)
        base = img.convert("RGBA")
        alpha = m.convert("RGBA").getchannel("A").resize(base.size, Image.Resampling.NEAREST)
    # Where the mask is transparent (edited), the tint shows at TINT_OPACITY.
    strength = alpha.point(lambda a: int((255 - a) * TINT_OPACITY))
    tint = Image.new("RGBA", base.size, (*TINT, 255))
    base.paste(tint, (0, 0), strength)
    buf = io.BytesIO()
    base.convert("RGB").save(buf, format="WEBP", quality=85, method=2)
    return buf.getvalue()


class ThumbCache:
    """Derived images on disk, written atomically; made once per key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        path = self.folder / f"{key}.webp"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        data = make()
        write_atomic(path, data)  # a cache: no fsync, a lost file is made again
        return data


def _stat_key(*paths: str) -> str:
    """A digest of the files' names, sizes and modification times."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise ImageMissing(f"{p}: {exc.strerror}") from exc
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:20]


class Images:
    """What the image routes serve."""

    def __init__(self, cache: ThumbCache, spool_dir: Path) -> None:
        self.cache = cache
        self.spool_dir = spool_dir

    def output(self, out: Output, output_root: str, size: str) -> Served:
        source = output_source(out, output_root, self.spool_dir)
        fmt = (out.format or Path(source).suffix.lstrip(".") or "png").lower()
        if size == "full" or MEDIA_TYPES.get(fmt) == SVG:
            return Served(read(source), MEDIA_TYPES.get(fmt, "application/octet-stream"))
        version = out.sha256 or _stat_key(source)
        key = f"out-{out.id}-{version[:16]}-{THUMB_SIDE}"
        return Served(self.cache.get(key, lambda: thumbnail(read(source))), WEBP)

    def input(self, job_id: int, spec: EditSpec, index: int, size: str, overlay: bool) -> Served:
        if not 0 <= index < len(spec.images):
            raise ImageMissing(f"job {job_id} has no input {index}")
        path = spec.images[index]
        side = THUMB_SIDE if size == "thumb" else LARGE_SIDE
        if overlay:
            if spec.mask is None or index != 0:
                raise ImageMissing(f"job {job_id} input {index} has no mask")
            mask = spec.mask
            key = f"in-{job_id}-{index}-mask-{_stat_key(path, mask)}-{side}"
            return Served(
                self.cache.get(key, lambda: mask_overlay(read(path), read(mask), side)), WEBP
            )
        key = f"in-{job_id}-{index}-{_stat_key(path)}-{side}"
        return Served(self.cache.get(key, lambda: thumbnail(read(path), side)), WEBP)
