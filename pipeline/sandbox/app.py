"""The sandbox ASGI app: OpenAI's `POST /v1/images/edits`, plus `/sandbox/*` admin endpoints.

Order of decisions for an edit: read the form -> auth (401) -> validation (400/404) -> directive
syntax (400) -> quota (429 insufficient_quota) -> fault choice (directive, else seeded draw) ->
immediate rejections (429/400/401/403 faults) -> rate limit (429) -> latency -> 500/timeout/reset
faults -> render -> 200 (whole, truncated, or with bad base64) -> billing log.
Before all of it, an outage (outage.py) may answer 503 or cut the connection. The Azure paths
(azure.py) replace auth and validation with Azure's checks (`_admit`) and the rate limit with the
deployments' own; the usage and costs endpoints are in usage.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from python_multipart.exceptions import MultipartParseError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pipeline.sandbox import connections, tokens, usage
from pipeline.sandbox.billing import BillingLog
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import (
    ApiError,
    bad_request,
    insufficient_quota,
    invalid_api_key,
    moderation_blocked,
    organization_not_verified,
    rate_limit_exceeded,
    server_error,
)
from pipeline.sandbox.faults import (
    BURST_RETRY_AFTER_MS,
    DIRECTIVE_DRIFT,
    DIRECTIVE_RETRY_AFTER_MS,
    REJECTIONS,
    DirectiveCounter,
    DirectiveError,
    Directives,
    Fault,
    FaultDice,
    latency_seconds,
    parse_directives,
    random_fault,
)
from pipeline.sandbox.images import EditJob, render
from pipeline.sandbox.outage import OutageMiddleware
from pipeline.sandbox.ratelimit import KeyedWindows, SlidingWindow
from pipeline.sandbox.requestlog import RequestLog, call_of, key_hint
from pipeline.sandbox.stats import Stats
from pipeline.sandbox.validation import EditRequest, validate

# Reported in x-ratelimit-* headers when no limit is configured; never enforced.
NOTIONAL_IMAGE_LIMIT = 10_000
NOTIONAL_TOKEN_LIMIT = 10_000_000
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_FIELDS = 1000


class Sandbox:
    """Everything one sandbox app keeps between requests. `config` is read afresh per request."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.image_window = SlidingWindow()
        self.token_window = SlidingWindow()
        self.directives = DirectiveCounter()
        self.dice = FaultDice(config.seed)
        self.billing = BillingLog()
        self.requests = RequestLog()
        self.deployment_windows = KeyedWindows()
        self.content_filter_dice = FaultDice(config.seed)

    def reset(self) -> None:
        """Clear stats, the request log, directive counters and rate windows, and restart the
        seeded sequences."""
        self.stats.clear()
        self.requests.clear()
        self.image_window.clear()
        self.token_window.clear()
        self.deployment_windows.clear()
        self.directives.clear()
        self.dice.reseed(self.config.seed)
        self.content_filter_dice.reseed(self.config.seed)


@dataclass(frozen=True)
class Plan:
    """What happens to a validated request."""

    fault: Fault | None
    from_directive: bool
    latency: float
    drift: float


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms / 1000, 60)
    text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text


def _corrupt_b64(value: str) -> str:
    """Base64 no decoder accepts: 4k+1 alphabet characters (padding cannot fix that) and a '!'."""
    core = value.rstrip("=")[:-1]
    core = core[: len(core) - (len(core) - 1) % 4]
    return core + "!"


async def _disconnected_within(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`, but stop early and return True if the client goes away."""

    async def wait_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait_for(asyncio.shield(watcher), timeout=seconds)
    except TimeoutError:
        return False
    finally:
        watcher.cancel()
    return True


def _bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


class Cut(StrEnum):
    """How a reply leaves the server."""

    NONE = "none"  # the whole response
    TRUNCATE = "truncate"  # headers promise the whole body, half is sent, connection closed
    RESET = "reset"  # no response: TCP RST
    NOTHING = "nothing"  # the client went away; nothing to send


@dataclass(frozen=True)
class Reply:
    status: int = 0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut: Cut = Cut.NONE
    billed: bool = False

    @classmethod
    def error(cls, error: ApiError) -> Reply:
        return cls(error.status, json.dumps(error.body()).encode(), error.headers)

    @property
    def outcome(self) -> str:
        """Key in stats' by_status."""
        if self.cut is Cut.RESET:
            return "reset"
        if self.cut is Cut.NOTHING:
            return "disconnected"
        return str(self.status)


DISCONNECTED = Reply(cut=Cut.NOTHING)


class EditsEndpoint:
    """ASGI app for `POST /v1/images/edits` (raw ASGI, so a reply can also be cut off).

    Stats, quota and the billing log are settled before the reply is transmitted, so a client
    that has its answer sees them final.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        request_id = f"req_{uuid.uuid4().hex}"
        self.sandbox.stats.begin()
        reply = DISCONNECTED
        try:
            reply = await self._reply(scope, receive, request_id)
        finally:
            self.sandbox.stats.end(reply.outcome)
            self.sandbox.requests.record(scope, reply.outcome)
        await self._transmit(scope, send, reply, request_id, started)

    # -- deciding -------------------------------------------------------------------------

    async def _reply(self, scope: Scope, receive: Receive, request_id: str) -> Reply:
        try:
            return await self._read_and_reply(scope, receive, request_id)
        except ClientDisconnect:  # the client left during the upload
            return DISCONNECTED

    async def _read_and_reply(self, scope: Scope, receive: Receive, request_id: str) -> Reply:
        request = Request(scope, receive)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith(FORM_CONTENT_TYPES):
            await request.body()
            return Reply.error(
                bad_request(
                    "The sandbox accepts only multipart/form-data edits (JSON bodies with image "
                    "URLs or file ids are not supported).",
                    param=None,
                    code="unsupported_content_type",
                )
            )
        try:
            form = await request.form(max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS)
        except (HTTPException, MultipartParseError) as exc:
            return Reply.error(
                bad_request(f"Could not parse the multipart body: {exc}", param=None, code=None)
            )
        try:
            return await self._reply_to_form(scope, request, receive, form, request_id)
        finally:
            await form.close()

    async def _reply_to_form(
        self, scope: Scope, request: Request, receive: Receive, form: FormData, request_id: str
    ) -> Reply:
        config = self.sandbox.config
        try:
            edit, key = await self._admit(scope, request, form)
            try:
                directives = parse_directives(edit.prompt)
            except DirectiveError as exc:
                raise bad_request(str(exc), param="prompt") from exc
            if not self.sandbox.stats.reserve_quota(config.quota_after):
                raise insufficient_quota()
        except ApiError as error:
            return self._error_reply(error)

        reply = DISCONNECTED
        try:
            plan = self._plan(edit, directives, config)
            reply = await self._run(scope, receive, edit, plan, key, request_id)
        except ApiError as error:
            reply = self._error_reply(error)
        finally:
            self.sandbox.stats.release_quota(billed=reply.billed, images=edit.n)
        return reply

    async def _admit(
        self, scope: Scope, request: Request, form: FormData
    ) -> tuple[EditRequest, str]:
        """Auth and validation: the checked request and the caller's key, or an ApiError."""
        config = self.sandbox.config
        call = call_of(scope)
        key = _bearer_key(request)
        call.key = key_hint(key)
        if key is None or (config.api_keys is not None and key not in config.api_keys):
            raise invalid_api_key(key)
        edit = await run_in_threadpool(validate, form)
        call.model = edit.model
        return edit, key

    def _error_reply(self, error: ApiError) -> Reply:
        return Reply.error(error)

    def _plan(self, edit: EditRequest, directives: Directives, config: SandboxConfig) -> Plan:
        draw = self.sandbox.dice.draw(config.seed)
        fault = directives.fault
        from_directive = fault is not None and self.sandbox.directives.fires(
            edit.prompt, directives.times
        )
        if not from_directive:
            fault = random_fault(config, draw.u)
        if fault is not None:
            self.sandbox.stats.count_fault(fault.value)
        if directives.latency_ms is not None:
            latency = directives.latency_ms / 1000.0
        else:
            latency = latency_seconds(config, draw.z)
        drift = DIRECTIVE_DRIFT if fault is Fault.DRIFT else config.drift
        return Plan(fault, from_directive, latency, drift)

    def _rejection(self, plan: Plan, edit: EditRequest, key: str) -> ApiError:
        if plan.fault is Fault.RATE_LIMIT:
            ms = DIRECTIVE_RETRY_AFTER_MS if plan.from_directive else BURST_RETRY_AFTER_MS
            return rate_limit_exceeded(
                f"Rate limit reached for {edit.model} in organization org-sandbox on images per "
                f"minute (IPM). Please try again in {ms}ms. Visit "
                "https://platform.openai.com/account/rate-limits to learn more.",
                ms,
            )
        if plan.fault is Fault.QUOTA:
            return insufficient_quota()
        if plan.fault is Fault.MODERATION:
            return moderation_blocked()
        if plan.fault is Fault.UNAUTHORIZED:
            return invalid_api_key(key)
        if plan.fault is Fault.FORBIDDEN:
            return organization_not_verified(edit.model)
        return ApiError(400, "The request was rejected as invalid (sandbox directive 400).")

    def _rate_limit(self, edit: EditRequest, config: SandboxConfig) -> None:
        limit = config.rate_limit_per_minute
        wait = self.sandbox.image_window.try_take(edit.n, limit)
        if wait <= 0:
            return
        self.sandbox.stats.count_rate_limited()
        used = self.sandbox.image_window.used()
        raise rate_limit_exceeded(
            f"Rate limit reached for {edit.model} in organization org-sandbox on images per "
            f"minute (IPM): Limit {limit}, Used {used}, Requested {edit.n}. Please try again in "
            f"{wait:.3f}s. Visit https://platform.openai.com/account/rate-limits to learn more.",
            max(1, math.ceil(wait * 1000)),
        )

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        edit: EditRequest,
        plan: Plan,
        key: str,
        request_id: str,
    ) -> Reply:
        config = self.sandbox.config
        if plan.fault in REJECTIONS:
            raise self._rejection(plan, edit, key)
        self._rate_limit(edit, config)
        if plan.latency > 0 and await _disconnected_within(receive, plan.latency):
            return DISCONNECTED
        if plan.fault is Fault.SERVER_ERROR:
            raise server_error()
        if plan.fault is Fault.TIMEOUT:
            if await _disconnected_within(receive, config.hang_seconds):
                return DISCONNECTED
            raise server_error()
        if plan.fault is Fault.RESET:
            if not connections.can_cut(scope):
                raise server_error()  # not served by SandboxServer/serve: nothing to reset
            return Reply(cut=Cut.RESET)

        usage = tokens.usage(
            prompt=edit.prompt,
            input_sizes=[(u.info.width, u.info.height) for u in edit.images],
            input_fidelity=edit.input_fidelity,
            output_size=edit.size,
            quality=edit.quality,
            n=edit.n,
        )
        body = await self._success_body(edit, plan, usage, config.seed)
        if plan.fault is Fault.TRUNCATED:
            return Reply(200, body, cut=Cut.TRUNCATE)
        self._bill(scope, edit, usage, request_id)
        return Reply(200, body, billed=True)

    async def _success_body(
        self, edit: EditRequest, plan: Plan, usage: dict[str, Any], seed: int
    ) -> bytes:
        job = EditJob(
            image=edit.images[0].file,
            mask=edit.mask.file if edit.mask else None,
            size=edit.size,
            output_format=edit.output_format,
            output_compression=edit.output_compression,
            background=edit.background,
            prompt=edit.prompt,
            n=edit.n,
            drift=plan.drift,
            seed=seed,
        )
        try:
            rendered = await run_in_threadpool(render, job)
        except (OSError, ValueError) as exc:
            # Validation reads only headers; a body that does not decode shows up here.
            raise bad_request(
                f"Invalid image file: it could not be decoded ({exc}).",
                param="image",
                code="invalid_image",
            ) from exc
        background = rendered.background
        encoded = [base64.b64encode(image).decode("ascii") for image in rendered.images]
        del rendered  # keep one copy of the images (base64) in memory, not two
        if plan.fault is Fault.BAD_B64:
            encoded = [_corrupt_b64(value) for value in encoded]
        payload = {
            "created": int(time.time()),
            "data": [{"b64_json": value} for value in encoded],
            "background": background,
            "output_format": edit.output_format,
            "quality": edit.quality,
            "size": edit.size_text,
            "usage": usage,
        }
        return json.dumps(payload).encode()

    def _bill(
        self, scope: Scope, edit: EditRequest, usage: dict[str, Any], request_id: str
    ) -> None:
        self.sandbox.token_window.add(usage["total_tokens"])
        call = call_of(scope)
        self.sandbox.billing.append(
            self.sandbox.config.billing_log,
            request_id=request_id,
            model=edit.model,
            size=edit.size_text,
            quality=edit.quality,
            n=edit.n,
            usage=usage,
            cost_usd=tokens.cost_usd(edit.model, usage),
            provider=call.provider,
            deployment=call.deployment,
        )

    # -- answering ------------------------------------------------------------------------

    def _headers(self, reply: Reply, request_id: str, started: float) -> list[tuple[bytes, bytes]]:
        config = self.sandbox.config
        window, token_window = self.sandbox.image_window, self.sandbox.token_window
        limit = config.rate_limit_per_minute or NOTIONAL_IMAGE_LIMIT
        values = {
            "content-type": "application/json",
            "content-length": str(len(reply.body)),
            "x-request-id": request_id,
            "openai-processing-ms": str(round((time.monotonic() - started) * 1000)),
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(max(0, limit - window.used())),
            "x-ratelimit-reset-requests": _duration(window.reset_in()),
            "x-ratelimit-limit-tokens": str(NOTIONAL_TOKEN_LIMIT),
            "x-ratelimit-remaining-tokens": str(max(0, NOTIONAL_TOKEN_LIMIT - token_window.used())),
            "x-ratelimit-reset-tokens": _duration(token_window.reset_in()),
            **reply.headers,
        }
        return [(k.encode(), v.encode()) for k, v in values.items()]

    async def _transmit(
        self, scope: Scope, send: Send, reply: Reply, request_id: str, started: float
    ) -> None:
        if reply.cut is Cut.NOTHING:
            return
        if reply.cut is Cut.RESET:
            await connections.reset(scope)
            return
        headers = self._headers(reply, request_id, started)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if reply.cut is Cut.NONE:
            await send({"type": "http.response.body", "body": reply.body})
            return
        half = reply.body[: len(reply.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        if not await connections.close(scope):
            # Not served by SandboxServer/serve: make the server drop the connection.
            raise RuntimeError("sandbox: truncated response (intentional)")


def _openai_http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    message = f"Invalid URL ({request.method} {request.url.path})"
    if status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    error = ApiError(status, message)
    return JSONResponse(error.body(), status_code=status)


def create_app(config: SandboxConfig) -> Starlette:
    """The sandbox as an ASGI app; `app.state.sandbox` holds its state and config."""
    # azure.py builds on EditsEndpoint above, so it can only be imported once this module is.
    from pipeline.sandbox import azure

    sandbox = Sandbox(config)

    async def stats(request: Request) -> Response:
        return JSONResponse(sandbox.stats.snapshot())

    async def get_config(request: Request) -> Response:
        return JSONResponse(sandbox.config.as_dict())

    async def post_config(request: Request) -> Response:
        try:
            values = await request.json()
            if not isinstance(values, dict):
                raise ValueError("expected a JSON object of config fields")
            sandbox.config.update(values)
        except ValueError as exc:
            return JSONResponse(
                bad_request(str(exc), param=None, code=None).body(), status_code=400
            )
        return JSONResponse(sandbox.config.as_dict())

    async def reset(request: Request) -> Response:
        sandbox.reset()
        return JSONResponse({"reset": True})

    async def requests_log(request: Request) -> Response:
        since = request.query_params.get("since")
        try:
            after = float(since) if since is not None else None
        except ValueError:
            error = bad_request(f"since must be epoch seconds, got {since!r}", param="since")
            return JSONResponse(error.body(), status_code=400)
        return JSONResponse(sandbox.requests.snapshot(after))

    app = Starlette(
        routes=[
            Route("/v1/images/edits", EditsEndpoint(sandbox), methods=["POST"]),
            *usage.routes(sandbox),
            azure.mount(sandbox),
            Route("/sandbox/stats", stats, methods=["GET"]),
            Route("/sandbox/requests", requests_log, methods=["GET"]),
            Route("/sandbox/config", get_config, methods=["GET"]),
            Route("/sandbox/config", post_config, methods=["POST"]),
            Route("/sandbox/reset", reset, methods=["POST"]),
        ],
        middleware=[Middleware(OutageMiddleware, sandbox=sandbox)],
        exception_handlers={404: _openai_http_error, 405: _openai_http_error},
    )
    app.state.sandbox = sandbox
    return app
