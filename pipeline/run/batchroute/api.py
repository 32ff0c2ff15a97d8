"""The Files and Batches API calls of the batch route: the second module that imports openai.

Like the edit gateway (`pipeline.run.gateway`), it turns the SDK's types into plain values and
its exceptions into one: every failure is a `ProviderError` whose `kind` is the retry policy's
class of the answer (`pipeline.run.retry.classify`): transient (try again later), hold (quota,
auth: stop the batch) or failed (this request cannot succeed as made). The client is the edit
gateway's (`Gateway.client`): one client per process, its retries off.

An output file is read as a stream of chunks from a byte offset (an HTTP Range request; a
server that ignores the Range is skipped forward), never downloaded whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import openai

from pipeline.errors import ProviderError
from pipeline.run.retry import classify
from pipeline.states import AttemptOutcome

ENDPOINT: Final = "/v1/images/edits"
COMPLETION_WINDOW: Literal["24h"] = "24h"
INPUT_PURPOSE = "user_data"  # input images and masks (API-FACTS: "purpose user_data")
BATCH_PURPOSE = "batch"
READ_CHUNK = 1 << 20
LIST_PAGE = 100

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteBatch:
    """A provider batch as the provider last described it."""

    id: str
    status: str
    input_file_id: str
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: int
    expires_at: int | None
    metadata: dict[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()


def _remote(batch: Any) -> RemoteBatch:
    counts = batch.request_counts
    errors: list[str] = []
    for error in (batch.errors.data or []) if batch.errors is not None else []:
        where = f" (line {error.line})" if error.line is not None else ""
        errors.append(f"{error.code}: {error.message}{where}")
    return RemoteBatch(
        id=batch.id,
        status=str(batch.status),
        input_file_id=batch.input_file_id,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        total=int(counts.total) if counts else 0,
        completed=int(counts.completed) if counts else 0,
        failed=int(counts.failed) if counts else 0,
        created_at=int(batch.created_at),
        expires_at=int(batch.expires_at) if batch.expires_at is not None else None,
        metadata=dict(batch.metadata or {}),
        errors=tuple(errors),
    )


class BatchAPI:
    """The Files and Batches endpoints through one SDK client (built once per process)."""

    def __init__(self, client: openai.OpenAI, redact: Callable[[str], str] = str) -> None:
        self.client = client
        self._redact = redact

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """Run one SDK call; any failure becomes a ProviderError naming `what`."""
        try:
            return call()
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body, dict) else {}
            error = error if isinstance(error, dict) else {}
            code = getattr(exc, "code", None) or error.get("code")
            message = self._redact(str(error.get("message") or exc.message))[:2000]
            raise ProviderError(
                f"{what}: {exc.status_code} {code or error.get('type') or ''}: {message}",
                kind=classify(exc.status_code, error.get("type"), code),
                status=exc.status_code,
                code=str(code) if code else None,
            ) from exc
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise ProviderError(
                f"{what}: the API could not be reached ({type(exc).__name__})",
                kind=AttemptOutcome.TRANSIENT,
                code="connection_error",
            ) from exc

    # -- files --------------------------------------------------------------------------------

    def upload(self, path: Path, purpose: str, filename: str | None = None) -> tuple[str, int]:
        """Upload a file (streamed from disk by the SDK); its id and size."""

        def call() -> tuple[str, int]:
            with path.open("rb") as fh:
                created = self.client.files.create(
                    file=(filename or path.name, fh),
                    purpose=purpose,  # type: ignore[arg-type]
                )
            return created.id, int(created.bytes)

        return self._call(f"uploading {path.name}", call)

    def file_ids(self, purpose: str) -> set[str]:
        """The ids of every file with `purpose` the provider still has (all pages)."""

        def call() -> set[str]:
            return {f.id for f in self.client.files.list(purpose=purpose, limit=10_000)}

        return self._call(f"listing the {purpose} files", call)

    def delete_file(self, file_id: str) -> bool:
        """Delete a file; False when the provider has no such file (already gone)."""
        try:
            self._call(f"deleting file {file_id}", lambda: self.client.files.delete(file_id))
        except ProviderError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    @contextmanager
    def content(self, file_id: str, offset: int = 0) -> Iterator[Iterator[bytes]]:
        """The bytes of a file from `offset` on, as chunks, streamed (never read whole)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        stream = self.client.files.with_streaming_response.content(file_id, extra_headers=headers)
        try:
            response = self._call(f"reading file {file_id}", stream.__enter__)
        except ProviderError as exc:
            if exc.status == 416:  # the offset is the end of the file: nothing left to read
                yield iter(())
                return
            raise
        try:
            served_from = offset if response.http_response.status_code == 206 else 0
            yield self._chunks(file_id, response.iter_bytes(READ_CHUNK), offset - served_from)
        finally:
            stream.__exit__(None, None, None)

    def _chunks(self, file_id: str, chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
        """`chunks` without their first `skip` bytes; a broken stream is a ProviderError."""
        iterator = iter(chunks)
        while True:
            try:
                chunk = self._call(f"reading file {file_id}", lambda: next(iterator, None))
            except ProviderError:
                raise
            except Exception as exc:  # httpx2 read errors surface here, outside the SDK
                raise ProviderError(
                    f"reading file {file_id}: the stream broke ({type(exc).__name__})",
                    kind=AttemptOutcome.TRANSIENT,
                    code="connection_error",
                ) from exc
            if chunk is None:
                return
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if chunk:
                yield chunk

    # -- batches ------------------------------------------------------------------------------

    def create(self, input_file_id: str, metadata: dict[str, str]) -> RemoteBatch:
        """Create a provider batch of `/v1/images/edits` lines, to finish within 24 h."""
        return _remote(
            self._call(
                f"creating a batch from {input_file_id}",
                lambda: self.client.batches.create(
                    input_file_id=input_file_id,
                    endpoint=ENDPOINT,
                    completion_window=COMPLETION_WINDOW,
                    metadata=metadata,
                ),
            )
        )

    def retrieve(self, batch_id: str) -> RemoteBatch:
        return _remote(
            self._call(f"reading batch {batch_id}", lambda: self.client.batches.retrieve(batch_id))
        )

    def cancel(self, batch_id: str) -> RemoteBatch:
        return _remote(
            self._call(f"cancelling batch {batch_id}", lambda: self.client.batches.cancel(batch_id))
        )

    def find(self, key: str, value: str, since: int) -> RemoteBatch | None:
        """The provider batch whose metadata has `key` = `value`, among those created at or
        after `since` (Unix seconds): the list is read newest first and stops there."""

        def call() -> RemoteBatch | None:
            page = self.client.batches.list(limit=LIST_PAGE)
            while True:
                for batch in page.data:
                    if (batch.metadata or {}).get(key) == value:
                        return _remote(batch)
                    if batch.created_at < since:
                        return None
                if not page.has_next_page():
                    return None
                page = page.get_next_page()

        return self._call("looking for a batch by its metadata", call)
