"""The background worker of one batch: an asyncio task on the server's event loop.

    validating (batch_validating_seconds; the input is read and checked: a malformed file fails
        the batch with `errors`, as the API does)
    -> in_progress (one line per 1/batch_lines_per_second: each line is validated like a sync
        edit, answered, written to the output or error file, and billed at half price)
    -> finalizing (batch_finalizing_seconds; output and error files become File objects)
    -> completed.

Every pause is multiplied by `time_scale`. A cancel stops before the next line (`cancelling`
-> `cancelled`); an expiry (`batch_expire_after_seconds`, or the admin endpoint) writes every
unfinished line to the error file with `batch_expired` (`expired`). Lines already answered stay
in their files and stay billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from starlette.concurrency import run_in_threadpool

from pipeline.sandbox.batches import ENDPOINT, Batch, BatchStore, LineRef, Status
from pipeline.sandbox.billing import BillingLog
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import (
    ApiError,
    bad_request,
    moderation_blocked,
    organization_not_verified,
    server_error,
)
from pipeline.sandbox.faults import (
    DIRECTIVE_DRIFT,
    DirectiveCounter,
    DirectiveError,
    Fault,
    FaultDice,
    parse_directives,
)
from pipeline.sandbox.files import FileStore, new_id
from pipeline.sandbox.models import DEFAULT_MODEL
from pipeline.sandbox.params import JsonParams
from pipeline.sandbox.response import BATCH_PRICE_FACTOR, cost_for, images_response, usage_for
from pipeline.sandbox.validation import EditRequest, Policy, validate

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 100
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
# Directives that end a line with a 500 (no answer is made, nothing is billed).
_SERVER_FAULTS = frozenset({Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.RESET, Fault.TRUNCATED})


@dataclass(frozen=True)
class BatchContext:
    """What every runner shares with the app; `config()` is read afresh at every step."""

    config: Callable[[], SandboxConfig]
    files: FileStore
    store: BatchStore
    billing: BillingLog
    dice: FaultDice  # batch lines' own seeded draws, apart from the sync requests'
    directives: DirectiveCounter


@dataclass(frozen=True)
class Parsed:
    lines: list[LineRef]
    model: str | None
    errors: list[dict[str, Any]]


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _line_problem(obj: Any, line: int) -> dict[str, Any] | None:
    """What makes one parsed input line unusable (the body itself is checked when it runs)."""
    if not isinstance(obj, dict):
        return _error("invalid_json_line", "This line is not a JSON object.", line)
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            "missing_required_parameter",
            "Each request needs a non-empty string 'custom_id'.",
            line,
            "custom_id",
        )
    if obj.get("method") != "POST":
        return _error("invalid_method", "The method must be 'POST'.", line, "method")
    if obj.get("url") != ENDPOINT:
        return _error(
            "url_mismatch",
            f"The URL provided for this request does not match the batch endpoint '{ENDPOINT}'.",
            line,
            "url",
        )
    if not isinstance(obj.get("body"), dict):
        return _error("invalid_request", "The 'body' must be a JSON object.", line, "body")
    return None


def parse_input(path: Path, max_bytes: int, max_requests: int) -> Parsed:
    """Read a batch input file line by line (never whole): the requests' positions, the model,
    and the errors that fail the batch (at most 100 reported)."""
    size = path.stat().st_size
    if size > max_bytes:
        message = f"The input file is {size} bytes; the limit is {max_bytes} bytes."
        return Parsed([], None, [_error("file_too_large", message, None)])
    lines: list[LineRef] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    offset = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                message = "This line is not parseable as valid JSON."
                errors.append(_error("invalid_json_line", message, number))
            else:
                problem = _line_problem(obj, number)
                if problem is None:
                    custom_id = obj["custom_id"]
                    line_model = obj["body"].get("model") or DEFAULT_MODEL
                    line_model = line_model if isinstance(line_model, str) else str(line_model)
                    if custom_id in seen:
                        problem = _error(
                            "duplicate_custom_id",
                            "The custom_id for this request is a duplicate of another request. "
                            "The custom_id parameter must be unique for each individual request "
                            "in a batch.",
                            number,
                            "custom_id",
                        )
                    elif model is not None and line_model != model:
                        problem = _error(
                            "model_mismatch",
                            f"The model '{line_model}' differs from the batch's model "
                            f"'{model}': one model per input file.",
                            number,
                            "body.model",
                        )
                    else:
                        seen.add(custom_id)
                        model = model or line_model
                        lines.append(LineRef(custom_id, start, len(raw)))
                if problem is not None:
                    errors.append(problem)
            if len(lines) > max_requests:
                message = (
                    f"The input file has more than {max_requests} requests, the most one batch "
                    "can hold."
                )
                return Parsed([], None, [_error("too_many_tasks", message, None)])
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    if not lines and not errors:
        errors.append(_error("empty_file", "The input file has no requests.", None))
    return Parsed(lines, model, errors)


def _read(file: IO[bytes], ref: LineRef) -> dict[str, Any]:
    file.seek(ref.offset)
    body: dict[str, Any] = json.loads(file.read(ref.length))["body"]
    return body


def _append(path: Path, entries: list[dict[str, Any]]) -> None:
    """Append JSONL entries (encoded here, in a worker thread: an answer can be megabytes)."""
    with path.open("a", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(entry) + "\n")


class BatchRunner:
    """Moves one batch to a final state; `run()` is the task."""

    def __init__(self, ctx: BatchContext, batch: Batch) -> None:
        self.ctx = ctx
        self.batch = batch
        self.input: IO[bytes] | None = None
        self.paths: dict[str, Path] = {}

    # -- pacing -------------------------------------------------------------------------------

    def _scaled(self, seconds: float) -> float:
        return seconds * self.ctx.config().time_scale

    def _expired(self) -> bool:
        deadline = self.batch.deadline
        return self.batch.expire_requested or (
            deadline is not None and asyncio.get_running_loop().time() >= deadline
        )

    async def _pause(self, seconds: float) -> None:
        """Wait, but wake at once for a cancel or an expiry (and at the deadline)."""
        timeout = seconds
        if self.batch.deadline is not None:
            left = self.batch.deadline - asyncio.get_running_loop().time()
            timeout = min(timeout, max(0.0, left))
        if timeout > 0 and not self.batch.wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.batch.wake.wait(), timeout=timeout)
        self.batch.wake.clear()

    # -- the life cycle -----------------------------------------------------------------------

    async def run(self) -> None:
        batch = self.batch
        try:
            await self._validate()
            if batch.status is Status.IN_PROGRESS:
                await self._work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a sandbox bug must not hang the batch: fail it visibly
            log.exception("sandbox batch %s crashed", batch.id)
            batch.errors = [_error("server_error", f"The sandbox failed: {exc!r}", None)]
            batch.set_status(Status.FAILED)
        finally:
            if self.input is not None:
                self.input.close()
            batch.finished.set()

    async def _validate(self) -> None:
        batch, config = self.batch, self.ctx.config()
        await self._pause(self._scaled(config.batch_validating_seconds))
        if batch.cancel_requested and not self._expired():
            batch.set_status(Status.CANCELLED)
            return
        stored = self.ctx.files.get(batch.input_file_id)
        if stored is None:
            message = f"The input file {batch.input_file_id} was deleted before it was read."
            batch.errors = [_error("invalid_file", message, None)]
            batch.set_status(Status.FAILED)
            return
        # Opened now and kept open: the batch runs on what it read even if the file is deleted.
        self.input = stored.path.open("rb")
        parsed = await run_in_threadpool(
            parse_input, stored.path, config.batch_max_file_bytes, config.batch_max_requests
        )
        if parsed.errors:
            batch.errors = parsed.errors
            batch.set_status(Status.FAILED)
            return
        batch.lines, batch.total, batch.model = parsed.lines, len(parsed.lines), parsed.model
        if self._expired():
            await self._expire()
            return
        batch.set_status(Status.IN_PROGRESS)

    async def _work(self) -> None:
        batch = self.batch
        while batch.done_lines < batch.total:
            config = self.ctx.config()
            await self._pause(self._scaled(1.0 / config.batch_lines_per_second))
            if self._expired():
                await self._expire()
                return
            if batch.cancel_requested:
                await self._close(Status.CANCELLED)
                return
            await self._answer(batch.lines[batch.done_lines])
            if batch.forgotten:
                return
        batch.set_status(Status.FINALIZING)
        # Finalizing cannot be cancelled or expired any more: every line has its answer.
        await asyncio.sleep(self._scaled(self.ctx.config().batch_finalizing_seconds))
        await self._close(Status.COMPLETED)

    async def _expire(self) -> None:
        batch = self.batch
        remaining = batch.lines[batch.done_lines :]
        entries = [
            {
                "id": new_id("batch_req_"),
                "custom_id": ref.custom_id,
                "response": None,
                "error": {"code": "batch_expired", "message": EXPIRED_MESSAGE},
            }
            for ref in remaining
        ]
        if entries:
            await run_in_threadpool(_append, self._path("error"), entries)
        batch.failed += len(remaining)
        batch.done_lines = batch.total
        await self._close(Status.EXPIRED)

    async def _close(self, status: Status) -> None:
        """Make the output and error files File objects, then take the final status."""
        batch = self.batch
        if batch.forgotten:
            return
        expires_at = batch.created_at + batch.output_expires_seconds
        for kind, path in self.paths.items():
            file_id = new_id("file-")
            filename = f"{batch.id}_{kind}.jsonl"
            await run_in_threadpool(
                self.ctx.files.register, path, file_id, filename, "batch_output", expires_at
            )
            if kind == "output":
                batch.output_file_id = file_id
            else:
                batch.error_file_id = file_id
        batch.set_status(status)

    def _path(self, kind: str) -> Path:
        if kind not in self.paths:
            folder = self.ctx.files.directory(self.ctx.config())
            self.paths[kind] = folder / f"{self.batch.id}.{kind}.jsonl"
        return self.paths[kind]

    # -- one line -----------------------------------------------------------------------------

    async def _answer(self, ref: LineRef) -> None:
        batch = self.batch
        assert self.input is not None
        body = await run_in_threadpool(_read, self.input, ref)
        request_id = f"req_{uuid.uuid4().hex}"
        status, response, bill = await self._respond(body)
        if batch.forgotten:
            return
        line = {
            "id": new_id("batch_req_"),
            "custom_id": ref.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": response},
            "error": None,
        }
        kind = "output" if status == 200 else "error"
        await run_in_threadpool(_append, self._path(kind), [line])
        del line, response
        if bill is not None:
            edit, usage, cost = bill
            if usage is not None:
                batch.input_tokens += usage["input_tokens"]
                batch.output_tokens += usage["output_tokens"]
            self.ctx.billing.append(
                self.ctx.config().billing_log,
                request_id=request_id,
                model=edit.model,
                size=edit.size_text,
                quality=edit.quality,
                n=edit.n,
                usage=usage,
                cost_usd=cost,
                route="batch",
                delivered=True,
                batch_id=batch.id,
                custom_id=ref.custom_id,
            )
            batch.completed += 1
        else:
            batch.failed += 1
        batch.done_lines += 1
        self.ctx.store.count_line(billed=bill is not None)

    def _fault(self, prompt: str, fault: Fault | None, times: int | None) -> Fault | None:
        """A firing directive, else one seeded draw against the batch line rates."""
        config = self.ctx.config()
        if fault is not None and self.ctx.directives.fires(prompt, times):
            return fault
        u = self.ctx.dice.draw(config.seed).u
        if u < config.batch_line_error_rate:
            return Fault.SERVER_ERROR
        if u < config.batch_line_error_rate + config.batch_line_moderation_rate:
            return Fault.MODERATION
        return None

    async def _respond(
        self, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any], tuple[EditRequest, dict[str, Any] | None, Decimal] | None]:
        """(status, body, billing) for one line's request; billing is None unless answered."""
        config = self.ctx.config()
        try:
            with JsonParams(body, self.ctx.files.path_of) as params:
                edit = await run_in_threadpool(validate, params, Policy.of(config, self.batch.key))
                try:
                    directives = parse_directives(edit.prompt)
                except DirectiveError as exc:
                    raise bad_request(str(exc), param="prompt") from exc
                fault = self._fault(edit.prompt, directives.fault, directives.times)
                if fault in _SERVER_FAULTS:
                    raise server_error()
                if fault is Fault.MODERATION:
                    raise moderation_blocked()
                if fault is Fault.BAD_REQUEST:
                    raise ApiError(400, "The request was rejected as invalid (sandbox directive).")
                if fault is Fault.FORBIDDEN:
                    raise organization_not_verified(edit.model)
                usage = usage_for(edit)
                payload = await images_response(
                    edit,
                    usage,
                    drift=DIRECTIVE_DRIFT if fault is Fault.DRIFT else config.drift,
                    seed=config.seed,
                    bad_b64=fault is Fault.BAD_B64,
                )
        except ApiError as error:
            return error.status, error.body(), None
        return 200, payload, (edit, usage, cost_for(edit, usage, BATCH_PRICE_FACTOR))
