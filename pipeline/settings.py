"""One typed settings model: environment variables `EDITBATCH_*`, optionally a TOML file.

Precedence (highest first): explicit overrides, environment, `EDITBATCH_CONFIG` TOML file, defaults.
"""

from __future__ import annotations

import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HOME = Path(".editbatch")


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

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(
                f"not a SQLAlchemy URL: {value!r} (expected e.g. sqlite:///path.db "
                "or postgresql+psycopg://user@host/db)"
            )
        return value

    @model_validator(mode="after")
    def _lease_covers_a_call(self) -> Settings:
        if self.lease_seconds <= self.request_timeout_seconds:
            raise ValueError(
                f"EDITBATCH_LEASE_SECONDS ({self.lease_seconds}) must be longer than "
                f"EDITBATCH_REQUEST_TIMEOUT_SECONDS ({self.request_timeout_seconds}): a job "
                "whose lease ends during a live call would be started (and paid for) twice"
            )
        return self

    @field_validator("nightly_route")
    @classmethod
    def _known_route(cls, value: str) -> str:
        route = value.strip().lower()
        if route not in ("sync", "batch"):
            raise ValueError(
                f"EDITBATCH_NIGHTLY_ROUTE={value!r}: use sync (one call per edit, results in "
                "minutes) or batch (OpenAI's Batch API: half price, within 24 h)"
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
        toml_file = os.environ.get("EDITBATCH_CONFIG")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_file)))
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
    """The process-wide settings, read once."""
    return Settings()
