"""The one exception tree of editbatch.

    EditbatchError                 root: anything editbatch raises on purpose
    ├── ConfigError                a setting or option is wrong (names the setting)
    ├── ManifestError              the manifest as a whole cannot be read (names the file)
    ├── StorageError               the output location cannot be written
    └── NotFoundError              a batch or job id that does not exist

Failures of edit calls are not exceptions either: the gateway returns a classified
`CallOutcome` (ok / transient / hold / failed) that the executor records and acts on.

Row-level validation problems are not exceptions: they are `RowError` values, collected so that
a person sees every bad row at once.
"""

from __future__ import annotations

from dataclasses import dataclass


class EditbatchError(Exception):
    """Raised when editbatch refuses or cannot do something; the message says what to do."""


class ConfigError(EditbatchError):
    """Raised when a setting or command-line option is invalid."""


class ManifestError(EditbatchError):
    """Raised when a manifest file cannot be read at all (missing, wrong encoding, no header)."""


class StorageError(EditbatchError):
    """Raised when an output cannot be written to its final location."""


@dataclass(frozen=True)
class RowError:
    """One problem with one manifest row: where it is and what to do about it."""

    row: int  # 1-based data row (CSV: the header is row 0)
    field: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        where = f"row {self.row}" + (f" (id {self.key})" if self.key else "")
        return f"{where}, field '{self.field}': {self.reason}"


class NotFoundError(EditbatchError):
    """Raised when a batch or job id does not exist."""
