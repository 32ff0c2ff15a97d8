"""`editbatch check`: a table of rejected rows and a non-zero exit; zero on the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.factories import make_image, make_mask, write_manifest
from tests.servers import REPO


def check(
    manifest: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check", str(manifest), *extra],
        env={
            **os.environ,
            "COLUMNS": "200",
            "EDITBATCH_HOME": str(manifest.parent / ".eb"),
            **(env or {}),
        },
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


def test_a_model_shutting_down_tomorrow_warns_today_and_is_refused_from_its_date(
    tmp_path: Path,
) -> None:
    """On 2026-11-30 a gpt-image-1.5 row passes `check` with a warning naming 2026-12-01, the
    replacement and the switch; on 2026-12-01 the same row is rejected at preflight with the
    date and the replacement. A gone model is never sent (it never gets past preflight)."""
    make_image(tmp_path / "ok.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"id": "A", "image": "ok.png", "prompt": "p", "model": "gpt-image-1.5"},
            {"id": "B", "image": "ok.png", "prompt": "q", "model": "gpt-image-2.5-flare"},
        ],
    )
    today = check(manifest, env={"EDITBATCH_TODAY": "2026-11-30"})
    assert today.returncode == 0, today.stdout + today.stderr
    assert "2 rows: 2 ok, 0 rejected" in today.stdout
    warning = " ".join(today.stderr.split())
    assert "gpt-image-1.5 (1 rows) shuts down on 2026-12-01 (tomorrow)" in warning
    assert "--model-map gpt-image-1.5=gpt-image-2.5-sunburst" in warning
    tomorrow = check(manifest, "--json", env={"EDITBATCH_TODAY": "2026-12-01"})
    assert tomorrow.returncode == 1
    (error,) = json.loads(tomorrow.stdout)["errors"]
    assert (error["row"], error["field"]) == (1, "model")
    assert "shut down on 2026-12-01" in error["reason"]
    assert "gpt-image-2.5-sunburst" in error["reason"]
    # The switch it names works: the same manifest, mapped, is clean on 2026-12-01.
    mapped = check(
        manifest,
        "--model-map",
        "gpt-image-1.5=gpt-image-2.5-sunburst",
        env={"EDITBATCH_TODAY": "2026-12-01"},
    )
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    assert "shuts down" not in mapped.stderr


def test_model_map_at_intake_checks_the_new_models_rules(tmp_path: Path) -> None:
    """Rows moved by --model-map are checked against the new model: an input_fidelity that
    gpt-image-1.5 takes and the 2.5 models do not is reported by row and field."""
    make_image(tmp_path / "ok.png")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"id": "A", "image": "ok.png", "prompt": "p", "model": "gpt-image-1.5"},
            {
                "id": "B",
                "image": "ok.png",
                "prompt": "q",
                "model": "gpt-image-1.5",
                "input_fidelity": "high",
            },
        ],
    )
    proc = check(manifest, "--json", "--model-map", "gpt-image-1.5=gpt-image-2.5-sunburst")
    assert proc.returncode == 1
    (error,) = json.loads(proc.stdout)["errors"]
    assert (error["row"], error["field"]) == (2, "input_fidelity")
    assert "gpt-image-2.5-sunburst does not take input_fidelity" in error["reason"]
    bad = check(manifest, "--model-map", "gpt-image-1.5")
    assert bad.returncode == 2 and "give OLD=NEW" in bad.stderr
