"""`editbatch check`: a table of rejected rows and a non-zero exit; zero on the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.factories import make_image, make_mask, write_manifest
from tests.servers import REPO


def check(manifest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check", str(manifest), *extra],
        env={**os.environ, "COLUMNS": "200", "EDITBATCH_HOME": str(manifest.parent / ".eb")},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_example_is_clean() -> None:
    proc = check(REPO / "examples" / "manifest.csv")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "12 rows: 12 ok, 0 rejected" in proc.stdout


def test_check_bad_manifest_prints_table_and_fails(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png", size=(256, 256))
    make_mask(tmp_path / "small_mask.png", size=(128, 128))
    (tmp_path / "fake.png").write_text("this is text, not a picture")
    rows = [
        {"id": "A", "image": "ok.png", "prompt": "fine"},
        {"id": "B", "image": "ok.png", "mask": "small_mask.png", "prompt": "bad mask"},
        {"id": "C", "image": "fake.png", "prompt": "text file"},
        {"id": "D", "image": "ok.png", "prompt": "old", "model": "dall-e-2"},
        {"id": "E", "image": "ok.png", "prompt": "n", "n": "11"},
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    proc = check(manifest)
    assert proc.returncode == 1
    assert "5 rows: 1 ok, 4 rejected" in proc.stdout
    table = proc.stderr
    assert "Rejected rows" in table
    for key, field in (("B", "mask"), ("C", "image"), ("D", "model"), ("E", "n")):
        assert any(key in line and field in line for line in table.splitlines()), (key, table)
    as_json = json.loads(check(manifest, "--json").stdout)
    assert {(e["row"], e["field"]) for e in as_json["errors"]} >= {
        (2, "mask"),
        (3, "image"),
        (4, "model"),
        (5, "n"),
    }


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    proc = check(tmp_path / "nope.csv")
    assert proc.returncode == 2
    assert "manifest not found" in proc.stderr
    assert "Traceback" not in proc.stderr
