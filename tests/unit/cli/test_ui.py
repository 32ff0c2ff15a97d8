"""What a person reads when the database fails during a command: one line, the database's own
words without the SQL, and the one thing to do."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from pipeline.cli import dispatch
from pipeline.cli.ui import database_error
from pipeline.db.session import Database
from pipeline.errors import EditbatchError
from pipeline.settings import Settings


class DeadlockDetected(Exception):
    """Stands in for psycopg.errors.DeadlockDetected (its text has a DETAIL line)."""


def deadlock() -> OperationalError:
    orig = DeadlockDetected(
        "deadlock detected\nDETAIL:  Process 41 waits for ShareLock on transaction 9071"
    )
    return OperationalError("UPDATE jobs SET state=%(state)s WHERE ...", {"state": "x"}, orig)


def test_a_database_error_is_one_line_without_the_sql() -> None:
    text = str(database_error(deadlock()))
    assert "\n" not in text
    assert text.startswith(
        "the database failed during this command (DeadlockDetected: deadlock detected); "
    )
    assert text.endswith("run it again (if it keeps failing, check the database of "
                         "EDITBATCH_DATABASE_URL)")  # fmt: skip
    assert "UPDATE" not in text and "state" not in text and "Process 41" not in text


def test_a_stored_batch_whose_sending_failed_names_resume_not_a_new_submit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """Running `submit` again would store the batch twice: the message says how to send it."""

    def failing_send(*_args: object, **_kwargs: object) -> int:
        raise deadlock()

    monkeypatch.setattr("pipeline.batch.submit.send", failing_send)
    monkeypatch.setattr(dispatch, "celery_enqueue", lambda: None)
    monkeypatch.setattr(dispatch, "celery_dispatch_batch", lambda: None)
    db = Database(f"sqlite:///{tmp_path / 'e.db'}")
    with pytest.raises(EditbatchError) as info:
        dispatch.to_workers(db, 7, settings)
    assert str(info.value) == (
        "batch 7 is stored, but the database failed while its jobs were being sent "
        "(DeadlockDetected: deadlock detected); send them with: editbatch resume 7"
    )
