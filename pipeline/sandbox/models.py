"""The sandbox's own model catalogue (rules per model), independent of the pipeline's.

Source: ../shared/API-FACTS.md and ../shared/contract/openapi-images-edits.json, as of 2026-11-21.
"""

from __future__ import annotations

from dataclasses import dataclass

AS_OF = "2026-11-21"
SOURCE = "../shared/API-FACTS.md"

FIXED_SIZES: tuple[str, ...] = ("1024x1024", "1536x1024", "1024x1536")
BASE_QUALITIES: tuple[str, ...] = ("low", "medium", "high", "auto")
EXTENDED_QUALITIES: tuple[str, ...] = ("low", "medium", "high", "xhigh", "max", "auto")

# Largest custom size, in either orientation (API-FACTS: "max 3840x2160").
MAX_LONG_EDGE = 3840
MAX_SHORT_EDGE = 2160
SIZE_MULTIPLE = 16
MAX_ASPECT = 3

DEFAULT_MODEL = "gpt-image-1.5"

# Gone, and so answered 404 model_not_found like any unknown name: gpt-image-1 (shut down
# 2026-10-23), dall-e-2 and dall-e-3 (retired 2026-05-12).
RETIRED_MODELS: tuple[str, ...] = ("gpt-image-1", "dall-e-2", "dall-e-3")


@dataclass(frozen=True)
class ModelRules:
    """What one model accepts. `fidelity` None means `input_fidelity` must be omitted."""

    custom_sizes: bool
    qualities: tuple[str, ...]
    fidelity: tuple[str, ...] | None
    markup: bool


_FIXED = ModelRules(
    custom_sizes=False, qualities=BASE_QUALITIES, fidelity=("high", "low"), markup=False
)
_MINI = ModelRules(custom_sizes=False, qualities=BASE_QUALITIES, fidelity=("low",), markup=False)
_V2 = ModelRules(custom_sizes=True, qualities=BASE_QUALITIES, fidelity=None, markup=False)
_V25 = ModelRules(
    custom_sizes=True, qualities=EXTENDED_QUALITIES, fidelity=("high", "low"), markup=True
)
_V26 = ModelRules(
    custom_sizes=True, qualities=BASE_QUALITIES, fidelity=("high", "low"), markup=False
)

MODELS: dict[str, ModelRules] = {
    "gpt-image-1.5": _FIXED,
    "chatgpt-image-latest": _FIXED,
    "gpt-image-1-mini": _MINI,
    "gpt-image-2": _V2,
    "gpt-image-2-2026-04-21": _V2,
    "gpt-image-2.5-sunburst": _V25,
    "gpt-image-2.5-sunburst-2026-09-08": _V25,
    "gpt-image-2.5-flare": _V25,
    "gpt-image-2.5-flare-2026-09-08": _V25,
    "gpt-image-2.6-sunburst": _V26,
    "gpt-image-2.6-flare": _V26,
}
