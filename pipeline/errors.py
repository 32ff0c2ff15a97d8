"""The one exception tree of editbatch: every exception the package defines is here.

    EditbatchError                 root: anything editbatch raises on purpose; the CLI prints
    │                              its message (what, where, the fix) and exits 2
    ├── ConfigError                a setting, an option or a data file (catalogue, prices) is
    │                              wrong: names the setting and what is accepted
    ├── ManifestError              the manifest as a whole cannot be read (names the file)
    │   └── StrictRefusal          `--strict`: a row is bad, so nothing was stored or sent
    ├── RemoteError                a remote input cannot be fetched (names the URI)
    │   ├── SchemeNotAllowed       its scheme is not in `remote_schemes`
    │   └── TooLarge               it is larger than the limit for its kind
    ├── OutputNameError            a name template cannot give a safe relative name
    ├── StorageError               the output location cannot be written
    ├── NotFoundError              a batch or job id that does not exist
    │   └── ImageMissing           the dashboard cannot serve an image: no such file, or not
    │                              where it may be (it answers 404)
    ├── PermitTimeout              no rate permit in time: the job is handed back, not failed
    ├── ProviderError              the Files or Batches API refused or could not be reached
    │                              (the batch route); carries the status and the class of it
    ├── LeaseLost                  another process took over a provider batch (lease lapsed)
    └── InvalidTransition          code asked for a state change pipeline.states does not allow

Three modules keep a private subclass for control flow that never leaves them
(`pipeline.run.executor._Stop`, `pipeline.observe.webhook._Retryable`,
`pipeline.output.formats._Refused`).

Failures of edit calls are not exceptions: the gateway returns a classified `CallOutcome`
(ok / transient / hold / failed) that the executor records and acts on. Row-level validation
problems are not exceptions either: they are `RowError` values, collected so that a person
sees every bad row at once. The sandbox (`pipeline.sandbox`) has its own errors: it shares no
code with the rest of the package.
"""

from __future__ import annotations

from dataclasses import dataclass


class EditbatchError(Exception):
    """Raised when editbatch refuses or cannot do something; the message says what to do."""


class ConfigError(EditbatchError):
    """Raised when a setting, a command-line option or a data file is invalid."""


class ManifestError(EditbatchError):
    """Raised when a manifest file cannot be read at all (missing, wrong encoding, no header)."""


class StrictRefusal(ManifestError):
    """Raised by `--strict` when any row is bad: nothing was stored or sent."""


class RemoteError(EditbatchError):
    """Raised when a remote input cannot be fetched; the message names the URI."""


class SchemeNotAllowed(RemoteError):
    """Raised when a URI's scheme is not in `remote_schemes`."""


class TooLarge(RemoteError):
    """Raised when a remote file is larger than the limit for its kind."""


class OutputNameError(EditbatchError):
    """Raised when a template cannot be rendered into a safe relative name."""


class StorageError(EditbatchError):
    """Raised when an output cannot be written to its final location."""


class NotFoundError(EditbatchError):
    """Raised when a batch or job id does not exist."""


class ImageMissing(NotFoundError):
    """Raised when an image cannot be served: no such file, or it is not where it may be."""


class PermitTimeout(EditbatchError):
    """Raised when no rate permit came within `max_wait`: hand the job back instead of blocking."""


class ProviderError(EditbatchError):
    """Raised when a Files or Batches API call of the batch route fails.

    `kind` is the retry policy's class of the answer (an `AttemptOutcome` value: transient,
    hold or failed), so the caller can wait, hold the batch, or give up on one provider batch.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.code = code


class LeaseLost(EditbatchError):
    """Raised when this process's lease on a provider batch lapsed and another process took the
    provider batch over: stop touching it, the other process finishes the step."""


class InvalidTransition(EditbatchError):
    """Raised when code asks for a state change that the tables of `pipeline.states` lack."""


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
