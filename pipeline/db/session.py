"""Engine and session factory; migrations are applied on first use."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

import migrations
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATED: set[str] = set()
_LOCK = threading.Lock()


def alembic_config(url: str) -> Config:
    """Alembic config pointing at the packaged `migrations/` folder."""
    from alembic.config import Config  # imported when needed: it costs 70 ms at start-up

    script_dir = Path(migrations.__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(script_dir))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _ensure_sqlite_folder(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(str(parsed.database)).parent.mkdir(parents=True, exist_ok=True)


# The extra of pyproject.toml that installs a driver, by the module SQLAlchemy imports.
DRIVER_EXTRAS = {"psycopg": "editbatch[postgres]", "psycopg2": "editbatch[postgres]"}


def check_driver(url: str, setting: str = "EDITBATCH_DATABASE_URL") -> None:
    """ConfigError naming the setting (and the extra to install) if `url` cannot be used: it
    does not parse, names no known database, or its driver is not installed."""
    shown = _masked(url)
    try:
        make_url(url).get_dialect().import_dbapi()
    except ArgumentError:
        raise ConfigError(
            f"{setting}={shown!r} is not a SQLAlchemy URL: expected e.g. sqlite:///path.db "
            "or postgresql+psycopg://user@host/db"
        ) from None
    except NoSuchModuleError:
        raise ConfigError(
            f"{setting}={shown!r} names an unknown database or driver: use sqlite:/// or "
            "postgresql+psycopg://"
        ) from None
    except ImportError as exc:
        module = (exc.name or "").split(".")[0]
        extra = DRIVER_EXTRAS.get(module)
        fix = f"pip install '{extra}'" if extra else f"install the Python package {module!r}"
        raise ConfigError(
            f"{setting}={shown!r} needs the database driver {module!r}, which is not "
            f"installed: {fix}"
        ) from None


def _masked(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def make_engine(url: str) -> Engine:
    """An engine with the pragmas SQLite needs for many concurrent writers."""
    check_driver(url)
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "future": True}
    if parsed.get_backend_name() == "sqlite":
        _ensure_sqlite_folder(url)
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
        kwargs.pop("pool_pre_ping")
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 40
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy emit BEGIN itself (below) instead of pysqlite's deferred BEGIN.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(conn: Any) -> None:
            # A deferred transaction that reads and then writes fails at once with "database
            # is locked" when another writer got in between (the busy timeout does not apply
            # to that upgrade). Taking the write lock up front makes every writer wait its turn.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def at_head(engine: Engine) -> bool:
    """True when the database is already at the newest revision (checked without alembic)."""
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError:  # no database or no version table yet
        return False
    return row is not None and row[0] == migrations.HEAD


def ensure_migrated(url: str, engine: Engine | None = None) -> None:
    """Run `alembic upgrade head` once per process per database (skipped when current)."""
    with _LOCK:
        if url in _MIGRATED:
            return
        _ensure_sqlite_folder(url)
        if engine is not None and at_head(engine):
            _MIGRATED.add(url)
            return
        try:
            upgrade(url)
        except DBAPIError:
            # Another process (a second worker starting at the same moment) migrated first;
            # once it has, upgrading again finds nothing to do.
            time.sleep(1.0)
            upgrade(url)
        _MIGRATED.add(url)


class Database:
    """An engine plus a session factory, built once per process and passed in."""

    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            ensure_migrated(url, self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()
