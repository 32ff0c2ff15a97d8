"""`editbatch doctor`: is tonight going to work? A list of named checks, each ✓ or ✗ with the fix.

    settings       every setting valid; no EDITBATCH_* variable that is no setting (a typo)
    database       reachable, at the newest migration
    redis          the broker (and the limiter's Redis) answer PING
    workers        Celery workers answer a ping: how many, their pool and threads
    output, spool  writable (a local folder or an fsspec URL such as s3://), by a test file
    provider       the API answers at all (`GET /models`, free)
    api key        set, and accepted (not 401)
    model M        each model of the manifest (or the default model) is available to this key
                   and organization (404: not for this key; 403: the organization must be
                   verified); gone, or shutting down by tomorrow, in the catalogue
    data           the price table and the catalogue are not older than
                   EDITBATCH_MAX_DATA_AGE_DAYS
    rate limit     (--probe) one low-quality edit, paid and shown first: the account's limit
                   from the rate-limit headers against EDITBATCH_IMAGES_PER_MINUTE

`CHECKS` is the list, in that order: each entry is a name and a function of the `Context`
returning `Check`s (one, or one per model). Another provider adds its own function (issue 15).
A check never raises: a failure is a ✗ whose `fix` says what to do. When the settings are
invalid nothing else can be checked, and the other checks are skipped.
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
from typing import Any

from pipeline import clock
from pipeline.errors import ConfigError, EditbatchError
from pipeline.settings import CONFIG_VARIABLE, Settings, variable

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
    """What the checks look at. The clients are built by `editbatch doctor` and passed in."""

    load_settings: Callable[[], Settings]
    output: str | None = None
    models: tuple[str, ...] = ()  # the manifest's models (empty: the default model)
    ping_workers: Callable[[], list[WorkerInfo]] | None = None
    probe_edit: Callable[[Settings], Check] | None = None  # --probe, after the price was agreed
    today: date = field(default_factory=clock.today)
    settings: Settings | None = None


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


def _gateway(settings: Settings) -> Any:
    from pipeline.run.gateway import Gateway

    return Gateway(settings.api_key(), settings.openai_base_url, 10.0)


def check_provider(ctx: Context) -> list[Check]:
    assert ctx.settings is not None
    base = ctx.settings.openai_base_url or "https://api.openai.com/v1"
    answer = _gateway(ctx.settings).list_models()
    if not answer.answered:
        return [
            Check(
                "provider openai",
                False,
                f"{base} does not answer: {answer.describe()}",
                "check the network, a proxy, or OPENAI_BASE_URL; the provider may be down",
            )
        ]
    return [Check("provider openai", True, f"{base} answers")]


def check_key(ctx: Context) -> list[Check]:
    assert ctx.settings is not None
    if not ctx.settings.api_key():
        return [
            Check("api key", False, "OPENAI_API_KEY is not set", "export OPENAI_API_KEY=sk-...")
        ]
    answer = _gateway(ctx.settings).list_models()
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
        return [Check("api key", False, f"not checked: {answer.describe()}", "see provider")]
    return [Check("api key", True, f"accepted (...{ctx.settings.api_key()[-4:]})")]


def check_models(ctx: Context) -> list[Check]:
    from pipeline.intake.catalog import Lifecycle, load_catalog

    assert ctx.settings is not None
    models = ctx.models or (ctx.settings.default_model,)
    gateway = _gateway(ctx.settings)
    catalog = load_catalog(ctx.settings.catalog_file)
    results = []
    for model in sorted(set(models)):
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
            results.append(Check(name, False, f"not checked: {answer.describe()}", "see provider"))
        elif info is not None and info.state_on(ctx.today) == Lifecycle.DEPRECATED:
            when = f" on {info.shutdown_on}" if info.shutdown_on else ""
            note = f"; replacement {info.replacement}" if info.replacement else ""
            results.append(Check(name, True, f"available; shuts down{when}{note}: plan a move"))
        else:
            results.append(Check(name, True, "available to this key"))
    return results


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
