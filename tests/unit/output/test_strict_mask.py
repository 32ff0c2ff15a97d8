"""Strict masks keep their promise even when the model rewrites protected pixels."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from sqlalchemy import select

from pipeline.db.jobs import queued_job_ids
from pipeline.db.models import Job, Output
from pipeline.db.session import Database
from pipeline.run.deps import build_deps
from pipeline.run.executor import process_job
from pipeline.run.ratelimit import LocalLimiter
from pipeline.settings import Settings
from tests.factories import make_image, make_mask, write_manifest
from tests.unit.helpers import new_batch

FEATHER = 3
THRESHOLD = 8


def measured_drift(source: Image.Image, mask: Image.Image, output: Image.Image) -> float:
    """The test's own count: protected pixels (alpha 255) where a channel moved > THRESHOLD."""
    src = source.convert("RGB").load()
    out = output.convert("RGB").load()
    alpha = mask.getchannel("A").load()
    assert src is not None and out is not None and alpha is not None
    protected = changed = 0
    for y in range(source.height):
        for x in range(source.width):
            if alpha[x, y] == 255:
                protected += 1
                a, b = src[x, y], out[x, y]
                if max(abs(a[i] - b[i]) for i in range(3)) > THRESHOLD:  # type: ignore[index]
                    changed += 1
    return changed / protected


def test_strict_output_is_source_where_protected_and_drift_is_recorded(
    tmp_path: Path, db: Database, settings: Settings
) -> None:
    folder = tmp_path / "in"
    size = (512, 512)
    make_image(folder / "src.png", size=size)
    make_mask(folder / "mask.png", size=size, keep=(100, 100, 400, 400))
    common = {
        "image": "src.png",
        "mask": "mask.png",
        "prompt": "white background #sandbox:drift",
        "model": "gpt-image-2",
        "size": "512x512",
        "quality": "low",
        "mask_feather": FEATHER,
    }
    rows = [{"id": "guide", **common}, {"id": "strict", "mask_mode": "strict", **common}]
    manifest = write_manifest(folder / "m.csv", rows)
    result = new_batch(db, manifest, str(tmp_path / "out"))
    assert result.rejected == 0, result.errors
    deps = build_deps(settings, LocalLimiter(None, None), db)
    for ids in queued_job_ids(db, result.batch_id):
        for job_id in ids:
            assert process_job(job_id, deps).state == "succeeded"

    source = Image.open(folder / "src.png")
    mask = Image.open(folder / "mask.png")
    raw = Image.open(tmp_path / "out" / "guide_1.png")  # guide mode keeps the raw output
    strict = Image.open(tmp_path / "out" / "strict_1.png")
    expected_drift = measured_drift(source, mask, raw)
    assert expected_drift > 0.2  # the sandbox really did rewrite protected pixels

    with db.session() as s:
        drifts = {
            key: drift
            for key, drift in s.execute(
                select(Job.external_key, Output.drift).join(Output, Output.job_id == Job.id)
            )
        }
    assert drifts["guide"] == expected_drift
    assert drifts["strict"] == expected_drift  # measured on the raw output, before compositing

    assert strict.size == source.size
    src_px, out_px, alpha = source.load(), strict.convert("RGB").load(), mask.getchannel("A")
    # protected core: alpha 255 and more than FEATHER pixels from any edited pixel
    core = (100 + FEATHER + 1, 100 + FEATHER + 1, 400 - FEATHER - 1, 400 - FEATHER - 1)
    assert alpha.getpixel((core[0], core[1])) == 255
    mismatches = sum(
        1
        for y in range(core[1], core[3] + 1)
        for x in range(core[0], core[2] + 1)
        if src_px[x, y] != out_px[x, y]  # type: ignore[index]
    )
    assert mismatches == 0
    # outside the mask the edit is kept (the strict output is not simply the source)
    assert src_px[10, 10] != out_px[10, 10]  # type: ignore[index]
