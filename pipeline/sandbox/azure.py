"""Azure OpenAI's image edit endpoints, answered the way Azure answers them.

Two paths, under `/openai` (the SDK's `AzureOpenAI` and plain `OpenAI` clients both work):
- classic: `POST /openai/deployments/{deployment}/images/edits?api-version=V`, with an `api-key`
  header or `Authorization: Bearer ENTRA_TOKEN` (what `AzureOpenAI(azure_endpoint=...,
  api_version=...)` sends for `images.edit(model=DEPLOYMENT)`);
- v1: `POST /openai/v1/images/edits`, the deployment named by the form's `model`, the key or
  token as a bearer (`OpenAI(base_url=".../openai/v1/")`), `api-version` optional.

Order of decisions: read the form or JSON body (as on OpenAI's path, params.py) -> api-version
(404 when missing, 400 when not accepted) -> credentials (401) -> deployment (404
DeploymentNotFound) -> the deployment's requests per minute (429 with retry-after) -> Azure's
limits (PNG/JPEG output only; PNG/JPEG inputs) -> validation as the deployment's model (quality
defaults to high) -> content filter (400 contentFilter) -> then as for OpenAI: directives, quota,
faults, latency (the work goes on if the client leaves), render, billing (route "sync",
delivered or not, with the provider and the deployment).

The sandbox's calendar applies to a deployment's model (a retired model's deployment answers
errors); OpenAI's organisation verification (`org_verified`) and `key_models` do not. Errors
Azure itself produces have Azure's shape (`{"error": {"code", "message"}}`); the model's
validation errors keep OpenAI's, which Azure's image error schema also describes.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, Router
from starlette.types import Receive, Scope, Send

from pipeline.sandbox.app import EditsEndpoint, Reply
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import ApiError, bad_request
from pipeline.sandbox.params import Params
from pipeline.sandbox.requestlog import call_of, key_hint
from pipeline.sandbox.validation import EditRequest, Policy, validate

if TYPE_CHECKING:
    from pipeline.sandbox.app import Sandbox

# api-version values the v1 path accepts besides none at all (a sandbox choice: Microsoft's docs
# say v1 needs no api-version, and early v1 previews used `preview`).
V1_API_VERSIONS = ("v1", "preview", "latest")
DEFAULT_QUALITY = "high"
OUTPUT_FORMATS = ("png", "jpeg")
INPUT_MIMETYPES = ("image/png", "image/jpeg")
REGION = "sandbox"


class AzureError(ApiError):
    """Raised to answer with Azure's own error shape: `{"error": {"code", "message", ...}}`."""

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def resource_not_found() -> AzureError:
    return AzureError(404, "Resource not found", code="404")


def api_version_not_supported() -> AzureError:
    return AzureError(400, "API version not supported", code="BadRequest")


def missing_key() -> AzureError:
    return AzureError(
        401,
        "Access denied due to missing subscription key. Make sure to include subscription key "
        "when making requests to an API.",
        code="401",
    )


def invalid_key() -> AzureError:
    return AzureError(
        401,
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
        "provide a valid key for an active subscription and use a correct regional API endpoint "
        "for your resource.",
        code="401",
    )


def invalid_token() -> AzureError:
    return AzureError(
        401,
        "Unauthorized. Access token is missing, invalid, audience is incorrect "
        "(https://cognitiveservices.azure.com), or have expired.",
        code="401",
    )


def permission_denied() -> AzureError:
    return AzureError(
        403,
        "The principal lacks the required data action "
        "`Microsoft.CognitiveServices/accounts/OpenAI/deployments/images/action`.",
        code="PermissionDenied",
    )


def deployment_not_found() -> AzureError:
    return AzureError(
        404,
        "The API deployment for this resource does not exist. If you created the deployment "
        "within the last 5 minutes, please wait a moment and try again.",
        code="DeploymentNotFound",
    )


def rate_limited(api_version: str | None, wait_ms: int) -> AzureError:
    seconds = max(1, math.ceil(wait_ms / 1000))
    version = f" under Azure OpenAI API version {api_version}" if api_version else ""
    return AzureError(
        429,
        f"Requests to the Images_Edit Operation{version} have exceeded call rate limit of your "
        f"current AIServices S0 pricing tier. Please retry after {seconds} seconds. Please "
        "contact Azure support service if you would like to further increase the default rate "
        "limit.",
        code="429",
        headers={"retry-after": str(seconds), "retry-after-ms": str(wait_ms)},
    )


def internal_error() -> AzureError:
    return AzureError(
        500,
        "Backend returned unexpected response. Please contact Microsoft for help.",
        code="InternalServerError",
    )


def content_filter(category: str = "violence") -> AzureError:
    """Azure's image content-filter answer (its REST reference: dalleErrorResponse)."""
    results: dict[str, Any] = {
        name: {"filtered": name == category, "severity": "medium" if name == category else "safe"}
        for name in ("hate", "self_harm", "sexual", "violence")
    }
    results["jailbreak"] = {"filtered": False, "detected": False}
    return AzureError(
        400,
        "Your task failed as a result of our safety system.",
        code="contentFilter",
        extra={
            "param": "prompt",
            "type": None,
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": results,
            },
        },
    )


def as_azure(error: ApiError) -> ApiError:
    """What Azure answers where the OpenAI flow raised `error` (faults and directives)."""
    if isinstance(error, AzureError):
        return error
    if error.code == "server_error":
        return internal_error()
    if error.code == "rate_limit_exceeded":
        return rate_limited(None, int(error.headers.get("retry-after-ms", "1000")))
    if error.code == "moderation_blocked":
        return content_filter()
    if error.code == "invalid_api_key":
        return invalid_key()
    if error.status == 403:
        return permission_denied()
    return error


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _allowed(value: str, accepted: list[str] | None) -> bool:
    return accepted is None or value in accepted


def authenticate(request: Request, config: SandboxConfig, *, v1: bool) -> str:
    """The caller's key or token if Azure would accept it; else the 401 Azure answers."""
    api_key = request.headers.get("api-key")
    if api_key is not None:
        if not api_key or not _allowed(api_key, config.azure_api_keys):
            raise invalid_key()
        return api_key
    token = _bearer(request)
    if token is None:
        raise missing_key()
    # On v1 an API key may also travel as a bearer (the plain OpenAI client sends it so).
    if _allowed(token, config.azure_ad_tokens) or (v1 and _allowed(token, config.azure_api_keys)):
        return token
    raise invalid_token()


def check_api_version(version: str | None, config: SandboxConfig, *, v1: bool) -> None:
    if v1:
        if version is not None and version not in V1_API_VERSIONS:
            raise api_version_not_supported()
        return
    if version is None:
        raise resource_not_found()
    if version not in config.azure_api_versions:
        raise api_version_not_supported()


def as_model(params: Params, model: str) -> Params:
    """The fields as the deployment's model sees them: `model` set, `quality` defaulting to
    high."""
    values = {"model": model}
    if not params.present("quality"):
        values["quality"] = DEFAULT_QUALITY
    return params.overridden(values)


def policy(config: SandboxConfig) -> Policy:
    """What a deployment's model may do: the calendar and `unavailable_models` apply; OpenAI's
    organisation verification and `key_models` do not, and there is no GIF or SVG output."""
    base = Policy.of(config, None)
    return replace(
        base,
        access=replace(base.access, org_verified=True),
        gif_models=frozenset(),
        svg_models=frozenset(),
    )


def check_output_format(params: Params) -> None:
    value = params.text("output_format")
    if value is not None and value not in OUTPUT_FORMATS:
        raise bad_request(
            f"Invalid value: '{value}'. Supported values are: 'png' and 'jpeg'.",
            param="output_format",
        )


def check_inputs(edit: EditRequest) -> None:
    for index, upload in enumerate(edit.images):
        if upload.info.mimetype not in INPUT_MIMETYPES:
            param = "image" if len(edit.images) == 1 else f"image[{index}]"
            raise bad_request(
                f"Invalid file '{param}': unsupported mimetype ('{upload.info.mimetype}'). "
                "Supported file formats are 'image/jpeg' and 'image/png'.",
                param=param,
                code="unsupported_file_mimetype",
            )


class AzureEditsEndpoint(EditsEndpoint):
    """The edits endpoint behind one of Azure's two paths (`v1` or a classic deployment path)."""

    def __init__(self, sandbox: Sandbox, *, v1: bool) -> None:
        super().__init__(sandbox)
        self.v1 = v1

    def _deployment(self, scope: Scope, params: Params) -> str:
        if not self.v1:
            return str(scope["path_params"]["deployment"])
        model = params.text("model")
        if not model:
            raise bad_request(
                "Missing required parameter: 'model' (the deployment name).",
                param="model",
                code="missing_required_parameter",
            )
        return model

    def _take_request(self, deployment: str, config: SandboxConfig, version: str | None) -> None:
        rpm = config.azure_deployment_rpm.get(deployment)
        wait = self.sandbox.deployment_windows.get(deployment).try_take(1, rpm)
        if wait > 0:
            self.sandbox.stats.count_rate_limited()
            raise rate_limited(version, max(1, math.ceil(wait * 1000)))

    async def _admit(
        self, scope: Scope, request: Request, params: Params
    ) -> tuple[EditRequest, str]:
        config = self.sandbox.config
        call = call_of(scope)
        version = request.query_params.get("api-version")
        check_api_version(version, config, v1=self.v1)
        credential = authenticate(request, config, v1=self.v1)
        call.key = key_hint(credential)
        deployment = call.deployment = self._deployment(scope, params)
        model = config.azure_deployments.get(deployment)
        if model is None:
            raise deployment_not_found()
        call.model = model
        self._take_request(deployment, config, version)
        check_output_format(params)
        edit = await run_in_threadpool(validate, as_model(params, model), policy(config))
        check_inputs(edit)
        draw = self.sandbox.content_filter_dice.draw(config.seed)
        if draw.u < config.azure_content_filter_rate:
            raise content_filter()
        return edit, credential

    def _rate_limit(self, edit: EditRequest, config: SandboxConfig) -> None:
        """Azure has no organisation-wide image limit: each deployment's is checked in _admit."""

    def _error_reply(self, error: ApiError) -> Reply:
        return Reply.error(as_azure(error))

    async def _transmit(
        self, scope: Scope, send: Send, reply: Reply, request_id: str, started: float
    ) -> None:
        headers = {"apim-request-id": str(uuid.uuid4()), "x-ms-region": REGION}
        deployment = call_of(scope).deployment
        rpm = self.sandbox.config.azure_deployment_rpm.get(deployment or "")
        if deployment is not None and rpm is not None:
            window = self.sandbox.deployment_windows.get(deployment)
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - window.used()))
            headers["x-ratelimit-reset-requests"] = f"{math.ceil(window.reset_in())}s"
        reply = replace(reply, headers={**headers, **reply.headers})
        await super()._transmit(scope, send, reply, request_id, started)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(resource_not_found().body(), status_code=404)
    await response(scope, receive, send)


def mount(sandbox: Sandbox) -> Mount:
    """Azure's paths, under `/openai`; any other path there answers Azure's 404."""
    router = Router(
        routes=[
            Route(
                "/deployments/{deployment}/images/edits",
                AzureEditsEndpoint(sandbox, v1=False),
                methods=["POST"],
            ),
            Route("/v1/images/edits", AzureEditsEndpoint(sandbox, v1=True), methods=["POST"]),
        ],
        default=_not_found,
    )
    return Mount("/openai", app=router)
