"""Azure OpenAI mode, through the SDK's real `AzureOpenAI` client (and the plain client on v1)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from PIL import Image

from pipeline.sandbox import SandboxServer
from tests.sandbox.helpers import billing_lines, decode, encoded, png, upload

API_VERSION = "2025-04-01-preview"
KEY = "az-key-0001"
TOKEN = "entra-token-0001"
IMAGE = upload(png(64, 64))


def _root(server: SandboxServer) -> str:
    return server.base_url.removesuffix("/v1")


@pytest.fixture
def azure(sandbox: SandboxServer) -> SandboxServer:
    """The shared sandbox with two deployments of one model and one of another."""
    sandbox.config.azure_deployments = {
        "edits-a": "gpt-image-1.5",
        "edits-b": "gpt-image-1.5",
        "edits-2": "gpt-image-2",
    }
    sandbox.config.azure_api_keys = [KEY]
    sandbox.config.azure_ad_tokens = [TOKEN]
    return sandbox


def _client(server: SandboxServer, **auth: Any) -> openai.AzureOpenAI:
    options: dict[str, Any] = auth or {"api_key": KEY}
    return openai.AzureOpenAI(
        azure_endpoint=_root(server), api_version=API_VERSION, max_retries=0, **options
    )


@pytest.fixture
def client(azure: SandboxServer) -> Iterator[openai.AzureOpenAI]:
    with _client(azure) as sdk:
        yield sdk


def _requests(server: SandboxServer) -> dict[str, Any]:
    response = httpx2.get(f"{_root(server)}/sandbox/requests", timeout=10)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def test_edit_through_a_deployment_is_answered_as_its_model_and_billed_to_it(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """An edit through a classic deployment path answers 200 with usage, defaults quality to
    high, and its billing line names the provider and the deployment."""
    raw = client.images.with_raw_response.edit(model="edits-a", image=IMAGE, prompt="white sweep")
    result = raw.parse()

    assert result.quality == "high"
    assert result.size == "1024x1024"
    assert decode(result.data[0].b64_json).size == (1024, 1024)
    assert result.usage is not None
    assert result.usage.output_tokens == 4160
    assert raw.headers["apim-request-id"]
    [line] = billing_lines(azure.config.billing_log)
    assert (line["provider"], line["deployment"], line["model"]) == (
        "azure",
        "edits-a",
        "gpt-image-1.5",
    )
    assert line["usage"] == result.usage.model_dump()
    u = result.usage
    cost = (
        Decimal(u.input_tokens_details.text_tokens) * 5
        + Decimal(u.input_tokens_details.image_tokens) * 8
        + Decimal(4160) * 32
    ) / 1_000_000
    assert line["cost_usd"] == f"{cost:.6f}"
    [entry] = _requests(azure)["requests"]
    assert (entry["provider"], entry["deployment"], entry["status"]) == ("azure", "edits-a", "200")
    assert entry["key"] == "...0001"  # a hint, never the key


def test_entra_id_token_goes_as_bearer_and_a_wrong_one_is_refused(azure: SandboxServer) -> None:
    """A token from `azure_ad_token_provider` travels as `Authorization: Bearer` and is
    accepted; a token Azure does not know answers 401 with Azure's body."""
    with _client(azure, azure_ad_token_provider=lambda: TOKEN) as sdk:
        assert sdk.images.edit(model="edits-2", image=IMAGE, prompt="p").data
    with (
        _client(azure, azure_ad_token_provider=lambda: "expired") as sdk,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        sdk.images.edit(model="edits-2", image=IMAGE, prompt="p")
    assert info.value.code == "401"
    assert "Access token is missing, invalid" in str(info.value.message)
    assert len(billing_lines(azure.config.billing_log)) == 1


def test_wrong_key_is_refused_with_azures_401(azure: SandboxServer) -> None:
    """A wrong `api-key` answers 401 with Azure's body ({"error": {"code", "message"}})."""
    with _client(azure, api_key="az-wrong") as sdk, pytest.raises(openai.AuthenticationError) as e:
        sdk.images.edit(model="edits-a", image=IMAGE, prompt="p")
    assert json.loads(e.value.response.content) == {
        "error": {
            "code": "401",
            "message": "Access denied due to invalid subscription key or wrong API endpoint. "
            "Make sure to provide a valid key for an active subscription and use a correct "
            "regional API endpoint for your resource.",
        }
    }
    assert billing_lines(azure.config.billing_log) == []


def test_unknown_deployment_answers_404_deployment_not_found(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """A deployment the resource does not have answers 404 DeploymentNotFound."""
    with pytest.raises(openai.NotFoundError) as info:
        client.images.edit(model="gpt-image-1.5", image=IMAGE, prompt="p")
    assert info.value.code == "DeploymentNotFound"
    assert _requests(azure)["by_deployment"] == {"gpt-image-1.5": {"404": 1}}


def test_missing_or_unknown_api_version(azure: SandboxServer) -> None:
    """No api-version answers 404 Resource not found; one not accepted answers 400."""
    url = f"{_root(azure)}/openai/deployments/edits-a/images/edits"
    files = {"image": ("a.png", png(32, 32), "image/png")}
    missing = httpx2.post(url, data={"prompt": "p"}, files=files, headers={"api-key": KEY})
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "404", "message": "Resource not found"}}
    with (
        openai.AzureOpenAI(
            azure_endpoint=_root(azure),
            api_version="2023-06-01-preview",
            api_key=KEY,
            max_retries=0,
        ) as sdk,
        pytest.raises(openai.BadRequestError) as info,
    ):
        sdk.images.edit(model="edits-a", image=IMAGE, prompt="p")
    assert info.value.code == "BadRequest"
    assert json.loads(info.value.response.content)["error"]["message"] == (
        "API version not supported"
    )
    azure.config.azure_api_versions = [API_VERSION, "2023-06-01-preview"]
    with openai.AzureOpenAI(
        azure_endpoint=_root(azure), api_version="2023-06-01-preview", api_key=KEY, max_retries=0
    ) as sdk:
        assert sdk.images.edit(model="edits-a", image=IMAGE, prompt="p").data


def test_webp_output_and_webp_input_are_refused(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """Azure has no WEBP output and takes PNG or JPEG inputs only (OpenAI accepts both)."""
    with pytest.raises(openai.BadRequestError) as output:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p", output_format="webp")
    assert (output.value.param, output.value.code) == ("output_format", "invalid_value")
    webp = encoded(Image.new("RGB", (32, 32), (9, 9, 9)), "WEBP")
    with pytest.raises(openai.BadRequestError) as inputs:
        client.images.edit(model="edits-a", image=("a.webp", webp, "image/webp"), prompt="p")
    assert (inputs.value.param, inputs.value.code) == ("image", "unsupported_file_mimetype")
    jpeg = client.images.edit(model="edits-a", image=IMAGE, prompt="p", output_format="jpeg")
    assert decode(jpeg.data[0].b64_json).format == "JPEG"
    assert len(billing_lines(azure.config.billing_log)) == 1


def _filtered(error: openai.BadRequestError) -> None:
    body = json.loads(error.response.content)["error"]
    assert body["code"] == "contentFilter"
    assert body["inner_error"]["code"] == "ResponsibleAIPolicyViolation"
    results = body["inner_error"]["content_filter_results"]
    assert [name for name, r in results.items() if r["filtered"]] == ["violence"]
    assert error.code == "contentFilter"


def test_content_filter_by_directive_and_by_rate(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """`#sandbox:moderation` and `azure_content_filter_rate` answer Azure's 400 contentFilter
    with its inner error and filter results, and nothing is billed."""
    with pytest.raises(openai.BadRequestError) as directive:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p #sandbox:moderation")
    _filtered(directive.value)
    azure.config.azure_content_filter_rate = 1.0
    with pytest.raises(openai.BadRequestError) as rate:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p")
    _filtered(rate.value)
    azure.config.azure_content_filter_rate = 0.0
    assert client.images.edit(model="edits-a", image=IMAGE, prompt="p").data
    assert len(billing_lines(azure.config.billing_log)) == 1


def test_faults_answer_in_azures_shapes(client: openai.AzureOpenAI) -> None:
    """Injected faults keep their status but take Azure's body (500 InternalServerError)."""
    with pytest.raises(openai.InternalServerError) as info:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p #sandbox:500")
    assert info.value.code == "InternalServerError"
    with pytest.raises(openai.RateLimitError) as limited:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p #sandbox:429")
    assert limited.value.code == "429"
    assert limited.value.response.headers["retry-after"] == "1"


def test_each_deployment_is_held_to_its_own_rate_limit(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """Two deployments of one model, 3 and 2 requests per minute: each admits its own number,
    then answers 429 with a retry-after that says when its oldest request leaves the minute;
    the request log shows neither went over its limit in any 60 s."""
    limits = {"edits-a": 3, "edits-b": 2}
    azure.config.azure_deployment_rpm = limits
    started = time.monotonic()
    statuses: dict[str, list[int]] = {name: [] for name in limits}
    waits: list[int] = []
    for _ in range(5):
        for name in limits:
            try:
                client.images.edit(model=name, image=IMAGE, prompt="p")
                statuses[name].append(200)
            except openai.RateLimitError as exc:
                statuses[name].append(429)
                assert exc.code == "429"
                waits.append(int(exc.response.headers["retry-after"]))
    elapsed = time.monotonic() - started
    assert statuses == {"edits-a": [200, 200, 200, 429, 429], "edits-b": [200, 200, 429, 429, 429]}
    assert all(60 - elapsed - 1 <= wait <= 60 for wait in waits)

    log = _requests(azure)
    assert log["by_deployment"] == {
        "edits-a": {"200": 3, "429": 2},
        "edits-b": {"200": 2, "429": 3},
    }
    for name, limit in limits.items():
        ok = [e["time"] for e in log["requests"] if (e["deployment"], e["status"]) == (name, "200")]
        assert len(ok) == limit
        assert all(sum(t <= u < t + 60 for u in ok) <= limit for t in ok)
    lines = billing_lines(azure.config.billing_log)
    assert sorted(line["deployment"] for line in lines) == ["edits-a"] * 3 + ["edits-b"] * 2
    assert azure.sandbox.stats.snapshot()["rate_limited"] == 5


def test_v1_base_url_with_the_plain_client(azure: SandboxServer) -> None:
    """`OpenAI(base_url=".../openai/v1/")` with `model` = the deployment works with the key as
    a bearer; an unknown deployment answers 404 DeploymentNotFound."""
    with openai.OpenAI(base_url=f"{_root(azure)}/openai/v1/", api_key=KEY, max_retries=0) as sdk:
        result = sdk.images.edit(model="edits-2", image=IMAGE, prompt="p", size="512x512")
        assert (result.size, result.quality) == ("512x512", "high")
        with pytest.raises(openai.NotFoundError) as info:
            sdk.images.edit(model="gpt-image-2", image=IMAGE, prompt="p")
        assert info.value.code == "DeploymentNotFound"
    [line] = billing_lines(azure.config.billing_log)
    assert (line["provider"], line["deployment"], line["model"]) == (
        "azure",
        "edits-2",
        "gpt-image-2",
    )


def test_other_azure_paths_answer_resource_not_found(azure: SandboxServer) -> None:
    """Paths under /openai the sandbox does not serve answer Azure's 404."""
    response = httpx2.get(f"{_root(azure)}/openai/deployments/edits-a/models", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "404"


def test_openai_edits_are_counted_per_key(sandbox: SandboxServer) -> None:
    """In OpenAI mode the request log counts requests per key (by a hint of the key)."""
    for key in ("sk-first-aaaa", "sk-second-bbbb", "sk-second-bbbb"):
        with openai.OpenAI(api_key=key, base_url=sandbox.base_url, max_retries=0) as sdk:
            sdk.images.edit(image=IMAGE, prompt="p", model="gpt-image-2", size="256x256")
    log = _requests(sandbox)
    assert log["by_key"] == {"...aaaa": {"200": 1}, "...bbbb": {"200": 2}}
    assert [e["model"] for e in log["requests"]] == ["gpt-image-2"] * 3
    since = log["requests"][1]["time"]
    later = httpx2.get(f"{_root(sandbox)}/sandbox/requests", params={"since": since}).json()
    assert len(later["requests"]) == 2


def test_models_files_and_batches_requests_are_in_the_request_log(sandbox: SandboxServer) -> None:
    """The request log holds every API request, the Models, Files and Batches APIs' too: path,
    status and a hint of the key, counted per key."""
    with openai.OpenAI(api_key="sk-files-cccc", base_url=sandbox.base_url, max_retries=0) as sdk:
        sdk.models.list()
        sdk.files.create(file=("a.png", png(32, 32)), purpose="user_data")
        with pytest.raises(openai.NotFoundError):
            sdk.batches.retrieve("batch_missing")
    unauthorized = httpx2.get(f"{sandbox.base_url}/files", timeout=10)
    assert unauthorized.status_code == 401
    log = _requests(sandbox)
    assert [(e["path"], e["status"], e["key"]) for e in log["requests"]] == [
        ("/v1/models", "200", "...cccc"),
        ("/v1/files", "200", "...cccc"),
        ("/v1/batches/batch_missing", "404", "...cccc"),
        ("/v1/files", "401", None),
    ]
    assert all(e["provider"] == "openai" for e in log["requests"])
    assert log["by_key"] == {"...cccc": {"200": 2, "404": 1}}


def test_json_edit_bodies_work_on_both_azure_paths(azure: SandboxServer) -> None:
    """A JSON edit body (images as a data URL or an uploaded file_id) is taken on the classic
    and v1 paths as on OpenAI's, validated as the deployment's model (quality high by default),
    and billed as a delivered sync answer of the deployment."""
    data_url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
    classic = httpx2.post(
        f"{_root(azure)}/openai/deployments/edits-2/images/edits",
        params={"api-version": API_VERSION},
        json={"prompt": "p", "images": [{"image_url": data_url}], "size": "512x512"},
        headers={"api-key": KEY},
        timeout=30,
    )
    assert classic.status_code == 200, classic.text
    assert (classic.json()["quality"], classic.json()["size"]) == ("high", "512x512")
    with openai.OpenAI(api_key="sk-files", base_url=azure.base_url, max_retries=0) as sdk:
        file_id = sdk.files.create(file=("a.png", png(64, 64)), purpose="user_data").id
    v1 = httpx2.post(
        f"{_root(azure)}/openai/v1/images/edits",
        json={"model": "edits-a", "prompt": "p", "images": [{"file_id": file_id}], "n": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert v1.status_code == 200, v1.text
    assert len(v1.json()["data"]) == 2
    lines = billing_lines(azure.config.billing_log)
    assert [
        (line["route"], line["delivered"], line["provider"], line["deployment"], line["model"])
        for line in lines
    ] == [
        ("sync", True, "azure", "edits-2", "gpt-image-2"),
        ("sync", True, "azure", "edits-a", "gpt-image-1.5"),
    ]
    bad = httpx2.post(
        f"{_root(azure)}/openai/v1/images/edits",
        json={"model": "edits-a", "prompt": "p", "images": [{"file_id": "file-missing"}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "images[0].file_id")


def test_an_azure_answer_the_client_left_is_billed_undelivered(azure: SandboxServer) -> None:
    """As on OpenAI's path, an Azure edit whose client left during the latency is still made
    and billed, as undelivered, to its deployment."""
    azure.config.latency_ms = 600
    with (
        _client(azure, api_key=KEY) as sdk,
        pytest.raises(openai.APITimeoutError),
    ):
        sdk.with_options(timeout=0.15).images.edit(model="edits-2", image=IMAGE, prompt="p")
    deadline = time.monotonic() + 10
    while azure.sandbox.stats.snapshot()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = azure.sandbox.stats.snapshot()
    assert (stats["billed"], stats["billed_undelivered"]) == (1, 1)
    [line] = billing_lines(azure.config.billing_log)
    assert (line["route"], line["delivered"], line["provider"], line["deployment"]) == (
        "sync",
        False,
        "azure",
        "edits-2",
    )
    [entry] = _requests(azure)["requests"]
    assert (entry["deployment"], entry["status"]) == ("edits-2", "disconnected")


def test_the_calendar_applies_to_deployments_but_not_openai_verification(
    client: openai.AzureOpenAI, azure: SandboxServer
) -> None:
    """A deployment of a model the sandbox treats as gone answers the model's error; OpenAI's
    organisation verification (`org_verified`) and GIF/SVG output do not apply on Azure."""
    azure.config.org_verified = False
    assert client.images.edit(model="edits-2", image=IMAGE, prompt="p").data
    with pytest.raises(openai.BadRequestError) as gif:
        client.images.edit(model="edits-2", image=IMAGE, prompt="p", output_format="gif")
    assert gif.value.param == "output_format"
    azure.config.unavailable_models = ["gpt-image-1.5"]
    with pytest.raises(openai.NotFoundError) as gone:
        client.images.edit(model="edits-a", image=IMAGE, prompt="p")
    assert gone.value.code == "model_not_found"
    assert len(billing_lines(azure.config.billing_log)) == 1
