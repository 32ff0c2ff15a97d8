"""The Files API (`/v1/files`): uploads kept on disk, their metadata in memory.

Per ../shared/contract/openapi-files-batches.json: upload (multipart `file` + `purpose`, optional
`expires_after[anchor|seconds]`), list (`purpose`, `limit`, `after`, `order`), retrieve, delete,
and `/content`, streamed from disk in chunks (never built in memory), so a client can read a
multi-GB batch output line by line. The sandbox keeps files for `batch`, `user_data` and
`vision` uploads, and writes `batch_output` files itself.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import ApiError, bad_request
from pipeline.sandbox.params import invalid_type, unknown_parameter

CONTRACT_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
UPLOAD_PURPOSES = ("batch", "user_data", "vision")
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # the contract: "Individual files can be up to 512 MB"
EXPIRES_MIN_SECONDS, EXPIRES_MAX_SECONDS = 3600, 2_592_000
LIST_LIMIT_MAX = 10_000
COPY_CHUNK = 1024 * 1024
UPLOAD_FIELDS = frozenset({"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"})

Authorize = Callable[[Request, SandboxConfig], str]
Handler = Callable[[Request], Awaitable[Response]]


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path
    sha256: str | None  # uploads only (for the stats); None for files the sandbox wrote
    expires_at: int | None = None

    def object(self) -> dict[str, Any]:
        """The OpenAIFile object (`status` is deprecated and always `processed` here)."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


def no_such_file(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="id")


def page(
    items: list[Any], limit: int, after: str | None, key: Callable[[Any], str]
) -> dict[str, Any]:
    """One page of a cursor list: the items after the one whose id is `after`."""
    if after is not None:
        ids = [key(item) for item in items]
        # An unknown cursor gives an empty page (the sandbox cannot place a forgotten id).
        items = items[ids.index(after) + 1 :] if after in ids else []
    chosen = items[:limit]
    return {
        "object": "list",
        "data": chosen,
        "first_id": key(chosen[0]) if chosen else None,
        "last_id": key(chosen[-1]) if chosen else None,
        "has_more": len(items) > limit,
    }


def list_limit(request: Request, default: int, maximum: int) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise invalid_type("limit", "an integer", "a string") from None
    if not 1 <= value <= maximum:
        raise bad_request(
            f"Invalid 'limit': expected a value between 1 and {maximum}, got {value}.",
            param="limit",
        )
    return value


class FileStore:
    """Files on disk under `files_dir` (or a temporary folder), metadata in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, StoredFile] = {}
        self._temp_dir: Path | None = None
        self._zero()

    def _zero(self) -> None:
        self.uploads = 0
        self.upload_bytes = 0
        self._upload_hashes: set[str] = set()

    def directory(self, config: SandboxConfig) -> Path:
        """Where new files go: `files_dir`, or a temporary folder made on first use."""
        if config.files_dir is not None:
            folder = Path(config.files_dir)
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        with self._lock:
            if self._temp_dir is None:
                self._temp_dir = Path(tempfile.mkdtemp(prefix="editbatch-sandbox-files-"))
            return self._temp_dir

    def new_path(self, config: SandboxConfig, file_id: str) -> Path:
        return self.directory(config) / file_id

    def add(self, stored: StoredFile, *, upload: bool) -> None:
        with self._lock:
            self._files[stored.id] = stored
            if upload and stored.sha256 is not None:
                self.uploads += 1
                self.upload_bytes += stored.bytes
                self._upload_hashes.add(stored.sha256)

    def register(
        self, path: Path, file_id: str, filename: str, purpose: str, expires_at: int | None
    ) -> StoredFile:
        """Make a file the sandbox wrote itself (a batch's output or error file) visible."""
        stored = StoredFile(
            id=file_id,
            filename=filename,
            purpose=purpose,
            bytes=path.stat().st_size,
            created_at=int(time.time()),
            path=path,
            sha256=None,
            expires_at=expires_at,
        )
        self.add(stored, upload=False)
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        with self._lock:
            return self._files.get(file_id)

    def path_of(self, file_id: str) -> Path | None:
        stored = self.get(file_id)
        return stored.path if stored is not None else None

    def delete(self, file_id: str) -> bool:
        with self._lock:
            stored = self._files.pop(file_id, None)
        if stored is None:
            return False
        stored.path.unlink(missing_ok=True)
        return True

    def listed(self, purpose: str | None, descending: bool) -> list[StoredFile]:
        with self._lock:
            files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        # Insertion order breaks ties between files created in the same second.
        ordered = sorted(enumerate(files), key=lambda p: (p[1].created_at, p[0]))
        result = [f for _, f in ordered]
        return result[::-1] if descending else result

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "count": self.uploads,
                "bytes": self.upload_bytes,
                "distinct_sha256": len(self._upload_hashes),
            }

    def clear(self) -> None:
        """Forget and delete every file, and zero the upload counters."""
        with self._lock:
            files = list(self._files.values())
            self._files.clear()
            self._zero()
        for stored in files:
            stored.path.unlink(missing_ok=True)

    def close(self) -> None:
        self.clear()
        with self._lock:
            temp, self._temp_dir = self._temp_dir, None
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def _copy(source: IO[bytes], target: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    source.seek(0)
    with target.open("wb") as out:
        while chunk := source.read(COPY_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _expires_at(form: FormData, created_at: int) -> int | None:
    anchor = form.get("expires_after[anchor]")
    seconds = form.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise bad_request(
            f"Invalid 'expires_after.anchor': expected 'created_at', got {anchor!r}.",
            param="expires_after.anchor",
        )
    if not isinstance(seconds, str) or not seconds.strip().isdigit():
        raise invalid_type("expires_after.seconds", "an integer", "a string")
    value = int(seconds)
    if not EXPIRES_MIN_SECONDS <= value <= EXPIRES_MAX_SECONDS:
        raise bad_request(
            f"Invalid 'expires_after.seconds': expected a value between {EXPIRES_MIN_SECONDS} "
            f"and {EXPIRES_MAX_SECONDS}, got {value}.",
            param="expires_after.seconds",
        )
    return created_at + value


def _purpose(form: FormData) -> str:
    purpose = form.get("purpose")
    if purpose is None:
        raise bad_request(
            "Missing required parameter: 'purpose'.",
            param="purpose",
            code="missing_required_parameter",
        )
    if not isinstance(purpose, str):
        raise invalid_type("purpose", "a string", "a file")
    if purpose not in CONTRACT_PURPOSES:
        allowed = ", ".join(f"'{p}'" for p in CONTRACT_PURPOSES)
        raise bad_request(
            f"Invalid value: '{purpose}'. Supported values are: {allowed}.", param="purpose"
        )
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(
            f"The sandbox stores files for the purposes 'batch', 'user_data' and 'vision' only, "
            f"not '{purpose}'.",
            param="purpose",
        )
    return purpose


def _upload_file(form: FormData, purpose: str) -> UploadFile:
    value = form.get("file")
    if value is None:
        raise bad_request(
            "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
        )
    if isinstance(value, str):
        raise invalid_type("file", "a file", "a string")
    if value.size is not None and value.size > MAX_UPLOAD_BYTES:
        raise bad_request(
            f"File is too large: {value.size} bytes; the limit is {MAX_UPLOAD_BYTES} bytes.",
            param="file",
        )
    if purpose == "batch" and not (value.filename or "").endswith(".jsonl"):
        raise bad_request(
            "Invalid file format for Batch API. Must be .jsonl", param="file", code=None
        )
    return value


def file_routes(
    store: FileStore,
    config: Callable[[], SandboxConfig],
    authorize: Authorize,
    respond: Callable[[ApiError], Response],
) -> list[Route]:
    """The `/v1/files` routes; `config()` is read per request, `respond` renders an ApiError."""

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            try:
                authorize(request, config())
                return await handler(request)
            except ApiError as error:
                return respond(error)

        return endpoint

    async def create(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request(
                "Uploads must be multipart/form-data.", param=None, code="unsupported_content_type"
            )
        try:
            form = await request.form(max_files=1, max_fields=10)
        except (HTTPException, MultipartParseError) as exc:
            raise bad_request(f"Could not parse the multipart body: {exc}", param=None) from exc
        try:
            for name in form:
                if name not in UPLOAD_FIELDS:
                    raise unknown_parameter(name)
            purpose = _purpose(form)
            upload = _upload_file(form, purpose)
            created_at = int(time.time())
            expires_at = _expires_at(form, created_at)
            file_id = new_id("file-")
            path = store.new_path(config(), file_id)
            size, sha256 = await run_in_threadpool(_copy, upload.file, path)
        finally:
            await form.close()
        stored = StoredFile(
            id=file_id,
            filename=Path(upload.filename or "upload").name,
            purpose=purpose,
            bytes=size,
            created_at=created_at,
            path=path,
            sha256=sha256,
            expires_at=expires_at,
        )
        store.add(stored, upload=True)
        return JSONResponse(stored.object())

    async def listing(request: Request) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(
                f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'.",
                param="order",
            )
        limit = list_limit(request, LIST_LIMIT_MAX, LIST_LIMIT_MAX)
        files = store.listed(request.query_params.get("purpose"), descending=order == "desc")
        objects = [f.object() for f in files]
        return JSONResponse(
            page(objects, limit, request.query_params.get("after"), key=lambda o: o["id"])
        )

    def _found(request: Request) -> StoredFile:
        file_id = request.path_params["file_id"]
        stored = store.get(file_id)
        if stored is None:
            raise no_such_file(file_id)
        return stored

    async def retrieve(request: Request) -> Response:
        return JSONResponse(_found(request).object())

    async def delete(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not store.delete(file_id):
            raise no_such_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def content(request: Request) -> Response:
        stored = _found(request)
        if not stored.path.exists():
            raise no_such_file(stored.id)
        # FileResponse reads and sends 64 KiB at a time.
        return FileResponse(stored.path, media_type="application/octet-stream")

    return [
        Route("/v1/files", guarded(create), methods=["POST"]),
        Route("/v1/files", guarded(listing), methods=["GET"]),
        Route("/v1/files/{file_id}", guarded(retrieve), methods=["GET"]),
        Route("/v1/files/{file_id}", guarded(delete), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", guarded(content), methods=["GET"]),
    ]
