"""The sandbox ASGI app: OpenAI's `POST /v1/images/edits`, `/v1/models`, `/v1/files`,
`/v1/batches`, `/v1/organization/usage/images` and `/costs`, Azure OpenAI's edit paths under
`/openai/`, plus `/sandbox/*` admin endpoints.

Order of decisions for an edit: read the form (or JSON body) -> auth (401) -> validation
(400/404/403) -> directive syntax (400) -> quota (429 insufficient_quota) -> fault choice
(directive, else seeded draw) -> immediate rejections (429/400/401/403 faults) -> rate limit
(429) -> latency (the work goes on if the client leaves) -> 500/timeout/reset faults -> render
-> billing log (delivered or not) -> 200 (whole, truncated, or with bad base64).
Before all of it, an outage (outage.py) may answer 503 or cut the connection. The Azure paths
(azure.py) replace auth and validation with Azure's checks (`_admit`) and the rate limit with the
deployments' own; the usage and costs endpoints are in usage.py. Every API request is recorded in
the request log (requestlog.py, `GET /sandbox/requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from python_multipart.exceptions import MultipartParseError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.sandbox import connections, usage
from pipeline.sandbox.batch_runner import BatchContext, BatchRunner
from pipeline.sandbox.batches import Batch, BatchStore, batch_routes
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
from pipeline.sandbox.files import FileStore, file_routes
from pipeline.sandbox.models import Access, model_list, model_object, retrieve
from pipeline.sandbox.outage import OutageMiddleware
from pipeline.sandbox.params import FormParams, JsonParams, Params
from pipeline.sandbox.ratelimit import KeyedWindows, SlidingWindow
from pipeline.sandbox.requestlog import RequestLog, call_of, key_hint
from pipeline.sandbox.response import cost_for, images_response, usage_for
from pipeline.sandbox.stats import Stats
from pipeline.sandbox.validation import EditRequest, Policy, validate

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
        self.files = FileStore()
        self.batches = BatchStore()
        self.batch_dice = FaultDice(config.seed)
        self.runners = BatchContext(
            config=lambda: self.config,
            files=self.files,
            store=self.batches,
            billing=self.billing,
            dice=self.batch_dice,
            directives=self.directives,
        )

    def reset(self) -> None:
        """Clear stats, the request log, directive counters and rate windows (the deployments'
        too), restart the seeded sequences (faults, content filter), stop every batch, and forget
        every batch and file (deleting the files from disk)."""
        self.stats.clear()
        self.requests.clear()
        self.image_window.clear()
        self.token_window.clear()
        self.deployment_windows.clear()
        self.directives.clear()
        self.dice.reseed(self.config.seed)
        self.content_filter_dice.reseed(self.config.seed)
        self.batch_dice.reseed(self.config.seed)
        for batch in self.batches.clear():
            if batch.task is not None:  # may be called from another thread than the loop's
                with contextlib.suppress(RuntimeError):  # the loop has already stopped
                    batch.task.get_loop().call_soon_threadsafe(batch.task.cancel)
        self.files.clear()

    def start_batch(self, batch: Batch) -> None:
        """Run a new batch on the running event loop (called by the create endpoint)."""
        batch.task = asyncio.get_running_loop().create_task(
            BatchRunner(self.runners, batch).run(), name=f"sandbox {batch.id}"
        )

    def snapshot(self) -> dict[str, Any]:
        """`GET /sandbox/stats`: the request counters, plus uploads and batches."""
        return {
            **self.stats.snapshot(),
            "uploads": self.files.stats(),
            "batches": self.batches.stats(),
        }

    async def close(self) -> None:
        """At shutdown: stop the batch runners, delete the files and their temporary folder."""
        tasks = [b.task for b in self.batches.clear() if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.files.close()


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


class DisconnectWatch:
    """Notices when the client goes away while the request carries on (the real API keeps
    working on, and bills, an answer whose client has left)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.gone = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        # The body has been read: the next message is the disconnect (or the end of the
        # response, which comes after stop()).
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def sleep(self, seconds: float, *, stop_early: bool) -> bool:
        """Sleep `seconds` (or less, with `stop_early`, if the client leaves); True if it left."""
        if not stop_early:
            await asyncio.sleep(seconds)
            return self.gone.is_set()
        try:
            await asyncio.wait_for(self.gone.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def stop(self) -> None:
        self._task.cancel()


def _bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def authorize(request: Request, config: SandboxConfig) -> str:
    """The request's API key, or the 401 the API answers without a valid one."""
    key = _bearer_key(request)
    if key is None or (config.api_keys is not None and key not in config.api_keys):
        raise invalid_api_key(key)
    return key


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
    delivered: bool = True  # False: billed, but the client left or the body was cut off

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
        if content_type.startswith("application/json"):
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return self._error_reply(
                    bad_request(f"Invalid JSON body: {exc}", param=None, code=None)
                )
            if not isinstance(body, dict):
                return self._error_reply(
                    bad_request("The JSON body must be an object.", param=None, code=None)
                )
            with JsonParams(body, self.sandbox.files.path_of) as json_params:
                return await self._reply_to(scope, request, receive, json_params, request_id)
        if not content_type.startswith(FORM_CONTENT_TYPES):
            await request.body()
            return self._error_reply(
                bad_request(
                    "Send the edit as multipart/form-data or as a JSON body.",
                    param=None,
                    code="unsupported_content_type",
                )
            )
        try:
            form = await request.form(max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS)
        except (HTTPException, MultipartParseError) as exc:
            return self._error_reply(
                bad_request(f"Could not parse the multipart body: {exc}", param=None, code=None)
            )
        try:
            return await self._reply_to(scope, request, receive, FormParams(form), request_id)
        finally:
            await form.close()

    async def _reply_to(
        self, scope: Scope, request: Request, receive: Receive, params: Params, request_id: str
    ) -> Reply:
        config = self.sandbox.config
        try:
            edit, key = await self._admit(scope, request, params)
            try:
                directives = parse_directives(edit.prompt)
            except DirectiveError as exc:
                raise bad_request(str(exc), param="prompt") from exc
            if not self.sandbox.stats.reserve_quota(config.quota_after):
                raise insufficient_quota()
        except ApiError as error:
            return self._error_reply(error)

        reply = DISCONNECTED
        watch = DisconnectWatch(receive)
        try:
            plan = self._plan(edit, directives, config)
            reply = await self._run(scope, watch, edit, plan, key, request_id)
        except ApiError as error:
            reply = DISCONNECTED if watch.gone.is_set() else self._error_reply(error)
        finally:
            watch.stop()
            self.sandbox.stats.release_quota(
                billed=reply.billed, images=edit.n, delivered=reply.delivered
            )
        return reply

    async def _admit(
        self, scope: Scope, request: Request, params: Params
    ) -> tuple[EditRequest, str]:
        """Auth and validation: the checked request and the caller's key, or an ApiError."""
        config = self.sandbox.config
        call = call_of(scope)
        call.key = key_hint(_bearer_key(request))
        key = authorize(request, config)
        edit = await run_in_threadpool(validate, params, Policy.of(config, key))
        call.model = edit.model
        return edit, key

    def _error_reply(self, error: ApiError) -> Reply:
        """The reply to an ApiError (the Azure paths answer some in Azure's shape)."""
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
        watch: DisconnectWatch,
        edit: EditRequest,
        plan: Plan,
        key: str,
        request_id: str,
    ) -> Reply:
        config = self.sandbox.config
        # bill_undelivered (the real API): a client that leaves does not stop the work, and the
        # answer made is billed. False (the old sandbox): stop at once, bill only what is sent.
        keep_going = config.bill_undelivered
        if plan.fault in REJECTIONS:
            raise self._rejection(plan, edit, key)
        self._rate_limit(edit, config)
        if plan.latency > 0:
            left = await watch.sleep(plan.latency, stop_early=not keep_going)
            if left and not keep_going:
                return DISCONNECTED
        if plan.fault is Fault.SERVER_ERROR:
            raise server_error()
        if plan.fault is Fault.TIMEOUT:
            if await watch.sleep(config.hang_seconds, stop_early=True):
                return DISCONNECTED
            raise server_error()
        if plan.fault is Fault.RESET:
            if not connections.can_cut(scope):
                raise server_error()  # not served by SandboxServer/serve: nothing to reset
            return DISCONNECTED if watch.gone.is_set() else Reply(cut=Cut.RESET)

        usage = usage_for(edit)
        payload = await images_response(
            edit, usage, drift=plan.drift, seed=config.seed, bad_b64=plan.fault is Fault.BAD_B64
        )
        body = json.dumps(payload).encode()
        del payload
        gone, cut_off = watch.gone.is_set(), plan.fault is Fault.TRUNCATED
        if not keep_going:
            if gone:
                return DISCONNECTED
            if cut_off:
                return Reply(200, body, cut=Cut.TRUNCATE)
            self._bill(scope, edit, usage, request_id, delivered=True)
            return Reply(200, body, billed=True)
        self._bill(scope, edit, usage, request_id, delivered=not (gone or cut_off))
        if gone:
            return Reply(cut=Cut.NOTHING, billed=True, delivered=False)
        if cut_off:
            return Reply(200, body, cut=Cut.TRUNCATE, billed=True, delivered=False)
        return Reply(200, body, billed=True)

    def _bill(
        self,
        scope: Scope,
        edit: EditRequest,
        usage: dict[str, Any] | None,
        request_id: str,
        *,
        delivered: bool,
    ) -> None:
        if usage is not None:
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
            cost_usd=cost_for(edit, usage),
            route="sync",
            delivered=delivered,
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


def error_response(error: ApiError) -> Response:
    """An OpenAI-shaped error answer with a request id, for the plain (non-edit) endpoints."""
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}", **error.headers}
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class RequestLogged:
    """Wraps a plain API endpoint (models, files, batches) so that its answers go into the
    request log, like the edits' and usage endpoints' do: recorded as the response starts, so a
    client that has its answer finds it logged."""

    def __init__(self, app: ASGIApp, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call_of(scope).key = key_hint(_bearer_key(Request(scope)))
        recorded = False

        async def send_logged(message: Message) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start" and not recorded:
                recorded = True
                self.log.record(scope, str(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except Exception:
            if not recorded:  # answered 500 by Starlette's error middleware, further out
                self.log.record(scope, "500")
            raise
        if not recorded:  # the client left before an answer
            self.log.record(scope, "disconnected")


def _logged(routes: list[BaseRoute], log: RequestLog) -> list[BaseRoute]:
    """`routes`, their API endpoints wrapped in RequestLogged (admin `/sandbox/*` ones are not)."""
    for route in routes:
        if isinstance(route, Route) and not route.path.startswith("/sandbox/"):
            route.app = RequestLogged(route.app, log)
    return routes


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

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sandbox.close()

    async def stats(request: Request) -> Response:
        return JSONResponse(sandbox.snapshot())

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

    async def list_models(request: Request) -> Response:
        try:
            key = authorize(request, sandbox.config)
        except ApiError as error:
            return error_response(error)
        return JSONResponse(model_list(Access.of(sandbox.config, key)))

    async def get_model(request: Request) -> Response:
        try:
            key = authorize(request, sandbox.config)
            access = Access.of(sandbox.config, key)
            model = retrieve(request.path_params["model"], access)
        except ApiError as error:
            return error_response(error)
        return JSONResponse(model_object(model, access))

    plain_routes: list[BaseRoute] = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        *file_routes(sandbox.files, lambda: sandbox.config, authorize, error_response),
        *batch_routes(
            sandbox.batches,
            sandbox.files,
            lambda: sandbox.config,
            authorize,
            error_response,
            sandbox.start_batch,
        ),
    ]
    app = Starlette(
        routes=[
            # The edits and usage endpoints record their own answers in the request log.
            Route("/v1/images/edits", EditsEndpoint(sandbox), methods=["POST"]),
            *usage.routes(sandbox),
            azure.mount(sandbox),
            *_logged(plain_routes, sandbox.requests),
            Route("/sandbox/stats", stats, methods=["GET"]),
            Route("/sandbox/requests", requests_log, methods=["GET"]),
            Route("/sandbox/config", get_config, methods=["GET"]),
            Route("/sandbox/config", post_config, methods=["POST"]),
            Route("/sandbox/reset", reset, methods=["POST"]),
        ],
        # Outermost: an outage answers every path but /sandbox/* (files, batches, models too).
        middleware=[Middleware(OutageMiddleware, sandbox=sandbox)],
        exception_handlers={404: _openai_http_error, 405: _openai_http_error},
        lifespan=lifespan,
    )
    app.state.sandbox = sandbox
    return app
