"""What a call will cost and how long a batch will take, before anything is sent (pure).

Token figures come from the published tables (shared/API-FACTS.md, checked 2026-11-21); prices
from `pipeline.cost.pricing`. Every amount is a `Decimal` rounded once, to the micro-dollar, by
`ModelPrice.cost`. Assumptions where nothing is published (each one is listed in docs/cost.md):

- `quality=auto` is expected to resolve to `medium`, and can land anywhere in low..high.
- `size=auto` is expected to resolve to the standard size nearest the first image's aspect ratio,
  and can land on any of the three standard sizes.
- `xhigh` / `max` (2.5 models) are priced as 2x / 4x the `high` figure.
- A mask or a markup guide adds no input tokens.
- An input image whose size is unknown ((0, 0), or missing) is counted as 1024x1024.
- GIF output: every frame is billed as one output image (expected and high: `frame_count`,
  default 9, frames per image); low: the whole GIF billed as one image.
- SVG output: one output image (the reference the SVG is drawn from); the SVG author's own
  tokens (`svg_usage`) are not estimated. `complexity` changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.cost.pricing import ModelPrice, PriceTable, Usage
from pipeline.errors import ConfigError
from pipeline.intake.catalog import parse_size
from pipeline.providers import ProviderSet
from pipeline.spec import EditSpec

__all__ = [
    "FIXED_SIZES",
    "OUTPUT_IMAGE_TOKENS",
    "BatchEstimate",
    "Estimate",
    "Workload",
    "estimate_batch",
    "estimate_cost",
    "estimate_duration",
    "estimate_usage",
    "fallback_usage",
    "frames_billed",
    "input_image_tokens",
    "lanes_duration",
    "output_image_tokens",
    "output_price",
    "resolve_size",
    "text_tokens",
    "workloads",
]

# Output image tokens per image (gpt-image-1 table; gpt-image-1.5 by inference), API-FACTS.
OUTPUT_IMAGE_TOKENS: dict[str, dict[str, int]] = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 400, "medium": 1568, "high": 6208},
}
FIXED_SIZES: tuple[str, ...] = tuple(OUTPUT_IMAGE_TOKENS)
BASE_QUALITIES = ("low", "medium", "high")
# Not published: an assumption, kept on the expensive side so that budgets stay safe.
EXTRA_QUALITY_FACTOR: dict[str, int] = {"xhigh": 2, "max": 4}
EXPECTED_AUTO_QUALITY = "medium"
GIF_DEFAULT_FRAMES = 9  # the API's default frame_count (openai 3.57)
SQUARE_AREA = 1024 * 1024

# Input image tokens (gpt-image-1, low fidelity): short side scaled to 512 px, 65 + 129 per tile.
INPUT_TILE_PX = 512
INPUT_BASE_TOKENS = 65
INPUT_TILE_TOKENS = 129
HIGH_FIDELITY_SQUARE = 4096
HIGH_FIDELITY_OTHER = 6144
UNKNOWN_PIXELS = (1024, 1024)
CHARS_PER_TEXT_TOKEN = 4


def _round_half_up_div(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def _known(pixels: tuple[int, int]) -> tuple[int, int]:
    width, height = pixels
    return (width, height) if width > 0 and height > 0 else UNKNOWN_PIXELS


def text_tokens(prompt: str) -> int:
    """Prompt tokens, at about four characters a token: ceil(len / 4)."""
    return -(-len(prompt) // CHARS_PER_TEXT_TOKEN)


def input_image_tokens(width: int, height: int) -> int:
    """Tokens of one input image: short side scaled to 512 px, 65 + 129 per 512-px tile.

    The scaled long side is a whole number of pixels (rounded half up), as a resized image is.
    """
    width, height = _known((width, height))
    short, long = sorted((width, height))
    scaled_long = _round_half_up_div(long * INPUT_TILE_PX, short)
    tiles = -(-scaled_long // INPUT_TILE_PX)  # the short side is exactly one tile
    return INPUT_BASE_TOKENS + INPUT_TILE_TOKENS * tiles


def fidelity_tokens(first: tuple[int, int], input_fidelity: str | None) -> int:
    """Extra input tokens of `input_fidelity=high`, charged once, by the first image's shape."""
    if input_fidelity != "high":
        return 0
    width, height = _known(first)
    return HIGH_FIDELITY_SQUARE if width == height else HIGH_FIDELITY_OTHER


def output_image_tokens(size: str, quality: str) -> int:
    """Tokens of one output image at a concrete `size` ("WxH") and `quality` (never `auto`).

    Standard sizes read the table; other WxH sizes (gpt-image-2 and later) scale the 1024x1024
    figure by pixel area, rounded half up.
    """
    if quality == "auto":
        raise ValueError("resolve quality=auto before counting tokens")
    factor = EXTRA_QUALITY_FACTOR.get(quality, 1)
    base = "high" if quality in EXTRA_QUALITY_FACTOR else quality
    if base not in BASE_QUALITIES:
        raise ValueError(f"no token figure for quality {quality!r}")
    table = OUTPUT_IMAGE_TOKENS.get(size)
    if table is not None:
        return table[base] * factor
    parsed = parse_size(size)
    if parsed is None:
        raise ValueError(f"size {size!r} is not WIDTHxHEIGHT")
    width, height = parsed
    square = OUTPUT_IMAGE_TOKENS["1024x1024"][base] * factor
    return _round_half_up_div(square * width * height, SQUARE_AREA)


def output_price(price: ModelPrice, size: str, quality: str) -> Decimal:
    """USD of one output image at `size` and `quality` (output tokens only), to the micro-dollar."""
    return price.cost(Usage(image_output=output_image_tokens(size, quality)))


def resolve_size(size: str, pixels: Sequence[tuple[int, int]]) -> str:
    """`size`, with `auto` replaced by the standard size nearest the first image's aspect."""
    if size != "auto":
        return size
    width, height = _known(pixels[0] if pixels else UNKNOWN_PIXELS)
    aspect = math.log(width / height)

    def distance(candidate: str) -> float:
        w, h = (int(p) for p in candidate.split("x"))
        return abs(math.log(w / h) - aspect)

    return min(FIXED_SIZES, key=distance)


def _input_usage(spec: EditSpec, pixels: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(text tokens, image tokens) of the request side; the mask and markup add nothing."""
    count = max(len(spec.images), 1)
    sizes = [_known(p) for p in pixels[:count]]
    sizes += [UNKNOWN_PIXELS] * (count - len(sizes))
    image = sum(input_image_tokens(w, h) for w, h in sizes)
    image += fidelity_tokens(sizes[0], spec.input_fidelity)
    return text_tokens(spec.prompt), image


def frames_billed(spec: EditSpec) -> int:
    """Output images billed per requested image: a GIF's frames (assumed), else 1."""
    if spec.output_format != "gif":
        return 1
    return spec.frame_count or GIF_DEFAULT_FRAMES


def _usage(
    spec: EditSpec,
    pixels: Sequence[tuple[int, int]],
    quality: str,
    size: str,
    n: int,
    frames: int | None = None,
) -> Usage:
    text_in, image_in = _input_usage(spec, pixels)
    per_image = frames_billed(spec) if frames is None else frames
    return Usage(
        text_input=text_in,
        image_input=image_in,
        image_output=output_image_tokens(size, quality) * n * per_image,
    )


def estimate_usage(
    spec: EditSpec,
    pixels: Sequence[tuple[int, int]],
    quality: str | None = None,
    size: str | None = None,
) -> Usage:
    """Expected tokens of one call for `spec`; `pixels` is each input image's (width, height).

    `quality` / `size` override the spec's (e.g. to bound a range); `auto` resolves to the
    expected value: medium quality, the standard size nearest the first image's aspect.
    """
    chosen_quality = quality or spec.quality
    if chosen_quality == "auto":
        chosen_quality = EXPECTED_AUTO_QUALITY
    chosen_size = resolve_size(size or spec.size, pixels)
    return _usage(spec, pixels, chosen_quality, chosen_size, spec.n)


def fallback_usage(
    spec: EditSpec,
    images_returned: int,
    pixels: Sequence[tuple[int, int]] = (),
    quality: str | None = None,
    size: str | None = None,
) -> Usage:
    """Estimated tokens of a call whose response carried no `usage` (record it as estimated).

    Counts the images that came back rather than `n`. Pass the response's resolved `quality`
    and `size` when it has them, and the input images' pixels when known (else 1024x1024).
    """
    chosen_quality = quality or spec.quality
    if chosen_quality == "auto":
        chosen_quality = EXPECTED_AUTO_QUALITY
    chosen_size = resolve_size(size or spec.size, pixels)
    return _usage(spec, pixels, chosen_quality, chosen_size, max(images_returned, 0))


@dataclass(frozen=True)
class Estimate:
    """The cost of one call: expected value and range, in USD (micro-dollar Decimals).

    `priced` is False when the model has no price; the amounts are None then (never a silent 0).
    """

    model: str
    usage: Usage  # the expected usage
    expected: Decimal | None
    low: Decimal | None
    high: Decimal | None
    priced: bool
    provider: str | None = None  # where the call goes (None: the default provider)


def _quality_range(quality: str) -> tuple[str, str]:
    return ("low", "high") if quality == "auto" else (quality, quality)


def _size_candidates(size: str) -> tuple[str, ...]:
    # What `auto` might resolve to: any standard size (the API does not publish its rule).
    return FIXED_SIZES if size == "auto" else (size,)


def estimate_cost(
    spec: EditSpec, pixels: Sequence[tuple[int, int]], prices: PriceTable
) -> Estimate:
    """Expected cost of one call for `spec`, with the range `auto` quality / size leave open.

    low: the lowest quality and cheapest size the spec allows; high: the highest quality and
    dearest size it allows. A row that fixes quality and size has low == expected == high,
    unless it asks for a GIF (low: the GIF billed as one image, not one per frame).
    """
    usage = estimate_usage(spec, pixels)
    price = prices.get(spec.model, spec.provider)
    if price is None:
        return Estimate(spec.model, usage, None, None, None, priced=False, provider=spec.provider)
    low_quality, high_quality = _quality_range(spec.quality)
    sizes = _size_candidates(spec.size)
    # A GIF might also be billed as one image: the low end allows for it.
    low = min(price.cost(_usage(spec, pixels, low_quality, s, spec.n, frames=1)) for s in sizes)
    high = max(price.cost(_usage(spec, pixels, high_quality, s, spec.n)) for s in sizes)
    return Estimate(
        spec.model, usage, price.cost(usage), low, high, priced=True, provider=spec.provider
    )


@dataclass(frozen=True)
class BatchEstimate:
    """Totals over many calls; `unpriced` counts the calls left out because their model has no
    price (a non-zero count means the totals are incomplete, not that those calls are free)."""

    calls: int
    images: int
    expected: Decimal
    low: Decimal
    high: Decimal
    unpriced: int
    unpriced_models: tuple[str, ...]
    # (provider, model) -> (calls, images): what each provider's lanes must carry (the
    # duration by lanes, `lanes_duration`); provider None: the default provider.
    work: Mapping[tuple[str | None, str], tuple[int, int]] = field(default_factory=dict)


def estimate_batch(estimates: Iterable[tuple[Estimate, int]]) -> BatchEstimate:
    """Sum (estimate, images it asks for) pairs, one per call, into batch totals."""
    calls = images = unpriced = 0
    expected = low = high = Decimal(0)
    models: set[str] = set()
    work: dict[tuple[str | None, str], tuple[int, int]] = {}
    for est, n in estimates:
        calls += 1
        images += n
        done_calls, done_images = work.get((est.provider, est.model), (0, 0))
        work[(est.provider, est.model)] = (done_calls + 1, done_images + n)
        if not est.priced or est.expected is None or est.low is None or est.high is None:
            unpriced += 1
            models.add(est.model)
            continue
        expected += est.expected
        low += est.low
        high += est.high
    return BatchEstimate(calls, images, expected, low, high, unpriced, tuple(sorted(models)), work)


def estimate_duration(
    n_calls: int,
    images: int,
    images_per_minute: float | None,
    max_in_flight: int | None,
    latency_s: float,
) -> float:
    """Seconds a batch needs at best: max(images / rate, calls x latency / in-flight).

    Never less than one call's latency when there is a call. None means no limit of that kind.
    """
    if n_calls <= 0:
        return 0.0
    by_rate = images * 60.0 / images_per_minute if images_per_minute else 0.0
    by_concurrency = n_calls * latency_s / max_in_flight if max_in_flight else latency_s
    return max(by_rate, by_concurrency, latency_s)


@dataclass(frozen=True)
class Workload:
    """The calls of one (provider, model) and the lanes they are spread over: their limits
    summed (`per_minute` counts images, or requests on Azure lanes: `units`); None when a lane
    has no limit of that kind."""

    provider: str
    model: str
    calls: int
    units: int
    per_minute: int | None
    in_flight: int | None
    latency_s: float
    lanes: int = 1
    unit: str = "images"  # what `per_minute` counts: images, or requests (Azure)

    def describe(self) -> str:
        rate = f"{self.per_minute} {self.unit}/min" if self.per_minute else "no rate limit"
        spread = f" over {self.lanes} deployments" if self.lanes > 1 else ""
        return f"{self.provider} {self.model} at {rate}{spread}"


def workloads(
    work: Mapping[tuple[str | None, str], tuple[int, int]], providers: ProviderSet
) -> list[Workload]:
    """Each (provider, model)'s calls with the limits of its lanes (a model the provider
    lacks is left out: preflight refused its rows)."""
    out = []
    for (name, model), (calls, images) in sorted(
        work.items(), key=lambda i: (i[0][0] or "", i[0][1])
    ):
        try:
            lanes = providers.lanes(name, model)
        except ConfigError:
            continue
        rates = [lane.limit.per_minute for lane in lanes]
        slots = [lane.limit.max_in_flight for lane in lanes]
        out.append(
            Workload(
                provider=name or providers.default,
                model=model,
                calls=calls,
                units=calls if lanes[0].per_request else images,
                per_minute=sum(r for r in rates if r) if all(rates) else None,
                in_flight=sum(s for s in slots if s) if all(slots) else None,
                latency_s=typical_latency((model,)),
                lanes=len(lanes),
                unit="requests" if lanes[0].per_request else "images",
            )
        )
    return out


def lanes_duration(loads: Sequence[Workload], threads: int) -> float:
    """Seconds a batch needs at best over its lanes: each (provider, model) at the sum of its
    lanes' rates (they run side by side), and every call through the in-flight slots (the
    lanes' caps summed when every lane has one, else `threads`). Never less than one call's
    latency when there is a call."""
    if not loads:
        return 0.0
    by_rate = max((w.units * 60.0 / w.per_minute for w in loads if w.per_minute), default=0.0)
    slots = sum(w.in_flight or 0 for w in loads) if all(w.in_flight for w in loads) else threads
    by_concurrency = sum(w.calls * w.latency_s for w in loads) / max(slots, 1)
    return max(by_rate, by_concurrency, max(w.latency_s for w in loads))


# Median edit latency in seconds (API-FACTS, checked 2026-11-21); others are a guess of 40 s.
TYPICAL_LATENCY_S = {"gpt-image-1.5": 39.0, "gpt-image-1-mini": 18.0}
DEFAULT_LATENCY_S = 40.0


def typical_latency(models: Iterable[str]) -> float:
    """The slowest median latency among `models` (a conservative duration estimate)."""
    return max((TYPICAL_LATENCY_S.get(m, DEFAULT_LATENCY_S) for m in models), default=0.0)
