"""Preflight: check one EditSpec against its files and the model catalogue before money is spent.

Every problem becomes a `RowError(row, field, reason)` whose reason says what to do. Files are
read once: a file's verdict is cached by (path, device, inode, size, mtime) and by the sha256 of
its bytes, so a manifest of 10,000 rows over 1,000 images reads and decodes each image once.

What is read, and how much:
- `os.stat` first: the cache, then existence, the folder it resolves into, zero bytes and the
  size limits, all without opening the file.
- The bytes once (for the sha256 that fingerprints the job), then Pillow's header (format,
  dimensions, EXIF orientation). The pixel count is checked against `max_pixels` from the
  header, before anything is decoded.
- Integrity without a full decode where the format allows it: PNG chunk CRCs (`verify()`),
  JPEG decoded at 1/8 scale (still reads every byte of the entropy-coded data), WebP decoded.
  Masks are decoded fully (their alpha is inspected).

Copies written to `work_dir/<kind>/<sha256 of the source>/<stem>.<ext>`: an upright image
(EXIF orientation), a PNG converted from another format (`convert=True`), an RGBA mask built
from a grayscale one, and a file whose extension lied (the upload's MIME type comes from the
name). The rewritten spec points at those copies; `digests` holds the sha256 of the bytes that
will be sent. A Preflight holds caches and is not thread-safe: use one per thread.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageChops, ImageFile, ImageOps, UnidentifiedImageError

from pipeline import clock
from pipeline.errors import ConfigError, RowError
from pipeline.files import write_atomic
from pipeline.intake.catalog import Catalog, Lifecycle, ModelInfo, parse_size
from pipeline.providers import Provider, ProviderSet
from pipeline.spec import COMPLEXITIES, OUTPUT_FORMATS, SVG_EFFORTS, EditSpec

__all__ = [
    "BACKGROUNDS",
    "GENERIC_MAX_IMAGES",
    "GENERIC_MAX_N",
    "GENERIC_MAX_PROMPT_CHARS",
    "MAX_IMAGE_BYTES",
    "MAX_MASK_BYTES",
    "OUTPUT_FORMATS",
    "Preflight",
    "PreflightOptions",
    "PreflightResult",
    "PreflightStats",
]

# The API's file limits ("< 50 MB", "< 4 MB"), read as decimal megabytes: the stricter reading.
MAX_IMAGE_BYTES = 50_000_000
MAX_MASK_BYTES = 4_000_000
# Rules for a model the catalogue does not know (with allow_unknown_model).
GENERIC_MAX_IMAGES = 16
GENERIC_MAX_PROMPT_CHARS = 32_000
GENERIC_MAX_N = 10
GENERIC_QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")
INPUT_FIDELITIES = ("high", "low")
BACKGROUNDS = ("transparent", "opaque", "auto")
COMPRESSIBLE_FORMATS = ("jpeg", "webp")
TRANSPARENT_FORMATS = ("png", "webp")

GIF_FRAMES = (2, 16)  # frame_count, inclusive (openai 3.57)
GIF_FRAME_STEP_MS = 10  # the API rounds frame_duration_ms to the nearest 10 ms ...
GIF_FRAME_MAX_MS = 655_350  # ... and caps it here
_SPECIAL_FORMATS = {"gif": "GIF", "svg": "SVG"}

# Pillow format name -> the API's name. MPO is the multi-picture JPEG many cameras write.
_ACCEPTED = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp"}
# Names whose extension the upload's MIME type is taken from (first: the one copies get).
_EXTENSIONS = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "webp": (".webp",)}
_ORIENTATION = 0x0112
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis")
_ALPHA_MODES = ("RGBA", "LA", "PA")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"II*\0", "TIFF"),
    (b"MM\0*", "TIFF"),
)


@dataclass(frozen=True)
class PreflightOptions:
    """How strict preflight is, and where it may read and write."""

    allowed_roots: tuple[Path, ...]  # the manifest's folder (passed by the caller) + --allow-root
    catalog: Catalog
    convert: bool = False  # --convert: other formats Pillow reads (TIFF, BMP, GIF, ...) -> PNG
    allow_unknown_model: bool = False
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked from the header
    work_dir: Path | None = None  # converted / upright / mask copies (content-addressed names)
    # The configured providers: a row's provider must exist and serve its model, with the
    # output and input formats it makes and takes. None: not checked (OpenAI only).
    providers: ProviderSet | None = None


@dataclass(frozen=True)
class PreflightResult:
    """The verdict on one spec. `spec` is None when the row is rejected (see `errors`)."""

    spec: EditSpec | None  # possibly rewritten to point at converted copies
    errors: tuple[RowError, ...]
    notes: tuple[str, ...]  # what preflight changed or wants a person to know
    digests: dict[str, str]  # path (as in `spec`) -> sha256 of the bytes that will be sent
    pixels: tuple[tuple[int, int], ...]  # (width, height) per image as sent; (0, 0) if unread
    formats: dict[str, str] = field(default_factory=dict)  # path -> png|jpeg|webp as sent

    @property
    def ok(self) -> bool:
        return self.spec is not None


@dataclass
class PreflightStats:
    """Counters, for benchmarks and tests: how often files were really read and decoded."""

    files_read: int = 0
    stat_hits: int = 0
    content_hits: int = 0
    files_written: int = 0


@dataclass(frozen=True)
class _Verdict:
    """What one file is as a given role (image / mask / markup); cached, row-independent."""

    error: str | None = None  # reason, without the "image 2: " label
    sent: str | None = None  # a work_dir copy to send instead of the file itself
    digest: str = ""  # sha256 of the bytes that will be sent
    fmt: str = ""  # png | jpeg | webp of the bytes that will be sent
    size: tuple[int, int] = (0, 0)  # as sent
    original_size: tuple[int, int] = (0, 0)  # before an EXIF orientation was applied
    notes: tuple[str, ...] = ()


def _read_bytes(path: str) -> bytes:
    """The whole file (callers have checked its size against the limit first)."""
    with open(path, "rb") as fh:
        return fh.read()


def _amount(n: int, exact: bool = False) -> str:
    """Bytes as a person reads them: "52.4 MB", "4 MB (4,000,000 bytes)", "900 bytes"."""
    if n < 100_000:
        return f"{n:,} bytes"
    text = f"{n / 1_000_000:.1f}".rstrip("0").rstrip(".") + " MB"
    return f"{text} ({n:,} bytes)" if exact else text


def _describe_unknown(data: bytes) -> str:
    head = data[:512]
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return (
            "is HEIC/HEIF, which needs the pillow-heif plugin to be read: install it and use "
            "--convert, or export the photo as JPEG"
        )
    damaged = next((name for sig, name in _SIGNATURES if head.startswith(sig)), None)
    if damaged is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        damaged = "WebP"
    if damaged is not None:
        return f"is a damaged {damaged} file (its header cannot be read): re-export it"
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            start = " ".join(text.split())[:30]
            return f"is not an image: it is a text file (starts with {start!r})"
    return f"is not an image (unrecognised format; starts with {head[:8].hex(' ')})"


class Preflight:
    """Checks specs one at a time; remembers every file it has looked at."""

    def __init__(self, options: PreflightOptions) -> None:
        if not options.allowed_roots:
            raise ConfigError("preflight needs at least one allowed folder (allowed_roots)")
        self.options = options
        self.catalog = options.catalog
        self.today = clock.today()  # one date for the whole batch: which models are gone
        self.stats = PreflightStats()
        real_roots = (os.path.realpath(r) for r in options.allowed_roots)
        self._roots = tuple((r, r.rstrip(os.sep) + os.sep) for r in real_roots)  # (root, prefix)
        self._by_stat: dict[tuple[str, str, int, int, int, int], _Verdict] = {}
        self._by_content: dict[tuple[str, str], _Verdict] = {}

    # --- the row ----------------------------------------------------------------------------

    def check(self, spec: EditSpec) -> PreflightResult:
        """Every problem with `spec`, or the spec as it will be sent (with digests and sizes)."""
        errors: list[RowError] = []
        notes: list[str] = []

        def err(field_name: str, reason: str) -> None:
            errors.append(RowError(spec.row, field_name, reason, spec.key))

        info = self._check_model(spec, err, notes)
        self._check_params(spec, info, err, notes)
        self._check_provider(spec, err)

        digests: dict[str, str] = {}
        formats: dict[str, str] = {}

        def take(role: str, label: str, path: str) -> tuple[str, _Verdict]:
            """The path to send for one file (and its verdict), recording what it adds."""
            verdict = self._file(role, path)
            if verdict.error is not None:
                err(role, f"{label}: {verdict.error}")
                return path, verdict
            sent = verdict.sent or path
            digests[sent] = verdict.digest
            formats[sent] = verdict.fmt
            notes.extend(f"{label}: {note}" for note in verdict.notes)
            return sent, verdict

        taken = [take("image", f"image {i}", p) for i, p in enumerate(spec.images, start=1)]
        images = tuple(sent for sent, _ in taken)
        pixels = tuple((0, 0) if v.error is not None else v.size for _, v in taken)
        first = taken[0][1] if taken and taken[0][1].error is None else None

        mask = spec.mask
        if mask is not None:
            mask, verdict = take("mask", "mask", mask)
            if verdict.error is None and first is not None and verdict.size != first.size:
                err("mask", _mask_size_reason(verdict.size, first))
        markup = spec.markup
        if markup is not None:
            markup, verdict = take("markup", "markup", markup)
            if verdict.error is None and first is not None and verdict.size != first.size:
                (w, h), (fw, fh) = verdict.size, first.size
                notes.append(f"markup: is {w}x{h} but image 1 is {fw}x{fh}")

        self._check_provider_inputs(spec, taken, err)

        checked = None
        if not errors:
            quality = self._provider_quality(spec)
            changed = (images, mask, markup, quality) != (
                spec.images,
                spec.mask,
                spec.markup,
                spec.quality,
            )
            checked = (
                replace(spec, images=images, mask=mask, markup=markup, quality=quality)
                if changed
                else spec
            )
        return PreflightResult(
            spec=checked,
            errors=tuple(errors),
            notes=tuple(notes),
            digests=digests,
            pixels=pixels,
            formats=formats,
        )

    def _check_model(
        self, spec: EditSpec, err: Callable[[str, str], None], notes: list[str]
    ) -> ModelInfo | None:
        """The catalogue entry whose rules apply, or None for generic rules only."""
        name = spec.model
        info = self.catalog.get(name)
        if info is None:
            if self.options.allow_unknown_model:
                notes.append(
                    f"model {name} is not in the catalogue (as of {self.catalog.as_of}): "
                    "only generic checks were made"
                )
            else:
                usable = self.catalog.usable(self.today)
                close = difflib.get_close_matches(name, usable, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                err(
                    "model",
                    f"unknown model {name!r}: {hint}known models are {', '.join(usable)} "
                    "(add it with a catalogue file, or pass --allow-unknown-model)",
                )
            return None
        if info.state_on(self.today) == Lifecycle.GONE:
            err("model", info.gone_reason())
            return None  # its own rules no longer matter; generic ones still find other problems
        # A shutdown ahead is said once per batch (catalog.shutdown_notices), not per row.
        return info

    def _check_params(
        self,
        spec: EditSpec,
        info: ModelInfo | None,
        err: Callable[[str, str], None],
        notes: list[str],
    ) -> None:
        on = f" on {spec.model}"
        # size
        if info is not None:
            reason = info.check_size(spec.size)
            if reason is not None:
                err("size", reason)
            elif (note := info.size_note(spec.size)) is not None:
                notes.append(note)
        elif spec.size != "auto" and parse_size(spec.size) is None:
            err("size", f"size {spec.size!r} is not WIDTHxHEIGHT or auto")

        # quality
        qualities = info.qualities if info is not None else GENERIC_QUALITIES
        if spec.quality not in qualities:
            err(
                "quality",
                f"quality {spec.quality!r} is not available{on}: use one of {', '.join(qualities)}",
            )

        # input_fidelity
        fidelity = spec.input_fidelity
        if fidelity is not None:
            allowed = info.input_fidelity if info is not None else INPUT_FIDELITIES
            if not allowed:
                err(
                    "input_fidelity",
                    f"{spec.model} does not take input_fidelity: omit input_fidelity "
                    "(leave it empty)",
                )
            elif fidelity not in allowed:
                err(
                    "input_fidelity",
                    f"input_fidelity {fidelity!r} is not available{on}: "
                    f"use {' or '.join(allowed)}, or omit it",
                )

        # output_format, background, output_compression
        fmt = spec.output_format
        if fmt in _SPECIAL_FORMATS:
            self._check_special_format(spec, info, err, notes)
        else:
            formats = info.output_formats if info is not None else OUTPUT_FORMATS
            if fmt not in formats:
                err(
                    "output_format",
                    f"output_format {fmt!r} is not available{on}: use one of {', '.join(formats)}",
                )
        background = spec.background
        if background is not None:
            if background not in BACKGROUNDS:
                err(
                    "background",
                    f"background {background!r} is not one of {', '.join(BACKGROUNDS)}",
                )
            elif background == "transparent":
                if fmt not in TRANSPARENT_FORMATS:
                    err(
                        "background",
                        f"background=transparent needs output_format png or webp (got {fmt}): "
                        "change output_format or drop the transparent background",
                    )
                support = info.transparent_background if info is not None else "supported"
                if support == "unsupported":
                    err("background", f"{spec.model} cannot make transparent backgrounds")
                elif support == "preview":
                    notes.append(f"transparent background is in preview{on}")
        compression = spec.output_compression
        if compression is not None:
            if not 0 <= compression <= 100:
                err("output_compression", f"output_compression must be 0..100, got {compression}")
            if fmt not in COMPRESSIBLE_FORMATS:
                err(
                    "output_compression",
                    f"output_compression applies only to jpeg or webp output (output_format is "
                    f"{fmt}): remove it or change output_format",
                )

        # n, prompt, number of images
        max_n = info.max_n if info is not None else GENERIC_MAX_N
        if not 1 <= spec.n <= max_n:
            err("n", f"n must be 1..{max_n}{on}, got {spec.n}")
        max_chars = info.max_prompt_chars if info is not None else GENERIC_MAX_PROMPT_CHARS
        if len(spec.prompt) > max_chars:
            err(
                "prompt",
                f"prompt is {len(spec.prompt):,} characters; {spec.model} takes at most "
                f"{max_chars:,}: shorten it",
            )
        max_images = info.max_images if info is not None else GENERIC_MAX_IMAGES
        if len(spec.images) > max_images:
            err(
                "image",
                f"{len(spec.images)} images given; {spec.model} takes at most {max_images}: "
                "split the row or drop reference images",
            )

        # mask, markup
        if spec.mask is not None and spec.markup is not None:
            err("markup", "markup cannot be combined with mask: give one or the other")
        if spec.mask is not None and info is not None and not info.mask:
            err("mask", f"{spec.model} does not take a mask")
        if spec.markup is not None and info is not None and not info.markup:
            takers = ", ".join(self.catalog.with_markup()) or "none"
            err("markup", f"{spec.model} does not take markup (models that do: {takers})")
        if spec.mask_mode == "strict" and spec.mask is None:
            err("mask_mode", "mask_mode strict needs a mask: add one, or use mask_mode guide")

        self._check_complexity(spec, info, err, notes)
        self._check_gif(spec, err, notes)
        self._check_svg(spec, err)

    def _check_complexity(
        self,
        spec: EditSpec,
        info: ModelInfo | None,
        err: Callable[[str, str], None],
        notes: list[str],
    ) -> None:
        value = spec.complexity
        if value is None:
            return
        if value not in COMPLEXITIES:
            err("complexity", f"complexity {value!r} is not one of {', '.join(COMPLEXITIES)}")
            return
        if info is None:
            return  # an unknown model: the note about generic checks covers it
        if info.complexity is None:
            notes.append(
                f"the catalogue does not know whether {spec.model} takes complexity: "
                f"complexity={value} is passed through as given"
            )
        elif not info.complexity:
            err("complexity", f"{spec.model} does not take complexity: omit it (leave it empty)")
        elif value not in info.complexity:
            err(
                "complexity",
                f"complexity {value!r} is not available on {spec.model}: use one of "
                f"{', '.join(info.complexity)}",
            )

    def _check_special_format(
        self,
        spec: EditSpec,
        info: ModelInfo | None,
        err: Callable[[str, str], None],
        notes: list[str],
    ) -> None:
        """output_format gif or svg: known to work, known not to, or not known (passed on)."""
        fmt = spec.output_format
        if info is None:
            return
        known: bool | None = getattr(info, fmt)
        label = _SPECIAL_FORMATS[fmt]
        if known is False:
            takers = ", ".join(self.catalog.known_to_take(fmt)) or "none in the catalogue"
            usual = ", ".join(info.output_formats)
            err(
                "output_format",
                f"{spec.model} does not make {label} output: use one of {usual} "
                f"(models known to make {label}: {takers})",
            )
        elif known is None:
            notes.append(
                f"the catalogue does not know whether {spec.model} makes {label} output: "
                f"output_format {fmt} is passed through (the API refuses it without {label} "
                f"access on your project; say {fmt} = true or false for {spec.model} in a "
                "catalogue file)"
            )

    def _check_gif(self, spec: EditSpec, err: Callable[[str, str], None], notes: list[str]) -> None:
        gif = spec.output_format == "gif"
        for name in ("frame_count", "frame_duration_ms"):
            if getattr(spec, name) is not None and not gif:
                err(
                    name,
                    f"{name} applies only to output_format gif (output_format is "
                    f"{spec.output_format}): remove it, or set output_format gif",
                )
        if not gif:
            return
        low, high = GIF_FRAMES
        if spec.frame_count is not None and not low <= spec.frame_count <= high:
            err("frame_count", f"frame_count must be {low}..{high}, got {spec.frame_count}")
        duration = spec.frame_duration_ms
        if duration is not None:
            step = GIF_FRAME_STEP_MS
            sent = min(GIF_FRAME_MAX_MS, (duration + step // 2) // step * step)
            if duration < 1:
                err("frame_duration_ms", f"frame_duration_ms must be 1 or more, got {duration}")
            elif sent != duration:
                notes.append(
                    f"frame_duration_ms {duration} becomes {max(sent, step)} ms (the API rounds "
                    f"to {step} ms and caps at {GIF_FRAME_MAX_MS:,})"
                )
        if spec.mask is not None:
            err("mask", "GIF output takes no mask: remove the mask, or choose png, webp or jpeg")

    def _check_svg(self, spec: EditSpec, err: Callable[[str, str], None]) -> None:
        svg = spec.output_format == "svg"
        for name in ("svg_model", "svg_effort"):
            if getattr(spec, name) is not None and not svg:
                err(
                    name,
                    f"{name} applies only to output_format svg (output_format is "
                    f"{spec.output_format}): remove it, or set output_format svg",
                )
        if not svg:
            return
        if spec.svg_effort is not None and spec.svg_effort not in SVG_EFFORTS:
            err(
                "svg_effort",
                f"svg_effort {spec.svg_effort!r} is not one of {', '.join(SVG_EFFORTS)}",
            )
        if spec.n != 1:
            err("n", f"SVG output takes n = 1, got {spec.n}: one row per SVG")
        if spec.mask_mode == "strict":
            err(
                "mask_mode",
                "mask_mode strict puts source pixels back into a raster output, and SVG is not "
                "one: use mask_mode guide, or png, webp or jpeg output",
            )

    def check_model_rules(self, spec: EditSpec) -> list[RowError]:
        """The model's rules alone (no file is read): for a job moved to another model
        (`resume --model-map`), whose files were checked when it was submitted."""
        errors: list[RowError] = []

        def err(field_name: str, reason: str) -> None:
            errors.append(RowError(spec.row, field_name, reason, spec.key))

        info = self._check_model(spec, err, [])
        self._check_params(spec, info, err, [])
        self._check_provider(spec, err)
        return errors

    def _provider_quality(self, spec: EditSpec) -> str:
        """The quality the row's provider will use: "auto" (none given) becomes the provider's
        default where it has one (Azure: high), so the estimate, the budget and the fingerprint
        are of what will be made and billed."""
        provider = self._provider_of(spec) if spec.quality == "auto" else None
        if provider is None or provider.default_quality is None:
            return spec.quality
        return provider.default_quality

    def _provider_of(self, spec: EditSpec) -> Provider | None:
        """The row's provider (None: no providers given, or an unknown one)."""
        providers = self.options.providers
        if providers is None:
            return None
        return providers.providers.get(spec.provider or providers.default)

    def _check_provider(self, spec: EditSpec, err: Callable[[str, str], None]) -> None:
        """The row's provider exists, serves its model, and makes its output format."""
        providers = self.options.providers
        if providers is None:
            return
        name = spec.provider or providers.default
        provider = providers.providers.get(name)
        if provider is None:
            err(
                "provider",
                f"unknown provider {name!r}: the configured providers are "
                f"{', '.join(providers.names())} (docs/providers.md)",
            )
            return
        if not provider.serves(spec.model):
            err("model", provider.not_served(spec.model))
        formats = provider.output_formats
        if formats is not None and spec.output_format not in formats:
            err(
                "output_format",
                f"provider {name} does not make {spec.output_format} output: use one of "
                f"{', '.join(formats)}",
            )

    def _check_provider_inputs(
        self,
        spec: EditSpec,
        taken: list[tuple[str, _Verdict]],
        err: Callable[[str, str], None],
    ) -> None:
        """Every image is in a format the row's provider takes (Azure: PNG or JPEG)."""
        provider = self._provider_of(spec)
        if provider is None or provider.input_formats is None:
            return
        accepted = provider.input_formats
        for index, (path, verdict) in enumerate(taken, start=1):
            if verdict.error is None and verdict.fmt not in accepted:
                err(
                    "image",
                    f"image {index}: {os.path.basename(path)} is {verdict.fmt.upper()}; provider "
                    f"{provider.name} takes {' or '.join(f.upper() for f in accepted)} inputs: "
                    "convert it (e.g. save it as PNG)",
                )

    # --- files ------------------------------------------------------------------------------

    def _file(self, role: str, path: str) -> _Verdict:
        """The verdict on one file in one role, from the caches when its stat is unchanged."""
        if "://" in path:
            return _Verdict(
                error=f"{path} is a remote address; preflight checks local files only: "
                "download it and refer to the local copy"
            )
        try:
            st: os.stat_result | None = os.stat(path)
        except OSError:
            st = None
        if st is not None:
            # Same path, same file (device, inode), unchanged: the earlier verdict stands, and
            # so does its location check (the file it reached was inside an allowed folder).
            stat_key = (role, path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._by_stat.get(stat_key)
            if cached is not None:
                self.stats.stat_hits += 1
                return cached
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(prefix) for root, prefix in self._roots):
            via = (
                "" if real == os.path.normpath(os.path.abspath(path)) else f" (resolves to {real})"
            )
            roots = ", ".join(root for root, _ in self._roots)
            return _Verdict(
                error=f"{path}{via} is outside the allowed folders ({roots}): move it there "
                "or allow its folder with --allow-root"
            )
        if st is None:
            try:
                st = os.stat(real)
            except FileNotFoundError:
                return _Verdict(error=f"file not found: {path}")
            except OSError as exc:
                return _Verdict(error=f"cannot read {path}: {exc.strerror or exc}")
        if not stat.S_ISREG(st.st_mode):
            return _Verdict(error=f"{path} is not a regular file (a folder?)")
        name = os.path.basename(path)
        if st.st_size == 0:
            return _Verdict(error=f"{name} is empty (0 bytes)")
        limit = MAX_MASK_BYTES if role == "mask" else MAX_IMAGE_BYTES
        if st.st_size >= limit:
            return _Verdict(
                error=f"{name} is {st.st_size:,} bytes; the API takes {role}s under "
                f"{_amount(limit, exact=True)}: scale it down or compress it"
            )

        try:
            data = _read_bytes(real)
        except OSError as exc:
            return _Verdict(error=f"cannot read {path}: {exc.strerror or exc}")
        self.stats.files_read += 1
        digest = hashlib.sha256(data).hexdigest()
        stem = os.path.splitext(name)[0]
        content_key = (role, digest)
        verdict = self._by_content.get(content_key)
        if verdict is not None:
            self.stats.content_hits += 1
        else:
            if role == "image":
                verdict = self._image(data, digest, stem)
            elif role == "mask":
                verdict = self._mask(data, digest, stem)
            else:
                verdict = self._markup(data, digest)
            self._by_content[content_key] = verdict
        verdict = self._for_name(verdict, data, digest, name)
        self._by_stat[(role, path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)] = verdict
        return verdict

    def _for_name(self, verdict: _Verdict, data: bytes, digest: str, name: str) -> _Verdict:
        """The content verdict for a file called `name`.

        Errors start with the name. A copy keeps the name's stem (the `{stem}` of output
        templates). A file whose extension does not match its bytes is sent as a copy with the
        right one, because the MIME type of the upload is taken from the name.
        """
        if verdict.error is not None:
            return replace(verdict, error=f"{name} {verdict.error}")
        stem, ext = os.path.splitext(name)
        if verdict.sent is not None:
            sent = Path(verdict.sent)
            if sent.stem != stem:
                target = sent.with_name(stem + sent.suffix)
                if not target.exists():
                    _link_or_copy(sent, target)
                verdict = replace(verdict, sent=str(target))
            return verdict
        if ext.lower() in _EXTENSIONS[verdict.fmt]:
            return verdict
        suffix = _EXTENSIONS[verdict.fmt][0]
        target = self._work_path("renamed", digest, stem + suffix)
        if not target.exists():
            write_atomic(target, data)
            self.stats.files_written += 1
        note = (
            f"{name} holds {verdict.fmt.upper()} data but is named "
            f"'{ext or '(no extension)'}': a copy named {target.name} is sent"
        )
        return replace(verdict, sent=str(target), notes=(*verdict.notes, note))

    def _open(self, data: bytes) -> tuple[ImageFile.ImageFile | None, str | None]:
        """Pillow's lazy open (header only), or why it failed, with the pixel guard applied."""
        try:
            with warnings.catch_warnings():
                # We apply our own (lower) limit below; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return None, "has more pixels than Pillow will open: scale it down"
        except UnidentifiedImageError:
            return None, _describe_unknown(data)
        except Exception as exc:  # Pillow raises many types on a damaged header
            return None, f"is truncated or corrupt ({exc}): re-export it"
        width, height = img.size
        if width * height > self.options.max_pixels:
            return None, (
                f"is {width}x{height} = {width * height:,} pixels, over the limit of "
                f"{self.options.max_pixels:,}: scale it down"
            )
        return img, None

    def _image(self, data: bytes, digest: str, stem: str) -> _Verdict:
        img, problem = self._open(data)
        if img is None:
            return _Verdict(error=problem)
        pil_format = img.format or "unknown"
        size = img.size
        fmt = _ACCEPTED.get(pil_format)
        if fmt is None:
            if not self.options.convert:
                return _Verdict(
                    error=f"is {pil_format}; the API takes PNG, JPEG or WebP: convert it, or "
                    "run with --convert to have it converted to PNG"
                )
            return self._converted(data, digest, stem, pil_format)
        orientation = 1
        if fmt in ("jpeg", "webp"):
            value = img.getexif().get(_ORIENTATION, 1)
            orientation = value if isinstance(value, int) and 1 <= value <= 8 else 1
        damage = _integrity(img, fmt)
        if damage is not None:
            return _Verdict(error=damage)
        if orientation == 1:
            return _Verdict(digest=digest, fmt=fmt, size=size, original_size=size)
        upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        sent, sent_digest, sent_fmt = self._write_image(upright, "upright", digest, stem)
        if sent_digest is None:
            return _Verdict(error=sent)
        return _Verdict(
            sent=sent,
            digest=sent_digest,
            fmt=sent_fmt,
            size=upright.size,
            original_size=size,
            notes=(f"EXIF orientation {orientation} applied (an upright copy is sent)",),
        )

    def _converted(self, data: bytes, digest: str, stem: str, pil_format: str) -> _Verdict:
        notes = [f"converted from {pil_format} to PNG"]
        try:
            opened = Image.open(io.BytesIO(data))
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                notes.append(f"only the first of its {frames} frames is used")
            opened.load()
            img = _sendable_mode(ImageOps.exif_transpose(opened))
        except Exception as exc:
            return _Verdict(
                error=f"is a truncated or corrupt {pil_format} file ({exc}): re-export it"
            )
        sent, sent_digest, _ = self._write_image(img, "converted", digest, stem, allow_jpeg=False)
        if sent_digest is None:
            return _Verdict(error=sent)
        return _Verdict(
            sent=sent,
            digest=sent_digest,
            fmt="png",
            size=img.size,
            original_size=img.size,
            notes=tuple(notes),
        )

    def _write_image(
        self, img: Image.Image, kind: str, digest: str, stem: str, allow_jpeg: bool = True
    ) -> tuple[str, str | None, str]:
        """Write a copy as PNG (JPEG q95 when the PNG would be over the limit): path, digest,
        format; or (reason, None, "") when it cannot be sent."""
        img = _sendable_mode(img)
        path, sent_digest, size = self._write(img, self._work_path(kind, digest, f"{stem}.png"))
        if size < MAX_IMAGE_BYTES:
            return path, sent_digest, "png"
        if allow_jpeg and img.mode in ("RGB", "L"):
            target = self._work_path(kind, digest, f"{stem}.jpg")
            path, sent_digest, size = self._write(img, target, "JPEG", quality=95)
            if size < MAX_IMAGE_BYTES:
                return path, sent_digest, "jpeg"
        return (
            f"its copy would be {_amount(size)}, over the {_amount(MAX_IMAGE_BYTES)} limit: "
            "scale it down",
            None,
            "",
        )

    def _work_path(self, kind: str, digest: str, filename: str) -> Path:
        """work_dir/<kind>/<sha256 of the source>/<filename>: the same source, the same path."""
        work_dir = self.options.work_dir
        if work_dir is None:
            raise ConfigError(
                "preflight needs a work_dir to write converted, upright, renamed or mask copies"
            )
        return work_dir / kind / digest / filename

    def _write(
        self, img: Image.Image, target: Path, pil_format: str = "PNG", **params: int
    ) -> tuple[str, str, int]:
        """Write `img` to `target` atomically, or reuse the copy already there: path, sha256,
        bytes."""
        if target.exists():
            blob = target.read_bytes()
        else:
            buffer = io.BytesIO()
            img.save(buffer, pil_format, **params)
            blob = buffer.getvalue()
            write_atomic(target, blob)
            self.stats.files_written += 1
        return str(target), hashlib.sha256(blob).hexdigest(), len(blob)

    def _mask(self, data: bytes, digest: str, stem: str) -> _Verdict:
        img, problem = self._open(data)
        if img is None:
            return _Verdict(error=problem)
        if img.format != "PNG":
            kind = (
                "a JPEG (JPEG has no transparency)"
                if img.format in ("JPEG", "MPO")
                else (f"a {img.format}")
            )
            return _Verdict(
                error=f"is {kind}; a mask must be a PNG with an alpha channel: save it as PNG, "
                "transparent where the image should be edited"
            )
        try:
            img.load()
        except Exception as exc:
            return _Verdict(error=f"is truncated or corrupt ({exc}): re-export it")
        size = img.size
        ok = _Verdict(digest=digest, fmt="png", size=size, original_size=size)

        alpha: Image.Image | None = None
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img if img.mode in ("RGBA", "LA") else img.convert("RGBA")
            alpha = rgba.getchannel("A")
            lowest, highest = _extrema(alpha)
            if lowest == 0:
                notes: tuple[str, ...] = ()
                if highest == 0:
                    notes = ("is fully transparent: the whole image may change",)
                if rgba is img:
                    return replace(ok, notes=notes)
                note = f"converted from {_mode_name(img)} to RGBA"
                return self._mask_copy(rgba, digest, stem, (note, *notes))
            if lowest < 255:
                return _Verdict(
                    error=f"has no fully transparent pixel (lowest alpha is {lowest}): the API "
                    "edits only where alpha is 0; make the area to edit fully transparent"
                )

        gray = _neutral_gray(img)
        if gray is None:
            if alpha is not None:
                return _Verdict(
                    error="has no fully transparent pixel (alpha is 255 everywhere), so nothing "
                    "would be edited: make the area to edit transparent (alpha 0)"
                )
            return _Verdict(
                error=f"has no alpha channel (it is a colour {img.mode} image): the API edits "
                "where the mask is transparent; save it as an RGBA PNG, transparent where the "
                "image should change, or as a grayscale PNG (black = edit) to have it converted"
            )
        if _extrema(gray)[0] != 0:
            opaque = "no fully transparent and " if alpha is not None else ""
            return _Verdict(
                error=f"has {opaque}no black pixel, so nothing would be edited: paint the area "
                "to edit black (or make it transparent)"
            )
        source = _mode_name(img) + (" with opaque alpha" if alpha is not None else "")
        # OpenAI's guide: the gray value becomes alpha, so black (0) is the area to edit.
        rgba = Image.merge("RGBA", (gray, gray, gray, gray))
        note = f"converted from {source} (gray becomes alpha; black is edited)"
        return self._mask_copy(rgba, digest, stem, (note,))

    def _mask_copy(
        self, rgba: Image.Image, digest: str, stem: str, notes: tuple[str, ...]
    ) -> _Verdict:
        target = self._work_path("mask", digest, f"{stem}.png")
        path, sent_digest, nbytes = self._write(rgba, target)
        if nbytes >= MAX_MASK_BYTES:
            return _Verdict(
                error=f"its RGBA copy is {_amount(nbytes)}, over the {_amount(MAX_MASK_BYTES)} "
                "mask limit: simplify or scale it"
            )
        return _Verdict(
            sent=path,
            digest=sent_digest,
            fmt="png",
            size=rgba.size,
            original_size=rgba.size,
            notes=notes,
        )

    def _markup(self, data: bytes, digest: str) -> _Verdict:
        img, problem = self._open(data)
        if img is None:
            return _Verdict(error=problem)
        if img.format != "PNG":
            return _Verdict(error=f"is {img.format}; markup must be a transparent PNG")
        try:
            img.load()
        except Exception as exc:
            return _Verdict(error=f"is truncated or corrupt ({exc}): re-export it")
        if img.mode not in _ALPHA_MODES and "transparency" not in img.info:
            return _Verdict(
                error="has no alpha channel: markup must be a transparent PNG with the guide "
                "drawn on it"
            )
        return _Verdict(digest=digest, fmt="png", size=img.size, original_size=img.size)


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` with the bytes of `source` (a hard link where the file system allows)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _integrity(img: ImageFile.ImageFile, fmt: str) -> str | None:
    """None when the whole file reads, else why not; decodes as little as the format allows."""
    try:
        if fmt == "png":
            img.verify()  # every chunk's CRC, through IEND, without inflating the pixels
        else:
            if fmt == "jpeg":
                width, height = img.size
                img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ...
        return f"is truncated or corrupt ({exc}): re-export it"
    return None


def _sendable_mode(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "RGBA", "L", "LA"):
        return img
    if img.mode.startswith("I"):  # 16-bit gray: keep the top 8 bits rather than clipping
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = img.mode in ("PA", "RGBa", "La") or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def _mode_name(img: Image.Image) -> str:
    return {
        "1": "black-and-white",
        "L": "grayscale",
        "LA": "grayscale",
        "P": "palette",
        "PA": "palette",
        "RGB": "gray RGB",
        "RGBA": "gray RGBA",
    }.get(img.mode, "grayscale" if img.mode.startswith("I") else img.mode)


def _neutral_gray(img: Image.Image) -> Image.Image | None:
    """The image as "L" when every pixel is a neutral gray (R = G = B), else None."""
    mode = img.mode
    if mode in ("1", "L"):
        return img.convert("L")
    if mode == "LA":
        return img.getchannel("L")
    if mode.startswith("I"):
        return _sendable_mode(img)
    if mode in ("P", "PA", "RGBA"):
        img = img.convert("RGB")
    if img.mode != "RGB":
        return None
    red, green, blue = img.split()
    if ImageChops.difference(red, green).getbbox() or ImageChops.difference(green, blue).getbbox():
        return None
    return red


def _extrema(band: Image.Image) -> tuple[int, int]:
    """(lowest, highest) of a single-band 8-bit image."""
    low, high = band.getextrema()
    assert isinstance(low, int) and isinstance(high, int), band.mode
    return low, high


def _mask_size_reason(mask_size: tuple[int, int], first: _Verdict) -> str:
    mw, mh = mask_size
    iw, ih = first.size
    reason = f"mask is {mw}x{mh} but image 1 is {iw}x{ih}"
    if first.original_size != first.size:
        reason += " (upright, after its EXIF orientation)"
        if mask_size == first.original_size:
            return reason + ": the mask matches the sideways image; rotate the mask to match"
    return reason + ": make the mask the same size"
