"""Prices as data and the exact cost of one call from its token usage.

All money is `decimal.Decimal`. A cost is summed from unrounded products and rounded once, to
the micro-dollar (ROUND_HALF_UP), so 100k jobs add up without float drift.

Batch prices (the batch route, OpenAI's Batch API) are the sync prices times the `[batch]`
factor of the same file (0.5), dated and sourced beside them: `PriceTable.for_route("batch")`.
A line's cost at batch prices is kept exactly (`exact_cost`: at most 9 decimal places), never
rounded per line, so a provider batch of 50,000 lines adds up to the provider's bill.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

MICRO = Decimal("0.000001")
PER_TOKEN = Decimal(1_000_000)


@dataclass(frozen=True)
class Usage:
    """Token usage of one call, as the API reported it (or as we estimated it)."""

    text_input: int = 0
    image_input: int = 0
    image_output: int = 0
    text_output: int = 0
    cached_text_input: int = 0
    cached_image_input: int = 0


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens for one model, with where the figures come from."""

    model: str
    text_input: Decimal
    image_input: Decimal
    image_output: Decimal
    text_output: Decimal
    cached_text_input: Decimal | None
    cached_image_input: Decimal | None
    source: str
    checked_on: str = ""  # when the figures were last checked against the source

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of `usage`, rounded once to the micro-dollar."""
        return quantize(self.exact_cost(usage))

    def exact_cost(self, usage: Usage) -> Decimal:
        """Cost of `usage`, not rounded (tokens x USD per 1M / 1M is exact in Decimal)."""
        cached_text = (
            self.cached_text_input if self.cached_text_input is not None else (self.text_input)
        )
        cached_image = (
            self.cached_image_input if self.cached_image_input is not None else (self.image_input)
        )
        total = (
            (usage.text_input - usage.cached_text_input) * self.text_input
            + usage.cached_text_input * cached_text
            + (usage.image_input - usage.cached_image_input) * self.image_input
            + usage.cached_image_input * cached_image
            + usage.image_output * self.image_output
            + usage.text_output * self.text_output
        )
        return total / PER_TOKEN

    def scaled(self, factor: Decimal, source: str) -> ModelPrice:
        """These prices times `factor` (batch prices), with `source` saying where that is from."""

        def times(value: Decimal | None) -> Decimal | None:
            return None if value is None else value * factor

        return ModelPrice(
            model=self.model,
            text_input=self.text_input * factor,
            image_input=self.image_input * factor,
            image_output=self.image_output * factor,
            text_output=self.text_output * factor,
            cached_text_input=times(self.cached_text_input),
            cached_image_input=times(self.cached_image_input),
            source=source,
        )


@dataclass(frozen=True)
class BatchDiscount:
    """What the batch route pays: the sync prices times `factor`, as of a date, from a source."""

    factor: Decimal
    as_of: str
    source: str


NO_DISCOUNT = BatchDiscount(Decimal(1), "unknown", "no [batch] table: batch priced as sync")


def quantize(value: Decimal) -> Decimal:
    return value.quantize(MICRO, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class PriceTable:
    """Prices per model, and per provider where a provider bills differently (its overrides
    win for its calls; `pipeline.providers.ProviderSet.prices` adds them)."""

    as_of: str
    source: str
    models: dict[str, ModelPrice]
    batch: BatchDiscount = NO_DISCOUNT
    route: str = "sync"
    providers: Mapping[str, Mapping[str, ModelPrice]] = field(default_factory=dict)
    default_provider: str | None = None  # whose overrides apply to a call naming no provider

    def for_route(self, route: str) -> PriceTable:
        """The prices a route pays: this table for sync, every price (a provider's own too) x
        the batch factor for batch."""
        if route == "sync" or self.route == route:
            return self
        if route != "batch":
            raise ValueError(f"unknown route {route!r}")
        source = f"{self.batch.source} (x{self.batch.factor}, as of {self.batch.as_of})"
        factor = self.batch.factor
        models = {name: p.scaled(factor, source) for name, p in self.models.items()}
        providers = {
            provider: {name: p.scaled(factor, source) for name, p in own.items()}
            for provider, own in self.providers.items()
        }
        as_of = f"{self.batch.as_of} (batch) / {self.as_of}"
        return PriceTable(
            as_of,
            self.source,
            models,
            self.batch,
            route="batch",
            providers=providers,
            default_provider=self.default_provider,
        )

    def exact_cost(self, model: str, usage: Usage, provider: str | None = None) -> Decimal | None:
        """Unrounded cost of `usage` on `model`; None when the model has no price."""
        price = self.get(model, provider)
        return None if price is None else price.exact_cost(usage)

    def get(self, model: str, provider: str | None = None) -> ModelPrice | None:
        provider = provider or self.default_provider
        if provider is not None:
            own = self.providers.get(provider, {}).get(model)
            if own is not None:
                return own
        return self.models.get(model)

    def cost(self, model: str, usage: Usage, provider: str | None = None) -> Decimal | None:
        """Cost of `usage` on `model` (at `provider`'s price if it has its own), or None when
        the model has no price (never a silent 0)."""
        price = self.get(model, provider)
        return None if price is None else price.cost(usage)

    def with_providers(
        self, overrides: Mapping[str, Mapping[str, ModelPrice]], default: str | None = None
    ) -> PriceTable:
        """This table with per-provider prices added (a new table; this one is shared)."""
        return replace(self, providers={**self.providers, **overrides}, default_provider=default)


def _decimal(model: str, name: str, value: Any, origin: str) -> Decimal:
    try:
        result = Decimal(str(value))
    except ArithmeticError as exc:
        raise ConfigError(f"{origin}: model {model!r}: {name} = {value!r} is not a number") from exc
    if result < 0:
        raise ConfigError(f"{origin}: model {model!r}: {name} must not be negative")
    return result


def _batch(data: dict[str, Any], origin: str) -> BatchDiscount | None:
    table = data.get("batch")
    if table is None:
        return None
    if not isinstance(table, dict) or "factor" not in table:
        raise ConfigError(f'{origin}: [batch] needs factor = "0.5" (and as_of, source)')
    factor = _decimal("[batch]", "factor", table["factor"], origin)
    if not 0 < factor <= 1:
        raise ConfigError(f"{origin}: [batch] factor must be above 0 and at most 1")
    return BatchDiscount(
        factor, str(table.get("as_of", "unknown")), str(table.get("source", origin))
    )


def _parse(data: dict[str, Any], origin: str) -> tuple[str, str, dict[str, ModelPrice]]:
    models: dict[str, ModelPrice] = {}
    for name, entry in (data.get("models") or {}).items():
        missing = [k for k in ("text_input", "image_input", "image_output") if k not in entry]
        if missing:
            raise ConfigError(f"{origin}: model {name!r} lacks {', '.join(missing)}")

        def opt(key: str, model: str = name, e: dict[str, Any] = entry) -> Decimal | None:
            return _decimal(model, key, e[key], origin) if key in e else None

        text_input = _decimal(name, "text_input", entry["text_input"], origin)
        models[name] = ModelPrice(
            model=name,
            text_input=text_input,
            image_input=_decimal(name, "image_input", entry["image_input"], origin),
            image_output=_decimal(name, "image_output", entry["image_output"], origin),
            text_output=opt("text_output") or text_input,
            cached_text_input=opt("cached_text_input"),
            cached_image_input=opt("cached_image_input"),
            source=str(entry.get("source", data.get("source", origin))),
            checked_on=str(entry.get("checked_on", data.get("as_of", ""))),
        )
    return str(data.get("as_of", "unknown")), str(data.get("source", origin)), models


def parse_price_models(
    models: Mapping[str, Any], origin: str, source: str
) -> dict[str, ModelPrice]:
    """Model prices from a table shaped like prices.toml's [models] (e.g. a provider's
    overrides); ConfigError naming `origin` and the model."""
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{origin}: model {name!r} must be a table of prices")
    return _parse({"models": dict(models), "source": source}, origin)[2]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"price file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


@lru_cache(maxsize=8)
def load_prices(override: Path | None = None) -> PriceTable:
    """The built-in table, with the models of `override` (a TOML file) replacing or adding."""
    builtin = resources.files("pipeline") / "data" / "prices.toml"
    data = tomllib.loads(builtin.read_text("utf-8"))
    as_of, source, models = _parse(data, "built-in prices")
    batch = _batch(data, "built-in prices") or NO_DISCOUNT
    if override is not None:
        extra = _read_toml(override)
        o_as_of, o_source, o_models = _parse(extra, str(override))
        models = {**models, **o_models}
        as_of, source = f"{o_as_of} (overrides) / {as_of}", f"{o_source}; {source}"
        batch = _batch(extra, str(override)) or batch
    return PriceTable(as_of=as_of, source=source, models=models, batch=batch)
