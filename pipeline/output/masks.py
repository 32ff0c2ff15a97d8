"""Strict masks: put back the pixels the mask protects, and measure how far the model strayed.

The API's masking is prompt-guided: the model may change pixels outside the transparent area.
With `mask_mode = "strict"` the collector composites the raw output over the source so that
every protected pixel is the source's, bit for bit.

Conventions (all functions are pure: PIL images in, PIL images or numbers out):

- The mask's alpha says what is protected: alpha 255 is kept, anything below 255 may change.
  A mask without an alpha band ("L" or "1") is read as its gray value, the way preflight
  converts grayscale masks (black = edited).
- An output of another size is brought back to the source's size with `fit_to`: scaled with
  LANCZOS to cover the source and, when the aspect ratio differs, cropped about the centre.
- Distances are chessboard steps (8-neighbourhood): a protected pixel touching an edited pixel
  (also diagonally) is 1 step away. The image border is not an edited pixel.
"""

from __future__ import annotations

from PIL import Image, ImageChops, ImageFilter, ImageOps

__all__ = [
    "MAX_FEATHER",
    "alpha_of",
    "composite_strict",
    "drift_share",
    "fit_to",
    "preserved_region",
]

MAX_FEATHER = 254  # the distance count is kept in an 8-bit band

_ERODE = ImageFilter.MinFilter(3)
_ONE_IF_FULL = [1 if v == 255 else 0 for v in range(256)]
_FULL_ONLY = [255 if v == 255 else 0 for v in range(256)]


def fit_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`: as is when it already fits, else LANCZOS cover-scaled and centre-cropped.

    Cover-crop keeps the geometry undistorted; the API returns its own size (e.g. 1536x1024 for
    a 1200x900 source), so a little of the long side is cut off rather than squeezed.
    """
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def alpha_of(mask: Image.Image) -> Image.Image:
    """The mask's alpha as an "L" image (gray value for masks without an alpha band)."""
    if mask.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return mask.getchannel("A")
    if "transparency" in mask.info:
        return mask.convert("RGBA").getchannel("A")
    if mask.mode in ("L", "1", "P") or mask.mode.startswith("I"):
        return _gray(mask)
    raise ValueError(
        f"mask has no alpha channel (mode {mask.mode}): protected pixels must have alpha 255"
    )


def _gray(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16-bit gray: keep the top 8 bits rather than clipping
        return image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return image.convert("L")


def _check_sizes(source: Image.Image, mask: Image.Image) -> None:
    if source.size != mask.size:
        raise ValueError(
            f"mask is {mask.width}x{mask.height} but the source is "
            f"{source.width}x{source.height}: they must be the same size"
        )


def _check_feather(feather: int) -> None:
    if not 0 <= feather <= MAX_FEATHER:
        raise ValueError(f"feather must be 0..{MAX_FEATHER} pixels, got {feather}")


def _protected(mask: Image.Image) -> Image.Image:
    """ "L" image: 255 where the mask's alpha is 255, else 0."""
    return alpha_of(mask).point(_FULL_ONLY)


def preserved_region(mask: Image.Image, feather: int = 0) -> Image.Image:
    """ "L" image (0/255) of the pixels `composite_strict` guarantees to be the source's:
    alpha 255 and more than `feather` steps from any pixel with alpha < 255."""
    _check_feather(feather)
    region = _protected(mask)
    for _ in range(feather):
        if region.getbbox() is None:
            break
        region = region.filter(_ERODE)
    return region


def _source_weight(mask: Image.Image, feather: int) -> Image.Image:
    """Source weight ("L"): 255 where preserved, 255*d/(feather+1) at d steps, 0 where edited."""
    region = _protected(mask)
    if feather == 0:
        return region
    # A protected pixel d steps from the edit lies in the first d erosions of the region (and in
    # all feather+1 of them when d > feather), so counting memberships gives d, capped.
    count = region.point(_ONE_IF_FULL)
    for _ in range(feather):
        region = region.filter(_ERODE)
        if region.getbbox() is None:
            break
        count = ImageChops.add(count, region.point(_ONE_IF_FULL))
    steps = feather + 1
    lut = [round(255 * min(c, steps) / steps) for c in range(256)]
    return count.point(lut)


def _working_mode(image: Image.Image) -> str:
    if image.mode in ("RGB", "RGBA"):
        return image.mode
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    return "RGBA" if has_alpha else "RGB"


def composite_strict(
    source: Image.Image, mask: Image.Image, output: Image.Image, feather: int = 0
) -> Image.Image:
    """The output, brought to the source's size, with every protected pixel put back.

    Pixels with mask alpha 255 that lie more than `feather` steps from any pixel with alpha < 255
    are exactly the source's; nearer protected pixels blend linearly from output to source with
    the distance; pixels with alpha < 255 are the output's. The result has the output's mode
    (RGB or RGBA; an RGB source under an RGBA output becomes opaque RGBA, an RGBA source under an
    RGB output loses its alpha).
    """
    _check_sizes(source, mask)
    _check_feather(feather)
    mode = _working_mode(output)
    out = fit_to(output if output.mode == mode else output.convert(mode), source.size)
    src = source if source.mode == mode else source.convert(mode)
    weight = _source_weight(mask, feather)
    result = Image.composite(src, out, weight)
    # Composite with weight 255 copies the source already; pasting through the preserved region
    # once more makes "bit for bit" independent of the blend arithmetic.
    core = weight.point(_FULL_ONLY).convert("1")
    result.paste(src, (0, 0), core)
    return result


def drift_share(
    source: Image.Image, mask: Image.Image, raw_output: Image.Image, threshold: int = 8
) -> float:
    """Share (0..1) of the protected area (alpha 255) that the raw output changed.

    A pixel counts as changed when any channel differs from the source by more than `threshold`
    (the output is first brought to the source's size with `fit_to`). 0.0 when nothing is
    protected. Colour channels are compared; alpha too when either image has it.
    """
    _check_sizes(source, mask)
    if not 0 <= threshold <= 255:
        raise ValueError(f"threshold must be 0..255, got {threshold}")
    protected = _protected(mask)
    area = protected.histogram()[255]
    if area == 0:
        return 0.0
    mode = "RGBA" if "RGBA" in (_working_mode(source), _working_mode(raw_output)) else "RGB"
    src = source if source.mode == mode else source.convert(mode)
    out = raw_output if raw_output.mode == mode else raw_output.convert(mode)
    out = fit_to(out, source.size)
    diff = ImageChops.difference(src, out)
    over = [255 if v > threshold else 0 for v in range(256)] * len(mode)
    bands = diff.point(over).split()
    changed = bands[0]
    for band in bands[1:]:
        changed = ImageChops.lighter(changed, band)
    drifted = ImageChops.multiply(changed, protected).histogram()[255]
    return drifted / area
