"""GIF and SVG outputs end to end: `editbatch check` and `editbatch run` in subprocesses, the real
openai SDK over HTTP to the sandbox, files under the names the person chose, and the ledger equal
to the sandbox's bill."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline.output.formats import describe
from pipeline.sandbox import SandboxConfig, SandboxServer
from tests.conftest import FAKE_KEY, billed_total
from tests.factories import make_image, write_manifest

MODEL = "gpt-image-2.5-sunburst"  # GIF and SVG access in the sandbox's default config


def editbatch(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gif_and_svg_rows_run_end_to_end(tmp_path: Path) -> None:
    """A manifest with GIF, SVG and complexity rows: `check` notes what the catalogue does not
    know and rejects, by row and field, what it knows a model cannot do (a catalogue file says
    gpt-image-2 makes no GIF); `run` sends only the good rows and writes each GIF (with the
    frames and durations asked for) and SVG under its name, with sha256, bytes and size in the
    report, and the ledger equal to the sandbox's bill."""
    folder = tmp_path / "in"
    make_image(folder / "shoe.png", (512, 512))
    make_image(folder / "bag.png", (600, 400), color=(40, 160, 90))
    rows = [
        {"id": "anim", "image": "shoe.png", "prompt": "make it spin", "output_format": "gif",
         "frame_count": "4", "frame_duration_ms": "120", "size": "1024x1024", "quality": "low"},
        {"id": "twice", "image": "bag.png", "prompt": "make it bounce", "output_format": "gif",
         "n": "2", "size": "1024x1024", "quality": "low", "complexity": "high"},
        {"id": "logo", "image": "shoe.png", "prompt": "as a flat vector logo",
         "output_format": "svg", "svg_effort": "low", "size": "1024x1024", "quality": "medium"},
        {"id": "plain", "image": "bag.png", "prompt": "studio sweep", "output_format": "png",
         "complexity": "low", "size": "1536x1024", "quality": "low"},
        {"id": "nogif", "image": "bag.png", "prompt": "spin", "output_format": "gif",
         "model": "gpt-image-2", "size": "1024x1024", "quality": "low"},
    ]  # fmt: skip
    manifest = write_manifest(folder / "m.csv", rows)
    catalogue = tmp_path / "catalog.toml"
    catalogue.write_text('[models."gpt-image-2"]\ngif = false\nsource = "our project"\n')
    billing = tmp_path / "billing.jsonl"
    out = tmp_path / "out"
    with SandboxServer(SandboxConfig(billing_log=str(billing))) as sandbox:
        env = {
            "EDITBATCH_HOME": str(tmp_path / "home"),
            "OPENAI_BASE_URL": sandbox.base_url,
            "OPENAI_API_KEY": FAKE_KEY,
            "EDITBATCH_CATALOG_FILE": str(catalogue),
        }
        checked = editbatch(["check", str(manifest), "--model", MODEL, "--json"], env, tmp_path)
        assert checked.returncode == 1, checked.stdout + checked.stderr  # the gpt-image-2 row
        report = json.loads(checked.stdout)
        assert (report["accepted"], report["rejected"]) == (4, 1)
        ((error),) = report["errors"]
        assert (error["row"], error["field"]) == (5, "output_format")
        assert "gpt-image-2 does not make GIF output" in error["reason"]
        notes = report["notes"]
        for row, what in ((1, "GIF"), (2, "complexity"), (2, "GIF"), (3, "SVG"), (4, "complexity")):
            assert any(n.startswith(f"row {row}:") and "does not know" in n and what in n
                       for n in notes), (row, what, notes)  # fmt: skip

        proc = editbatch(
            ["run", str(manifest), "--model", MODEL, "--output", str(out)], env, tmp_path
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        status = json.loads(editbatch(["status", "1", "--json"], env, tmp_path).stdout)

    assert status["counts"]["succeeded"] == 4 and status["counts"]["rejected"] == 1
    billed, per_request = billed_total(billing)
    assert len(per_request) == 4  # nothing was sent for the rejected row
    assert str(billed) == status["cost_usd"]

    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("report-"))
    assert names == ["anim_1.gif", "logo_1.svg", "plain_1.png", "twice_1.gif", "twice_2.gif"]
    with Image.open(out / "anim_1.gif") as gif:
        assert (gif.format, gif.size, gif.n_frames) == ("GIF", (1024, 1024), 4)
        assert gif.info["duration"] == 120
    with Image.open(out / "twice_2.gif") as gif:
        assert gif.n_frames == 9  # the API's default
    svg = (out / "logo_1.svg").read_bytes()
    assert svg.lstrip().startswith(b"<svg") and describe(svg).width == 1024

    jobs = {j["id"]: j for j in json.loads((out / "report-1.json").read_text())["jobs"]}
    for key, files in (("anim", ["anim_1.gif"]), ("twice", ["twice_1.gif", "twice_2.gif"]),
                       ("logo", ["logo_1.svg"]), ("plain", ["plain_1.png"])):  # fmt: skip
        job = jobs[key]
        data = [(out / name).read_bytes() for name in files]
        assert job["outputs"] == [str(out / name) for name in files]
        assert job["sha256"] == [hashlib.sha256(d).hexdigest() for d in data]
        assert job["bytes"] == [str(len(d)) for d in data]
        assert job["formats"] == [name.rsplit(".", 1)[1] for name in files]
    assert jobs["logo"]["sizes"] == ["1024x1024"] and jobs["plain"]["sizes"] == ["1536x1024"]
    assert jobs["nogif"]["state"] == "rejected" and jobs["nogif"]["outputs"] == []
