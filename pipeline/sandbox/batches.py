"""The Batches API (`/v1/batches`): Batch objects, their store and the HTTP routes.

Per ../shared/contract/openapi-files-batches.json and API-FACTS ("The Batch API for edits"):
create (`input_file_id`, `endpoint` "/v1/images/edits", `completion_window` "24h", `metadata`
up to 16 pairs, `output_expires_after`), retrieve, list (newest first, `limit`, `after`,
`has_more`) and cancel. The work itself (validating -> in_progress -> finalizing -> completed,
or cancelled, expired, failed) is done by batch_runner.py, one asyncio task per batch.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import ApiError, bad_request
from pipeline.sandbox.files import Authorize, FileStore, list_limit, new_id, page
from pipeline.sandbox.params import invalid_type, unknown_parameter

ENDPOINT = "/v1/images/edits"
CONTRACT_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
OUTPUT_EXPIRES_DEFAULT = 30 * 24 * 3600  # API-FACTS: output files are deleted after 30 days
EXPIRES_MIN_SECONDS, EXPIRES_MAX_SECONDS = 3600, 2_592_000
LIST_DEFAULT, LIST_MAX = 20, 100
CREATE_FIELDS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)


class Status(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL = frozenset({Status.FAILED, Status.COMPLETED, Status.EXPIRED, Status.CANCELLED})


@dataclass(frozen=True)
class LineRef:
    """Where one request of the input file is: its custom_id and its bytes."""

    custom_id: str
    offset: int
    length: int


@dataclass
class Batch:
    """One batch and what its runner needs. Timestamps are Unix seconds."""

    id: str
    input_file_id: str
    key: str  # the API key that created it: its lines are checked with that key's models
    metadata: dict[str, str] | None
    created_at: int
    expires_at: int
    deadline: float | None  # loop time at which the batch expires (None: never)
    output_expires_seconds: int
    status: Status = Status.VALIDATING
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    times: dict[str, int] = field(default_factory=dict)
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    lines: list[LineRef] = field(default_factory=list)
    done_lines: int = 0  # lines answered (output or error file), in input order
    cancel_requested: bool = False
    expire_requested: bool = False
    forgotten: bool = False  # set by a reset: the runner must not touch shared state any more
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def set_status(self, status: Status) -> None:
        self.status = status
        stamp = {
            Status.IN_PROGRESS: "in_progress_at",
            Status.FINALIZING: "finalizing_at",
            Status.COMPLETED: "completed_at",
            Status.FAILED: "failed_at",
            Status.EXPIRED: "expired_at",
            Status.CANCELLING: "cancelling_at",
            Status.CANCELLED: "cancelled_at",
        }.get(status)
        if stamp is not None:
            self.times[stamp] = int(time.time())
        if status in FINAL:
            self.finished.set()

    def object(self) -> dict[str, Any]:
        """The Batch object of the contract (unset fields null, as the API sends them)."""
        stamps = (
            "in_progress_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        )
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "model": self.model,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            **{name: self.times.get(name) for name in stamps},
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


def no_such_batch(batch_id: str) -> ApiError:
    return ApiError(404, f"No such Batch object: {batch_id}", param="batch_id")


class BatchStore:
    """Every batch of this sandbox, newest last, and the batch counters of `/sandbox/stats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, Batch] = {}
        self.lines_done = 0
        self.lines_billed = 0

    def add(self, batch: Batch) -> None:
        with self._lock:
            self._batches[batch.id] = batch

    def get(self, batch_id: str) -> Batch | None:
        with self._lock:
            return self._batches.get(batch_id)

    def newest_first(self) -> list[Batch]:
        with self._lock:
            return list(reversed(self._batches.values()))

    def count_line(self, *, billed: bool) -> None:
        with self._lock:
            self.lines_done += 1
            self.lines_billed += billed

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_status = Counter(b.status.value for b in self._batches.values())
            return {
                "by_status": dict(by_status),
                "lines_done": self.lines_done,
                "lines_billed": self.lines_billed,
            }

    def clear(self) -> list[Batch]:
        """Forget every batch (their runners are stopped by the caller); return them."""
        with self._lock:
            batches = list(self._batches.values())
            self._batches.clear()
            self.lines_done = self.lines_billed = 0
        for batch in batches:
            batch.forgotten = True
        return batches


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("metadata", "an object", "another type")
    if len(value) > METADATA_PAIRS:
        raise bad_request(
            f"Invalid 'metadata': too many properties. Expected an object with at most "
            f"{METADATA_PAIRS} properties, but got an object with {len(value)} properties.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, item in value.items():
        if len(key) > METADATA_KEY_CHARS:
            raise bad_request(
                f"Invalid 'metadata': key '{key[:20]}...' is longer than {METADATA_KEY_CHARS} "
                "characters.",
                param="metadata",
            )
        if not isinstance(item, str):
            raise invalid_type(f"metadata.{key}", "a string", "another type")
        if len(item) > METADATA_VALUE_CHARS:
            raise bad_request(
                f"Invalid 'metadata.{key}': string too long. Expected a string with maximum "
                f"length {METADATA_VALUE_CHARS}, but got a string with length {len(item)} "
                "instead.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return dict(value)


def _output_expires(value: Any) -> int:
    if value is None:
        return OUTPUT_EXPIRES_DEFAULT
    if not isinstance(value, dict) or value.get("anchor") != "created_at":
        raise bad_request(
            'Invalid \'output_expires_after\': expected {"anchor": "created_at", "seconds": N}.',
            param="output_expires_after",
        )
    seconds = value.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise invalid_type("output_expires_after.seconds", "an integer", "another type")
    if not EXPIRES_MIN_SECONDS <= seconds <= EXPIRES_MAX_SECONDS:
        raise bad_request(
            f"Invalid 'output_expires_after.seconds': expected a value between "
            f"{EXPIRES_MIN_SECONDS} and {EXPIRES_MAX_SECONDS}, got {seconds}.",
            param="output_expires_after.seconds",
        )
    return seconds


def _required_text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        raise bad_request(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    if not isinstance(value, str):
        raise invalid_type(name, "a string", "another type")
    return value


def new_batch(
    body: Any, key: str, files: FileStore, config: SandboxConfig, loop_time: float
) -> Batch:
    """A Batch for a create request's JSON body, or the 400 the API answers."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", param=None)
    for name in body:
        if name not in CREATE_FIELDS:
            raise unknown_parameter(name)
    input_file_id = _required_text(body, "input_file_id")
    endpoint = _required_text(body, "endpoint")
    window = _required_text(body, "completion_window")
    if endpoint not in CONTRACT_ENDPOINTS:
        allowed = ", ".join(f"'{e}'" for e in CONTRACT_ENDPOINTS)
        raise bad_request(
            f"Invalid value: '{endpoint}'. Supported values are: {allowed}.", param="endpoint"
        )
    if endpoint != ENDPOINT:
        raise bad_request(
            f"The sandbox runs batches for '{ENDPOINT}' only, not '{endpoint}'.",
            param="endpoint",
            code="unsupported_value",
        )
    if window != COMPLETION_WINDOW:
        raise bad_request(
            f"Invalid value: '{window}'. Supported values are: '{COMPLETION_WINDOW}'.",
            param="completion_window",
        )
    metadata = _metadata(body.get("metadata"))
    output_expires = _output_expires(body.get("output_expires_after"))
    stored = files.get(input_file_id)
    if stored is None:
        raise bad_request(f"No such File object: {input_file_id}", param="input_file_id")
    if stored.purpose != "batch":
        raise bad_request(
            f"Invalid 'input_file_id': file '{input_file_id}' has purpose '{stored.purpose}'; "
            "batch input files must be uploaded with purpose 'batch'.",
            param="input_file_id",
        )
    created_at = int(time.time())
    expire_after = config.batch_expire_after_seconds
    if expire_after is None:
        deadline, expires_at = None, created_at + WINDOW_SECONDS
    else:
        scaled = expire_after * config.time_scale
        deadline, expires_at = loop_time + scaled, created_at + round(scaled)
    return Batch(
        id=new_id("batch_"),
        input_file_id=input_file_id,
        key=key,
        metadata=metadata,
        created_at=created_at,
        expires_at=expires_at,
        deadline=deadline,
        output_expires_seconds=output_expires,
    )


Start = Callable[[Batch], None]
WaitFinished = Callable[[Batch, float], Awaitable[None]]


def batch_routes(
    store: BatchStore,
    files: FileStore,
    config: Callable[[], SandboxConfig],
    authorize: Authorize,
    respond: Callable[[ApiError], Response],
    start: Start,
) -> list[Route]:
    """The `/v1/batches` routes and the admin `POST /sandbox/batches/{id}/expire`; `start`
    launches a new batch's runner."""

    def guarded(
        handler: Callable[[Request, str], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                key = authorize(request, config())
                return await handler(request, key)
            except ApiError as error:
                return respond(error)

        return endpoint

    def _found(request: Request) -> Batch:
        batch_id = request.path_params["batch_id"]
        batch = store.get(batch_id)
        if batch is None:
            raise no_such_batch(batch_id)
        return batch

    async def create(request: Request, key: str) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}", param=None) from exc
        loop_time = asyncio.get_running_loop().time()
        batch = new_batch(body, key, files, config(), loop_time)
        store.add(batch)
        start(batch)
        return JSONResponse(batch.object())

    async def listing(request: Request, key: str) -> Response:
        limit = list_limit(request, LIST_DEFAULT, LIST_MAX)
        objects = [b.object() for b in store.newest_first()]
        return JSONResponse(
            page(objects, limit, request.query_params.get("after"), key=lambda o: o["id"])
        )

    async def retrieve(request: Request, key: str) -> Response:
        return JSONResponse(_found(request).object())

    async def cancel(request: Request, key: str) -> Response:
        batch = _found(request)
        if batch.status in (Status.VALIDATING, Status.IN_PROGRESS):
            batch.cancel_requested = True
            batch.set_status(Status.CANCELLING)
            batch.wake.set()
        elif batch.status is not Status.CANCELLING:
            raise bad_request(
                f"Cannot cancel a batch with status '{batch.status.value}'.",
                param=None,
                code=None,
            )
        return JSONResponse(batch.object())

    async def expire(request: Request) -> Response:
        """Admin: expire a batch now, as if its completion window had run out."""
        try:
            batch = _found(request)
            if batch.status in FINAL or batch.status is Status.FINALIZING:
                raise bad_request(
                    f"The batch has status '{batch.status.value}'; only an unfinished batch "
                    "can expire.",
                    param=None,
                    code=None,
                )
        except ApiError as error:
            return respond(error)
        batch.expire_requested = True
        batch.wake.set()
        await asyncio.wait_for(batch.finished.wait(), timeout=60)
        return JSONResponse(batch.object())

    return [
        Route("/v1/batches", guarded(create), methods=["POST"]),
        Route("/v1/batches", guarded(listing), methods=["GET"]),
        Route("/v1/batches/{batch_id}", guarded(retrieve), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/sandbox/batches/{batch_id}/expire", expire, methods=["POST"]),
    ]
