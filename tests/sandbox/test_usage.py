"""`GET /v1/organization/usage/images` and `/costs`: the contract, the billing log, the admin key,
pagination and empty days."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox import schema
from tests.sandbox.helpers import API_KEY, billing_lines, png, upload

ADMIN_KEY = "sk-admin-sandbox-0001"
DAY = 86_400
# 2026-01-05 00:00:00 UTC, a Monday: synthetic billing lines are placed from here on.
MONDAY = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp())
IMAGE = upload(png(32, 32))


@pytest.fixture
def admin_client(sandbox: SandboxServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        api_key=API_KEY, admin_api_key=ADMIN_KEY, base_url=sandbox.base_url, max_retries=0
    ) as sdk:
        yield sdk


def _get(
    server: SandboxServer, path: str, params: dict[str, Any], key: str = ADMIN_KEY
) -> httpx2.Response:
    return httpx2.get(
        f"{server.base_url}/organization/{path}",
        params=params,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def _usage_line(
    at: float, model: str, size: str, n: int, cost: str, **extra: Any
) -> dict[str, Any]:
    """A billing-log line as the sandbox writes it (usage roughly that of a low 1024 edit)."""
    return {
        "request_id": f"req_{int(at * 1000)}",
        "time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "model": model,
        "size": size,
        "quality": "low",
        "n": n,
        "usage": {
            "input_tokens": 200,
            "input_tokens_details": {"image_tokens": 194, "text_tokens": 6},
            "output_tokens": 272 * n,
            "output_tokens_details": {"image_tokens": 272 * n, "text_tokens": 0},
            "total_tokens": 200 + 272 * n,
        },
        "cost_usd": cost,
        **extra,
    }


def _write(log: str | None, lines: list[dict[str, Any]]) -> None:
    assert log is not None
    with open(log, "a", encoding="utf-8") as out:
        for line in lines:
            out.write(json.dumps(line) + "\n")


def _decimal_json(response: httpx2.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def _edits(client: openai.OpenAI) -> None:
    """A mix of billed edits: two models, several sizes, qualities and n."""
    client.images.edit(image=IMAGE, prompt="one", n=3, quality="low")
    client.images.edit(image=IMAGE, prompt="two", quality="high", size="1536x1024")
    client.images.edit(image=IMAGE, prompt="four", model="gpt-image-2", size="256x256", n=2)
    client.images.edit(image=IMAGE, prompt="five", model="gpt-image-1-mini", quality="medium")


def test_answers_are_valid_against_the_contract(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    """Both endpoints' pages, grouped or not, match the contract's UsageResponse, and results
    carry only the fields their schema names."""
    _edits(client)
    contract = schema.load_contract(schema.USAGE_COSTS)["components"]["schemas"]
    start = int(datetime.now(UTC).timestamp()) - DAY
    cases = [
        ("usage/images", {}, "UsageImagesResult"),
        ("usage/images", {"group_by[]": ["model", "size", "source"]}, "UsageImagesResult"),
        ("usage/images", {"bucket_width": "1h", "limit": 48}, "UsageImagesResult"),
        ("costs", {}, "CostsResult"),
        ("costs", {"group_by[]": ["line_item", "project_id"]}, "CostsResult"),
    ]
    for path, params, result_schema in cases:
        response = _get(sandbox, path, {"start_time": start, **params})
        assert response.status_code == 200, response.text
        body = response.json()
        assert schema.check(body, "UsageResponse", schema.USAGE_COSTS) == []
        results = [r for bucket in body["data"] for r in bucket["results"]]
        assert results, (path, params)
        allowed = set(contract[result_schema]["properties"])
        assert all(set(r) <= allowed for r in results), (path, results[0])
        assert all(schema.check(r, result_schema, schema.USAGE_COSTS) == [] for r in results)


def test_contract_copy_is_current() -> None:
    """tests/sandbox/contract/openapi-usage-costs.json is the shared contract, byte for byte."""
    shared = schema.SHARED_CONTRACT_DIR / schema.USAGE_COSTS
    if shared.exists():
        assert (schema.CONTRACT_DIR / schema.USAGE_COSTS).read_bytes() == shared.read_bytes()


def test_totals_equal_the_billing_log(
    client: openai.OpenAI, admin_client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    """Images and requests per model and size, and costs per day and per line item, equal the
    billing log exactly: the costs to the micro-dollar, read back as Decimal."""
    _edits(client)
    with pytest.raises(openai.InternalServerError):  # not billed, so not counted
        client.images.edit(image=IMAGE, prompt="p #sandbox:500")
    lines = billing_lines(sandbox.config.billing_log)
    assert len(lines) == 4
    start = int(datetime.now(UTC).timestamp()) - DAY

    usage = admin_client.admin.organization.usage.images(
        start_time=start, group_by=["model", "size"]
    )
    got = {
        (r.model, r.size): (r.images, r.num_model_requests)  # type: ignore[union-attr]
        for bucket in usage.data
        for r in bucket.results
    }
    want: Counter[tuple[str, str]] = Counter()
    requests: Counter[tuple[str, str]] = Counter()
    for line in lines:
        want[(line["model"], line["size"])] += line["n"]
        requests[(line["model"], line["size"])] += 1
    assert got == {key: (want[key], requests[key]) for key in want}

    billed = sum(Decimal(line["cost_usd"]) for line in lines)
    total = _decimal_json(_get(sandbox, "costs", {"start_time": start}))
    amounts = [r["amount"]["value"] for b in total["data"] for r in b["results"]]
    assert sum(amounts) == billed
    assert all(r["amount"]["currency"] == "usd" for b in total["data"] for r in b["results"])

    items = _decimal_json(_get(sandbox, "costs", {"start_time": start, "group_by[]": "line_item"}))
    by_item = {r["line_item"]: r for b in items["data"] for r in b["results"]}
    assert sum(r["amount"]["value"] for r in by_item.values()) == billed
    for model in {line["model"] for line in lines}:
        of_model = [line for line in lines if line["model"] == model]
        inp, out = by_item[f"{model}, input_tokens"], by_item[f"{model}, output_tokens"]
        assert inp["amount"]["value"] + out["amount"]["value"] == sum(
            Decimal(line["cost_usd"]) for line in of_model
        )
        assert inp["quantity"] == sum(line["usage"]["input_tokens"] for line in of_model)
        assert out["quantity"] == sum(line["usage"]["output_tokens"] for line in of_model)
        assert inp["quantity_unit"] == out["quantity_unit"] == "tokens"
        assert 0 < inp["amount"]["value"] < out["amount"]["value"]


def test_admin_key_rule(sandbox: SandboxServer) -> None:
    """No key and unknown keys answer 401 invalid_api_key; an ordinary API key answers 401
    missing_scope (api.usage.read); an admin key is served. `admin_keys` narrows admin keys."""
    params = {"start_time": MONDAY}
    for path in ("usage/images", "costs"):
        no_key = httpx2.get(f"{sandbox.base_url}/organization/{path}", params=params)
        assert (no_key.status_code, no_key.json()["error"]["code"]) == (401, "invalid_api_key")
        ordinary = _get(sandbox, path, params, key=API_KEY)
        assert (ordinary.status_code, ordinary.json()["error"]["code"]) == (401, "missing_scope")
        assert "api.usage.read" in ordinary.json()["error"]["message"]
        assert _get(sandbox, path, params).status_code == 200
    sandbox.config.api_keys = [API_KEY]
    unknown = _get(sandbox, "costs", params, key="sk-unknown")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (401, "invalid_api_key")
    sandbox.config.admin_keys = ["sk-admin-other"]
    assert _get(sandbox, "costs", params).status_code == 401
    assert _get(sandbox, "costs", params, key="sk-admin-other").status_code == 200
    with (
        openai.OpenAI(
            api_key=API_KEY, admin_api_key=API_KEY, base_url=sandbox.base_url, max_retries=0
        ) as sdk,
        pytest.raises(openai.AuthenticationError) as info,
    ):
        sdk.admin.organization.usage.costs(start_time=MONDAY)
    assert info.value.code == "missing_scope"


def test_pagination_walks_every_bucket_once(
    admin_client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    """With `limit` 3 over 10 days the pages chain through `next_page` and together list every
    day once, in order, with its usage; a bad cursor answers 400."""
    lines = [
        _usage_line(
            MONDAY + day * DAY + 3600 * (day % 5), "gpt-image-1.5", "1024x1024", 1 + day, "0.01"
        )
        for day in range(10)
    ]
    _write(sandbox.config.billing_log, lines)
    pages = []
    cursor: str | None = None
    while True:
        extra: dict[str, Any] = {"page": cursor} if cursor else {}
        page = admin_client.admin.organization.usage.images(
            start_time=MONDAY, end_time=MONDAY + 10 * DAY, limit=3, **extra
        )
        pages.append(page)
        if not page.has_more:
            assert page.next_page is None
            break
        assert page.next_page is not None
        cursor = page.next_page
    assert [len(p.data) for p in pages] == [3, 3, 3, 1]
    buckets = [b for p in pages for b in p.data]
    assert [b.start_time for b in buckets] == [MONDAY + d * DAY for d in range(10)]
    assert all(b.end_time == b.start_time + DAY for b in buckets)
    assert [b.results[0].images for b in buckets] == [1 + d for d in range(10)]  # type: ignore[union-attr]
    bad = _get(sandbox, "usage/images", {"start_time": MONDAY, "page": "page_nonsense"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "page")


def test_a_day_without_usage_is_an_empty_bucket(sandbox: SandboxServer) -> None:
    """Days with no billed request are listed with no results, for usage and for costs; a
    request at 23:59:59 counts on its own day, one at midnight on the next."""
    _write(
        sandbox.config.billing_log,
        [
            _usage_line(MONDAY + DAY - 1, "gpt-image-2", "1024x1024", 2, "0.012345"),
            _usage_line(MONDAY + 2 * DAY, "gpt-image-2", "1024x1024", 1, "0.000001"),
        ],
    )
    params = {"start_time": MONDAY, "end_time": MONDAY + 4 * DAY}
    images = _get(sandbox, "usage/images", params).json()
    assert [[r["images"] for r in b["results"]] for b in images["data"]] == [[2], [], [1], []]
    costs = _decimal_json(_get(sandbox, "costs", params))
    assert [[r["amount"]["value"] for r in b["results"]] for b in costs["data"]] == [
        [Decimal("0.012345")],
        [],
        [Decimal("0.000001")],
        [],
    ]


def test_azure_lines_are_left_out_and_the_route_is_ignored(sandbox: SandboxServer) -> None:
    """Azure's lines are billed by Azure, not OpenAI's organization; a `route` field (sync or
    batch) has no field in the contract's images or costs results, so it neither groups nor
    filters."""
    _write(
        sandbox.config.billing_log,
        [
            _usage_line(MONDAY + 10, "gpt-image-1.5", "1024x1024", 1, "0.010000", route="sync"),
            _usage_line(MONDAY + 20, "gpt-image-1.5", "1024x1024", 2, "0.005000", route="batch"),
            _usage_line(
                MONDAY + 30,
                "gpt-image-1.5",
                "1024x1024",
                4,
                "0.5",
                provider="azure",
                deployment="d",
            ),
        ],
    )
    params = {"start_time": MONDAY, "end_time": MONDAY + DAY}
    [bucket] = _get(sandbox, "usage/images", params).json()["data"]
    assert [(r["images"], r["num_model_requests"]) for r in bucket["results"]] == [(3, 2)]
    [cost] = _decimal_json(_get(sandbox, "costs", params))["data"]
    assert [r["amount"]["value"] for r in cost["results"]] == [Decimal("0.015")]


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("usage/images", {}, "start_time"),
        ("usage/images", {"start_time": MONDAY, "end_time": MONDAY}, "start_time"),
        ("usage/images", {"start_time": MONDAY, "bucket_width": "1w"}, "bucket_width"),
        ("usage/images", {"start_time": MONDAY, "limit": 32}, "limit"),
        ("usage/images", {"start_time": MONDAY, "group_by[]": "line_item"}, "group_by"),
        ("costs", {"start_time": MONDAY, "bucket_width": "1h"}, "bucket_width"),
        ("costs", {"start_time": MONDAY, "limit": 181}, "limit"),
        ("costs", {"start_time": "monday"}, "start_time"),
    ],
)
def test_bad_queries_name_the_parameter(
    sandbox: SandboxServer, path: str, params: dict[str, Any], param: str
) -> None:
    """A query the contract does not allow answers 400 naming the parameter."""
    response = _get(sandbox, path, params)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_a_corrupt_billing_log_is_a_clear_server_error(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    """A billing log line that is not JSON answers 500 naming the file and line."""
    log = tmp_path / "broken.jsonl"
    log.write_text('{"oops"\n')
    sandbox.config.billing_log = str(log)
    response = _get(sandbox, "costs", {"start_time": MONDAY})
    assert response.status_code == 500
    assert "line 1" in response.json()["error"]["message"]


def test_per_image_priced_lines_are_one_images_line_item(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    """A dall-e-2 edit (billed per image, answered without usage) counts its images, and its
    cost is one `dall-e-2, images` line item whose quantity is the images, not tokens."""
    sandbox.config.today = "2026-05-11"  # dall-e-2's last day
    client.images.edit(image=IMAGE, prompt="p", model="dall-e-2", size="512x512", n=2)
    client.images.edit(image=IMAGE, prompt="p", model="gpt-image-2", size="256x256")
    lines = billing_lines(sandbox.config.billing_log)
    assert [line["usage"] is None for line in lines] == [True, False]
    start = int(datetime.now(UTC).timestamp()) - DAY
    usage = _get(sandbox, "usage/images", {"start_time": start, "group_by[]": "model"}).json()
    images = {r["model"]: r["images"] for b in usage["data"] for r in b["results"]}
    assert images == {"dall-e-2": 2, "gpt-image-2": 1}
    costs = _decimal_json(_get(sandbox, "costs", {"start_time": start, "group_by[]": "line_item"}))
    by_item = {r["line_item"]: r for b in costs["data"] for r in b["results"]}
    assert set(by_item) == {
        "dall-e-2, images",
        "gpt-image-2, input_tokens",
        "gpt-image-2, output_tokens",
    }
    dalle = by_item["dall-e-2, images"]
    assert (dalle["quantity"], dalle["quantity_unit"]) == (2, "images")
    assert dalle["amount"]["value"] == Decimal(lines[0]["cost_usd"]) == Decimal("0.036")
    assert by_item["gpt-image-2, input_tokens"]["quantity_unit"] == "tokens"
    assert sum(r["amount"]["value"] for r in by_item.values()) == sum(
        Decimal(line["cost_usd"]) for line in lines
    )
    plain = _get(sandbox, "costs", {"start_time": start, "group_by[]": "line_item"}).json()
    results = [r for b in plain["data"] for r in b["results"]]
    assert all(schema.check(r, "CostsResult", schema.USAGE_COSTS) == [] for r in results)


def test_batch_lines_count_at_their_discounted_cost(sandbox: SandboxServer) -> None:
    """Batch API lines (route batch, half price) count in images and costs like sync ones, at
    the cost the billing log holds."""
    _write(
        sandbox.config.billing_log,
        [
            _usage_line(MONDAY + 10, "gpt-image-2", "1024x1024", 1, "0.008200", route="sync"),
            _usage_line(
                MONDAY + 20,
                "gpt-image-2",
                "1024x1024",
                1,
                "0.004100",
                route="batch",
                batch_id="batch_1",
                custom_id="a",
                delivered=True,
            ),
        ],
    )
    params = {"start_time": MONDAY, "end_time": MONDAY + DAY, "group_by[]": "line_item"}
    [bucket] = _decimal_json(_get(sandbox, "costs", params))["data"]
    assert sum(r["amount"]["value"] for r in bucket["results"]) == Decimal("0.012300")
    quantities = {r["line_item"]: r["quantity"] for r in bucket["results"]}
    assert quantities == {"gpt-image-2, input_tokens": 400, "gpt-image-2, output_tokens": 544}
