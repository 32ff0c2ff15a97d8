"""Local files: the one atomic write, sha256 of a file read in chunks, an image's size.

Every file editbatch writes in place of another (spooled outputs, converted inputs, the remote
cache, final outputs in a local folder) goes through `write_atomic`, so a reader or a crash
never leaves a half-written file at a final path.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def write_atomic(target: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `target`: a reader sees the old file or the whole new one, never a part.

    A temporary file in the same folder, then `os.replace`. `durable` also fsyncs the data
    before the rename (final outputs: a power cut must not leave an empty file under the name).
    The file gets the mode any new file gets (0666 less the umask); mkstemp's 0600 would be
    kept by the rename.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def image_sizes(paths: Iterable[str]) -> tuple[tuple[int, int], ...]:
    """Each image's (width, height) from its header, (0, 0) when it cannot be read (estimates
    count an unknown size as 1024x1024)."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except OSError:
            sizes.append((0, 0))
    return tuple(sizes)
