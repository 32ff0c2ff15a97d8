"""Providers: where edit calls go, each with its own lanes, limits, prices and rules.

    openai      OpenAI's API (or OPENAI_BASE_URL), with OPENAI_API_KEY: the default provider
    azure       Azure OpenAI: an endpoint, an api-version, deployments per model (several for
                one model, even in other regions, spread a batch over them), an api-key or
                Entra ID (azure-identity's token provider)
    compatible  any OpenAI-compatible base URL (a LiteLLM proxy, Portkey), with its own key

A **lane** is one (provider, deployment). The limiter keys images per minute, in-flight slots
and 429 pauses by lane (`Lane.scope`), and a worker takes its permit from whichever lane of the
job's provider and model has capacity (`Limiter.permit_any`), so a night is not held to one
deployment's 10 requests a minute. For OpenAI and compatible gateways the deployment is the
model itself: one lane per model, as OpenAI limits each model apart. Azure lanes count requests,
OpenAI's count images (n summed).

Where they come from (docs/providers.md):

    environment  OPENAI_API_KEY / OPENAI_BASE_URL make `openai`; the SDK's Azure variables plus
                 one mapping make `azure`: AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY,
                 OPENAI_API_VERSION, EDITBATCH_AZURE_DEPLOYMENTS="gpt-image-2=my-deployment,..."
    TOML         [providers.NAME] tables in the EDITBATCH_CONFIG file: several providers, each
                 with its limits, price overrides and catalogue differences (`PROVIDER_KEYS`);
                 a table replaces the provider of the same name made from the environment
    choice       EDITBATCH_PROVIDER (or `--provider`) for a batch; a manifest column `provider`
                 for a row

Every mistake is a ConfigError naming the variable or the TOML key. Keys are read from the
environment (`api_key_env`) or the TOML file, never stored in the database; a lane's Redis key
holds a one-way hash of the endpoint or key only (`LaneLimit.account`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from pipeline.cost.pricing import ModelPrice, PriceTable, parse_price_models
from pipeline.errors import ConfigError
from pipeline.settings import Settings, limit_problem

__all__ = [
    "AZURE_DEFAULT_QUALITY",
    "AZURE_FORMATS",
    "DEFAULT_PROVIDER",
    "ENTRA_SCOPE",
    "PROVIDER_KEYS",
    "Auth",
    "Connection",
    "Kind",
    "Lane",
    "LaneLimit",
    "Provider",
    "ProviderSet",
    "account_id",
    "check_name",
    "parse_deployment_pairs",
    "providers_of",
    "sandbox_overrides",
]

DEFAULT_PROVIDER = "openai"
ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"
"""The token audience of Azure OpenAI's classic paths (the v1 path also takes
https://ai.azure.com/.default: set `token_scope`)."""
AZURE_V1 = "v1"
"""`api_version = "v1"`: Azure's v1 path (`{endpoint}/openai/v1/`, the plain OpenAI client)."""
AZURE_FORMATS = ("png", "jpeg")
# Azure's image edits default to quality high (API-FACTS); OpenAI's "auto" lets the model choose.
AZURE_DEFAULT_QUALITY = "high"
"""Azure documents PNG and JPEG, in and out: no WEBP (nor GIF or SVG) output, no WEBP input."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_FORMATS = ("png", "webp", "jpeg", "gif", "svg")
_INPUT_FORMATS = ("png", "webp", "jpeg")


class Kind(StrEnum):
    """What speaks at the other end."""

    OPENAI = "openai"
    AZURE = "azure"
    COMPATIBLE = "compatible"


class Auth(StrEnum):
    """How an Azure provider signs in."""

    API_KEY = "api_key"
    ENTRA_ID = "entra_id"


PROVIDER_KEYS: Mapping[str, str] = {
    "kind": "openai, azure or compatible (a provider named openai or azure may leave it out)",
    "base_url": "openai, compatible: the API base URL, e.g. https://litellm.internal/v1",
    "endpoint": "azure: the resource, https://NAME.openai.azure.com (default "
    "AZURE_OPENAI_ENDPOINT)",
    "api_version": "azure: e.g. 2025-04-01-preview, or v1 for the /openai/v1/ path (default "
    "OPENAI_API_VERSION)",
    "api_key_env": "the environment variable holding the key (default OPENAI_API_KEY, or "
    "AZURE_OPENAI_API_KEY on azure)",
    "api_key": "the key itself (prefer api_key_env: a file is easier to leak)",
    "auth": "azure: api_key or entra_id (DefaultAzureCredential; pip install 'editbatch[azure]')",
    "token_scope": f"azure with entra_id: the token audience (default {ENTRA_SCOPE})",
    "deployments": "azure (required), compatible: model -> deployment name, a list of names, or "
    "tables {name, endpoint, api_key_env, requests_per_minute, max_in_flight}",
    "models": "openai, compatible: the models it serves (default: any in the catalogue)",
    "images_per_minute": "openai, compatible: images per minute of each model's lane",
    "requests_per_minute": "azure: requests per minute of each deployment",
    "max_in_flight": "calls in flight per lane, across every worker",
    "burst": "calls a lane may start at once after a quiet spell (default 1)",
    "model_limits": "openai, compatible: {model = {images_per_minute, max_in_flight, burst}}",
    "output_formats": "output formats it makes (default: the catalogue's; azure: png, jpeg)",
    "input_formats": "input image formats it takes (default: png, webp, jpeg; azure: png, jpeg)",
    "prices": "{model = {text_input, image_input, image_output, ...}} in USD per 1M tokens, "
    "over the price table (as in EDITBATCH_PRICES_FILE)",
}
_DEPLOYMENT_KEYS = (
    "name",
    "endpoint",
    "api_key_env",
    "api_key",
    "requests_per_minute",
    "images_per_minute",
    "max_in_flight",
    "burst",
)


def account_id(secret: str) -> str:
    """A short, one-way id of a key or an endpoint, for Redis key names (never the key)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LaneLimit:
    """Limits of one lane; None means no limit of that kind.

    `per_minute` counts images (OpenAI, compatible) or requests (Azure lanes, `Lane.units`).
    `account` names the credential or endpoint in Redis keys (a hash; "" = the limiter's own).
    """

    per_minute: int | None = None
    max_in_flight: int | None = None
    burst: int = 1
    account: str = ""

    @property
    def active(self) -> bool:
        return bool(self.per_minute or self.max_in_flight)


@dataclass(frozen=True)
class Connection:
    """How to reach one endpoint with one credential: the gateway builds one SDK client each."""

    kind: Kind
    url: str | None  # base URL (openai, compatible; None: api.openai.com), or Azure's endpoint
    api_version: str | None = None
    auth: Auth = Auth.API_KEY
    token_scope: str = ENTRA_SCOPE
    key_source: str = field(default="", compare=False)  # for messages: a variable or TOML key
    api_key: str = field(default="", repr=False)

    @property
    def azure_v1(self) -> bool:
        return self.kind == Kind.AZURE and self.api_version == AZURE_V1

    def describe(self) -> str:
        """Where calls go, for messages and `doctor` (no secret)."""
        if self.kind == Kind.AZURE:
            path = "/openai/v1/" if self.azure_v1 else f" api-version {self.api_version}"
            return f"{self.url}{path}"
        return self.url or "https://api.openai.com/v1"


@dataclass(frozen=True)
class Lane:
    """One (provider, deployment): what a call is sent to, and the scope its limits apply to."""

    provider: str
    model: str
    deployment: str  # sent as the request's `model`: Azure's deployment, else the model name
    connection: Connection
    limit: LaneLimit
    scope: str  # "provider:deployment" ("@host" added for a deployment on its own endpoint)
    per_request: bool = False  # Azure counts requests per minute; OpenAI counts images

    def units(self, n: int) -> int:
        """What one call of `n` images costs this lane's rate."""
        return 1 if self.per_request else max(n, 1)


@dataclass(frozen=True)
class Provider:
    """One configured provider."""

    name: str
    kind: Kind
    connection: Connection
    origin: str  # where it was configured, for messages
    deployments: Mapping[str, tuple[Lane, ...]] = field(default_factory=dict)  # model -> lanes
    models: tuple[str, ...] | None = None  # None: any model (the catalogue decides)
    default_limit: LaneLimit = LaneLimit()
    model_limits: Mapping[str, LaneLimit] = field(default_factory=dict)
    output_formats: tuple[str, ...] | None = None  # None: as the catalogue says
    input_formats: tuple[str, ...] | None = None
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    # What a row's quality "auto" (none given) means there; None: the model decides (OpenAI).
    default_quality: str | None = None

    def serves(self, model: str) -> bool:
        if model in self.deployments:
            return True
        if self.kind == Kind.AZURE:
            return False
        return self.models is None or model in self.models

    def served(self) -> tuple[str, ...] | None:
        """The models it serves, sorted; None when any model of the catalogue."""
        if self.kind == Kind.AZURE:
            return tuple(sorted(self.deployments))
        if self.models is None:
            return None
        return tuple(sorted({*self.models, *self.deployments}))

    def not_served(self, model: str) -> str:
        """Why `model` cannot go to this provider, and what to do."""
        served = self.served() or ()
        listed = ", ".join(served) or "none"
        if self.kind == Kind.AZURE:
            return (
                f"provider {self.name} has no deployment of {model} (it deploys {listed}): "
                f"choose one of those models, another provider, or add a deployment of "
                f"{model} ({self.origin})"
            )
        return (
            f"provider {self.name} does not serve {model} (it serves {listed}): choose one of "
            f"those models or another provider, or add it to `models` ({self.origin})"
        )

    def lanes(self, model: str) -> tuple[Lane, ...]:
        """The lanes a call for `model` may take; ConfigError when the provider lacks it."""
        lanes = self.deployments.get(model)
        if lanes:
            return lanes
        if not self.serves(model):
            raise ConfigError(self.not_served(model))
        return (self._model_lane(model),)

    def _model_lane(self, model: str) -> Lane:
        return Lane(
            provider=self.name,
            model=model,
            deployment=model,
            connection=self.connection,
            limit=self.model_limits.get(model, self.default_limit),
            scope=f"{self.name}:{model}",
        )

    def all_lanes(self) -> list[Lane]:
        """Every lane known without a job: the deployments, and models with their own limits."""
        lanes = [lane for group in self.deployments.values() for lane in group]
        lanes.extend(self._model_lane(m) for m in self.model_limits if m not in self.deployments)
        return lanes


@dataclass(frozen=True)
class ProviderSet:
    """Every configured provider, and the default one."""

    default: str
    providers: Mapping[str, Provider]

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.providers))

    def get(self, name: str | None) -> Provider:
        """The provider called `name` (None: the default); ConfigError naming the choices."""
        key = name or self.default
        provider = self.providers.get(key)
        if provider is None:
            raise ConfigError(
                f"unknown provider {key!r}: the configured providers are "
                f"{', '.join(self.names())} (docs/providers.md)"
            )
        return provider

    def lanes(self, provider: str | None, model: str) -> tuple[Lane, ...]:
        return self.get(provider).lanes(model)

    def limit_for(self, scope: str) -> LaneLimit:
        """The limits of the lane `scope` ("provider:deployment"); none for an unknown scope."""
        name, sep, rest = scope.partition(":")
        provider = self.providers.get(name)
        if not sep or provider is None:
            return LaneLimit()
        for lane in provider.all_lanes():
            if lane.scope == scope:
                return lane.limit
        if provider.kind == Kind.AZURE:
            return LaneLimit()
        return provider.model_limits.get(rest, provider.default_limit)

    def any_limit(self) -> bool:
        """Is any lane limited (so the workers need the shared limiter)?"""
        return any(
            p.default_limit.active or any(lane.limit.active for lane in p.all_lanes())
            for p in self.providers.values()
        )

    def connections(self) -> list[Connection]:
        """Every endpoint and credential a call may use (one SDK client each)."""
        seen: dict[Connection, None] = {}
        for provider in self.providers.values():
            seen[provider.connection] = None
            for lane in provider.all_lanes():
                seen[lane.connection] = None
        return list(seen)

    def prices(self, base: PriceTable) -> PriceTable:
        """`base` with each provider's price overrides (`PriceTable.get(model, provider)`)."""
        overrides = {name: dict(p.prices) for name, p in self.providers.items() if p.prices}
        return base.with_providers(overrides, self.default) if overrides else base


# -- the sandbox (`editbatch run --sandbox`) -----------------------------------------------------

SANDBOX_KEY = "sk-sandbox-local"


def sandbox_overrides(settings: Settings, root: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Field values (for `Settings.model_copy(update=...)`: whole tables, not merged into the
    TOML's) that send every provider's calls to the sandbox at `root` (its OpenAI path, its
    Azure paths, with throwaway keys: a rehearsal never spends), and the Azure deployments the
    sandbox must serve (deployment -> model). A deployment on its own endpoint (another region)
    goes to the same sandbox under another host name, so it stays a lane of its own."""
    key = SecretStr(SANDBOX_KEY)
    overrides: dict[str, Any] = {"openai_base_url": f"{root}/v1", "openai_api_key": key}
    deployments: dict[str, str] = {}
    if settings.azure_deployments:
        overrides.update(azure_openai_endpoint=root, azure_openai_api_key=key, azure_auth="api_key")
        pairs = parse_deployment_pairs(settings.azure_deployments, "EDITBATCH_AZURE_DEPLOYMENTS")
        deployments.update({name: model for model, names in pairs.items() for name in names})
    region = root.replace("://127.0.0.1", "://localhost", 1)
    tables: dict[str, dict[str, Any]] = {}
    for name, raw in settings.providers.items():
        table = {k: v for k, v in dict(raw).items() if k not in ("api_key_env", "token_scope")}
        table["api_key"] = SANDBOX_KEY
        if (table.get("kind") or name) == Kind.AZURE:
            table.update(endpoint=root, auth=Auth.API_KEY.value)
            entries = table.get("deployments")
            if isinstance(entries, dict):
                table["deployments"] = {
                    model: _sandboxed_entries(value, region, model, deployments)
                    for model, value in entries.items()
                }
        else:
            table["base_url"] = f"{root}/v1"
        tables[str(name)] = table
    overrides["providers"] = tables
    return overrides, deployments


def _sandboxed_entries(value: Any, region: str, model: str, served: dict[str, str]) -> Any:
    items = value if isinstance(value, list) else [value]
    out: list[Any] = []
    for item in items:
        if isinstance(item, dict):
            item = {k: v for k, v in item.items() if k not in ("api_key_env", "api_key")}
            if "endpoint" in item:
                item["endpoint"] = region
            served[str(item.get("name"))] = model
        else:
            served[str(item)] = model
        out.append(item)
    return out


# -- reading the configuration ------------------------------------------------------------------


def providers_of(settings: Settings, environ: Mapping[str, str] | None = None) -> ProviderSet:
    """The providers configured by `settings` (and the environment, for `api_key_env`)."""
    env = os.environ if environ is None else environ
    found: dict[str, Provider] = {DEFAULT_PROVIDER: _openai_from_settings(settings)}
    if settings.azure_deployments:
        found["azure"] = _azure_from_settings(settings)
    for name, table in settings.providers.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"providers.{name} must be a table ([providers.{name}] in the EDITBATCH_CONFIG "
                "file)"
            )
        found[name] = _provider(str(name), table, settings, env)
    default = settings.provider.strip()
    if default not in found:
        hint = (
            " (set EDITBATCH_AZURE_DEPLOYMENTS, AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION, "
            "or write a [providers.azure] table)"
            if default == "azure"
            else ""
        )
        raise ConfigError(
            f"EDITBATCH_PROVIDER={settings.provider!r}: no such provider{hint}; the configured "
            f"providers are {', '.join(sorted(found))}"
        )
    _check_scopes(found)
    return ProviderSet(default=default, providers=found)


def _openai_from_settings(settings: Settings) -> Provider:
    key = settings.api_key()
    account = account_id(key)
    default = LaneLimit(settings.images_per_minute, settings.max_in_flight, account=account)
    limits = {
        model: _limit_table(
            values, default, f"EDITBATCH_MODEL_LIMITS[{model!r}]", per_minute="images_per_minute"
        )
        for model, values in settings.model_limits.items()
    }
    return Provider(
        name=DEFAULT_PROVIDER,
        kind=Kind.OPENAI,
        connection=Connection(
            Kind.OPENAI, settings.openai_base_url, key_source="OPENAI_API_KEY", api_key=key
        ),
        origin="OPENAI_API_KEY / OPENAI_BASE_URL",
        default_limit=default,
        model_limits=limits,
    )


def parse_deployment_pairs(text: str, where: str) -> dict[str, list[str]]:
    """`"gpt-image-2=dep-a,gpt-image-2=dep-b,gpt-image-1.5=dep-c"` -> model -> deployments."""
    pairs: dict[str, list[str]] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        model, sep, deployment = (part.strip() for part in item.partition("="))
        if not sep or not model or not deployment:
            raise ConfigError(
                f"{where}: {item.strip()!r} is not MODEL=DEPLOYMENT; give pairs separated by "
                'commas, e.g. "gpt-image-2=my-deployment,gpt-image-2=my-second-deployment"'
            )
        check_name(deployment, f"{where}: deployment")
        names = pairs.setdefault(model, [])
        if deployment in names:
            raise ConfigError(f"{where}: {model}={deployment} is given twice")
        names.append(deployment)
    if not pairs:
        raise ConfigError(f"{where} is empty: give MODEL=DEPLOYMENT pairs")
    return pairs


def _azure_from_settings(settings: Settings) -> Provider:
    where = "EDITBATCH_AZURE_DEPLOYMENTS"
    assert settings.azure_deployments is not None
    pairs = parse_deployment_pairs(settings.azure_deployments, where)
    endpoint = _azure_endpoint(settings.azure_openai_endpoint, "AZURE_OPENAI_ENDPOINT", where)
    version = settings.openai_api_version
    if not version:
        raise ConfigError(
            f"{where} is set but OPENAI_API_VERSION is not: set the api-version of your Azure "
            "OpenAI resource, e.g. OPENAI_API_VERSION=2025-04-01-preview (or v1)"
        )
    auth = _auth(settings.azure_auth, "EDITBATCH_AZURE_AUTH")
    secret = settings.azure_openai_api_key
    key = secret.get_secret_value().strip() if secret is not None else ""
    if auth == Auth.API_KEY and not key:
        raise ConfigError(
            f"{where} is set but AZURE_OPENAI_API_KEY is not: set the key of your Azure "
            "OpenAI resource, or sign in with Entra ID: EDITBATCH_AZURE_AUTH=entra_id"
        )
    if auth == Auth.ENTRA_ID:
        key = ""  # a token is fetched instead; a key left in the environment is not sent
    connection = Connection(
        Kind.AZURE,
        endpoint,
        api_version=version,
        auth=auth,
        key_source="AZURE_OPENAI_API_KEY",
        api_key=key,
    )
    limit = LaneLimit(
        settings.azure_requests_per_minute, settings.max_in_flight, account=account_id(endpoint)
    )
    deployments = {
        model: tuple(_azure_lane("azure", model, name, connection, limit) for name in names)
        for model, names in pairs.items()
    }
    return Provider(
        name="azure",
        kind=Kind.AZURE,
        connection=connection,
        origin=where,
        deployments=deployments,
        default_limit=limit,
        output_formats=AZURE_FORMATS,
        input_formats=AZURE_FORMATS,
        default_quality=AZURE_DEFAULT_QUALITY,
    )


def _azure_lane(
    provider: str,
    model: str,
    deployment: str,
    connection: Connection,
    limit: LaneLimit,
    own_endpoint: bool = False,
) -> Lane:
    scope = f"{provider}:{deployment}"
    if own_endpoint:  # the same deployment name in another region is another lane
        scope += f"@{urlsplit(connection.url or '').hostname}"
    return Lane(provider, model, deployment, connection, limit, scope, per_request=True)


class _Table:
    """Typed reads of one [providers.NAME] table, with errors naming the key."""

    def __init__(self, name: str, data: Mapping[str, Any], env: Mapping[str, str]) -> None:
        self.name, self.data, self.env = name, data, env
        self.where = f"[providers.{name}] (EDITBATCH_CONFIG)"

    def fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(
            f"providers.{self.name}.{key} = {self.data.get(key)!r}: expected {expected}"
        )

    def text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, "a string")
        return value.strip()

    def number(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, "a whole number, at least 1")
        return value

    def names(self, key: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "a list of strings")
        names = tuple(v.strip().lower() if allowed else v.strip() for v in value)
        if allowed is not None:
            bad = [v for v in names if v not in allowed]
            if bad:
                raise self.fail(key, f"a list drawn from {', '.join(allowed)}")
        return names

    def key(self, default_env: str, *, required: bool) -> tuple[str, str]:
        """(the key, where it came from): `api_key`, or the variable named by `api_key_env`."""
        if "api_key" in self.data and "api_key_env" in self.data:
            raise ConfigError(
                f"providers.{self.name}: give api_key or api_key_env, not both (prefer "
                "api_key_env: the name of the variable holding the key)"
            )
        if "api_key" in self.data:
            value = self.text("api_key")
            return value or "", f"providers.{self.name}.api_key"
        variable = self.text("api_key_env") or default_env
        value = self.env.get(variable, "").strip()
        if not value and (required or "api_key_env" in self.data):
            raise ConfigError(
                f"provider {self.name}: the variable {variable} (its api_key_env) is not set: "
                f"export {variable}=... or name another variable in providers.{self.name}."
                "api_key_env"
            )
        return value, variable


def _provider(
    name: str, data: Mapping[str, Any], settings: Settings, env: Mapping[str, str]
) -> Provider:
    check_name(name, "[providers.NAME]: the provider name")
    unknown = sorted(set(data) - set(PROVIDER_KEYS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(PROVIDER_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"providers.{name}: unknown key {unknown[0]!r}{hint}; the keys are "
            f"{', '.join(PROVIDER_KEYS)} (docs/providers.md)"
        )
    table = _Table(name, data, env)
    kind_text = table.text("kind") or (name if name in (Kind.OPENAI, Kind.AZURE) else None)
    if kind_text is None:
        raise ConfigError(
            f'providers.{name} needs kind = "openai", "azure" or "compatible" (only the '
            "providers named openai and azure may leave it out)"
        )
    try:
        kind = Kind(kind_text)
    except ValueError:
        raise table.fail("kind", '"openai", "azure" or "compatible"') from None
    _refuse(table, kind)
    if kind == Kind.AZURE:
        return _azure_provider(table, settings)
    return _openai_like(table, kind, settings)


_ONLY = {
    "endpoint": (Kind.AZURE,),
    "api_version": (Kind.AZURE,),
    "auth": (Kind.AZURE,),
    "token_scope": (Kind.AZURE,),
    "requests_per_minute": (Kind.AZURE,),
    "base_url": (Kind.OPENAI, Kind.COMPATIBLE),
    "models": (Kind.OPENAI, Kind.COMPATIBLE),
    "images_per_minute": (Kind.OPENAI, Kind.COMPATIBLE),
    "model_limits": (Kind.OPENAI, Kind.COMPATIBLE),
    "deployments": (Kind.AZURE, Kind.COMPATIBLE),
}


def _refuse(table: _Table, kind: Kind) -> None:
    for key, kinds in _ONLY.items():
        if key in table.data and kind not in kinds:
            instead = {
                "images_per_minute": " (Azure limits deployments by requests: use "
                "requests_per_minute)",
                "requests_per_minute": " (use images_per_minute)",
                "base_url": " (use endpoint)",
                "endpoint": " (use base_url)",
            }.get(key, "")
            raise ConfigError(
                f"providers.{table.name}.{key} does not apply to kind {kind.value}{instead}"
            )


def _openai_like(table: _Table, kind: Kind, settings: Settings) -> Provider:
    base_url = table.text("base_url")
    if kind == Kind.OPENAI and base_url is None:
        base_url = settings.openai_base_url
    if kind == Kind.COMPATIBLE and base_url is None:
        raise ConfigError(
            f"providers.{table.name} (kind compatible) needs base_url, e.g. "
            '"https://litellm.internal/v1"'
        )
    if base_url is not None:
        _check_url(base_url, f"providers.{table.name}.base_url")
    key, source = table.key("OPENAI_API_KEY", required=False)
    connection = Connection(kind, base_url, key_source=source, api_key=key)
    account = account_id(f"{base_url or ''}\n{key}")
    default = LaneLimit(
        table.number("images_per_minute"),
        table.number("max_in_flight"),
        table.number("burst") or 1,
        account,
    )
    limits = _model_limits(table, default)
    deployments: dict[str, tuple[Lane, ...]] = {}
    for model, entries in _deployment_entries(table).items():
        lanes = []
        for entry in entries:
            if set(entry) - {"name"}:
                raise ConfigError(
                    f"providers.{table.name}.deployments.{model}: a compatible gateway's "
                    "deployment is a name only (the model name it is sent as); set limits "
                    "with model_limits"
                )
            lanes.append(
                Lane(
                    table.name,
                    model,
                    entry["name"],
                    connection,
                    limits.get(model, default),
                    f"{table.name}:{entry['name']}",
                )
            )
        deployments[model] = tuple(lanes)
    return Provider(
        name=table.name,
        kind=kind,
        connection=connection,
        origin=table.where,
        deployments=deployments,
        models=table.names("models"),
        default_limit=default,
        model_limits=limits,
        output_formats=table.names("output_formats", _FORMATS),
        input_formats=table.names("input_formats", _INPUT_FORMATS),
        prices=_prices(table),
    )


def _azure_provider(table: _Table, settings: Settings) -> Provider:
    where = f"providers.{table.name}"
    endpoint = _azure_endpoint(
        table.text("endpoint") or settings.azure_openai_endpoint, f"{where}.endpoint", where
    )
    version = table.text("api_version") or settings.openai_api_version
    if not version:
        raise ConfigError(
            f'{where} needs api_version (or OPENAI_API_VERSION), e.g. "2025-04-01-preview", '
            'or "v1" for the /openai/v1/ path'
        )
    auth = _auth(table.text("auth") or Auth.API_KEY, f"{where}.auth")
    key, source = ("", "")
    if auth == Auth.API_KEY:
        key, source = table.key("AZURE_OPENAI_API_KEY", required=True)
    elif "api_key" in table.data or "api_key_env" in table.data:
        raise ConfigError(f'{where}: auth = "entra_id" signs in without a key: drop the key')
    scope = table.text("token_scope") or ENTRA_SCOPE
    connection = Connection(Kind.AZURE, endpoint, version, auth, scope, source, key)
    default = LaneLimit(
        table.number("requests_per_minute"),
        table.number("max_in_flight"),
        table.number("burst") or 1,
        account_id(endpoint),
    )
    entries = _deployment_entries(table)
    if not entries:
        raise ConfigError(
            f'{where} (kind azure) needs deployments, e.g. deployments = {{ "gpt-image-2" = '
            '["my-deployment", "my-second-deployment"] }'
        )
    deployments: dict[str, tuple[Lane, ...]] = {}
    for model, items in entries.items():
        lanes = []
        for entry in items:
            lanes.append(_azure_entry(table, model, entry, connection, default))
        deployments[model] = tuple(lanes)
    return Provider(
        name=table.name,
        kind=Kind.AZURE,
        connection=connection,
        origin=table.where,
        deployments=deployments,
        default_limit=default,
        output_formats=table.names("output_formats", _FORMATS) or AZURE_FORMATS,
        input_formats=table.names("input_formats", _INPUT_FORMATS) or AZURE_FORMATS,
        prices=_prices(table),
        default_quality=AZURE_DEFAULT_QUALITY,
    )


def _azure_entry(
    table: _Table,
    model: str,
    entry: Mapping[str, Any],
    connection: Connection,
    default: LaneLimit,
) -> Lane:
    where = f"providers.{table.name}.deployments.{model}"
    sub = _Table(table.name, entry, table.env)
    if "images_per_minute" in entry:
        raise ConfigError(f"{where}: Azure limits deployments by requests: use requests_per_minute")
    own = connection
    endpoint = sub.text("endpoint")
    if endpoint is not None or "api_key" in entry or "api_key_env" in entry:
        url = _azure_endpoint(endpoint or connection.url, f"{where}.endpoint", where)
        key, source = connection.api_key, connection.key_source
        if connection.auth == Auth.API_KEY and ("api_key" in entry or "api_key_env" in entry):
            key, source = sub.key("AZURE_OPENAI_API_KEY", required=True)
        own = Connection(
            Kind.AZURE,
            url,
            connection.api_version,
            connection.auth,
            connection.token_scope,
            source,
            key,
        )
    limit = LaneLimit(
        sub.number("requests_per_minute") or default.per_minute,
        sub.number("max_in_flight") or default.max_in_flight,
        sub.number("burst") or default.burst,
        account_id(own.url or ""),
    )
    return _azure_lane(
        table.name, model, str(entry["name"]), own, limit, own_endpoint=own.url != connection.url
    )


def _deployment_entries(table: _Table) -> dict[str, list[dict[str, Any]]]:
    """model -> [{name, ...}] from `deployments` (a name, a list of names or of tables)."""
    raw = table.data.get("deployments")
    if raw is None:
        return {}
    where = f"providers.{table.name}.deployments"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table: model = deployment name(s)")
    out: dict[str, list[dict[str, Any]]] = {}
    for model, value in raw.items():
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ConfigError(f"{where}.{model} is empty: give a deployment name")
        entries: list[dict[str, Any]] = []
        for item in items:
            entry = {"name": item} if isinstance(item, str) else item
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(
                    f"{where}.{model}: expected a deployment name, a list of names, or tables "
                    'with a name, e.g. {name = "img-west", endpoint = "https://west.openai.'
                    'azure.com"}'
                )
            unknown = sorted(set(entry) - set(_DEPLOYMENT_KEYS))
            if unknown:
                raise ConfigError(
                    f"{where}.{model}: unknown key {unknown[0]!r}; a deployment takes "
                    f"{', '.join(_DEPLOYMENT_KEYS)}"
                )
            check_name(entry["name"], f"{where}.{model}: deployment")
            entries.append(entry)
        out[str(model)] = entries
    return out


def _model_limits(table: _Table, default: LaneLimit) -> dict[str, LaneLimit]:
    raw = table.data.get("model_limits")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise table.fail("model_limits", "a table of model = {images_per_minute, ...}")
    return {
        str(model): _limit_table(
            values, default, f"providers.{table.name}.model_limits[{model!r}]", "images_per_minute"
        )
        for model, values in raw.items()
    }


def _limit_table(
    values: Mapping[str, Any], default: LaneLimit, where: str, per_minute: str
) -> LaneLimit:
    """A model's own limits; unset fields inherit the default. Checked by the settings' one
    check of limits (EDITBATCH_MODEL_LIMITS was checked when the settings were read)."""
    problem = limit_problem(values, (per_minute, "max_in_flight", "burst"))
    if problem:
        raise ConfigError(f"{where} {problem}")
    return LaneLimit(
        values.get(per_minute, default.per_minute),
        values.get("max_in_flight", default.max_in_flight),
        values.get("burst", default.burst),
        default.account,
    )


def _prices(table: _Table) -> dict[str, ModelPrice]:
    raw = table.data.get("prices")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise table.fail("prices", "a table of model = {text_input, image_input, image_output}")
    return parse_price_models(
        raw, f"providers.{table.name}.prices", f"price override of provider {table.name}"
    )


def _azure_endpoint(value: str | None, setting: str, where: str) -> str:
    if not value:
        raise ConfigError(
            f"{where} needs the Azure OpenAI endpoint: set {setting}, e.g. "
            "https://my-resource.openai.azure.com"
        )
    _check_url(value, setting)
    return value.rstrip("/")


def _check_url(value: str, setting: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{setting}={value!r} is not an http:// or https:// URL")


def _auth(value: str, setting: str) -> Auth:
    try:
        return Auth(value.strip().lower())
    except ValueError:
        raise ConfigError(f"{setting}={value!r}: expected api_key or entra_id") from None


def check_name(value: str, what: str) -> None:
    if not _NAME.match(value):
        raise ConfigError(
            f"{what} {value!r}: letters, digits, '.', '_' and '-' only (no ':' or spaces), "
            "at most 63 characters"
        )


def _check_scopes(found: Mapping[str, Provider]) -> None:
    """Two lanes with one scope would share (and halve) a limit: refuse it."""
    seen: dict[str, str] = {}
    for provider in found.values():
        for lane in provider.all_lanes():
            other = seen.get(lane.scope)
            if other is not None and other != lane.model:
                raise ConfigError(
                    f"provider {provider.name}: deployment {lane.deployment} is given for "
                    f"{other} and {lane.model}; a deployment serves one model"
                )
            if other == lane.model and provider.kind == Kind.AZURE:
                raise ConfigError(
                    f"provider {provider.name}: deployment {lane.deployment} of {lane.model} "
                    "is listed twice"
                )
            seen[lane.scope] = lane.model
