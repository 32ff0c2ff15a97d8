"""Move spooled outputs to their final names in storage, atomically, and record them.

Re-runnable: an output is collected once (collected_at set); a storage failure leaves the raw
file in the spool and the reason on the output row, and `editbatch collect BATCH` tries again.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import fsspec
from PIL import Image
from sqlalchemy import func, select

from pipeline.db.models import Batch, Job, Output, utcnow
from pipeline.db.session import Database
from pipeline.errors import OutputNameError, StorageError
from pipeline.intake.naming import render_name
from pipeline.output import masks
from pipeline.output.formats import describe, is_svg
from pipeline.output.storage import Storage
from pipeline.spec import EditSpec

log = logging.getLogger("editbatch.collector")


class StorageCache:
    """One Storage per output root, shared by the threads of a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Storage] = {}

    def get(self, root: str) -> Storage:
        with self._lock:
            if root not in self._items:
                self._items[root] = Storage(root)
            return self._items[root]


PIL_FORMAT = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}


def finish_output(spec: EditSpec, raw: bytes) -> tuple[bytes, dict[str, object]]:
    """Post-process one raw API output; returns the final bytes and what to record about them.

    Masked edits: the drift of the raw output (share of the protected area it changed) is
    measured. `mask_mode=strict`: the output is brought back to the source's size and every
    protected pixel (outside the feather band) is put back exactly, in the requested format.
    An SVG output is kept as it came (no pixels to measure; preflight refuses strict masks
    for SVG, and GIF output takes no mask).
    """
    if is_svg(raw):
        return raw, _describe(raw, spec, None)
    drift: float | None = None
    img: Image.Image
    with Image.open(io.BytesIO(raw)) as img:
        # Without a mask only the header is needed (size, format): no full decode.
        if spec.mask is not None:
            img.load()
            with Image.open(spec.images[0]) as src, Image.open(spec.mask) as mask:
                src.load()
                mask.load()
                drift = masks.drift_share(src, mask, img)
                if spec.mask_mode == "strict":
                    img = masks.composite_strict(src, mask, img, spec.mask_feather)
                    raw = _encode(img, spec)
        width, height = img.size
        fmt = (img.format or spec.output_format).lower()
    return raw, {"width": width, "height": height, "format": fmt, "drift": drift}


def _describe(raw: bytes, spec: EditSpec, drift: float | None) -> dict[str, object]:
    described = describe(raw)
    return {
        "width": described.width,
        "height": described.height,
        "format": described.format or spec.output_format,
        "drift": drift,
    }


def _encode(img: Image.Image, spec: EditSpec) -> bytes:
    fmt = PIL_FORMAT.get(spec.output_format, "PNG")
    if fmt == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    options: dict[str, object] = {}
    if spec.output_compression is not None and fmt in ("JPEG", "WEBP"):
        options["quality"] = max(1, 100 - spec.output_compression)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


@dataclass(frozen=True)
class CopiedOutputs:
    ext: str
    data: tuple[bytes, ...]
    drift: tuple[float | None, ...]


def copy_outputs(db: Database, donor_job_id: int, storages: StorageCache) -> CopiedOutputs:
    """The final bytes of an earlier job's outputs (to reuse them); OSError if any is gone."""
    with db.session() as session:
        spec_json = session.scalar(select(Job.spec).where(Job.id == donor_job_id))
        outputs = list(
            session.scalars(
                select(Output).where(Output.job_id == donor_job_id).order_by(Output.index)
            )
        )
    if not outputs or spec_json is None:
        raise OSError(f"job {donor_job_id} has no outputs")
    data = []
    for out in outputs:
        if out.uri:
            with fsspec.open(out.uri, "rb") as fh:
                blob = fh.read()
            if out.sha256 and hashlib.sha256(blob).hexdigest() != out.sha256:
                raise OSError(f"{out.uri} changed since it was written (sha256 differs)")
        elif out.spool_path:
            blob = Path(out.spool_path).read_bytes()
        else:
            raise OSError(f"job {donor_job_id} output {out.index} has no file")
        data.append(blob)
    ext = EditSpec.from_json(spec_json).ext
    return CopiedOutputs(ext, tuple(data), tuple(o.drift for o in outputs))


def collect_job(db: Database, job_id: int, storages: StorageCache) -> int:
    """Collect every uncollected output of one job; returns how many were written."""
    with db.session() as session:
        row = session.execute(
            select(Job.spec, Job.batch_id, Job.reused_from_job_id, Batch.output_uri)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id == job_id)
        ).one()
        outputs = list(
            session.scalars(
                select(Output).where(Output.job_id == job_id, Output.collected_at.is_(None))
            )
        )
        if not outputs:
            return 0
        spec = EditSpec.from_json(row.spec)
        storage = storages.get(row.output_uri)
        written = 0
        for out in outputs:
            try:
                name = render_name(spec, out.index, row.batch_id)
                assert out.spool_path is not None
                raw = Path(out.spool_path).read_bytes()
                if row.reused_from_job_id is None:
                    data, meta = finish_output(spec, raw)
                else:  # already post-processed when it was first bought
                    data, meta = raw, _describe(raw, spec, out.drift)
                uri = storage.write(name, data)
            except (StorageError, OutputNameError, OSError, ValueError) as exc:
                out.collect_error = str(exc)
                log.warning("job %s output %s not collected: %s", job_id, out.index, exc)
                continue
            out.uri = uri
            out.sha256 = hashlib.sha256(data).hexdigest()
            out.bytes = len(data)
            out.width = meta["width"] if isinstance(meta["width"], int) else None
            out.height = meta["height"] if isinstance(meta["height"], int) else None
            out.format = str(meta["format"])
            out.drift = meta["drift"] if isinstance(meta["drift"], float) else None
            out.collected_at = utcnow()
            out.collect_error = None
            written += 1
        session.commit()
        for out in outputs:
            if out.collected_at is not None and out.spool_path:
                Path(out.spool_path).unlink(missing_ok=True)
        return written


def collect_batch(db: Database, batch_id: int, storages: StorageCache) -> tuple[int, int]:
    """Retry collection for a whole batch; returns (written, still uncollected)."""
    with db.session() as session:
        job_ids = list(
            session.scalars(
                select(Output.job_id)
                .join(Job, Job.id == Output.job_id)
                .where(Job.batch_id == batch_id, Output.collected_at.is_(None))
                .distinct()
            )
        )
    written = sum(collect_job(db, job_id, storages) for job_id in job_ids)
    with db.session() as session:
        left = session.scalar(
            select(func.count(Output.id))
            .join(Job, Job.id == Output.job_id)
            .where(Job.batch_id == batch_id, Output.collected_at.is_(None))
        )
    return written, int(left or 0)
