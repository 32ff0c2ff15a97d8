"""One typed settings model: environment variables `EDITBATCH_*`, optionally a TOML file.

Precedence (highest first): explicit overrides, environment, `EDITBATCH_CONFIG` TOML file, defaults.

A bad value never reaches a person as a pydantic traceback: building `Settings` raises
`ConfigError` whose message has one line per bad setting, naming the variable (or the TOML key
and its file), the value (secrets hidden) and what is accepted (`describe_error`). The CLI and
the Celery worker print that line and exit with status 2.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import annotated_types
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from pipeline.errors import ConfigError

DEFAULT_HOME = Path(".editbatch")
CONFIG_VARIABLE = "EDITBATCH_CONFIG"
"""Names the TOML settings file (read by `settings_customise_sources`, not a field)."""

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
_CRON_TOKEN = re.compile(r"^[0-9A-Za-z*/,\-]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
_REDIS_SCHEMES = ("redis", "rediss", "unix")
MODEL_LIMIT_FIELDS = ("images_per_minute", "max_in_flight", "burst")
_API_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Settings(BaseSettings):
    """Effective configuration of one editbatch process (CLI, producer or worker)."""

    model_config = SettingsConfigDict(
        env_prefix="EDITBATCH_", extra="ignore", populate_by_name=True
    )

    home: Path = Field(DEFAULT_HOME, description="Folder for the default SQLite file and spool.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<home>/editbatch.db (WAL mode)."
    )
    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker (Redis).")
    redis_url: str | None = Field(
        None, description="Redis for the shared rate limiter; default: the broker URL."
    )
    spool_dir: Path | None = Field(None, description="Raw API outputs before collection.")
    default_model: str = Field(
        "gpt-image-2.5-sunburst", description="Model for rows that name none."
    )
    shutdown_warn_days: int = Field(
        30,
        ge=0,
        description="Warn when a model of a batch shuts down within this many days (or before "
        "the batch's estimated finish).",
    )
    concurrency: int = Field(8, ge=1, le=1000, description="Calls in flight per `run` process.")
    images_per_minute: int | None = Field(
        None, ge=1, description="Account image rate limit shared by every worker."
    )
    max_in_flight: int | None = Field(
        None, ge=1, description="Most calls in flight across every worker."
    )
    model_limits: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description='Per-model overrides, JSON: {"gpt-image-1-mini": {"images_per_minute": 50}}.',
    )
    max_attempts: int = Field(5, ge=1, le=50, description="Calls per job before it fails.")
    backoff_base_seconds: float = Field(1.0, gt=0, description="First retry wait (jittered).")
    backoff_max_seconds: float = Field(60.0, gt=0, description="Longest retry wait.")
    request_timeout_seconds: float = Field(
        300.0, gt=0, description="Timeout of one edit call (edits take 20-60 s)."
    )
    lease_seconds: int = Field(
        900,
        ge=1,
        description="A running job whose lease expires is requeued; longer than the request "
        "timeout (each call renews it).",
    )
    prices_file: Path | None = Field(None, description="TOML price table replacing the built-in.")
    catalog_file: Path | None = Field(None, description="TOML model catalogue overrides.")
    daily_budget_usd: Decimal | None = Field(None, ge=0, description="Spend cap per UTC day.")
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve Prometheus metrics from each worker on this port."
    )
    log_json: bool = Field(False, description="Log JSON lines instead of plain text.")
    log_level: str | None = Field(
        None, description="DEBUG, INFO, WARNING, ERROR; default WARNING (CLI), --loglevel (Celery)."
    )
    remote_schemes: tuple[str, ...] = Field(
        ("file", "s3"),
        description='Schemes inputs may be read from, JSON: ["file", "s3"] (fsspec protocols).',
    )
    remote_max_image_bytes: int = Field(
        50_000_000, ge=1, description="Largest remote image (or mask) fetched."
    )
    remote_max_manifest_bytes: int = Field(
        200_000_000, ge=1, description="Largest remote manifest fetched."
    )
    nightly_manifest: str | None = Field(
        None,
        description="Dated manifest for nightly runs, e.g. s3://b/manifests/{date:%Y-%m-%d}.csv.",
    )
    nightly_output: str | None = Field(
        None, description="Output folder or URL of nightly runs; may hold {date:...} too."
    )
    nightly_budget_usd: Decimal | None = Field(
        None, ge=0, description="Budget of each nightly batch (held when reached)."
    )
    nightly_cron: str = Field("0 2 * * *", description="When beat submits it (cron, UTC).")
    nightly_route: str = Field(
        "sync", description="Route of nightly batches: sync, or batch (OpenAI's Batch API)."
    )
    batch_poll_seconds: float = Field(
        60.0, gt=0, description="How often open provider batches are polled (the batch route)."
    )
    batch_max_lines: int = Field(
        50_000, ge=1, le=50_000, description="Most lines in one provider batch (API: 50,000)."
    )
    batch_max_bytes: int = Field(
        200_000_000,
        ge=1_000,
        le=200_000_000,
        description="Largest input file of one provider batch (API: 200 MB).",
    )
    webhook_url: str | None = Field(
        None, description="POST a signed JSON summary here when a batch finishes."
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key for X-Editbatch-Signature (required with the URL)."
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Timeout of one POST.")
    webhook_attempts: int = Field(5, ge=1, le=20, description="POSTs before giving up.")
    dashboard_token: SecretStr | None = Field(
        None,
        description="Sign-in token of the dashboard (`editbatch serve`); required to serve "
        "beyond 127.0.0.1 (docs/dashboard.md).",
    )
    breaker_threshold: int = Field(
        20,
        ge=2,
        le=10_000,
        description="Calls in a row, across every worker, failing with a connection error, a "
        "timeout or a 5xx before the batch is held as api_unreachable.",
    )
    breaker_probe_seconds: float = Field(
        5.0, gt=0, description="First wait before probing an unreachable API (then doubled)."
    )
    breaker_probe_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait between two probes of an unreachable API."
    )
    breaker_give_up_seconds: float = Field(
        3600.0,
        gt=0,
        description="Probing stops this long after the trip; the batch stays held for a person.",
    )
    broker_check_seconds: float = Field(
        2.0,
        ge=0,
        description="How often each worker checks that Redis still holds the queue (a restart "
        "or flush re-sends the queued jobs at once); 0 turns it off.",
    )
    max_data_age_days: int = Field(
        45, ge=1, description="`doctor` warns when the price table or catalogue is older."
    )
    openai_admin_key: SecretStr | None = Field(
        None,
        validation_alias="OPENAI_ADMIN_KEY",
        description="Admin key for the usage and costs API (`reconcile`); never the job key.",
    )
    openai_api_key: SecretStr | None = Field(
        None,
        validation_alias="OPENAI_API_KEY",
        description="API key (read from OPENAI_API_KEY; never stored or logged).",
    )
    openai_base_url: str | None = Field(
        None, validation_alias="OPENAI_BASE_URL", description="API base URL (OPENAI_BASE_URL)."
    )
    # Providers (pipeline/providers.py reads these; docs/providers.md).
    provider: str = Field(
        "openai", description="Provider of batches and rows that name none (openai, azure, ...)."
    )
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Providers by name, [providers.NAME] tables in the TOML file "
        "(docs/providers.md).",
    )
    azure_deployments: str | None = Field(
        None,
        description='Azure deployments per model: "gpt-image-2=my-deployment,..." (a model '
        "named twice gets two deployments); makes the provider `azure` from AZURE_OPENAI_*.",
    )
    azure_requests_per_minute: int | None = Field(
        None, ge=1, description="Requests per minute of each deployment of provider `azure`."
    )
    azure_auth: str = Field(
        "api_key",
        description="How provider `azure` signs in: api_key (AZURE_OPENAI_API_KEY) or entra_id "
        "(azure-identity's DefaultAzureCredential; pip install 'editbatch[azure]').",
    )
    azure_openai_endpoint: str | None = Field(
        None,
        validation_alias="AZURE_OPENAI_ENDPOINT",
        description="Azure OpenAI resource, https://NAME.openai.azure.com (AZURE_OPENAI_ENDPOINT).",
    )
    azure_openai_api_key: SecretStr | None = Field(
        None,
        validation_alias="AZURE_OPENAI_API_KEY",
        description="Azure OpenAI key (AZURE_OPENAI_API_KEY; never stored or logged).",
    )
    openai_api_version: str | None = Field(
        None,
        validation_alias="OPENAI_API_VERSION",
        description="Azure OpenAI api-version, e.g. 2025-04-01-preview (OPENAI_API_VERSION).",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except (ValidationError, SettingsError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(describe_error(exc, values)) from None

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                "not a SQLAlchemy URL: expected e.g. sqlite:///path.db "
                "or postgresql+psycopg://user@host/db"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_is_redis(cls, value: str) -> str:
        return _url(value, _BROKER_SCHEMES, "a Redis URL, e.g. redis://localhost:6379/0")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _url(value, _REDIS_SCHEMES, "a Redis URL, e.g. redis://localhost:6379/0")

    @field_validator("webhook_url", "openai_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _url(value, ("http", "https"), "an http:// or https:// URL")

    @field_validator("home", "spool_dir")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        if value is not None and (str(value).strip() == "" or value.is_file()):
            raise ValueError("not a folder: give a folder path (created when missing)")
        return value

    @field_validator("prices_file", "catalog_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file: give the path of an existing TOML file")
        return value

    @field_validator("default_model")
    @classmethod
    def _model_name(cls, value: str) -> str:
        if not _MODEL_NAME.match(value):
            raise ValueError(
                "not a model name: letters, digits and . _ : / - without spaces, e.g. gpt-image-1.5"
            )
        return value

    @field_validator("model_limits")
    @classmethod
    def _model_limits(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        for model, limits in value.items():
            problem = limit_problem(limits)
            if problem:
                raise ValueError(f"model {model!r} {problem}")
        return value

    @field_validator("provider")
    @classmethod
    def _provider_name(cls, value: str) -> str:
        _provider_rule(lambda providers: providers.check_name(value, "provider"))
        return value

    @field_validator("azure_deployments")
    @classmethod
    def _deployment_pairs(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _provider_rule(lambda providers: providers.parse_deployment_pairs(value, "pairs"))
        return value

    @field_validator("azure_auth")
    @classmethod
    def _azure_auth(cls, value: str) -> str:
        auth = value.strip().lower()
        if auth not in ("api_key", "entra_id"):
            raise ValueError(
                "not a way to sign in: use api_key (AZURE_OPENAI_API_KEY) or entra_id "
                "(DefaultAzureCredential; pip install 'editbatch[azure]')"
            )
        return auth

    @field_validator("azure_openai_endpoint")
    @classmethod
    def _azure_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _url(value, ("http", "https"), "an https:// URL, e.g. https://NAME.openai.azure.com")

    @field_validator("openai_api_version")
    @classmethod
    def _api_version(cls, value: str | None) -> str | None:
        if value is not None and not _API_VERSION.match(value.strip()):
            raise ValueError("not an api-version: e.g. 2025-04-01-preview, or v1")
        return None if value is None else value.strip()

    @field_validator("nightly_manifest", "nightly_output")
    @classmethod
    def _dated_pattern(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            fields = [(n, c) for _, n, _, c in string.Formatter().parse(value) if n is not None]
        except ValueError as exc:
            raise ValueError(f"not a pattern ({exc}): e.g. s3://b/{{date:%Y-%m-%d}}.csv") from None
        bad = [n for n, conversion in fields if n != "date" or conversion]
        if bad:
            raise ValueError(
                f"only {{date}} or {{date:%Y-%m-%d}}-style fields are allowed, not {{{bad[0]}}}"
            )
        return value

    @field_validator("nightly_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        cron_fields(value)
        return value

    @field_validator("openai_admin_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator(
        "openai_api_key", "openai_admin_key", "dashboard_token", "azure_openai_api_key"
    )
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and any(ch.isspace() for ch in value.get_secret_value()):
            raise ValueError(
                "contains a space or a line break (a copy-paste slip?): accepted: the key alone"
            )
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("empty: accepted: a shared secret (any text), or leave it unset")
        return value

    @model_validator(mode="after")
    def _lease_covers_a_call(self) -> Settings:
        if self.lease_seconds <= self.request_timeout_seconds:
            raise ValueError(
                f"EDITBATCH_LEASE_SECONDS ({self.lease_seconds}) must be longer than "
                f"EDITBATCH_REQUEST_TIMEOUT_SECONDS ({self.request_timeout_seconds:g}): a job "
                "whose lease ends during a live call would be started (and paid for) twice"
            )
        return self

    @field_validator("nightly_route")
    @classmethod
    def _known_route(cls, value: str) -> str:
        route = value.strip().lower()
        if route not in ("sync", "batch"):
            raise ValueError(
                "not a route: use sync (one call per edit, results in minutes) or batch "
                "(OpenAI's Batch API: half price, within 24 h)"
            )
        return route

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str | None) -> str | None:
        if value is None:
            return None
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(
                f"unknown log level {value!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        return level

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = config_file()
        if toml_file is not None:
            source = TomlConfigSettingsSource(settings_cls, toml_file=toml_file)
            unknown = sorted(set(source.toml_data) - _toml_keys())
            if unknown:
                raise ConfigError(
                    f"{CONFIG_VARIABLE}={toml_file}: unknown key {unknown[0]!r}"
                    f"{_did_you_mean(unknown[0], _toml_keys())}; the keys are the settings' "
                    "names in lower case (editbatch config lists them)"
                )
            sources.append(source)
        return tuple(sources)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'editbatch.db').resolve()}"

    @property
    def effective_spool_dir(self) -> Path:
        return (self.spool_dir or self.home / "spool").resolve()

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or self.broker_url

    def api_key(self) -> str:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else ""

    def masked(self) -> dict[str, Any]:
        """Every setting with its effective value, secrets masked, for `editbatch config`."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "****" if value.get_secret_value() else None
            out[name] = None if value is None else str(value)
        out["providers"] = None if not self.providers else str(_mask_secrets(self.providers))
        out["database_url"] = _mask_url_password(self.effective_database_url)
        out["broker_url"] = _mask_url_password(self.broker_url)
        if self.webhook_url:  # a webhook URL's path or query often is a token itself
            parts = urlsplit(self.webhook_url)
            port = f":{parts.port}" if parts.port else ""
            out["webhook_url"] = f"{parts.scheme}://{parts.hostname}{port}/****"
        return out


def _mask_secrets(value: Any) -> Any:
    """A copy of nested TOML tables with every `api_key` value masked."""
    if isinstance(value, dict):
        return {k: ("****" if k == "api_key" and v else _mask_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_secrets(v) for v in value]
    return value


def _mask_url_password(url: str) -> str:
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:****@{host}" if ":" in creds else url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; ConfigError (one line per bad setting) if invalid."""
    return Settings()


def cron_fields(expr: str) -> dict[str, str]:
    """`"0 2 * * *"` -> keyword arguments for `celery.schedules.crontab`; ConfigError if bad."""
    parts = expr.split()
    if len(parts) != len(CRON_FIELDS) or not all(_CRON_TOKEN.match(p) for p in parts):
        raise ConfigError(
            f"EDITBATCH_NIGHTLY_CRON={expr!r} is not a cron expression: give five fields, "
            "minute hour day-of-month month day-of-week, e.g. '0 2 * * *' (02:00 UTC daily)"
        )
    return dict(zip(CRON_FIELDS, parts, strict=True))


def config_file() -> Path | None:
    """The TOML file named by EDITBATCH_CONFIG, if any; ConfigError if it does not exist."""
    name = os.environ.get(CONFIG_VARIABLE)
    if not name:
        return None
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"{CONFIG_VARIABLE}={name!r}: no such file; accepted: a TOML file")
    return path


def limit_problem(values: Mapping[str, Any], fields: tuple[str, ...] = MODEL_LIMIT_FIELDS) -> str:
    """What is wrong with one model's (or lane's) limits, `{images_per_minute, max_in_flight,
    burst}`, or "" (pure). The one check of limits: EDITBATCH_MODEL_LIMITS here, and the
    [providers.NAME] tables' `model_limits` (`pipeline.providers`)."""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        return f"has unknown field(s) {', '.join(unknown)}: allowed are {', '.join(fields)}"
    low = sorted(
        name
        for name, number in values.items()
        if isinstance(number, bool) or not isinstance(number, int) or number < 1
    )
    if low:
        return f"{', '.join(low)}: must be a whole number, at least 1"
    return ""


def _provider_rule(check: Callable[[types.ModuleType], object]) -> None:
    """Run `check(pipeline.providers)`, whose ConfigError becomes this setting's error: the
    providers module holds the rule (imported here, when a setting is read, as it imports
    this module)."""
    from pipeline import providers

    try:
        check(providers)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _url(value: str, schemes: tuple[str, ...], accepted: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.path):
        raise ValueError(f"not {accepted} (schemes: {', '.join(schemes)})")
    return value


# -- one line per bad setting -----------------------------------------------------------------

# Every SecretStr setting: its value is never shown in an error (a new key cannot be missed).
_SECRET_FIELDS = frozenset(
    name
    for name, info in Settings.model_fields.items()
    if info.annotation is SecretStr or SecretStr in typing.get_args(info.annotation)
)


def variable(name: str) -> str:
    """The environment variable of setting `name` (EDITBATCH_<NAME>, or its alias)."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, str):
        return alias
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def _toml_keys() -> set[str]:
    keys = set(Settings.model_fields)
    for info in Settings.model_fields.values():
        if isinstance(info.validation_alias, str):
            keys.add(info.validation_alias)
    return keys


def _field_of(key: str) -> str:
    """The field name of `key`, which may be its alias (OPENAI_API_KEY -> openai_api_key)."""
    for name, info in Settings.model_fields.items():
        if info.validation_alias == key:
            return name
    return key


def _did_you_mean(word: str, choices: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word.lower(), sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _env_value(name: str) -> str | None:
    wanted = variable(name).lower()
    for key, value in os.environ.items():
        if key.lower() == wanted:
            return value
    return None


def _where(name: str, given: dict[str, Any]) -> tuple[str, Any]:
    """Where setting `name` came from (its variable, or a TOML key) and its raw value. A value
    given as an argument is named by its variable too: that is the setting's public name."""
    if name in given:
        return variable(name), given[name]
    env = _env_value(name)
    if env is not None:
        return variable(name), env
    path = os.environ.get(CONFIG_VARIABLE)
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError):
            data = {}
        alias = Settings.model_fields[name].validation_alias
        for key in (name, alias):
            if isinstance(key, str) and key in data:
                return f"{key} (in {path})", data[key]
    return variable(name), None


def _show(name: str, value: Any) -> str:
    if name in _SECRET_FIELDS:
        return "(hidden)"
    text = repr(value)
    return text if len(text) <= 240 else text[:237] + "..."


def accepted(name: str) -> str:
    """What setting `name` accepts, from its type and bounds, e.g. 'a whole number 1..1000'."""
    info: FieldInfo = Settings.model_fields[name]
    kind = info.annotation
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    bounds = []
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            bounds.append(f"at least {meta.ge}")
        elif isinstance(meta, annotated_types.Gt):
            bounds.append(f"above {meta.gt}")
        elif isinstance(meta, annotated_types.Le):
            bounds.append(f"at most {meta.le}")
    limit = f" ({', '.join(bounds)})" if bounds else ""
    origin = typing.get_origin(kind)
    if kind is bool:
        return "true or false"
    if kind is int:
        return f"a whole number{limit}"
    if kind is float:
        return f"a number{limit}"
    if kind is Decimal:
        return f"an amount in USD{limit}, e.g. 25.00"
    if origin is dict:
        return 'a JSON object, e.g. {"gpt-image-1-mini": {"images_per_minute": 50}}'
    if origin is tuple:
        return 'a JSON list of strings, e.g. ["file", "s3"]'
    if kind is Path:
        return "a path"
    return info.description or "text"


_LOC = re.compile(r'field "(?P<field>\w+)"')


def describe_error(exc: Exception, given: dict[str, Any] | None = None) -> str:
    """One line per bad setting: where it came from, the value, what is wrong and accepted."""
    given = given or {}
    if isinstance(exc, tomllib.TOMLDecodeError):
        return f"{CONFIG_VARIABLE}={os.environ.get(CONFIG_VARIABLE)!r}: not valid TOML ({exc})"
    if isinstance(exc, SettingsError):
        # pydantic-settings could not decode a JSON value (dicts, lists) from its source.
        found = _LOC.search(str(exc))
        if found and found.group("field") in Settings.model_fields:
            name = found.group("field")
            source, value = _where(name, given)
            return f"{source}={_show(name, value)}: not valid JSON; accepted: {accepted(name)}"
        return str(exc)
    assert isinstance(exc, ValidationError)
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if loc:
            loc[0] = _field_of(loc[0])
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc or loc[0] not in Settings.model_fields:
            lines.append(message)  # a rule over several settings names them itself
            continue
        name = loc[0]
        source, raw = _where(name, given)
        where = source + "".join(f"[{part!r}]" for part in loc[1:])
        value = _show(name, error.get("input") if len(loc) > 1 else raw)
        if error["type"] == "value_error":
            lines.append(f"{where}={value}: {message}")
        else:
            reason = message[:1].lower() + message[1:]
            lines.append(f"{where}={value}: {reason}; accepted: {accepted(name)}")
    return "\n".join(lines)
