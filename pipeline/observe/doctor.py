"""`editbatch doctor`: is tonight going to work? A list of named checks, each ✓ or ✗ with the fix.

    settings       every setting valid; no EDITBATCH_* variable that is no setting (a typo)
    database       reachable, at the newest migration
    redis          the broker (and the limiter's Redis) answer PING
    workers        Celery workers answer a ping: how many, their pool and threads
    output, spool  writable (a local folder or an fsspec URL such as s3://), by a test file
    provider P     one per provider in use (pipeline/providers.py: the default, those the
                   manifest's rows name, those configured): it answers at all (`GET /models`,
                   free); a provider whose settings cannot be read is one ✗ `providers`
    api key        OpenAI's (when provider openai is in use): set, and accepted (not 401)
    model M        each model of the manifest (or the default model), by provider: on OpenAI,
                   available to this key and organization (404: not for this key; 403: the
                   organization must be verified), gone or shutting down by tomorrow in the
                   catalogue; on another provider (`model M on P`), deployed or served there
    deployment     each deployment (lane) of an Azure provider, and each named deployment of a
                   gateway, probed for free (`gateway.check_lane`: an edit with n=0 the model
                   refuses only after the endpoint, api-version, key and deployment passed)
    data           the price table and the catalogue are not older than
                   EDITBATCH_MAX_DATA_AGE_DAYS
    rate limit     (--probe) one low-quality edit on the default provider, paid and shown
                   first: the limit from the rate-limit headers against the lane's setting

`CHECKS` is the list, in that order: each entry is a name and a function of the `Context`
returning `Check`s (one, or one per provider, model or deployment). A check never raises: a
failure is a ✗ whose `fix` says what to do. When the settings are invalid nothing else can be
checked, and the other checks are skipped.
"""

from __future__ import annotations

import difflib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import clock
from pipeline.errors import ConfigError, EditbatchError
from pipeline.providers import DEFAULT_PROVIDER, Auth, Kind, Lane, Provider, ProviderSet
from pipeline.settings import CONFIG_VARIABLE, Settings, variable

if TYPE_CHECKING:
    from pipeline.run.gateway import Answer, Gateway

__all__ = [
    "CHECKS",
    "Check",
    "Context",
    "WorkerInfo",
    "run_checks",
]

VERIFY_URL = "https://platform.openai.com/settings/organization/general"


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "skipped": self.skipped,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class WorkerInfo:
    """A Celery worker that answered: its name, pool and threads (or processes)."""

    name: str
    pool: str
    concurrency: int


@dataclass
class Context:
    """What the checks look at. The clients are built by `editbatch doctor` and passed in
    (`http_client`: an httpx2 client for the SDK, as in `Gateway`; unit tests answer in
    process)."""

    load_settings: Callable[[], Settings]
    output: str | None = None
    # The manifest's (provider, model) pairs, provider None for rows that name none (empty:
    # the default model on the default provider).
    uses: tuple[tuple[str | None, str], ...] = ()
    ping_workers: Callable[[], list[WorkerInfo]] | None = None
    probe_edit: Callable[[Settings], Check] | None = None  # --probe, after the price was agreed
    today: date = field(default_factory=clock.today)
    settings: Settings | None = None
    http_client: Any = None
    providers: ProviderSet | None = None  # read by the provider check
    _gateway: Gateway | None = None

    def gateway(self) -> Gateway:
        """One SDK client per provider connection, built once for every check."""
        from pipeline.run.gateway import Gateway

        assert self.settings is not None
        if self._gateway is None:
            connections = self.providers.connections() if self.providers is not None else []
            self._gateway = Gateway(
                self.settings.api_key(),
                self.settings.openai_base_url,
                10.0,
                http_client=self.http_client,
                connections=connections,
            )
        return self._gateway

    def in_use(self) -> list[Provider]:
        """The providers to check: the default one, those the manifest's rows name, and those
        configured beyond the implicit openai (a [providers.NAME] table, the Azure variables;
        openai with OPENAI_API_KEY set). The default first, then by name."""
        if self.providers is None or self.settings is None:
            return []
        providers, settings = self.providers, self.settings
        names = {providers.default} | {p or providers.default for p, _ in self.uses}
        names |= set(settings.providers) | ({"azure"} if settings.azure_deployments else set())
        if settings.api_key():
            names.add(DEFAULT_PROVIDER)
        known = [n for n in names if n in providers.providers]
        known.sort(key=lambda n: (n != providers.default, n))
        return [providers.providers[n] for n in known]

    def used(self, name: str) -> bool:
        return any(p.name == name for p in self.in_use())


CheckFn = Callable[[Context], list[Check]]


def run_checks(ctx: Context, checks: Iterable[tuple[str, CheckFn]] | None = None) -> list[Check]:
    """Every check in order; after invalid settings, the others are skipped."""
    results: list[Check] = []
    for name, check in checks if checks is not None else CHECKS:
        if name != "settings" and ctx.settings is None:
            results.append(Check(name, False, "skipped: the settings are invalid", skipped=True))
            continue
        try:
            results.extend(check(ctx))
        except Exception as exc:  # a check must never take the checklist down
            results.append(Check(name, False, f"the check itself failed: {exc!r}"))
    return results


# -- the checks -----------------------------------------------------------------------------------


def check_settings(ctx: Context) -> list[Check]:
    try:
        ctx.settings = ctx.load_settings()
    except ConfigError as exc:
        return [Check("settings", False, str(exc), "correct the value(s) named above")]
    # Read outside the settings model: the TOML file's name, and the clock's pinned date.
    known = {variable(name) for name in Settings.model_fields} | {CONFIG_VARIABLE, clock.ENV}
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith("EDITBATCH_") and name.upper() not in known
    )
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hints.append(f"{name}" + (f" (did you mean {close[0]}?)" if close else ""))
        return [
            Check(
                "settings",
                False,
                f"not settings, ignored: {', '.join(hints)}",
                "rename or remove them (editbatch config lists the settings)",
            )
        ]
    source = os.environ.get(CONFIG_VARIABLE)
    where = f"environment and {source}" if source else "environment"
    return [Check("settings", True, f"valid ({where})")]


def check_database(ctx: Context) -> list[Check]:
    import migrations
    from pipeline.db.session import Database, at_head

    assert ctx.settings is not None
    url = ctx.settings.effective_database_url
    shown = ctx.settings.masked()["database_url"]
    try:
        db = Database(url, migrate=False)
    except ConfigError as exc:
        return [Check("database", False, str(exc), "install the driver named above")]
    try:
        from sqlalchemy import text

        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = at_head(db.engine)
    except Exception as exc:
        return [
            Check(
                "database",
                False,
                f"{shown}: cannot connect ({_first_line(exc)})",
                "start the database or correct EDITBATCH_DATABASE_URL",
            )
        ]
    finally:
        db.dispose()
    if not current:
        return [
            Check(
                "database",
                False,
                f"{shown}: no tables yet, or not at the newest migration ({migrations.HEAD})",
                "editbatch db upgrade (once, before the workers start)",
            )
        ]
    return [Check("database", True, f"{shown}, migration {migrations.HEAD}")]


def check_redis(ctx: Context) -> list[Check]:
    from redis import Redis, RedisError

    assert ctx.settings is not None
    urls = {"EDITBATCH_BROKER_URL": ctx.settings.broker_url}
    if ctx.settings.redis_url and ctx.settings.redis_url != ctx.settings.broker_url:
        urls["EDITBATCH_REDIS_URL"] = ctx.settings.redis_url
    results = []
    for setting, url in urls.items():
        shown = _mask(url)
        try:
            client = Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
            client.ping()
            client.close()
        except (RedisError, ValueError, OSError) as exc:
            results.append(
                Check(
                    "redis",
                    False,
                    f"{shown} ({setting}) does not answer: {_first_line(exc)}",
                    f"start Redis or correct {setting}",
                )
            )
            continue
        results.append(Check("redis", True, f"{shown} answers"))
    return results


def check_workers(ctx: Context) -> list[Check]:
    if ctx.ping_workers is None:
        return [Check("workers", True, "not checked (no broker in this setup)", skipped=True)]
    try:
        workers = ctx.ping_workers()
    except Exception as exc:
        return [
            Check(
                "workers",
                False,
                f"cannot ask the workers: {_first_line(exc)}",
                "start Redis (the workers are asked through the broker)",
            )
        ]
    if not workers:
        return [
            Check(
                "workers",
                False,
                "no Celery worker answered a ping",
                "start one on each worker machine: celery -A worker.app worker",
            )
        ]
    threads = sum(w.concurrency for w in workers)
    listed = ", ".join(f"{w.name} ({w.pool}, {w.concurrency})" for w in workers)
    return [Check("workers", True, f"{len(workers)} alive, {threads} threads: {listed}")]


def check_output(ctx: Context) -> list[Check]:
    assert ctx.settings is not None
    targets = [
        ("output", ctx.output or "outputs"),
        ("spool", str(ctx.settings.effective_spool_dir)),
    ]
    return [_writable(name, where) for name, where in targets]


def _writable(name: str, where: str) -> Check:
    from pipeline.output.storage import Storage

    probe_name = f".editbatch-doctor-{uuid.uuid4().hex[:8]}"
    try:
        storage = Storage(where)
        uri = storage.write(probe_name, b"editbatch doctor\n")
    except (EditbatchError, OSError, ValueError) as exc:
        return Check(
            name,
            False,
            f"{where} is not writable: {exc}",
            f"fix the permissions or choose another {name}",
        )
    try:
        if storage.is_local:
            Path(uri).unlink()
        else:
            storage.fs.rm(f"{storage.root}/{probe_name}")
    except Exception as exc:  # written but not removed: still writable
        return Check(name, True, f"{where} is writable (the test file {uri} stays: {exc})")
    return Check(name, True, f"{where} is writable")


def check_provider(ctx: Context) -> list[Check]:
    from pipeline.providers import providers_of

    assert ctx.settings is not None
    try:
        ctx.providers = providers_of(ctx.settings)
    except ConfigError as exc:
        return [
            Check(
                "providers",
                False,
                str(exc),
                "correct the provider settings named above (docs/providers.md)",
            )
        ]
    return [_reachable(ctx, provider) for provider in ctx.in_use()]


def _reachable(ctx: Context, provider: Provider) -> Check:
    """Does `provider` answer at all (`GET /models`, free)?"""
    name = f"provider {provider.name}"
    connection = provider.connection
    where = connection.describe()
    try:
        answer = ctx.gateway().list_models(connection=connection)
    except ConfigError as exc:  # Entra ID without azure-identity
        return Check(name, False, str(exc), "install what the message names")
    if not answer.answered:
        return Check(
            name,
            False,
            f"{where} does not answer: {answer.describe()}",
            f"check the network, a proxy, or {_setting(provider, 'url')}; the provider may be down",
        )
    if answer.status == 401 and provider.kind != Kind.OPENAI:
        return Check(
            name, False, f"{where} refused the key: {answer.describe()}", _key_fix(provider)
        )
    return Check(name, True, f"{where} answers")


def check_key(ctx: Context) -> list[Check]:
    assert ctx.settings is not None
    if ctx.providers is None or not ctx.used(DEFAULT_PROVIDER):
        return []  # no call goes to OpenAI: its key is not needed
    if not ctx.settings.api_key():
        return [
            Check("api key", False, "OPENAI_API_KEY is not set", "export OPENAI_API_KEY=sk-...")
        ]
    answer = ctx.gateway().list_models()
    if answer.status == 401:
        return [
            Check(
                "api key",
                False,
                f"the API refused the key: {answer.describe()}",
                "set OPENAI_API_KEY to a valid key of this organization (platform.openai.com, "
                "API keys)",
            )
        ]
    if not answer.answered:
        return [Check("api key", False, f"not checked: {answer.describe()}", "see provider openai")]
    return [Check("api key", True, f"accepted (...{ctx.settings.api_key()[-4:]})")]


def check_models(ctx: Context) -> list[Check]:
    from pipeline.intake.catalog import Lifecycle, load_catalog

    assert ctx.settings is not None
    if ctx.providers is None:
        return []  # the provider check said why
    providers = ctx.providers
    uses = ctx.uses or ((None, ctx.settings.default_model),)
    by_provider = sorted({(p or providers.default, m) for p, m in uses})
    results = [
        _model_elsewhere(ctx, provider, model)
        for provider, model in by_provider
        if provider != DEFAULT_PROVIDER
    ]
    gateway = ctx.gateway()
    catalog = load_catalog(ctx.settings.catalog_file)
    for model in sorted({m for p, m in by_provider if p == DEFAULT_PROVIDER}):
        name = f"model {model}"
        info = catalog.get(model)
        if info is not None and info.state_on(ctx.today) == Lifecycle.GONE:
            results.append(Check(name, False, info.gone_reason(), "move the rows to another model"))
            continue
        ends_soon = (
            info is not None
            and info.shutdown_on is not None
            and (info.shutdown_on - ctx.today).days <= 1
        )
        if ends_soon:
            assert info is not None
            instead = f" to {info.replacement}" if info.replacement else ""
            results.append(
                Check(
                    name,
                    False,
                    f"shuts down on {info.shutdown_on}: a night run from then on is refused",
                    f"move the rows{instead} (--model-map {model}={info.replacement or 'NEW'})",
                )
            )
            continue
        answer = gateway.lookup(model)
        if answer.status == 401:
            results.append(
                Check(name, False, "not checked: the key was refused", "see api key", True)
            )
        elif answer.status == 403:
            results.append(
                Check(
                    name,
                    False,
                    f"403: {answer.message or 'organization must be verified'}",
                    "GPT Image models need a verified organization: an owner verifies it at "
                    f"{VERIFY_URL} (Verify Organization); access follows within about 15 minutes",
                )
            )
        elif answer.status == 404 or (answer.status == 400 and answer.code == "invalid_value"):
            results.append(
                Check(
                    name,
                    False,
                    f"not available to this key and organization ({answer.describe()})",
                    "choose another model (--model, or the manifest's model column) or give "
                    "this key's project access to it",
                )
            )
        elif not answer.ok:
            results.append(
                Check(name, False, f"not checked: {answer.describe()}", "see provider openai")
            )
        elif info is not None and info.state_on(ctx.today) == Lifecycle.DEPRECATED:
            when = f" on {info.shutdown_on}" if info.shutdown_on else ""
            note = f"; replacement {info.replacement}" if info.replacement else ""
            results.append(Check(name, True, f"available; shuts down{when}{note}: plan a move"))
        else:
            results.append(Check(name, True, "available to this key"))
    return results


def _model_elsewhere(ctx: Context, name: str, model: str) -> Check:
    """`model` on a provider other than OpenAI: configured, deploying or serving it; on a
    gateway, the gateway knows it (a free lookup)."""
    from pipeline.run.gateway import check_lane

    title = f"model {model} on {name}"
    assert ctx.providers is not None
    provider = ctx.providers.providers.get(name)
    if provider is None:
        return Check(
            title,
            False,
            f"provider {name} (named by the manifest) is not configured: the configured "
            f"providers are {', '.join(ctx.providers.names())}",
            "correct the rows' provider column, or configure it (docs/providers.md)",
        )
    if not provider.serves(model):
        return Check(title, False, provider.not_served(model), "see the message")
    lanes = provider.lanes(model)
    if provider.kind == Kind.AZURE:
        names = ", ".join(lane.deployment for lane in lanes)
        return Check(title, True, f"deployed as {names} (each checked below)")
    if model in provider.deployments:
        names = ", ".join(lane.deployment for lane in lanes)
        return Check(title, True, f"sent as {names} (each checked below)")
    answer = check_lane(ctx.gateway(), lanes[0])
    if answer.ok:
        return Check(title, True, f"{provider.connection.describe()} serves it")
    if answer.status == 401:
        return Check(title, False, "not checked: the key was refused", f"see provider {name}", True)
    if answer.status == 404 or (answer.status == 400 and answer.code == "invalid_value"):
        return Check(
            title,
            False,
            f"{provider.connection.describe()} does not serve it ({answer.describe()})",
            f"choose a model it serves, or another provider (--provider, the rows' provider "
            f"column); {provider.origin} configures it",
        )
    return Check(title, False, f"not checked: {answer.describe()}", f"see provider {name}")


def check_deployments(ctx: Context) -> list[Check]:
    """Each deployment of each provider in use that has deployments (Azure's, and the names a
    gateway sends), probed for free with `gateway.check_lane`."""
    from pipeline.run.gateway import check_lane

    results = []
    for provider in ctx.in_use():
        for lanes in provider.deployments.values():
            for lane in lanes:
                try:
                    answer = check_lane(ctx.gateway(), lane)
                except ConfigError as exc:  # Entra ID without azure-identity
                    results.append(Check(f"deployment {lane.scope}", False, str(exc), "see above"))
                    continue
                results.append(_deployment_check(provider, lane, answer))
    return results


def _deployment_check(provider: Provider, lane: Lane, answer: Answer) -> Check:
    """What `check_lane`'s answer says about one deployment, and the setting that fixes it."""
    from pipeline.run.retry import provider_misconfigured

    name = f"deployment {lane.scope}"
    where = lane.connection.describe()
    azure = lane.connection.kind == Kind.AZURE
    if answer.ok:
        how = (
            "busy (429), but there"
            if answer.status == 429
            else "endpoint, api-version, key and deployment accepted (an edit with n=0, "
            "refused as asked, unbilled)"
            if azure
            else "the gateway knows it"
        )
        return Check(name, True, f"{lane.deployment} of {lane.model} at {where}: {how}")
    said = answer.describe()
    if answer.status is None or answer.status >= 500:
        return Check(
            name,
            False,
            f"{where} does not answer: {said}",
            f"check the network, a proxy, or {_setting(provider, 'url')}; the provider may be down",
        )
    if answer.status in (401, 403):
        return Check(name, False, f"{where} refused the credential: {said}", _key_fix(provider))
    if answer.status == 404 and answer.code == "DeploymentNotFound":
        return Check(
            name,
            False,
            f"{where} has no deployment {lane.deployment}: {said}",
            f"correct the deployment name of {lane.model} in {_setting(provider, 'deployments')} "
            "(the resource's Deployments list), or create it there",
        )
    if provider_misconfigured(answer.status, answer.code, answer.message):
        return Check(
            name,
            False,
            f"{where} refused the path or api-version: {said}",
            f"set {_setting(provider, 'api_version')} to an api-version the resource supports, "
            "e.g. 2025-04-01-preview (or v1), and check the endpoint "
            f"({_setting(provider, 'url')}: https://NAME.openai.azure.com, no path)",
        )
    if answer.status == 404:
        return Check(
            name,
            False,
            f"{where} does not know {lane.deployment}: {said}",
            f"correct the deployment name in {_setting(provider, 'deployments')}",
        )
    return Check(name, False, f"{where} answered {said}", "see the message")


def _setting(provider: Provider, what: str) -> str:
    """The setting a person changes to fix `what` (url, api_version, deployments, key) of
    `provider`: a TOML key of its table, or the environment variable it came from."""
    table = provider.origin.startswith("[providers.")
    if what == "key":
        return provider.connection.key_source or "the key"
    if table:
        key = {
            "url": "endpoint" if provider.kind == Kind.AZURE else "base_url",
            "api_version": "api_version",
            "deployments": "deployments",
        }[what]
        return f"providers.{provider.name}.{key} ({CONFIG_VARIABLE})"
    if provider.kind == Kind.AZURE:
        return {
            "url": "AZURE_OPENAI_ENDPOINT",
            "api_version": "OPENAI_API_VERSION",
            "deployments": "EDITBATCH_AZURE_DEPLOYMENTS",
        }[what]
    return "OPENAI_BASE_URL" if what == "url" else f"providers.{provider.name}.{what}"


def _key_fix(provider: Provider) -> str:
    if provider.connection.auth == Auth.ENTRA_ID:
        return (
            "check the Entra ID credential (az login, a managed identity, AZURE_CLIENT_ID...) "
            "and give it the Cognitive Services OpenAI User role on the resource"
        )
    return f"set {_setting(provider, 'key')} to a valid key of {provider.connection.describe()}"


def check_data(ctx: Context) -> list[Check]:
    from pipeline.cost.pricing import load_prices
    from pipeline.intake.catalog import load_catalog

    assert ctx.settings is not None
    limit = ctx.settings.max_data_age_days
    results = []
    for name, as_of, setting in (
        ("prices", load_prices(ctx.settings.prices_file).as_of, "EDITBATCH_PRICES_FILE"),
        ("catalogue", load_catalog(ctx.settings.catalog_file).as_of, "EDITBATCH_CATALOG_FILE"),
    ):
        day = _first_date(as_of)
        if day is None:
            results.append(Check(name, False, f"no date ({as_of!r})", f"date it in {setting}"))
            continue
        age = (ctx.today - day).days
        if age > limit:
            results.append(
                Check(
                    name,
                    False,
                    f"as of {day}, {age} days old (more than EDITBATCH_MAX_DATA_AGE_DAYS={limit})",
                    f"check the current figures and put them in a file named by {setting} "
                    "(or upgrade editbatch)",
                )
            )
        else:
            results.append(Check(name, True, f"as of {day} ({age} days old)"))
    return results


def check_rate_limit(ctx: Context) -> list[Check]:
    if ctx.probe_edit is None:
        return []  # only with --probe
    assert ctx.settings is not None
    return [ctx.probe_edit(ctx.settings)]


CHECKS: list[tuple[str, CheckFn]] = [
    ("settings", check_settings),
    ("database", check_database),
    ("redis", check_redis),
    ("workers", check_workers),
    ("output", check_output),
    ("provider", check_provider),
    ("api key", check_key),
    ("models", check_models),
    ("deployments", check_deployments),
    ("data", check_data),
    ("rate limit", check_rate_limit),
]


# -- helpers --------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _first_date(text: str) -> date | None:
    for word in text.replace("(", " ").replace("/", " ").split():
        try:
            return date.fromisoformat(word)
        except ValueError:
            continue
    return None


def _mask(url: str) -> str:
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{head}://{user}:****@{host}"


def temp_png() -> Path:
    """A small opaque PNG for the --probe edit (removed by the caller)."""
    from PIL import Image

    handle, name = tempfile.mkstemp(suffix=".png", prefix="editbatch-doctor-")
    os.close(handle)
    Image.new("RGB", (256, 256), (200, 200, 200)).save(name)
    return Path(name)
