"""The spool: raw outputs of a paid call, on local disk, until they are collected.

`spool/<batch>/<job>/<claim token>/<index>.<ext>`: the claim token is part of the path, so a
worker whose lease lapsed never touches the files of the worker that took the job over. Files
are written atomically; the collector deletes them once their final copy is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pipeline.files import write_atomic


def folder(spool_dir: Path, batch_id: int, job_id: int, token: str) -> Path:
    """Where one claim of one job spools its outputs."""
    return spool_dir / str(batch_id) / str(job_id) / token


def write(
    spool_dir: Path, batch_id: int, job_id: int, token: str, ext: str, images: Iterable[bytes]
) -> list[Path]:
    """Spool each image as `<index>.<ext>` (1-based); the paths, in order."""
    target = folder(spool_dir, batch_id, job_id, token)
    paths = []
    for index, data in enumerate(images, start=1):
        path = target / f"{index}.{ext}"
        write_atomic(path, data)
        paths.append(path)
    return paths


def discard(paths: Iterable[Path]) -> None:
    """Delete spooled files nobody will collect (the claim was lost before they were recorded)."""
    for path in paths:
        path.unlink(missing_ok=True)
