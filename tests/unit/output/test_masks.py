"""Strict compositing and drift: exact where protected, blended in the feather band."""

from __future__ import annotations

import time

import pytest
from PIL import Image, ImageDraw, ImageOps

from pipeline.output.masks import composite_strict, drift_share, fit_to, preserved_region

SIZE = (48, 40)
HOLE = (18, 14, 29, 25)  # inclusive box of transparent (edited) pixels


def noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """Deterministic noisy image (different seeds give different pixels everywhere)."""
    bands = [
        Image.effect_mandelbrot(size, (-2 + seed, -1.5, 1 + seed, 1.5), 50 + 10 * i)
        for i in range(len(mode))
    ]
    img = Image.merge(mode, bands)
    return Image.eval(img, lambda v: (v * 37 + seed * 91) % 256)


def hole_mask(size: tuple[int, int] = SIZE, box: tuple[int, int, int, int] = HOLE) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle(box, fill=(0, 0, 0, 0))
    return mask


def chessboard_distance(x: int, y: int, box: tuple[int, int, int, int] = HOLE) -> int:
    """Steps from (x, y) to the nearest pixel of the box (0 inside)."""
    x0, y0, x1, y1 = box
    dx = max(x0 - x, 0, x - x1)
    dy = max(y0 - y, 0, y - y1)
    return max(dx, dy)


def pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(p) for p in img.get_flattened_data()]  # type: ignore[arg-type]


def test_strict_composite_is_bit_identical_outside_the_hole() -> None:
    source, output = noise(SIZE, 1), noise(SIZE, 2)
    result = composite_strict(source, hole_mask(), output)
    assert (result.size, result.mode) == (SIZE, "RGB")
    for y in range(SIZE[1]):
        for x in range(SIZE[0]):
            want = output if chessboard_distance(x, y) == 0 else source
            assert result.getpixel((x, y)) == want.getpixel((x, y)), (x, y)


def test_feather_band_blends_and_beyond_is_exact() -> None:
    source, output = noise(SIZE, 3), noise(SIZE, 4)
    feather = 3
    result = composite_strict(source, hole_mask(), output, feather=feather)
    core = preserved_region(hole_mask(), feather)
    blended = 0
    for y in range(SIZE[1]):
        for x in range(SIZE[0]):
            d = chessboard_distance(x, y)
            got = result.getpixel((x, y))
            src, out = source.getpixel((x, y)), output.getpixel((x, y))
            assert isinstance(got, tuple) and isinstance(src, tuple) and isinstance(out, tuple)
            if d == 0:
                assert got == out
            elif d > feather:
                assert got == src, (x, y)
                assert core.getpixel((x, y)) == 255
            else:
                assert core.getpixel((x, y)) == 0
                weight = d / (feather + 1)
                for g, s, o in zip(got, src, out, strict=True):
                    assert abs(g - (s * weight + o * (1 - weight))) <= 1.5, (x, y, d)
                blended += 1
    assert blended > 0


def test_output_of_another_size_is_brought_back() -> None:
    source = noise(SIZE, 5)
    output = noise((72, 40), 6)  # wider: cover-cropped about the centre
    result = composite_strict(source, hole_mask(), output)
    assert result.size == SIZE
    fitted = ImageOps.fit(output, SIZE, method=Image.Resampling.LANCZOS)
    assert fit_to(output, SIZE).tobytes() == fitted.tobytes()
    x0, y0, x1, y1 = HOLE
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            assert result.getpixel((x, y)) == fitted.getpixel((x, y))
    assert result.getpixel((0, 0)) == source.getpixel((0, 0))


def test_rgb_source_under_rgba_output_becomes_opaque_rgba() -> None:
    source = noise(SIZE, 7)
    output = noise(SIZE, 8, mode="RGBA")
    result = composite_strict(source, hole_mask(), output)
    assert result.mode == "RGBA"
    r, g, b = source.getpixel((1, 1))  # type: ignore[misc]
    assert result.getpixel((1, 1)) == (r, g, b, 255)
    assert result.getpixel((20, 20)) == output.getpixel((20, 20))


def test_grayscale_mask_reads_gray_as_alpha() -> None:
    source, output = noise(SIZE, 9), noise(SIZE, 10)
    gray = hole_mask().getchannel("A")
    assert composite_strict(source, gray, output).tobytes() == (
        composite_strict(source, hole_mask(), output).tobytes()
    )


def test_preserved_region_shrinks_by_the_feather() -> None:
    mask = Image.new("RGBA", (11, 11), (0, 0, 0, 255))
    mask.putpixel((5, 5), (0, 0, 0, 0))
    region = preserved_region(mask, feather=2)
    assert region.mode == "L"
    for y in range(11):
        for x in range(11):
            inside = max(abs(x - 5), abs(y - 5)) <= 2
            assert region.getpixel((x, y)) == (0 if inside else 255), (x, y)
    # the image border is not an edit: an all-opaque mask preserves everything
    assert preserved_region(Image.new("RGBA", (5, 5), (0, 0, 0, 255)), 3).getbbox() == (0, 0, 5, 5)


def test_partial_alpha_is_not_protected() -> None:
    mask = Image.new("RGBA", (4, 1), (0, 0, 0, 255))
    mask.putpixel((1, 0), (0, 0, 0, 254))
    source, output = Image.new("RGB", (4, 1), "white"), Image.new("RGB", (4, 1), "black")
    result = composite_strict(source, mask, output)
    assert pixels(result) == [(255, 255, 255), (0, 0, 0), (255, 255, 255), (255, 255, 255)]


def test_drift_share_matches_a_hand_count() -> None:
    # 10x10, left half edited (50 px), right half protected (50 px).
    source = Image.new("RGB", (10, 10), (100, 100, 100))
    mask = Image.new("RGBA", (10, 10), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, 4, 9), fill=(0, 0, 0, 0))
    raw = source.copy()
    ImageDraw.Draw(raw).rectangle((0, 0, 4, 9), fill=(255, 0, 0))  # edits do not count
    for x, y in [(5, 0), (6, 1), (7, 2), (8, 3), (9, 4)]:  # 5 drifted: +20 in red
        raw.putpixel((x, y), (120, 100, 100))
    for x, y in [(5, 5), (6, 6), (7, 7)]:  # 3 within the threshold: +8 in blue
        raw.putpixel((x, y), (100, 100, 108))
    raw.putpixel((9, 9), (100, 91, 100))  # 1 drifted: -9 in green
    assert drift_share(source, mask, raw) == pytest.approx(6 / 50)
    assert drift_share(source, mask, raw, threshold=7) == pytest.approx(9 / 50)
    assert drift_share(source, mask, raw, threshold=20) == 0.0


def test_drift_share_resizes_the_output_like_the_composite() -> None:
    source = Image.new("RGB", (32, 32), (10, 20, 30))
    raw = Image.new("RGB", (64, 48), (10, 20, 30))  # same colour, other size
    assert drift_share(source, hole_mask((32, 32), (0, 0, 3, 3)), raw) == 0.0


def test_drift_share_with_nothing_protected_is_zero() -> None:
    source = Image.new("RGB", (8, 8))
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert drift_share(source, mask, Image.new("RGB", (8, 8), "white")) == 0.0


def test_mismatched_sizes_and_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="same size"):
        composite_strict(Image.new("RGB", (8, 8)), hole_mask(), Image.new("RGB", (8, 8)))
    with pytest.raises(ValueError, match="feather"):
        preserved_region(hole_mask(), -1)
    with pytest.raises(ValueError, match="threshold"):
        drift_share(noise(SIZE, 1), hole_mask(), noise(SIZE, 1), threshold=300)


def test_drift_share_is_fast_on_a_megapixel() -> None:
    size = (1024, 1024)
    source, raw = noise(size, 11), noise(size, 12)
    mask = hole_mask(size, (100, 100, 600, 600))
    start = time.perf_counter()
    drift_share(source, mask, raw)
    assert time.perf_counter() - start < 0.5  # ~10 ms here; generous for slow CI machines
