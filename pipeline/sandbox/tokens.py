"""The sandbox's own token tables, usage arithmetic and prices (no code shared with the pipeline).

Source: ../shared/API-FACTS.md, as of 2026-11-30. Prices are USD per 1M tokens, except dall-e-2
(USD per image; from OpenAI's pricing page before its retirement, not in API-FACTS).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

AS_OF = "2026-11-30"
SOURCE = "../shared/API-FACTS.md"

# Output image tokens per image, by size and quality (gpt-image-1 table, used for every model).
OUTPUT_IMAGE_TOKENS: dict[str, dict[str, int]] = {
    "1024x1024": {"low": 272, "medium": 1056, "high": 4160},
    "1024x1536": {"low": 408, "medium": 1584, "high": 6240},
    "1536x1024": {"low": 400, "medium": 1568, "high": 6208},
}
# No published figures for the 2.5 models' extra qualities: a sandbox assumption, as multiples of
# the `high` figure.
EXTRA_QUALITY_FACTOR: dict[str, int] = {"xhigh": 2, "max": 4}
SQUARE_AREA = 1024 * 1024

INPUT_IMAGE_BASE = 65
INPUT_IMAGE_PER_TILE = 129
INPUT_TILE_PX = 512
HIGH_FIDELITY_SQUARE = 4096
HIGH_FIDELITY_OTHER = 6144

MILLION = Decimal(1_000_000)
COST_QUANTUM = Decimal("0.000001")


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. Text output tokens are priced like text input."""

    text_in: Decimal
    image_in: Decimal
    image_out: Decimal


def _price(text_in: str, image_in: str, image_out: str) -> Price:
    return Price(Decimal(text_in), Decimal(image_in), Decimal(image_out))


_V1 = _price("5.00", "10.00", "40.00")
_MINI = _price("2.00", "2.50", "8.00")
_V15 = _price("5.00", "8.00", "32.00")
_V2 = _price("5.00", "8.00", "30.00")

PRICES: dict[str, Price] = {
    "gpt-image-1": _V1,
    "gpt-image-1-mini": _MINI,
    "gpt-image-1.5": _V15,
    "chatgpt-image-latest": _V15,
    "gpt-image-2": _V2,
    "gpt-image-2-2026-04-21": _V2,
    "gpt-image-2.5-sunburst": _V2,
    "gpt-image-2.5-sunburst-2026-09-08": _V2,
    "gpt-image-2.5-flare": _V2,
    "gpt-image-2.5-flare-2026-09-08": _V2,
    "gpt-image-2.6-sunburst": _V2,
    "gpt-image-2.6-flare": _V2,
}

# dall-e-2 answered without `usage` and was billed per image, by size.
PER_IMAGE_PRICES: dict[str, dict[str, Decimal]] = {
    "dall-e-2": {
        "256x256": Decimal("0.016"),
        "512x512": Decimal("0.018"),
        "1024x1024": Decimal("0.020"),
    },
}


def _round_half_up_div(numerator: int, denominator: int) -> int:
    return (2 * numerator + denominator) // (2 * denominator)


def output_image_tokens(width: int, height: int, quality: str) -> int:
    """Tokens for one output image; `quality` is already resolved (never `auto`)."""
    factor = EXTRA_QUALITY_FACTOR.get(quality, 1)
    base_quality = "high" if quality in EXTRA_QUALITY_FACTOR else quality
    table = OUTPUT_IMAGE_TOKENS.get(f"{width}x{height}")
    if table is not None:
        return table[base_quality] * factor
    square = OUTPUT_IMAGE_TOKENS["1024x1024"][base_quality] * factor
    return _round_half_up_div(square * width * height, SQUARE_AREA)


def input_image_tokens(width: int, height: int) -> int:
    """Scale so the short side is 512 px (long side rounded half up), 65 + 129 per 512-px tile."""
    short, long = sorted((width, height))
    scaled_long = _round_half_up_div(long * INPUT_TILE_PX, short)
    tiles = -(-scaled_long // INPUT_TILE_PX)
    return INPUT_IMAGE_BASE + INPUT_IMAGE_PER_TILE * tiles


def fidelity_tokens(width: int, height: int, input_fidelity: str | None) -> int:
    """Extra input image tokens that `input_fidelity=high` adds for the first image."""
    if input_fidelity != "high":
        return 0
    return HIGH_FIDELITY_SQUARE if width == height else HIGH_FIDELITY_OTHER


def text_tokens(prompt: str) -> int:
    return -(-len(prompt) // 4)


def usage(
    *,
    prompt: str,
    input_sizes: list[tuple[int, int]],
    input_fidelity: str | None,
    output_size: tuple[int, int],
    quality: str,
    n: int,
    frames: int = 1,
) -> dict[str, Any]:
    """The `usage` object of a response; `input_sizes` are the input images, first one first.

    `frames`: a GIF's frame count. Nothing is published on how GIF output is billed; the sandbox
    bills every frame as one output image.
    """
    image_in = sum(input_image_tokens(w, h) for w, h in input_sizes)
    image_in += fidelity_tokens(*input_sizes[0], input_fidelity)
    text_in = text_tokens(prompt)
    image_out = output_image_tokens(*output_size, quality) * frames * n
    input_total = image_in + text_in
    return {
        "input_tokens": input_total,
        "input_tokens_details": {"image_tokens": image_in, "text_tokens": text_in},
        "output_tokens": image_out,
        "output_tokens_details": {"image_tokens": image_out, "text_tokens": 0},
        "total_tokens": input_total + image_out,
    }


def _rounded(total: Decimal) -> Decimal:
    return total.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


def per_image_cost(model: str, size: str, n: int, factor: Decimal = Decimal(1)) -> Decimal:
    """Cost of a per-image-priced answer (dall-e-2), times `factor`, rounded once."""
    return _rounded(PER_IMAGE_PRICES[model][size] * n * factor)


def cost_usd(
    model: str, usage_: dict[str, Any], factor: Decimal = Decimal(1), *, exact: bool = False
) -> Decimal:
    """Exact sum of tokens x price / 1e6, times `factor` (0.5 for the Batch API), rounded once,
    half up, to 0.000001 USD; `exact` (batch lines): not rounded at all (at most 9 decimal
    places), since the provider bills a batch's usage as a whole, not line by line."""
    price = PRICES[model]
    inp = usage_["input_tokens_details"]
    out = usage_["output_tokens_details"]
    total: Decimal = (
        inp["text_tokens"] * price.text_in
        + inp["image_tokens"] * price.image_in
        + out["image_tokens"] * price.image_out
        + out["text_tokens"] * price.text_in
    )
    cost = total * factor / MILLION
    return cost if exact else _rounded(cost)
