"""The only module that talks to the OpenAI SDK: one call, one classified outcome.

The SDK's own retries are off (`max_retries=0`) so every attempt is seen, recorded and priced;
the executor owns the retry policy. Nothing here raises for an API failure: the result is a
`CallOutcome` whose `kind` says what the caller must do (see ARCHITECTURE.md, error classes).

One SDK client per provider connection (`pipeline.providers.Connection`), built once per
process: `openai.OpenAI` for OpenAI and compatible gateways (and Azure's v1 path),
`openai.AzureOpenAI` for Azure's deployment paths (api-version; an `api-key`, or an Entra ID
token from azure-identity's `get_bearer_token_provider`, imported only when a provider uses it).
A call on a lane sends the lane's deployment as `model`: AzureOpenAI puts it in the path.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx2
import openai

from pipeline.cost.pricing import Usage
from pipeline.errors import ConfigError, EditbatchError
from pipeline.observe.logs import add_secret
from pipeline.output.formats import unreadable
from pipeline.providers import Auth, Connection, Kind, Lane
from pipeline.run.retry import classify, content_blocked, parse_retry_after
from pipeline.settings import Settings
from pipeline.spec import EditSpec
from pipeline.states import AttemptOutcome

KEPT_HEADERS = (
    "x-ratelimit",
    "x-request-id",
    "retry-after",
    "openai-processing",
    "apim-request-id",
)

MIME = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "jpg": "image/jpeg"}


@dataclass(frozen=True)
class CallOutcome:
    """What one call to the edit endpoint did, as plain values.

    kind: OK (images present), TRANSIENT (retry later), HOLD (stop the batch: quota, auth),
    FAILED (this job cannot succeed as asked); see `pipeline.run.retry.classify`.
    """

    kind: AttemptOutcome
    latency_ms: float
    http_status: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_param: str | None = None
    error_message: str | None = None
    retry_after: float | None = None
    usage: Usage | None = None
    images: tuple[bytes, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    # SVG output: the author model's own tokens, which the API reports apart from `usage`
    # (`svg_usage`) and bills at that model's rates (priced by the executor when the price
    # table has that model; otherwise the attempt is flagged unpriced).
    svg_usage: Usage | None = None
    svg_author: str | None = None
    # No answer came back, but the API may have made one and billed it (we timed out, or the
    # body was cut off): booked at its estimated cost.
    maybe_billed: bool = False
    # Where the call went (None: a call without a lane, to the gateway's own client).
    provider: str | None = None
    deployment: str | None = None


def filter_detail(error: Any) -> str:
    """The categories a content filter flagged, from Azure's `inner_error.content_filter_results`
    (chat answers spell it `innererror.content_filter_result`): "violence (medium)", or ""."""
    if not isinstance(error, dict):
        return ""
    inner = error.get("inner_error") or error.get("innererror")
    if not isinstance(inner, dict):
        return ""
    results = inner.get("content_filter_results") or inner.get("content_filter_result")
    if not isinstance(results, dict):
        return ""
    flagged = [
        f"{name} ({value.get('severity')})" if value.get("severity") else str(name)
        for name, value in results.items()
        if isinstance(value, dict) and value.get("filtered")
    ]
    return ", ".join(flagged)


def entra_credential() -> Any:
    """azure-identity's DefaultAzureCredential (environment, managed identity, Azure CLI...)."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def token_provider(connection: Connection) -> Callable[[], str]:
    """A bearer token source for an Entra ID connection; ConfigError without azure-identity."""
    try:
        from azure.identity import get_bearer_token_provider
    except ImportError as exc:
        raise ConfigError(
            f"{connection.describe()} signs in with Entra ID (auth entra_id), which needs "
            "azure-identity: pip install 'editbatch[azure]'"
        ) from exc
    provider: Callable[[], str] = get_bearer_token_provider(
        entra_credential(), connection.token_scope
    )
    return provider


def build_client(
    connection: Connection, timeout: float, http_client: httpx2.Client | None = None
) -> openai.OpenAI:
    """The SDK client for one connection (retries off)."""
    if connection.kind == Kind.AZURE:
        entra = connection.auth == Auth.ENTRA_ID
        if connection.azure_v1:
            # The v1 path takes the plain client; a token source goes where the key would.
            key: str | Callable[[], str] = (
                token_provider(connection) if entra else connection.api_key
            )
            return openai.OpenAI(
                base_url=f"{connection.url}/openai/v1/",
                api_key=key,
                max_retries=0,
                timeout=timeout,
                http_client=http_client,
            )
        return openai.AzureOpenAI(
            azure_endpoint=connection.url or "",
            api_version=connection.api_version,
            api_key=None if entra else connection.api_key,
            azure_ad_token_provider=token_provider(connection) if entra else None,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
    return openai.OpenAI(
        api_key=connection.api_key or "missing-key",
        base_url=connection.url,
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
    )


@dataclass(frozen=True)
class Answer:
    """What the API said to a call that costs nothing: the status (None: no answer at all),
    the error code and message."""

    status: int | None
    code: str | None = None
    message: str = ""
    # None for a plain free call. For a call made to be refused (`check_lane`: an Azure edit
    # with n=0, which a working deployment refuses only after the endpoint, api-version, key and
    # deployment were accepted): whether it was refused that way.
    refused_as_asked: bool | None = None

    @property
    def answered(self) -> bool:
        """The API is there (it answered with anything but a server error)."""
        return self.status is not None and self.status < 500

    @property
    def ok(self) -> bool:
        """It said what a working setup says: a 2xx, or (a call made to be refused) the
        refusal asked for."""
        if self.refused_as_asked is not None:
            return self.refused_as_asked
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        head = " ".join(str(p) for p in (self.status, self.code) if p)
        return f"{head}: {self.message}" if head and self.message else head or self.message


def _answer_of(exc: openai.APIStatusError, redact: Any) -> Answer:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    code = getattr(exc, "code", None) or (error.get("code") if isinstance(error, dict) else None)
    message = error.get("message") if isinstance(error, dict) else None
    return Answer(
        exc.status_code, str(code) if code else None, redact(str(message or exc.message))[:500]
    )


def usage_from_response(usage: Any) -> Usage | None:
    """Our Usage from the SDK's `ImagesResponse.usage` (None when the API sent none)."""
    if usage is None:
        return None
    in_details = getattr(usage, "input_tokens_details", None)
    out_details = getattr(usage, "output_tokens_details", None)
    input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
    output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
    if in_details is not None:
        image_in = int(getattr(in_details, "image_tokens", 0) or 0)
        text_in = int(getattr(in_details, "text_tokens", 0) or 0)
    else:  # no split given: count it all as text (the cheaper rate would under-report)
        image_in, text_in = 0, input_tokens
    if out_details is not None:
        image_out = int(getattr(out_details, "image_tokens", 0) or 0)
        text_out = int(getattr(out_details, "text_tokens", 0) or 0)
    else:  # an image endpoint's output tokens are image tokens
        image_out, text_out = output_tokens, 0
    cached = getattr(in_details, "cached_tokens", None) if in_details is not None else None
    return Usage(
        text_input=text_in,
        image_input=image_in,
        image_output=image_out,
        text_output=text_out,
        cached_image_input=int(cached or 0),
    )


def svg_usage_from_response(svg_usage: Any) -> tuple[Usage | None, str | None]:
    """The SVG author's tokens (as text in / text out, reasoning counted as output) and model,
    from the SDK's `ImagesResponse.svg_usage`; (None, None) when the API sent none."""
    if svg_usage is None:
        return None, None
    output = int(getattr(svg_usage, "output_tokens", 0) or 0)
    reasoning = int(getattr(svg_usage, "reasoning_tokens", 0) or 0)
    # Reasoning tokens are usually counted inside output_tokens (as in the Responses API);
    # only a larger figure is taken, so they are never counted twice.
    usage = Usage(
        text_input=int(getattr(svg_usage, "input_tokens", 0) or 0),
        text_output=max(output, reasoning),
    )
    model = getattr(svg_usage, "model", None)
    return usage, str(model) if model else None


def decode_images(data: list[Any]) -> tuple[bytes, ...] | str:
    """The decoded outputs (raster images, or SVG documents), or why they are unusable."""
    images: list[bytes] = []
    for i, item in enumerate(data or [], start=1):
        b64 = getattr(item, "b64_json", None)
        if not b64:
            return f"image {i}: no b64_json in the response"
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return f"image {i}: invalid base64"
        problem = unreadable(raw)
        if problem is not None:
            return f"image {i}: {problem}"
        images.append(raw)
    if not images:
        return "the response contained no images"
    return tuple(images)


def answer_cut_off(cause: BaseException | None) -> bool:
    """The connection closed after the answer's headers, in its body: the answer was made."""
    return isinstance(cause, httpx2.RemoteProtocolError) and "complete message body" in str(cause)


def _files(spec: EditSpec) -> dict[str, Any]:
    def file_tuple(path: str) -> tuple[str, bytes, str]:
        p = Path(path)
        ext = p.suffix.lower().lstrip(".")
        return (p.name, p.read_bytes(), MIME.get(ext, "application/octet-stream"))

    files: dict[str, Any] = {
        "image": [file_tuple(p) for p in spec.images]
        if len(spec.images) > 1
        else file_tuple(spec.images[0])
    }
    if spec.mask:
        files["mask"] = file_tuple(spec.mask)
    if spec.markup:
        files["markup"] = file_tuple(spec.markup)
    return files


class Gateway:
    """Configured SDK clients, built once per process and shared by all threads.

    The client of (`api_key`, `base_url`) serves calls without a lane; `connections` (from
    `ProviderSet.connections()`) are built up front, so a provider that cannot be reached as
    configured (no azure-identity for Entra ID) fails when the worker starts, not mid-batch.
    `http_client` (an `httpx2.Client`) replaces the SDK's own transport for every client: unit
    tests pass one with an `httpx2.MockTransport` to answer in-process, without a server.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str | None,
        timeout: float,
        http_client: httpx2.Client | None = None,
        connections: Iterable[Connection] = (),
    ) -> None:
        self._timeout = timeout
        self._http_client = http_client
        self._lock = threading.Lock()
        self._secrets = {api_key} if api_key else set()
        self.client = openai.OpenAI(
            api_key=api_key or "missing-key",
            base_url=base_url,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
        self._clients: dict[Connection, openai.OpenAI] = {
            Connection(Kind.OPENAI, base_url, api_key=api_key): self.client
        }
        for connection in connections:
            self.client_for(connection)

    def client_for(self, connection: Connection) -> openai.OpenAI:
        """The client of `connection`, built on first use."""
        with self._lock:
            client = self._clients.get(connection)
            if client is None:
                client = build_client(connection, self._timeout, self._http_client)
                self._clients[connection] = client
                if connection.api_key:
                    self._secrets.add(connection.api_key)
                    add_secret(connection.api_key)  # an Azure key is not `sk-` shaped
            return client

    def _redact(self, text: str) -> str:
        """Remove the API keys from text that will be stored (the API may echo one back)."""
        for secret in self._secrets:
            if len(secret) >= 8:
                text = text.replace(secret, "sk-****")
        return text

    def redact(self, text: str) -> str:
        """Remove the API key from text (the batch route's API calls share the client)."""
        return self._redact(text)

    def close(self) -> None:
        for client in set(self._clients.values()):
            client.close()

    def lookup(
        self, model: str, timeout: float = 10.0, connection: Connection | None = None
    ) -> Answer:
        """Retrieve `model` (`GET /models/{model}`, free) on `connection` (None: the client
        without a lane): whether the API answers, and what."""
        return self._free(lambda client: client.models.retrieve(model), timeout, connection)

    def list_models(self, timeout: float = 10.0, connection: Connection | None = None) -> Answer:
        """List the models (`GET /models`, free): whether the API answers, and what."""
        return self._free(lambda client: client.models.list(), timeout, connection)

    def _free(self, call: Any, timeout: float, connection: Connection | None = None) -> Answer:
        client = self.client if connection is None else self.client_for(connection)
        try:
            call(client.with_options(timeout=timeout))
        except openai.APIStatusError as exc:
            return _answer_of(exc, self._redact)
        except openai.APITimeoutError:
            return Answer(None, "timeout", f"no answer within {timeout:g} s")
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            detail = f": {type(cause).__name__}" if cause is not None else ""
            return Answer(None, "connection_error", f"connection failed{detail}")
        return Answer(200)

    def probe(self, model: str, timeout: float = 10.0, lane: Lane | None = None) -> str | None:
        """Ask the API something that costs nothing (retrieve `model`, or on `lane` its
        deployment through its connection): None when it answers (any status below 500: the
        API is there), else why not."""
        if lane is None:
            answer = self.lookup(model, timeout)
        else:
            answer = self.lookup(lane.deployment, timeout, lane.connection)
        return None if answer.answered else answer.describe()

    def edit(self, spec: EditSpec, lane: Lane | None = None) -> CallOutcome:
        """Make exactly one edit call for `spec` (on `lane`: its connection, its deployment as
        `model`) and classify what came back."""
        outcome = self._edit(spec, lane)
        if lane is None:
            return outcome
        return _on_lane(outcome, lane)

    def _edit(self, spec: EditSpec, lane: Lane | None) -> CallOutcome:
        files = _files(spec)
        params = spec.api_params()
        client = self.client
        if lane is not None:
            client = self.client_for(lane.connection)
            params["model"] = lane.deployment
        started = time.perf_counter()

        def elapsed() -> float:
            return (time.perf_counter() - started) * 1000.0

        try:
            raw = client.images.with_raw_response.edit(**files, **params)
            headers = {
                k.lower(): v for k, v in raw.headers.items() if k.lower().startswith(KEPT_HEADERS)
            }
            request_id = raw.headers.get("x-request-id") or raw.headers.get("apim-request-id")
            response = raw.parse()
        except openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            error = body.get("error", body) if isinstance(body, dict) else {}
            error_type = error.get("type") if isinstance(error, dict) else None
            code = getattr(exc, "code", None) or (
                error.get("code") if isinstance(error, dict) else None
            )
            message = str((error.get("message") if isinstance(error, dict) else None) or "")
            param = error.get("param") if isinstance(error, dict) else None
            code_text = str(code) if code else None
            if content_blocked(exc.status_code, code_text) and (flagged := filter_detail(error)):
                message = f"{message} (filtered: {flagged})"
            return CallOutcome(
                kind=classify(exc.status_code, error_type, code_text, param, message),
                latency_ms=elapsed(),
                http_status=exc.status_code,
                request_id=exc.request_id or exc.response.headers.get("apim-request-id"),
                error_type=error_type or type(exc).__name__,
                error_code=code_text,
                error_param=str(param) if param else None,
                error_message=self._redact(message or exc.message)[:2000],
                retry_after=parse_retry_after(exc.response.headers),
            )
        except openai.APITimeoutError:
            return CallOutcome(
                kind=AttemptOutcome.TRANSIENT,
                latency_ms=elapsed(),
                error_type="timeout",
                error_code="timeout",
                error_message="the request timed out (the API may still make and bill the "
                "answer: booked at its estimated cost)",
                maybe_billed=True,
            )
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            detail = f": {type(cause).__name__}" if cause is not None else ""
            if answer_cut_off(cause):
                # The answer was being sent when the connection closed: the API made it and
                # bills it.
                return CallOutcome(
                    kind=AttemptOutcome.TRANSIENT,
                    latency_ms=elapsed(),
                    error_type="connection",
                    error_code="truncated_response",
                    error_message="the answer was cut off mid-body (billed by the API: booked "
                    "at its estimated cost)",
                    maybe_billed=True,
                )
            return CallOutcome(
                kind=AttemptOutcome.TRANSIENT,
                latency_ms=elapsed(),
                error_type="connection",
                error_code="connection_error",
                error_message=f"connection failed or was cut off{detail}",
            )
        except (ValueError, openai.APIResponseValidationError) as exc:
            return CallOutcome(
                kind=AttemptOutcome.TRANSIENT,
                latency_ms=elapsed(),
                http_status=200,
                error_type="bad_response",
                error_code="unreadable_response",
                error_message=f"the response could not be parsed: {type(exc).__name__}",
            )
        usage = usage_from_response(response.usage)
        decoded = decode_images(list(response.data or []))
        if isinstance(decoded, str):
            return CallOutcome(
                kind=AttemptOutcome.TRANSIENT,
                latency_ms=elapsed(),
                http_status=raw.status_code,
                request_id=request_id,
                error_type="bad_output",
                error_code="bad_image_data",
                error_message=decoded,
                usage=usage,
                headers=headers,
            )
        svg_usage, svg_author = svg_usage_from_response(getattr(response, "svg_usage", None))
        return CallOutcome(
            kind=AttemptOutcome.OK,
            latency_ms=elapsed(),
            http_status=raw.status_code,
            request_id=request_id,
            usage=usage,
            images=decoded,
            headers=headers,
            svg_usage=svg_usage,
            svg_author=svg_author,
        )


def _on_lane(outcome: CallOutcome, lane: Lane) -> CallOutcome:
    """`outcome` naming the provider and deployment it came from."""
    return replace(outcome, provider=lane.provider, deployment=lane.deployment)


def _probe_image() -> tuple[str, bytes, str]:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buffer, "PNG")
    return ("probe.png", buffer.getvalue(), "image/png")


def check_lane(gateway: Gateway, lane: Lane, timeout: float = 10.0) -> Answer:
    """Probe `lane` without paying (`editbatch doctor`): on OpenAI and compatible gateways,
    retrieve its model (`GET /models/{model}`); on Azure, send its deployment an edit with n=0,
    which the model refuses (400) only after the endpoint, the api-version, the credential and
    the deployment were all accepted (it counts one request against the deployment's limit).
    That refusal is the answer asked for (`Answer.refused_as_asked`, so `Answer.ok`); a 429 says
    the deployment is there and busy."""
    client = gateway.client_for(lane.connection).with_options(timeout=timeout)
    azure = lane.connection.kind == Kind.AZURE
    try:
        if azure:
            client.images.edit(
                model=lane.deployment, image=_probe_image(), prompt="editbatch doctor", n=0
            )
        else:
            client.models.retrieve(lane.deployment)
    except openai.APIStatusError as exc:
        answer = _answer_of(exc, gateway.redact)
        status, code = answer.status, answer.code
        if not azure:
            return answer
        refused_as_asked = (
            status == 400 and classify(status, None, code, None, answer.message) == "failed"
        ) or status == 429  # there, and busy
        return replace(answer, refused_as_asked=refused_as_asked)
    except openai.APITimeoutError:
        return Answer(None, "timeout", f"no answer within {timeout:g} s")
    except openai.APIConnectionError as exc:
        cause = exc.__cause__
        detail = f": {type(cause).__name__}" if cause is not None else ""
        return Answer(None, "connection_error", f"connection failed{detail}")
    if azure:
        # An Azure edit with n=0 that was answered 200 was not refused: say so, never hide it.
        return Answer(200, None, "the deployment accepted an edit with n=0", refused_as_asked=False)
    return Answer(200)


class BillingGateway:
    """The provider's own usage and cost figures (`/organization/usage/images`, `/costs`), read
    with an admin key, never the job key (`editbatch reconcile`)."""

    def __init__(self, admin_key: str, base_url: str | None, timeout: float = 60.0) -> None:
        self._secret = admin_key
        self.client = openai.OpenAI(
            api_key="not-used-for-admin-calls",
            admin_api_key=admin_key,
            base_url=base_url,
            max_retries=2,
            timeout=timeout,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> BillingGateway:
        """With OPENAI_ADMIN_KEY, which must be set and must not be the job key."""
        admin = settings.openai_admin_key.get_secret_value() if settings.openai_admin_key else ""
        if not admin:
            raise ConfigError(
                "reconcile reads the provider's usage with an admin key: set OPENAI_ADMIN_KEY "
                "(platform.openai.com/settings/organization/admin-keys; not the job key)"
            )
        if admin == settings.api_key():
            raise ConfigError(
                "OPENAI_ADMIN_KEY is the job key (OPENAI_API_KEY): use an admin key kept apart"
            )
        return cls(admin, settings.openai_base_url)

    def close(self) -> None:
        self.client.close()

    def usage_images(self, start: int, end: int) -> list[dict[str, Any]]:
        """Image usage by day and model: every result of every bucket, with `start_time`."""
        return self._pages(
            lambda page: self.client.admin.organization.usage.images(
                start_time=start,
                end_time=end,
                bucket_width="1d",
                group_by=["model"],
                limit=31,
                **page,
            )
        )

    def costs(self, start: int, end: int) -> list[dict[str, Any]]:
        """Costs by day and line item (`MODEL, input_tokens` ...), with `start_time`."""
        return self._pages(
            lambda page: self.client.admin.organization.usage.costs(
                start_time=start,
                end_time=end,
                bucket_width="1d",
                group_by=["line_item"],
                limit=180,
                **page,
            )
        )

    def _pages(self, fetch: Any) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        page: dict[str, Any] = {}
        while True:
            try:
                response = fetch(page)
            except openai.APIStatusError as exc:
                answer = _answer_of(exc, lambda text: text.replace(self._secret, "sk-admin-****"))
                raise EditbatchError(
                    f"the provider refused the usage query: {answer.describe()}"
                    + (_ADMIN_FIX if exc.status_code in (401, 403) else "")
                ) from None
            except openai.APIConnectionError as exc:
                raise EditbatchError(f"the provider's usage API does not answer: {exc}") from None
            body = response.model_dump()
            for bucket in body.get("data") or []:
                for result in bucket.get("results") or []:
                    results.append({**result, "start_time": bucket["start_time"]})
            if not body.get("has_more") or not body.get("next_page"):
                return results
            page = {"page": body["next_page"]}


_ADMIN_FIX = (
    " (OPENAI_ADMIN_KEY must be an admin key with the api.usage.read scope: "
    "platform.openai.com/settings/organization/admin-keys)"
)
