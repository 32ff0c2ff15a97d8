"""Alembic environment: uses the URL handed in by pipeline.db.session.alembic_config.

Run as `alembic -c migrations/alembic.ini ...` (development, `alembic check` in CI), the
database is EDITBATCH_DATABASE_URL when it is set, else the ini's scratch SQLite file.
"""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy import Numeric, create_engine, pool

from pipeline.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str | None:
    if config.config_file_name is not None and os.environ.get("EDITBATCH_DATABASE_URL"):
        return os.environ["EDITBATCH_DATABASE_URL"]
    return config.get_main_option("sqlalchemy.url")


def _compare_type(
    ctx: Any, inspected: Any, metadata: Any, inspected_type: Any, metadata_type: Any
) -> bool | None:
    """SQLite has no fixed-point type: NUMERIC(p, s) is only an affinity there, so a change of
    precision alters nothing (migration 0007) and is not a difference. Else: alembic's rule."""
    sqlite = ctx.dialect.name == "sqlite"
    if sqlite and isinstance(inspected_type, Numeric) and isinstance(metadata_type, Numeric):
        return False
    return None


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    assert url
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=_compare_type,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
