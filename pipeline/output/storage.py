"""Where outputs land: a local folder or any fsspec URL (s3://bucket/prefix, file://...).

Writes are atomic: a reader never sees a partial file at a final path. Locally that is
`pipeline.files.write_atomic` (fsynced); on object stores a single PUT is
atomic by nature.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError
from pipeline.files import write_atomic


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
                write_atomic(target, data, durable=True)
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
