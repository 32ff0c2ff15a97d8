"""The model catalogue: what each image model accepts on the edit endpoint, loaded from TOML.

The facts live in `pipeline/data/catalog.toml` (with the date and the source of each); a person
can override or add models with their own TOML file (`Settings.catalog_file`), merged key by key
over the built-in entry of the same name.

A model's life cycle is dated (`deprecated_on`, `shutdown_on`, `replacement`); whether it is
current, deprecated or gone on a day is computed (`ModelInfo.state_on`), and `shutdown_notices`
says which models of a batch shut down soon or before the batch would finish.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline import clock
from pipeline.errors import ConfigError
from pipeline.spec import COMPLEXITIES

__all__ = [
    "COMPLEXITIES",
    "TRANSPARENCY",
    "Catalog",
    "Lifecycle",
    "ModelInfo",
    "SdkReview",
    "ShutdownNotice",
    "SizeRule",
    "build_catalog",
    "load_catalog",
    "parse_size",
    "shutdown_notices",
]


class Lifecycle(StrEnum):
    """Where a model is in its life on a given day (computed from its dates)."""

    CURRENT = "current"
    DEPRECATED = "deprecated"  # its end is announced: it still answers, plan a move
    GONE = "gone"  # shut down: the API no longer answers for it; refused at preflight


TRANSPARENCY = ("supported", "preview", "unsupported")
_SIZE_RE = re.compile(r"^(\d{1,6})x(\d{1,6})$")


def parse_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a "WxH" string, or None when it is not one."""
    match = _SIZE_RE.match(size.strip().lower())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class SizeRule:
    """Free sizes: WxH with both sides a multiple of `multiple`, within aspect and edge limits."""

    multiple: int
    max_aspect: float
    max_long_side: int
    max_short_side: int
    experimental_above: tuple[int, int] | None = None

    def check(self, width: int, height: int) -> str | None:
        """None when WxH is allowed, else why not (with what to do)."""
        if width <= 0 or height <= 0:
            return "a side is zero"
        m = self.multiple
        if width % m or height % m:
            near_w = max(m, (width + m // 2) // m * m)
            near_h = max(m, (height + m // 2) // m * m)
            return f"width and height must both be divisible by {m} (nearest: {near_w}x{near_h})"
        long_side, short_side = max(width, height), min(width, height)
        if long_side / short_side > self.max_aspect:
            ratio = _ratio_text(width, height)
            limit = _number(self.max_aspect)
            return f"aspect ratio {ratio} is outside 1:{limit}..{limit}:1"
        if long_side > self.max_long_side or short_side > self.max_short_side:
            return (
                f"larger than the maximum {self.max_long_side}x{self.max_short_side} "
                f"(long side <= {self.max_long_side}, short side <= {self.max_short_side})"
            )
        return None

    def is_experimental(self, width: int, height: int) -> bool:
        if self.experimental_above is None:
            return False
        ew, eh = self.experimental_above
        return width * height > ew * eh


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _ratio_text(width: int, height: int) -> str:
    if width >= height:
        return f"{_number(round(width / height, 2))}:1"
    return f"1:{_number(round(height / width, 2))}"


@dataclass(frozen=True)
class ModelInfo:
    """What one model accepts, and where that knowledge comes from."""

    name: str
    deprecated_on: dt.date | None
    shutdown_on: dt.date | None
    replacement: str | None
    sizes: tuple[str, ...]
    size_rule: SizeRule | None
    qualities: tuple[str, ...]
    input_fidelity: tuple[str, ...]  # empty: the parameter must be omitted
    transparent_background: str  # one of TRANSPARENCY
    output_formats: tuple[str, ...]
    max_images: int
    max_prompt_chars: int
    max_n: int
    mask: bool
    markup: bool
    source: str
    # The parameters added by openai 3.57. None: the catalogue does not know whether the model
    # takes it (preflight says so and passes the value through); () / False: it does not.
    complexity: tuple[str, ...] | None = None
    gif: bool | None = None
    svg: bool | None = None
    params_source: str | None = None  # where the three facts above come from

    def state_on(self, day: dt.date) -> Lifecycle:
        """Current, deprecated or gone on `day`."""
        if self.shutdown_on is not None and day >= self.shutdown_on:
            return Lifecycle.GONE
        if self.deprecated_on is not None:
            return Lifecycle.DEPRECATED if day >= self.deprecated_on else Lifecycle.CURRENT
        # A shutdown date with no announcement date is itself the announcement.
        return Lifecycle.DEPRECATED if self.shutdown_on is not None else Lifecycle.CURRENT

    @property
    def state(self) -> Lifecycle:
        """The state today (`pipeline.clock.today()`)."""
        return self.state_on(clock.today())

    def gone_reason(self) -> str:
        """What preflight says about a gone model: the date, the replacement, the switch."""
        text = f"model {self.name} was shut down on {self.shutdown_on}"
        if self.replacement:
            text += (
                f": use {self.replacement} instead (--model-map "
                f"{self.name}={self.replacement} switches every row)"
            )
        return text

    def check_size(self, size: str) -> str | None:
        """None when `size` is accepted, else the reason (naming what would be accepted)."""
        if size in self.sizes:
            return None
        listed = ", ".join(self.sizes)
        if self.size_rule is None:
            return f"size {size!r} is not available on {self.name}: use one of {listed}"
        parsed = parse_size(size)
        if parsed is None:
            return (
                f"size {size!r} is not available on {self.name}: give WIDTHxHEIGHT "
                f"(e.g. 1536x864) or one of {listed}"
            )
        reason = self.size_rule.check(*parsed)
        return None if reason is None else f"size {size} is not available on {self.name}: {reason}"

    def size_note(self, size: str) -> str | None:
        """A warning worth showing for an accepted size (experimental resolutions)."""
        rule, parsed = self.size_rule, parse_size(size)
        if rule is None or parsed is None or rule.experimental_above is None:
            return None
        if size not in self.sizes and rule.check(*parsed) is None and rule.is_experimental(*parsed):
            ew, eh = rule.experimental_above
            return f"size {size} is above {ew}x{eh}: experimental on {self.name}"
        return None


@dataclass(frozen=True)
class SdkReview:
    """What the catalogue was last checked against: the openai SDK version, and the SDK's edit
    parameters and models the project leaves out on purpose (name -> why).

    `tests/unit/intake/test_sdk_drift.py` holds the installed SDK against it.
    """

    version: str
    ignored_params: Mapping[str, str]
    ignored_models: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class Catalog:
    """All known models. `as_of` is the date the facts were checked."""

    as_of: str
    models: Mapping[str, ModelInfo]
    source: str = ""
    sdk: SdkReview | None = None

    def get(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    def names(self) -> tuple[str, ...]:
        """Every model name, sorted."""
        return tuple(sorted(self.models))

    def usable(self, day: dt.date | None = None) -> tuple[str, ...]:
        """Models that can still be called on `day` (default today): not gone, sorted."""
        on = day or clock.today()
        return tuple(n for n in self.names() if self.models[n].state_on(on) != Lifecycle.GONE)

    def current(self, day: dt.date | None = None) -> tuple[str, ...]:
        """Models current on `day` (default today), sorted."""
        on = day or clock.today()
        return tuple(n for n in self.names() if self.models[n].state_on(on) == Lifecycle.CURRENT)

    def with_markup(self) -> tuple[str, ...]:
        return tuple(n for n in self.usable() if self.models[n].markup)

    def known_to_take(self, param: str) -> tuple[str, ...]:
        """Usable models the catalogue knows to take `param` ("complexity", "gif", "svg")."""
        return tuple(n for n in self.usable() if getattr(self.models[n], param))

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models[n] for n in self.names())

    def __len__(self) -> int:
        return len(self.models)


# --- loading -----------------------------------------------------------------------------

_MODEL_KEYS = {
    "deprecated_on",
    "shutdown_on",
    "replacement",
    "sizes",
    "size_rule",
    "qualities",
    "input_fidelity",
    "transparent_background",
    "output_formats",
    "max_images",
    "max_prompt_chars",
    "max_n",
    "mask",
    "markup",
    "source",
    "complexity",
    "gif",
    "svg",
    "params_source",
}
_RULE_KEYS = {"multiple", "max_aspect", "max_long_side", "max_short_side", "experimental_above"}
_TOP_KEYS = {"as_of", "source", "defaults", "models", "sdk"}
_SDK_KEYS = {"version", "ignored_params", "ignored_models"}


class _Reader:
    """Typed access to one model's merged table, with errors that name the file and the key."""

    def __init__(self, origin: str, model: str, data: Mapping[str, Any]) -> None:
        self.origin, self.model, self.data = origin, model, data

    def fail(self, key: str, expected: str) -> ConfigError:
        value = self.data.get(key)
        return ConfigError(
            f"{self.origin}: model {self.model!r}: {key} = {value!r}: expected {expected}"
        )

    def need(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.origin}: model {self.model!r} lacks {key!r}")
        return self.data[key]

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.need(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a list of strings")
        return tuple(v.lower() for v in value)

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self.need(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"a whole number >= {minimum}")
        return value

    def flag(self, key: str) -> bool:
        value = self.need(key)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.need(key)
        if value not in choices:
            raise self.fail(key, "one of " + ", ".join(choices))
        return str(value)

    def optional_flag(self, key: str) -> bool | None:
        """None when the key is left out (unknown), else true or false."""
        return None if key not in self.data else self.flag(key)

    def optional_choices(self, key: str, choices: tuple[str, ...]) -> tuple[str, ...] | None:
        """None when the key is left out (unknown); else a list drawn from `choices`."""
        if key not in self.data:
            return None
        values = self.strings(key)
        if not set(values) <= set(choices):
            raise self.fail(key, "a list drawn from " + ", ".join(choices) + " ([] for none)")
        return values

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string")
        return value

    def optional_date(self, key: str) -> dt.date | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            return value.date()
        if isinstance(value, dt.date):
            return value
        if isinstance(value, str):
            try:
                return dt.date.fromisoformat(value)
            except ValueError:
                pass
        raise self.fail(key, "a date (YYYY-MM-DD)")

    def size_rule(self) -> SizeRule | None:
        value = self.data.get("size_rule")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("size_rule", "a table")
        unknown = set(value) - _RULE_KEYS
        if unknown:
            raise ConfigError(
                f"{self.origin}: model {self.model!r}: unknown size_rule key(s) "
                f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(_RULE_KEYS))})"
            )
        rule = _Reader(self.origin, f"{self.model}.size_rule", value)
        aspect = rule.need("max_aspect")
        if isinstance(aspect, bool) or not isinstance(aspect, int | float) or aspect < 1:
            raise rule.fail("max_aspect", "a number >= 1")
        experimental = None
        if "experimental_above" in value:
            raw = value["experimental_above"]
            experimental = parse_size(raw) if isinstance(raw, str) else None
            if experimental is None:
                raise rule.fail("experimental_above", "a size such as '2560x1440'")
        return SizeRule(
            multiple=rule.integer("multiple", 1),
            max_aspect=float(aspect),
            max_long_side=rule.integer("max_long_side", 1),
            max_short_side=rule.integer("max_short_side", 1),
            experimental_above=experimental,
        )


def _model(name: str, data: Mapping[str, Any], origin: str) -> ModelInfo:
    if "lifecycle" in data or "retired_on" in data:
        raise ConfigError(
            f"{origin}: model {name!r}: `lifecycle` and `retired_on` are no longer read: a "
            "model's state is computed from its dates. Write `shutdown_on = YYYY-MM-DD` (and "
            "`deprecated_on`, `replacement`) instead"
        )
    unknown = set(data) - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"{origin}: model {name!r}: unknown key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_MODEL_KEYS))})"
        )
    r = _Reader(origin, name, data)
    deprecated_on = r.optional_date("deprecated_on")
    shutdown_on = r.optional_date("shutdown_on")
    if deprecated_on and shutdown_on and deprecated_on > shutdown_on:
        raise ConfigError(
            f"{origin}: model {name!r}: deprecated_on {deprecated_on} is after shutdown_on "
            f"{shutdown_on}"
        )
    sizes = r.strings("sizes")
    for size in sizes:
        if size != "auto" and parse_size(size) is None:
            raise r.fail("sizes", "sizes such as '1024x1024' or 'auto'")
    for special in ("gif", "svg"):
        if special in r.strings("output_formats"):
            raise r.fail("output_formats", f"png, webp, jpeg (say {special} = true instead)")
    return ModelInfo(
        name=name,
        deprecated_on=deprecated_on,
        shutdown_on=shutdown_on,
        replacement=r.optional_text("replacement"),
        sizes=sizes,
        size_rule=r.size_rule(),
        qualities=r.strings("qualities"),
        input_fidelity=r.strings("input_fidelity"),
        transparent_background=r.choice("transparent_background", TRANSPARENCY),
        output_formats=r.strings("output_formats"),
        max_images=r.integer("max_images"),
        max_prompt_chars=r.integer("max_prompt_chars", 1),
        max_n=r.integer("max_n", 1),
        mask=r.flag("mask"),
        markup=r.flag("markup"),
        source=r.optional_text("source") or origin,
        complexity=r.optional_choices("complexity", COMPLEXITIES),
        gif=r.optional_flag("gif"),
        svg=r.optional_flag("svg"),
        params_source=r.optional_text("params_source"),
    )


def _reasons(table: Any, key: str) -> dict[str, str]:
    origin = "built-in catalogue: [sdk]"
    if table is None:
        return {}
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in table.items()
    ):
        raise ConfigError(f"{origin}: {key} must map each name to the reason (a string)")
    return dict(table)


def _sdk(data: Any) -> SdkReview | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError("built-in catalogue: [sdk] must be a table")
    unknown = set(data) - _SDK_KEYS
    if unknown:
        raise ConfigError(
            f"built-in catalogue: [sdk]: unknown key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_SDK_KEYS))})"
        )
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise ConfigError('built-in catalogue: [sdk] needs version = "X.Y.Z" (a string)')
    return SdkReview(
        version=version,
        ignored_params=_reasons(data.get("ignored_params"), "ignored_params"),
        ignored_models=_reasons(data.get("ignored_models"), "ignored_models"),
    )


def _tables(data: Mapping[str, Any], origin: str) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{origin}: unknown top-level key(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(_TOP_KEYS))})"
        )
    defaults = data.get("defaults", {})
    models = data.get("models", {})
    if not isinstance(defaults, dict) or not isinstance(models, dict):
        raise ConfigError(f"{origin}: [defaults] and [models] must be tables")
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(f'{origin}: models.{name} must be a table ([models."{name}"])')
    return defaults, models


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Key-by-key merge; a nested table (size_rule) merges too."""
    merged = dict(base)
    for key, value in top.items():
        old = merged.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value}
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"catalogue file not found: {path} (setting catalog_file)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


@lru_cache(maxsize=1)
def _builtin_data() -> dict[str, Any]:
    text = (resources.files("pipeline") / "data" / "catalog.toml").read_text("utf-8")
    return tomllib.loads(text)


def build_catalog(
    builtin: Mapping[str, Any],
    override: Mapping[str, Any] | None = None,
    override_origin: str = "catalogue override",
) -> Catalog:
    """A Catalog from already-parsed TOML data (the built-in table and an optional override)."""
    defaults, models = _tables(builtin, "built-in catalogue")
    raw = {name: _merge(defaults, entry) for name, entry in models.items()}
    origins = dict.fromkeys(raw, "built-in catalogue")
    as_of = str(builtin.get("as_of", "unknown"))
    source = str(builtin.get("source", "built-in catalogue"))
    if override is not None:
        o_defaults, o_models = _tables(override, override_origin)
        if "sdk" in override:
            raise ConfigError(
                f"{override_origin}: [sdk] is only read from the built-in catalogue (it records "
                "what the project checked against the installed openai SDK)"
            )
        if o_defaults:
            raise ConfigError(
                f"{override_origin}: [defaults] is only read from the built-in catalogue; "
                "set the keys on each model instead"
            )
        for name, entry in o_models.items():
            raw[name] = _merge(raw.get(name, defaults), entry)
            origins[name] = override_origin
        if "as_of" in override:
            as_of = f"{override['as_of']} (overrides) / {as_of}"
        source = f"{override.get('source', override_origin)}; {source}"
    infos = {name: _model(name, entry, origins[name]) for name, entry in raw.items()}
    return Catalog(as_of=as_of, models=infos, source=source, sdk=_sdk(builtin.get("sdk")))


@lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    return build_catalog(_builtin_data())


def load_catalog(override: Path | None = None) -> Catalog:
    """The built-in catalogue, with the models of `override` (a TOML file) merged over it.

    The built-in catalogue alone is built once per process; an override file is read each call.
    """
    if override is None:
        return _default_catalog()
    return build_catalog(_builtin_data(), _read_toml(override), str(override))


@dataclass(frozen=True)
class ShutdownNotice:
    """A model of a batch that shuts down soon: when, what replaces it, and whether the batch
    would still be running then."""

    model: str
    shutdown_on: dt.date
    days_left: int
    replacement: str | None
    straddles: bool  # the batch's estimated finish is on or after the shutdown
    rows: int

    def text(self, batch_id: int | None = None) -> str:
        """One line for a person: what happens, and the command that switches."""
        when = (
            "today"
            if self.days_left == 0
            else ("tomorrow" if self.days_left == 1 else f"in {self.days_left} days")
        )
        line = f"{self.model} ({self.rows} rows) shuts down on {self.shutdown_on} ({when})"
        if self.straddles:
            line += (
                ": this batch would straddle the shutdown (its estimated finish is later), so "
                "its last jobs would be held"
            )
        if self.replacement:
            switch = f"--model-map {self.model}={self.replacement}"
            line += f"; replacement {self.replacement}: switch with `{switch}`"
            if batch_id is not None:
                line += f" (on this batch: `editbatch resume {batch_id} {switch}`)"
        return line


def shutdown_notices(
    catalog: Catalog,
    rows_by_model: Mapping[str, int],
    *,
    warn_days: int,
    finish: dt.datetime | None = None,
    today: dt.date | None = None,
) -> list[ShutdownNotice]:
    """Models of a batch that shut down within `warn_days` of `today`, or before `finish` (the
    batch's estimated end, UTC). Gone models are not here: preflight refuses their rows."""
    day = today or clock.today()
    notices = []
    for model, rows in sorted(rows_by_model.items()):
        info = catalog.get(model)
        if info is None or info.shutdown_on is None or info.state_on(day) == Lifecycle.GONE:
            continue
        days_left = (info.shutdown_on - day).days
        straddles = finish is not None and finish.date() >= info.shutdown_on
        if days_left <= warn_days or straddles:
            notices.append(
                ShutdownNotice(
                    model, info.shutdown_on, days_left, info.replacement, straddles, rows
                )
            )
    return notices
