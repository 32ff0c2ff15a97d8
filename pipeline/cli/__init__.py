"""The `editbatch` command line: one module per group of commands.

app.py       the Typer apps
options.py   options shared by several commands, declared once
ui.py        tables, estimates, errors a person can act on
dispatch.py  where jobs go: Celery workers or this process (the one importer of `worker`)
intake.py    check, estimate
batches.py   submit, run
control.py   status, resume, pause, cancel, retry, collect
web.py       serve (the dashboard), export (approved outputs)
admin.py     nightly, sandbox, prices, config, db
"""

from __future__ import annotations

import sys

from pipeline.cli import admin, batches, control, intake, web  # noqa: F401  (register the commands)
from pipeline.cli.app import app
from pipeline.cli.ui import err
from pipeline.observe.logs import setup_logging
from pipeline.settings import get_settings

__all__ = ["app", "main"]

# `editbatch --help` lists the commands in the order a person meets them.
ORDER = (
    "check", "estimate", "run", "submit", "status", "resume", "pause", "cancel", "retry",
    "collect", "serve", "export", "nightly", "models", "prices", "config", "sandbox",
)  # fmt: skip
app.registered_commands.sort(
    key=lambda c: ORDER.index(c.name or c.callback.__name__)  # type: ignore[union-attr]
)


def main() -> None:
    try:
        settings = get_settings()
        json_logs, level = settings.log_json, settings.log_level or "WARNING"
    except ValueError:  # an invalid setting: the command reports it when it reads the settings
        json_logs, level = False, "WARNING"
    setup_logging(json=json_logs, level=level)
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to continue")
        sys.exit(130)
