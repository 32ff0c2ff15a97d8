"""The Typer applications the command modules register on."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Run AI image edits in bulk, reliably and at a known cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
