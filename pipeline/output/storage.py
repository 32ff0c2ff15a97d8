"""Where outputs land: a local folder or any fsspec URL (s3://bucket/prefix, file://...).

Writes are atomic: a reader never sees a partial file at a final path. Locally that is a
temporary file in the same folder, fsync, then `os.replace`; on object stores a single PUT is
atomic by nature.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError


class Storage:
    """An output root. `write(relative_name, data)` returns the final URI."""

    def __init__(self, root: str) -> None:
        self.root_uri = root
        fs, path = fsspec.core.url_to_fs(root)
        self.fs = fs
        self.is_local = isinstance(fs, LocalFileSystem)
        self.root = str(Path(path).resolve()) if self.is_local else path.rstrip("/")

    def uri(self, name: str) -> str:
        if self.is_local:
            return str(Path(self.root) / name)
        return f"{self.fs.unstrip_protocol(self.root)}/{name}"

    def _local_target(self, name: str) -> Path:
        root = Path(self.root)
        target = (root / name).resolve()
        if root != target and root not in target.parents:
            raise StorageError(f"output name {name!r} resolves outside the output root {root}")
        return target

    def write(self, name: str, data: bytes) -> str:
        """Write `data` atomically under `name`; raise StorageError naming the path on failure."""
        if self.is_local:
            target = self._local_target(name)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # A symlinked folder inside the root could still point outside: re-check.
                self._local_target(name)
                # Not mkstemp: its file is 0600, and os.replace would keep that mode. Created
                # like this, the file gets what any new file gets (0666 less the umask).
                tmp = target.parent / f".tmp-{secrets.token_hex(8)}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
            return str(target)
        try:
            # pipe_file, not open("wb"): s3fs sends one PUT below 100 MiB (above, a multipart
            # upload that is aborted on error), whereas a file object closed after an error
            # still commits what it holds, and turns multipart at 50 MiB.
            self.fs.pipe_file(f"{self.root}/{name}", data)
        except Exception as exc:  # fsspec backends raise their own types
            raise StorageError(f"cannot write {self.uri(name)}: {exc}") from exc
        return self.uri(name)
