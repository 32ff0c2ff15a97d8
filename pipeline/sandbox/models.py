"""The sandbox's own model catalogue: rules per model and each model's life cycle.

Independent of the pipeline's catalogue. Source: ../shared/API-FACTS.md ("Models", "Parameters")
and the SDK's `openai.types.ImageModel` (openai 3.57), as of 2026-11-30.

Which models a request may use depends on the sandbox's calendar (`SandboxConfig.today`), the
`unavailable_models` it was told to drop, the key (`key_models`) and `org_verified`; `resolve`
applies them in that order of precedence: unknown -> not for this key -> gone -> unverified.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from pipeline.sandbox.errors import (
    ApiError,
    bad_request,
    model_not_found,
    organization_not_verified,
)

if TYPE_CHECKING:  # config.py takes its defaults from this module
    from pipeline.sandbox.config import SandboxConfig

AS_OF = "2026-11-30"
SOURCE = "../shared/API-FACTS.md"

FIXED_SIZES: tuple[str, ...] = ("1024x1024", "1536x1024", "1024x1536")
DALL_E_2_SIZES: tuple[str, ...] = ("256x256", "512x512", "1024x1024")
BASE_QUALITIES: tuple[str, ...] = ("low", "medium", "high", "auto")
EXTENDED_QUALITIES: tuple[str, ...] = ("low", "medium", "high", "xhigh", "max", "auto")
DALL_E_2_QUALITIES: tuple[str, ...] = ("standard", "auto")

# Largest custom size, in either orientation (API-FACTS: "max 3840x2160").
MAX_LONG_EDGE = 3840
MAX_SHORT_EDGE = 2160
SIZE_MULTIPLE = 16
MAX_ASPECT = 3

DEFAULT_MODEL = "gpt-image-2.5-sunburst"

# Models with GIF and SVG output by default (both need preview access the config can change).
V25_MODELS: tuple[str, ...] = (
    "gpt-image-2.5-sunburst",
    "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.5-flare",
    "gpt-image-2.5-flare-2026-09-08",
)
V26_MODELS: tuple[str, ...] = ("gpt-image-2.6-sunburst", "gpt-image-2.6-flare")
DEFAULT_GIF_MODELS: tuple[str, ...] = (*V25_MODELS, *V26_MODELS)
DEFAULT_SVG_MODELS: tuple[str, ...] = V25_MODELS


@dataclass(frozen=True)
class ModelRules:
    """What one model accepts on `/v1/images/edits`.

    `fidelity` None means `input_fidelity` must be omitted. `gpt_params` False (dall-e-2) means
    the GPT-image-only parameters (background, output_format, ...) are refused.
    """

    custom_sizes: bool
    qualities: tuple[str, ...]
    fidelity: tuple[str, ...] | None
    markup: bool
    complexity: bool = False
    fixed_sizes: tuple[str, ...] = FIXED_SIZES
    auto_size: bool = True
    max_images: int = 16
    max_prompt_chars: int = 32_000
    gpt_params: bool = True


_FIXED = ModelRules(
    custom_sizes=False, qualities=BASE_QUALITIES, fidelity=("high", "low"), markup=False
)
_MINI = ModelRules(custom_sizes=False, qualities=BASE_QUALITIES, fidelity=("low",), markup=False)
_V2 = ModelRules(
    custom_sizes=True, qualities=BASE_QUALITIES, fidelity=None, markup=False, complexity=True
)
_V25 = ModelRules(
    custom_sizes=True,
    qualities=EXTENDED_QUALITIES,
    fidelity=("high", "low"),
    markup=True,
    complexity=True,
)
_V26 = ModelRules(
    custom_sizes=True,
    qualities=BASE_QUALITIES,
    fidelity=("high", "low"),
    markup=False,
    complexity=True,
)
# Only reachable with `today` before 2026-05-12; the edits contract: one square PNG under 4 MB,
# a prompt of at most 1,000 characters, 256/512/1024 squares.
_DALL_E_2 = ModelRules(
    custom_sizes=False,
    qualities=DALL_E_2_QUALITIES,
    fidelity=None,
    markup=False,
    fixed_sizes=DALL_E_2_SIZES,
    auto_size=False,
    max_images=1,
    max_prompt_chars=1000,
    gpt_params=False,
)


@dataclass(frozen=True)
class Lifecycle:
    """Dates from OpenAI's deprecations page. `created` is what `/v1/models` reports: the
    snapshot's date where the name carries one, otherwise a placeholder (not published)."""

    created: date
    shutdown: date | None = None
    announced: date | None = None
    replacements: tuple[str, ...] = ()


@dataclass(frozen=True)
class Model:
    """A model the API knows. `rules` None: it exists but cannot edit images (dall-e-3)."""

    name: str
    rules: ModelRules | None
    lifecycle: Lifecycle
    gpt_image: bool = True


_REPLACED_BY_25 = ("gpt-image-2.5-sunburst", "gpt-image-2.5-flare")
_ENDING = Lifecycle(
    date(2025, 12, 16),
    shutdown=date(2026, 12, 1),
    announced=date(2026, 6, 2),
    replacements=_REPLACED_BY_25,
)
_DALL_E = Lifecycle(date(2022, 11, 3), shutdown=date(2026, 5, 12))

_CATALOGUE: tuple[Model, ...] = (
    Model("gpt-image-1.5", _FIXED, _ENDING),
    Model("chatgpt-image-latest", _FIXED, _ENDING),
    Model("gpt-image-1-mini", _MINI, _ENDING),
    Model(
        "gpt-image-1",
        _FIXED,
        Lifecycle(date(2025, 4, 23), shutdown=date(2026, 10, 23), replacements=_REPLACED_BY_25),
    ),
    Model("gpt-image-2", _V2, Lifecycle(date(2026, 4, 21))),
    Model("gpt-image-2-2026-04-21", _V2, Lifecycle(date(2026, 4, 21))),
    Model("gpt-image-2.5-sunburst", _V25, Lifecycle(date(2026, 9, 8))),
    Model("gpt-image-2.5-sunburst-2026-09-08", _V25, Lifecycle(date(2026, 9, 8))),
    Model("gpt-image-2.5-flare", _V25, Lifecycle(date(2026, 9, 8))),
    Model("gpt-image-2.5-flare-2026-09-08", _V25, Lifecycle(date(2026, 9, 8))),
    Model("gpt-image-2.6-sunburst", _V26, Lifecycle(date(2026, 11, 1))),
    Model("gpt-image-2.6-flare", _V26, Lifecycle(date(2026, 11, 1))),
    Model("dall-e-2", _DALL_E_2, _DALL_E, gpt_image=False),
    Model("dall-e-3", None, _DALL_E, gpt_image=False),
)
MODELS: dict[str, Model] = {model.name: model for model in _CATALOGUE}


@dataclass(frozen=True)
class Access:
    """Which models one request may use: the config's calendar and switches, and its key."""

    today: date
    unavailable: frozenset[str]
    style: str
    org_verified: bool
    allowed: frozenset[str] | None  # None: every model

    @classmethod
    def of(cls, config: SandboxConfig, key: str | None) -> Access:
        allowed = None
        if config.key_models is not None and key is not None:
            listed = config.key_models.get(key)
            allowed = frozenset(listed) if listed is not None else None
        return cls(
            today=config.current_date(),
            unavailable=frozenset(config.unavailable_models),
            style=config.unavailable_style,
            org_verified=config.org_verified,
            allowed=allowed,
        )

    def gone(self, model: Model) -> bool:
        shutdown = model.lifecycle.shutdown
        return model.name in self.unavailable or (shutdown is not None and shutdown <= self.today)

    def listed(self, model: Model) -> bool:
        """Whether `/v1/models` shows the model to this key."""
        return not self.gone(model) and (self.allowed is None or model.name in self.allowed)


def _shut_down(model: Model, access: Access) -> ApiError:
    shutdown = model.lifecycle.shutdown
    when = shutdown if shutdown is not None and shutdown <= access.today else access.today
    message = f"The model `{model.name}` was shut down on {when.isoformat()}."
    if model.lifecycle.replacements:
        message += f" Use {' or '.join(model.lifecycle.replacements)} instead."
    return bad_request(message, param="model", code="invalid_value")


def resolve(name: str, access: Access) -> Model:
    """The model a request names, or the ApiError the API answers for it."""
    model = MODELS.get(name)
    if model is None or (access.allowed is not None and name not in access.allowed):
        raise model_not_found(name)
    if access.gone(model):
        raise _shut_down(model, access) if access.style == "400" else model_not_found(name)
    if model.gpt_image and not access.org_verified:
        raise organization_not_verified(name)
    return model


def retrieve(name: str, access: Access) -> Model:
    """`GET /v1/models/{model}`: 404 for unknown, gone or not-for-this-key models."""
    model = MODELS.get(name)
    if model is None or not access.listed(model):
        raise model_not_found(name)
    if model.gpt_image and not access.org_verified:
        raise organization_not_verified(name)
    return model


def _timestamp(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def model_object(model: Model, access: Access) -> dict[str, Any]:
    """The Model object of `/v1/models`; `shutdown_date` once the shutdown is announced."""
    life = model.lifecycle
    announced = life.shutdown is not None and (
        life.announced is None or life.announced <= access.today
    )
    return {
        "id": model.name,
        "object": "model",
        "created": _timestamp(life.created),
        "owned_by": "system",
        "shutdown_date": life.shutdown.isoformat() if announced and life.shutdown else None,
    }


def model_list(access: Access) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [model_object(m, access) for m in _CATALOGUE if access.listed(m)],
    }
