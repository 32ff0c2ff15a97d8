from __future__ import annotations

from alembic.script import ScriptDirectory

import migrations
from pipeline.db.session import alembic_config


def test_head_constant_is_the_newest_revision() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script.get_current_head() == migrations.HEAD
