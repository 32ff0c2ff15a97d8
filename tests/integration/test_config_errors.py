"""A configuration mistake stops the real processes (`editbatch`, `celery -A worker.app worker`)
with exit status 2 and the same single line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.servers import REPO

LINE = (
    "error: EDITBATCH_CONCURRENCY='abc': input should be a valid integer, unable to parse string "
    "as an integer; accepted: a whole number (at least 1, at most 1000)"
)


def run(args: list[str], tmp: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EDITBATCH_", "OPENAI_"))}
    return subprocess.run(
        args,
        env={**clean, "PYTHONPATH": str(REPO), "EDITBATCH_HOME": str(tmp / "home"), **env},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_and_worker_say_the_same_line_for_a_bad_setting(tmp_path: Path) -> None:
    """`EDITBATCH_CONCURRENCY=abc` gives the CLI and the Celery worker (and beat) one line and
    exit 2: Celery's app loader does not wrap it in a traceback."""
    commands = [
        [sys.executable, "-m", "pipeline.cli", "status"],
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo"],
        [sys.executable, "-m", "celery", "-A", "worker.app", "beat"],
    ]
    for command in commands:
        proc = run(command, tmp_path, EDITBATCH_CONCURRENCY="abc")
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert proc.stderr.strip() == LINE, (command, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr


def test_worker_without_the_database_driver_names_the_extra(tmp_path: Path) -> None:
    """A worker whose database URL needs psycopg, on a machine without it, says which extra to
    install before it starts consuming (not at its first task)."""
    hide = tmp_path / "hide-psycopg"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['psycopg'] = None\n")
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("EDITBATCH_")},
            "PYTHONPATH": f"{hide}{os.pathsep}{REPO}",
            "EDITBATCH_DATABASE_URL": "postgresql+psycopg://editbatch@db.invalid/editbatch",
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "error: EDITBATCH_DATABASE_URL='postgresql+psycopg://editbatch@db.invalid/editbatch' "
        "needs the database driver 'psycopg', which is not installed: "
        "pip install 'editbatch[postgres]'"
    )
