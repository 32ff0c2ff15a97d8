"""Preflight: every bad input gives a RowError naming the row, the field and what to do."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from pipeline import clock
from pipeline.errors import ConfigError
from pipeline.files import file_sha256
from pipeline.intake import preflight as preflight_module
from pipeline.intake.catalog import load_catalog
from pipeline.intake.preflight import (
    MAX_IMAGE_BYTES,
    MAX_MASK_BYTES,
    Preflight,
    PreflightOptions,
    PreflightResult,
)
from pipeline.spec import EditSpec

ROW = 7
KEY = "SKU-42"


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "manifest"
    folder.mkdir()
    return folder


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path / "work"


@pytest.fixture
def make(root: Path) -> Callable[..., Path]:
    """Write an image under the allowed root: make("a.png", size=(64, 64), mode="RGB")."""

    def _make(
        name: str,
        size: tuple[int, int] = (64, 64),
        mode: str = "RGB",
        color: Any = None,
        fmt: str | None = None,
        folder: Path | None = None,
        **save: Any,
    ) -> Path:
        path = (folder or root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if color is None:
            color = {"RGB": (200, 120, 40), "RGBA": (200, 120, 40, 255), "L": 128, "1": 1}.get(
                mode, 0
            )
        img = Image.new(mode, size, color)
        img.save(path, fmt, **save)
        return path

    return _make


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths preflight really reads (the bytes of a file, not its stat)."""
    seen: list[str] = []
    real_read = preflight_module._read_bytes

    def counting(path: str) -> bytes:
        seen.append(path)
        return real_read(path)

    monkeypatch.setattr(preflight_module, "_read_bytes", counting)
    return seen


def options(root: Path, work: Path | None, **kw: Any) -> PreflightOptions:
    return PreflightOptions(allowed_roots=(root,), catalog=load_catalog(), work_dir=work, **kw)


@pytest.fixture
def pf(root: Path, work: Path) -> Preflight:
    return Preflight(options(root, work))


def spec(*images: Path | str, **kw: Any) -> EditSpec:
    values: dict[str, Any] = {
        "row": ROW,
        "key": KEY,
        "images": tuple(str(p) for p in images),
        "prompt": "put the bag on a white studio sweep",
        "model": "gpt-image-1.5",
    }
    values.update(kw)
    for name in ("mask", "markup"):
        if isinstance(values.get(name), Path):
            values[name] = str(values[name])
    return EditSpec(**values)


def only_error(result: PreflightResult, field: str, *fragments: str) -> None:
    """Exactly one error, on `field`, for our row and key, whose reason has every fragment."""
    assert result.spec is None
    assert len(result.errors) == 1, [str(e) for e in result.errors]
    error = result.errors[0]
    assert (error.row, error.key, error.field) == (ROW, KEY, field), str(error)
    for fragment in fragments:
        assert fragment in error.reason, f"{fragment!r} not in {error.reason!r}"


def mask_with_hole(
    root: Path, name: str = "mask.png", size: tuple[int, int] = (64, 64), mode: str = "RGBA"
) -> Path:
    """An RGBA mask, opaque with a transparent square in the middle."""
    img = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(img).rectangle((16, 16, 40, 40), fill=(0, 0, 0, 0))
    if mode != "RGBA":
        img = img.convert(mode)
    path = root / name
    img.save(path, "PNG")
    return path


def png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height, with next to no pixel data (cheap bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def sparse(path: Path, size: int) -> Path:
    with path.open("r+b") as fh:
        fh.truncate(size)
    return path


# --- the good path ---------------------------------------------------------------------------


def test_valid_row_passes_unchanged_with_digests_and_pixels(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    image = make("bag.png", size=(64, 48))
    logo = make("logo.jpg", size=(32, 32), fmt="JPEG")
    mask = root / "mask.png"
    hole = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    hole.putpixel((3, 3), (0, 0, 0, 0))
    hole.save(mask)
    result = pf.check(spec(image, logo, mask=mask))
    assert result.errors == ()
    assert result.spec == spec(image, logo, mask=mask)
    assert result.pixels == ((64, 48), (32, 32))
    assert result.digests == {
        str(image): file_sha256(str(image)),
        str(logo): file_sha256(str(logo)),
        str(mask): file_sha256(str(mask)),
    }
    assert result.formats[str(logo)] == "jpeg"
    assert result.spec is not None
    assert len(result.spec.fingerprint(result.digests)) == 64


# --- files: existence, location, size ---------------------------------------------------------


def test_missing_file(pf: Preflight, root: Path) -> None:
    only_error(pf.check(spec(root / "nope.png")), "image", "image 1", "file not found")


def test_zero_byte_image(pf: Preflight, root: Path) -> None:
    empty = root / "empty.png"
    empty.write_bytes(b"")
    only_error(pf.check(spec(empty)), "image", "image 1", "empty (0 bytes)")


def test_folder_instead_of_file(pf: Preflight, root: Path) -> None:
    (root / "dir.png").mkdir()
    only_error(pf.check(spec(root / "dir.png")), "image", "not a regular file")


def test_second_image_is_named(pf: Preflight, make: Callable[..., Path], root: Path) -> None:
    good = make("good.png")
    only_error(pf.check(spec(good, root / "gone.png")), "image", "image 2:", "file not found")


def test_outside_allowed_roots(pf: Preflight, make: Callable[..., Path], tmp_path: Path) -> None:
    outside = make("secret.png", folder=tmp_path / "elsewhere")
    only_error(pf.check(spec(outside)), "image", "outside the allowed folders", "--allow-root")


def test_outside_allowed_roots_via_symlink(
    pf: Preflight, make: Callable[..., Path], root: Path, tmp_path: Path
) -> None:
    outside = make("secret.png", folder=tmp_path / "elsewhere")
    link = root / "innocent.png"
    link.symlink_to(outside)
    only_error(pf.check(spec(link)), "image", "outside the allowed folders", "resolves to")


def test_outside_allowed_roots_via_dotdot(
    pf: Preflight, make: Callable[..., Path], root: Path, tmp_path: Path
) -> None:
    make("secret.png", folder=tmp_path / "elsewhere")
    sneaky = f"{root}/../elsewhere/secret.png"
    only_error(pf.check(spec(sneaky)), "image", "outside the allowed folders")


def test_allow_root_admits_another_folder(
    root: Path, work: Path, make: Callable[..., Path], tmp_path: Path
) -> None:
    outside = make("shared.png", folder=tmp_path / "shared")
    opts = PreflightOptions(
        allowed_roots=(root, tmp_path / "shared"), catalog=load_catalog(), work_dir=work
    )
    assert Preflight(opts).check(spec(outside)).errors == ()


def test_remote_address_is_refused(pf: Preflight) -> None:
    only_error(pf.check(spec("s3://bucket/bag.png")), "image", "remote address")


def test_image_over_50_mb_is_refused_without_reading(
    pf: Preflight, make: Callable[..., Path], reads: list[str]
) -> None:
    big = sparse(make("huge.png"), MAX_IMAGE_BYTES + 1)
    only_error(pf.check(spec(big)), "image", "50,000,001 bytes", "under 50 MB")
    assert reads == []


def test_image_size_limit_is_a_module_constant(
    pf: Preflight, make: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make("photo.png")
    monkeypatch.setattr(preflight_module, "MAX_IMAGE_BYTES", 100)
    only_error(pf.check(spec(image)), "image", "under 100 bytes")


# --- files: content -------------------------------------------------------------------------


def test_truncated_png(pf: Preflight, make: Callable[..., Path]) -> None:
    path = make("cut.png", size=(128, 128), color=None)
    Image.effect_noise((128, 128), 60).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    only_error(pf.check(spec(path)), "image", "cut.png is truncated or corrupt", "re-export")


def test_truncated_jpeg(pf: Preflight, root: Path) -> None:
    path = root / "cut.jpg"
    Image.effect_noise((256, 256), 60).convert("RGB").save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    only_error(pf.check(spec(path)), "image", "truncated or corrupt")


def test_truncated_webp(pf: Preflight, root: Path) -> None:
    path = root / "cut.webp"
    Image.effect_noise((256, 256), 60).convert("RGB").save(path, "WEBP")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    only_error(pf.check(spec(path)), "image", "truncated or corrupt")


def test_corrupt_png_data(pf: Preflight, root: Path) -> None:
    path = root / "flipped.png"
    Image.effect_noise((128, 128), 60).convert("RGB").save(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    only_error(pf.check(spec(path)), "image", "truncated or corrupt")


def test_corrupt_header(pf: Preflight, root: Path) -> None:
    path = root / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    only_error(pf.check(spec(path)), "image", "garbage.png is a damaged PNG file")


def test_text_file_named_png(pf: Preflight, root: Path) -> None:
    path = root / "notes.png"
    path.write_text("sku,prompt\nA1,white background\n")
    only_error(pf.check(spec(path)), "image", "not an image", "text file")


def test_heic_without_plugin_says_how(pf: Preflight, root: Path) -> None:
    path = root / "IMG_0001.heic"
    path.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\x01\x02" * 100)
    only_error(pf.check(spec(path)), "image", "HEIC", "pillow-heif")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_unsupported_format_without_convert(
    pf: Preflight, make: Callable[..., Path], fmt: str
) -> None:
    path = make(f"scan.{fmt.lower()}", fmt=fmt)
    only_error(pf.check(spec(path)), "image", f"is {fmt}", "--convert")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_unsupported_format_with_convert(
    root: Path, work: Path, make: Callable[..., Path], fmt: str
) -> None:
    path = make(f"scan.{fmt.lower()}", size=(40, 30), fmt=fmt)
    result = Preflight(options(root, work, convert=True)).check(spec(path))
    assert result.errors == ()
    assert result.spec is not None
    sent = Path(result.spec.images[0])
    assert work in sent.parents and sent.name == "scan.png"  # the stem is kept for {stem}
    assert f"image 1: converted from {fmt} to PNG" in result.notes
    assert result.digests[str(sent)] == file_sha256(str(sent))
    assert result.pixels == ((40, 30),)
    with Image.open(sent) as img:
        assert (img.format, img.size) == ("PNG", (40, 30))
        assert img.getpixel((0, 0)) == (200, 120, 40)


def test_conversion_needs_a_work_dir(root: Path, make: Callable[..., Path]) -> None:
    path = make("scan.tiff", fmt="TIFF")
    with pytest.raises(ConfigError, match="work_dir"):
        Preflight(options(root, None, convert=True)).check(spec(path))


def test_decompression_bomb_over_our_limit_is_refused_from_the_header(
    pf: Preflight, root: Path
) -> None:
    # 9000x9000 = 81 Mpx: over our 64 Mpx limit, under Pillow's own; the data is not even valid,
    # so passing this test proves the pixels were never decoded.
    path = png_with_header(root / "bomb.png", 9000, 9000)
    only_error(pf.check(spec(path)), "image", "9000x9000", "limit of 64,000,000")


def test_decompression_bomb_over_pillows_limit(pf: Preflight, root: Path) -> None:
    path = png_with_header(root / "bomb.png", 20000, 20000)
    only_error(pf.check(spec(path)), "image", "more pixels than Pillow will open")


def test_max_pixels_option(root: Path, work: Path, make: Callable[..., Path]) -> None:
    path = make("photo.png", size=(100, 100))
    result = Preflight(options(root, work, max_pixels=5_000)).check(spec(path))
    only_error(result, "image", "100x100", "scale it down")


def test_exif_orientation_is_applied(pf: Preflight, root: Path, work: Path) -> None:
    path = root / "sideways.jpg"
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif)
    result = pf.check(spec(path))
    assert result.errors == ()
    assert result.spec is not None
    sent = result.spec.images[0]
    assert work in Path(sent).parents and Path(sent).name == "sideways.png"
    assert result.pixels == ((20, 40),)
    assert any("EXIF orientation 6 applied" in note for note in result.notes)
    assert result.digests[sent] == file_sha256(sent)
    with Image.open(sent) as upright:
        assert upright.size == (20, 40)
        assert upright.getexif().get(0x0112) in (None, 1)


def test_mask_must_match_the_upright_image(pf: Preflight, root: Path) -> None:
    path = root / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (64, 32)).save(path, "JPEG", exif=exif)
    mask = root / "mask.png"
    Image.new("RGBA", (64, 32), (0, 0, 0, 0)).save(mask)
    only_error(pf.check(spec(path, mask=mask)), "mask", "rotate the mask")


def test_extension_that_lies_is_sent_under_the_right_one(
    pf: Preflight, make: Callable[..., Path], work: Path
) -> None:
    # The upload's MIME type comes from the file name: a JPEG named .png would be sent as PNG.
    path = make("photo.png", fmt="JPEG")
    result = pf.check(spec(path))
    assert result.errors == ()
    assert result.spec is not None
    sent = result.spec.images[0]
    assert work in Path(sent).parents and Path(sent).name == "photo.jpg"
    assert Path(sent).read_bytes() == path.read_bytes()
    assert result.formats[sent] == "jpeg"
    assert result.digests[sent] == file_sha256(str(path))
    assert any("holds JPEG data but is named '.png'" in note for note in result.notes)


def test_same_content_under_two_names_keeps_each_stem(
    root: Path, work: Path, make: Callable[..., Path]
) -> None:
    first = make("front.tiff", fmt="TIFF")
    second = root / "back.tiff"
    shutil.copy(first, second)
    pf = Preflight(options(root, work, convert=True))
    a, b = pf.check(spec(first)), pf.check(spec(second))
    assert a.spec is not None and b.spec is not None
    assert Path(a.spec.images[0]).name == "front.png"
    assert Path(b.spec.images[0]).name == "back.png"
    assert a.digests[a.spec.images[0]] == b.digests[b.spec.images[0]]
    assert pf.stats.content_hits == 1


# --- masks ----------------------------------------------------------------------------------


def test_mask_without_alpha_rgb_colour(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    image = make("bag.png")
    mask = root / "mask.png"
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    img.putpixel((1, 1), (0, 0, 0))
    img.save(mask)
    only_error(pf.check(spec(image, mask=mask)), "mask", "no alpha channel", "RGBA PNG")


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_mask_is_converted_gray_becomes_alpha(
    pf: Preflight, make: Callable[..., Path], root: Path, work: Path, mode: str
) -> None:
    image = make("bag.png")
    gray = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(gray).rectangle((10, 10, 20, 20), fill=0)
    if mode == "L":
        gray.putpixel((40, 40), 100)
    mask = root / "mask.png"
    gray.convert(mode).save(mask)
    result = pf.check(spec(image, mask=mask))
    assert result.errors == ()
    assert result.spec is not None and result.spec.mask is not None
    sent = result.spec.mask
    assert work in Path(sent).parents and Path(sent).name == "mask.png"
    assert any(
        "converted from" in n and "gray becomes alpha; black is edited" in n for n in result.notes
    )
    assert result.digests[sent] == file_sha256(sent)
    with Image.open(sent) as converted:
        assert converted.mode == "RGBA"
        alpha = converted.getchannel("A")
        assert alpha.tobytes() == gray.convert(mode).convert("L").tobytes()
        assert alpha.getpixel((15, 15)) == 0 and alpha.getpixel((0, 0)) == 255


def test_black_and_white_rgb_mask_is_converted(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    image = make("bag.png")
    mask = root / "mask.png"
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((10, 10, 30, 30), fill=(0, 0, 0))
    img.save(mask)
    result = pf.check(spec(image, mask=mask))
    assert result.errors == ()
    assert any("mask: converted from gray RGB" in n for n in result.notes)


def test_opaque_la_mask_reads_its_gray(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    image = make("bag.png")
    gray = Image.new("L", (64, 64), 255)
    gray.putpixel((5, 5), 0)
    mask = root / "mask.png"
    Image.merge("LA", (gray, Image.new("L", (64, 64), 255))).save(mask)
    result = pf.check(spec(image, mask=mask))
    assert result.errors == ()
    assert any("grayscale with opaque alpha" in n for n in result.notes)


def test_palette_mask_with_transparency_becomes_rgba(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    image = make("bag.png")
    mask = root / "mask.png"
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.putpixel((0, 0), 0)
    pal.save(mask, transparency=0)
    result = pf.check(spec(image, mask=mask))
    assert result.errors == ()
    assert "mask: converted from palette to RGBA" in result.notes


def test_grayscale_mask_without_black(pf: Preflight, make: Callable[..., Path], root: Path) -> None:
    image = make("bag.png")
    mask = root / "mask.png"
    Image.new("L", (64, 64), 200).save(mask)
    only_error(pf.check(spec(image, mask=mask)), "mask", "no black pixel")


def test_mask_of_another_size(pf: Preflight, make: Callable[..., Path], root: Path) -> None:
    image = make("bag.png", size=(64, 64))
    mask = mask_with_hole(root, size=(48, 48))
    only_error(
        pf.check(spec(image, mask=mask)),
        "mask",
        "mask is 48x48 but image 1 is 64x64: make the mask the same size",
    )


def test_jpeg_mask(pf: Preflight, make: Callable[..., Path]) -> None:
    image = make("bag.png")
    mask = make("mask.jpg", fmt="JPEG")
    only_error(pf.check(spec(image, mask=mask)), "mask", "JPEG", "must be a PNG")


def test_mask_without_transparent_pixel(pf: Preflight, make: Callable[..., Path]) -> None:
    image = make("bag.png")
    mask = make("mask.png", mode="RGBA", color=(255, 0, 0, 255))
    only_error(pf.check(spec(image, mask=mask)), "mask", "no fully transparent pixel")


def test_mask_with_only_partial_transparency(pf: Preflight, make: Callable[..., Path]) -> None:
    image = make("bag.png")
    mask = make("mask.png", mode="RGBA", color=(0, 0, 0, 10))
    only_error(pf.check(spec(image, mask=mask)), "mask", "lowest alpha is 10")


def test_mask_over_4_mb(pf: Preflight, make: Callable[..., Path], root: Path) -> None:
    image = make("bag.png")
    mask = sparse(mask_with_hole(root), MAX_MASK_BYTES + 1)
    only_error(pf.check(spec(image, mask=mask)), "mask", "under 4 MB")


def test_markup_without_alpha(make: Callable[..., Path], pf: Preflight) -> None:
    image = make("bag.png")
    markup = make("arrows.png")
    only_error(
        pf.check(spec(image, markup=markup, model="gpt-image-2.5-sunburst")),
        "markup",
        "transparent PNG",
    )


# --- the model and its parameters -----------------------------------------------------------


@pytest.fixture
def image(make: Callable[..., Path]) -> Path:
    return make("bag.png")


def test_gone_model_names_date_and_replacement(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, model="gpt-image-1")),
        "model",
        "shut down on 2026-10-23",
        "use gpt-image-2.5-sunburst",
        "--model-map gpt-image-1=gpt-image-2.5-sunburst",
    )


def test_gone_dalle(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, model="dall-e-2")), "model", "shut down on 2026-05-12")


def test_unknown_model_lists_known_ones(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, model="gpt-image-1.6")),
        "model",
        "unknown model 'gpt-image-1.6'",
        "gpt-image-1.5",
        "gpt-image-2.6-flare",
        "--allow-unknown-model",
    )


def test_unknown_model_allowed_with_the_flag(root: Path, work: Path, image: Path) -> None:
    pf = Preflight(options(root, work, allow_unknown_model=True))
    result = pf.check(spec(image, model="gpt-image-3", size="2048x2048"))
    assert result.errors == ()
    assert any("not in the catalogue" in note for note in result.notes)
    # generic rules still apply
    only_error(pf.check(spec(image, model="gpt-image-3", n=11)), "n", "1..10")


def test_model_shutting_down_tomorrow_passes_today_and_is_refused_from_its_date(
    root: Path, work: Path, image: Path
) -> None:
    """On 2026-11-30 a gpt-image-1.5 row is accepted (the shutdown is a batch-level warning,
    not a note on every row); from 2026-12-01 preflight refuses it, naming the date and the
    replacement, so it is never sent."""
    with clock.frozen(dt.date(2026, 11, 30)):
        result = Preflight(options(root, work)).check(spec(image, model="gpt-image-1.5"))
    assert result.errors == () and not any("1.5" in note for note in result.notes)
    with clock.frozen(dt.date(2026, 12, 1)):
        refused = Preflight(options(root, work)).check(spec(image, model="gpt-image-1.5"))
    only_error(refused, "model", "shut down on 2026-12-01", "use gpt-image-2.5-sunburst instead")


@pytest.mark.parametrize(
    ("model", "size", "fragment"),
    [
        ("gpt-image-1.5", "512x512", "use one of 1024x1024, 1536x1024, 1024x1536, auto"),
        ("gpt-image-2", "1000x1000", "divisible by 16"),
        ("gpt-image-2", "4096x1024", "aspect ratio 4:1"),
        ("gpt-image-2.5-flare", "4096x2160", "larger than the maximum 3840x2160"),
        ("gpt-image-2.6-sunburst", "2160x3856", "larger than the maximum"),
        ("gpt-image-2", "big", "give WIDTHxHEIGHT"),
    ],
)
def test_size_the_model_does_not_take(
    pf: Preflight, image: Path, model: str, size: str, fragment: str
) -> None:
    only_error(pf.check(spec(image, model=model, size=size)), "size", fragment)


def test_free_size_accepted_and_experimental_noted(pf: Preflight, image: Path) -> None:
    assert pf.check(spec(image, model="gpt-image-2", size="1536x864")).errors == ()
    result = pf.check(spec(image, model="gpt-image-2", size="3840x2160"))
    assert result.errors == ()
    assert any("experimental" in note for note in result.notes)


def test_quality_per_model(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, quality="xhigh")), "quality", "low, medium, high, auto")
    assert pf.check(spec(image, model="gpt-image-2.5-sunburst", quality="max")).errors == ()


def test_input_fidelity_high_on_mini(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, model="gpt-image-1-mini", input_fidelity="high")),
        "input_fidelity",
        "'high' is not available on gpt-image-1-mini",
        "use low",
    )


def test_input_fidelity_on_gpt_image_2(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, model="gpt-image-2", input_fidelity="low")),
        "input_fidelity",
        "omit input_fidelity",
    )


def test_transparent_background_with_jpeg(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, background="transparent", output_format="jpeg")),
        "background",
        "needs output_format png or webp",
    )


def test_transparent_background_preview_is_noted(pf: Preflight, image: Path) -> None:
    result = pf.check(spec(image, model="gpt-image-2", background="transparent"))
    assert result.errors == ()
    assert "transparent background is in preview on gpt-image-2" in result.notes


def test_unknown_background(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, background="white")), "background", "not one of")


def test_output_format_not_offered(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, output_format="avif")), "output_format", "png, webp, jpeg")


def test_compression_with_png(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, output_compression=80)),
        "output_compression",
        "only to jpeg or webp",
    )


def test_compression_out_of_range(pf: Preflight, image: Path) -> None:
    only_error(
        pf.check(spec(image, output_format="webp", output_compression=101)),
        "output_compression",
        "0..100, got 101",
    )


@pytest.mark.parametrize("n", [0, 11])
def test_n_out_of_range(pf: Preflight, image: Path, n: int) -> None:
    only_error(pf.check(spec(image, n=n)), "n", f"1..10 on gpt-image-1.5, got {n}")


def test_prompt_too_long(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, prompt="x" * 32_001)), "prompt", "32,001 characters", "32,000")


def test_seventeen_images(pf: Preflight, make: Callable[..., Path]) -> None:
    images = [make(f"ref{i}.png", size=(8, 8)) for i in range(17)]
    only_error(pf.check(spec(*images)), "image", "17 images given", "at most 16")


def test_markup_with_mask(pf: Preflight, image: Path, root: Path) -> None:
    mask = mask_with_hole(root)
    markup = mask_with_hole(root, name="markup.png")
    only_error(
        pf.check(spec(image, mask=mask, markup=markup, model="gpt-image-2.5-sunburst")),
        "markup",
        "cannot be combined with mask",
    )


def test_markup_on_a_model_without_it(pf: Preflight, image: Path, root: Path) -> None:
    markup = mask_with_hole(root, name="markup.png")
    only_error(
        pf.check(spec(image, markup=markup)), "markup", "does not take markup", "2.5-sunburst"
    )
    assert pf.check(spec(image, markup=markup, model="gpt-image-2.5-flare")).errors == ()


def test_strict_mask_mode_needs_a_mask(pf: Preflight, image: Path) -> None:
    only_error(pf.check(spec(image, mask_mode="strict")), "mask_mode", "needs a mask")


def test_every_problem_of_a_row_is_reported(pf: Preflight, root: Path) -> None:
    result = pf.check(spec(root / "gone.png", n=0, quality="ultra", output_compression=5))
    assert {e.field for e in result.errors} == {"image", "n", "quality", "output_compression"}


# --- caching --------------------------------------------------------------------------------


def test_same_file_is_read_once(pf: Preflight, make: Callable[..., Path], reads: list[str]) -> None:
    image = make("bag.png")
    first = pf.check(spec(image))
    for _ in range(5):
        assert pf.check(spec(image, prompt="another prompt")).digests == first.digests
    assert reads == [str(image)]
    assert pf.stats.stat_hits == 5

    # A changed file (new size / mtime) is read again.
    make("bag.png", size=(32, 32))
    os.utime(image, ns=(1, 1))
    assert pf.check(spec(image)).pixels == ((32, 32),)
    assert len(reads) == 2


def test_same_content_elsewhere_is_not_decoded_again(
    pf: Preflight, make: Callable[..., Path], root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make("bag.png")
    copy = root / "copy.png"
    shutil.copy(image, copy)
    opens: list[object] = []
    real_open = Image.open

    def counting(fp: Any, *args: Any, **kw: Any) -> Any:
        opens.append(fp)
        return real_open(fp, *args, **kw)

    monkeypatch.setattr(Image, "open", counting)
    pf.check(spec(image))
    result = pf.check(spec(copy))
    assert len(opens) == 1
    assert pf.stats.content_hits == 1
    assert result.spec is not None and result.spec.images == (str(copy),)
    assert result.digests == {str(copy): file_sha256(str(image))}


def test_errors_are_cached_too(pf: Preflight, root: Path, reads: list[str]) -> None:
    bad = root / "notes.png"
    bad.write_text("hello")
    for _ in range(3):
        assert pf.check(spec(bad)).errors[0].field == "image"
    assert len(reads) == 1


def test_converted_copies_are_reused_across_instances(
    root: Path, work: Path, make: Callable[..., Path]
) -> None:
    path = make("scan.tiff", fmt="TIFF")
    first = Preflight(options(root, work, convert=True))
    second = Preflight(options(root, work, convert=True))
    a, b = first.check(spec(path)), second.check(spec(path))
    assert a.spec is not None and b.spec is not None
    assert a.spec.images == b.spec.images and a.digests == b.digests
    assert (first.stats.files_written, second.stats.files_written) == (1, 0)


def test_needs_an_allowed_root() -> None:
    with pytest.raises(ConfigError, match="allowed folder"):
        Preflight(PreflightOptions(allowed_roots=(), catalog=load_catalog()))


def test_symlink_inside_the_root_is_fine(
    pf: Preflight, make: Callable[..., Path], root: Path
) -> None:
    target = make("store/abc123.png")
    link = root / "bag.png"
    link.symlink_to(target)
    result = pf.check(spec(link))
    assert result.errors == ()
    assert result.digests == {str(link): file_sha256(str(target))}


def test_truncated_tiff_with_convert(root: Path, work: Path) -> None:
    path = root / "scan.tiff"
    Image.effect_noise((128, 128), 60).convert("RGB").save(path, "TIFF")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = Preflight(options(root, work, convert=True)).check(spec(path))
    only_error(result, "image", "scan.tiff is a truncated or corrupt TIFF file")


def test_animated_gif_with_convert_uses_the_first_frame(root: Path, work: Path) -> None:
    path = root / "spin.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "lime", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = Preflight(options(root, work, convert=True)).check(spec(path))
    assert result.errors == ()
    assert "image 1: only the first of its 3 frames is used" in result.notes
    assert result.spec is not None
    with Image.open(result.spec.images[0]) as img:
        assert img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_fully_transparent_mask_is_noted(pf: Preflight, make: Callable[..., Path]) -> None:
    image = make("bag.png")
    mask = make("mask.png", mode="RGBA", color=(0, 0, 0, 0))
    result = pf.check(spec(image, mask=mask))
    assert result.errors == ()
    assert "mask: is fully transparent: the whole image may change" in result.notes
