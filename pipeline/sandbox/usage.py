"""`GET /v1/organization/usage/images` and `GET /v1/organization/costs`, from the billing log.

They follow ../shared/contract/openapi-usage-costs.json: time buckets (`start_time` inclusive,
`end_time` exclusive, default now; buckets aligned to whole UTC minutes, hours or days), `limit`
buckets per page and a `page` cursor, every bucket listed even when it has no results. Only
OpenAI's own lines of the billing log count (Azure's are billed by Azure). Costs are the exact
Decimal sums of the log's `cost_usd`, converted to a JSON number once per result; with
`group_by=line_item` each request's cost is split into `input_tokens` and `output_tokens` items
that add up to it exactly (a per-image-priced line, dall-e-2's, without `usage`, is one `images`
item). Batch lines count like sync ones, at the discounted cost the log holds. Both endpoints
need an admin key (`admin_keys`, by default any key that starts with `sk-admin-`); an ordinary
key answers 401 `missing_scope`, as the real API does.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.sandbox import tokens
from pipeline.sandbox.config import SandboxConfig
from pipeline.sandbox.errors import ApiError, bad_request, invalid_api_key
from pipeline.sandbox.requestlog import call_of, key_hint

if TYPE_CHECKING:
    from pipeline.sandbox.app import Sandbox

ADMIN_KEY_PREFIX = "sk-admin-"
WIDTHS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
# (default, maximum) number of buckets per page, from the contract.
IMAGE_LIMITS: dict[str, tuple[int, int]] = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
COST_LIMITS: dict[str, tuple[int, int]] = {"1d": (7, 180)}
IMAGE_GROUPS = ("project_id", "user_id", "api_key_id", "model", "size", "source")
COST_GROUPS = ("project_id", "line_item", "api_key_id")
IMAGE_FILTERS = {
    "models": "model",
    "sizes": "size",
    "sources": "source",
    "project_ids": "project_id",
    "user_ids": "user_id",
    "api_key_ids": "api_key_id",
}
COST_FILTERS = {"project_ids": "project_id", "api_key_ids": "api_key_id", "line_items": "line_item"}
SOURCE = "image.edit"
MICRO = Decimal("0.000001")
PAGE_PREFIX = "page_"
MISSING_SCOPE = (
    "You have insufficient permissions for this operation. Missing scopes: api.usage.read. "
    "Check that you have the correct role in your organization (Reader, Writer, Owner) and "
    "project (Member, Owner), and if you're using a restricted API key, that it has the "
    "necessary scopes."
)


@dataclass(frozen=True)
class Item:
    """One countable thing in a bucket: a request (usage) or one line item of it (costs).

    `keys` holds the values it can be grouped by; the sandbox has no projects or users and does
    not record keys, so project_id, user_id and api_key_id are always null.
    """

    time: float
    keys: dict[str, str | None]
    images: int = 0
    amount: Decimal = Decimal(0)
    quantity: int = 0
    unit: str | None = None


@dataclass(frozen=True)
class Query:
    start: int
    end: int
    width: int
    limit: int
    first_bucket: int
    group_by: tuple[str, ...]
    filters: dict[str, frozenset[str]] = field(default_factory=dict)


# -- reading the billing log -------------------------------------------------------------------


def read_log(path: str | None) -> list[dict[str, Any]]:
    """The billing log's OpenAI lines; a last line still being written is left for later."""
    if path is None or not Path(path).exists():
        return []
    lines = []
    with open(path, encoding="utf-8") as log:
        for number, line in enumerate(log, start=1):
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ApiError(
                    500,
                    f"The sandbox's billing log {path} has a line that is not JSON "
                    f"(line {number}: {exc}).",
                    type="server_error",
                ) from exc
            if record.get("provider", "openai") == "openai":
                lines.append(record)
    return lines


def _epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()


def _base_keys(record: dict[str, Any]) -> dict[str, str | None]:
    return {
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "model": str(record["model"]),
        "size": str(record["size"]),
        "source": SOURCE,
    }


def image_items(records: Iterable[dict[str, Any]]) -> list[Item]:
    return [Item(_epoch(r), _base_keys(r), images=int(r["n"])) for r in records]


def split_cost(record: dict[str, Any]) -> tuple[Decimal, Decimal]:
    """A request's cost as (input, output) shares that add up to it exactly.

    The input share is the cost times the input tokens' share of the list price, rounded half up
    to the micro-dollar; the output share is the rest. Taking the ratio, not the list price, keeps
    the split right for discounted (e.g. batch) lines.
    """
    cost = Decimal(str(record["cost_usd"]))
    price = tokens.PRICES.get(str(record["model"]))
    if price is None:
        return Decimal(0), cost
    usage = record["usage"]
    inp, out = usage["input_tokens_details"], usage["output_tokens_details"]
    input_list = inp["text_tokens"] * price.text_in + inp["image_tokens"] * price.image_in
    output_list = out["image_tokens"] * price.image_out + out["text_tokens"] * price.text_in
    if input_list + output_list == 0:
        return Decimal(0), cost
    input_share = (cost * input_list / (input_list + output_list)).quantize(
        MICRO, rounding=ROUND_HALF_UP
    )
    return input_share, cost - input_share


def cost_items(records: Iterable[dict[str, Any]]) -> list[Item]:
    items = []
    for record in records:
        at, keys = _epoch(record), _base_keys(record)
        usage = record["usage"]
        if usage is None:  # billed per image (dall-e-2): one item, counted in images
            line_item = f"{keys['model']}, images"
            cost = Decimal(str(record["cost_usd"]))
            items.append(
                Item(
                    at,
                    {**keys, "line_item": line_item},
                    amount=cost,
                    quantity=int(record["n"]),
                    unit="images",
                )
            )
            continue
        input_share, output_share = split_cost(record)
        for kind, amount, quantity in (
            ("input_tokens", input_share, int(usage["input_tokens"])),
            ("output_tokens", output_share, int(usage["output_tokens"])),
        ):
            line_item = f"{keys['model']}, {kind}"
            items.append(
                Item(
                    at,
                    {**keys, "line_item": line_item},
                    amount=amount,
                    quantity=quantity,
                    unit="tokens",
                )
            )
    return items


# -- the query ---------------------------------------------------------------------------------


def _list(params: QueryParams, name: str) -> list[str]:
    """An array parameter, sent as `name[]=a&name[]=b` (the SDK) or `name=a&name=b`."""
    return [*params.getlist(f"{name}[]"), *params.getlist(name)]


def _integer(params: QueryParams, name: str) -> int | None:
    text = params.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise bad_request(
            f"Invalid type for '{name}': expected an integer, but got a string instead.",
            param=name,
            code="invalid_type",
        ) from exc


def encode_page(bucket_start: int) -> str:
    return PAGE_PREFIX + base64.urlsafe_b64encode(str(bucket_start).encode()).decode()


def _decode_page(cursor: str) -> int | None:
    if not cursor.startswith(PAGE_PREFIX):
        return None
    try:
        return int(base64.urlsafe_b64decode(cursor[len(PAGE_PREFIX) :].encode()).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def parse_query(
    params: QueryParams,
    now: float,
    limits: dict[str, tuple[int, int]],
    groups: Sequence[str],
    filters: dict[str, str],
) -> Query:
    """Check the query like the real endpoint; raise ApiError 400 naming the parameter."""
    start = _integer(params, "start_time")
    if start is None:
        raise bad_request(
            "Missing required parameter: 'start_time'.",
            param="start_time",
            code="missing_required_parameter",
        )
    end = _integer(params, "end_time")
    # Whole seconds, exclusive: the default takes in the current second too.
    end = int(now) + 1 if end is None else end
    if start < 0 or end <= start:
        raise bad_request(
            f"Invalid time range: start_time {start} must be >= 0 and before end_time {end}.",
            param="start_time",
        )
    width_name = params.get("bucket_width", "1d")
    if width_name not in limits:
        raise bad_request(
            f"Invalid value: '{width_name}'. Supported values are: "
            f"{', '.join(repr(w) for w in limits)}.",
            param="bucket_width",
        )
    default_limit, max_limit = limits[width_name]
    limit = _integer(params, "limit")
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= max_limit:
        raise bad_request(
            f"Invalid 'limit': expected a value between 1 and {max_limit} for bucket_width "
            f"{width_name}, but got {limit} instead.",
            param="limit",
        )
    group_by = tuple(_list(params, "group_by"))
    for name in group_by:
        if name not in groups:
            raise bad_request(
                f"Invalid value: '{name}'. Supported values are: "
                f"{', '.join(repr(g) for g in groups)}.",
                param="group_by",
            )
    width = WIDTHS[width_name]
    aligned = start - start % width
    first = aligned
    cursor = params.get("page")
    if cursor is not None:
        decoded = _decode_page(cursor)
        if decoded is None or decoded < aligned or decoded >= end or (decoded - aligned) % width:
            raise bad_request(f"Invalid page cursor '{cursor}' for this query.", param="page")
        first = decoded
    chosen = {
        key: frozenset(values) for name, key in filters.items() if (values := _list(params, name))
    }
    return Query(start, end, width, limit, first, tuple(dict.fromkeys(group_by)), chosen)


# -- the page ----------------------------------------------------------------------------------


def page(
    items: Sequence[Item], query: Query, result: Callable[[list[Item], dict[str, Any]], Any]
) -> dict[str, Any]:
    """The buckets of one page; `result` turns one group's items into a result object."""
    wanted = [
        item
        for item in items
        if query.start <= item.time < query.end
        and all(item.keys.get(key) in values for key, values in query.filters.items())
    ]
    starts = range(query.first_bucket, query.end, query.width)
    shown, rest = starts[: query.limit], starts[query.limit :]
    buckets = []
    for bucket_start in shown:
        bucket_end = bucket_start + query.width
        groups: dict[tuple[str | None, ...], list[Item]] = defaultdict(list)
        for item in wanted:
            if bucket_start <= item.time < bucket_end:
                groups[tuple(item.keys.get(k) for k in query.group_by)].append(item)
        results = [
            result(members, dict(zip(query.group_by, key, strict=True)))
            for key, members in sorted(groups.items(), key=lambda kv: [v or "" for v in kv[0]])
        ]
        buckets.append(
            {
                "object": "bucket",
                "start_time": bucket_start,
                "end_time": bucket_end,
                "results": results,
            }
        )
    return {
        "object": "page",
        "data": buckets,
        "has_more": bool(rest),
        "next_page": encode_page(rest[0]) if rest else None,
    }


def image_result(items: list[Item], group: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "object": "organization.usage.images.result",
        "images": sum(item.images for item in items),
        "num_model_requests": len(items),
    }
    for key in IMAGE_GROUPS:
        result[key] = group.get(key)
    return result


def cost_result(items: list[Item], group: dict[str, Any]) -> dict[str, Any]:
    total = sum((item.amount for item in items), Decimal(0))
    by_line_item = "line_item" in group
    units = {item.unit for item in items}
    return {
        "object": "organization.costs.result",
        # One conversion of the exact sum: a JSON number with at most 6 decimals, exact when
        # read back as a Decimal for sums under $1e9 (15 significant digits).
        "amount": {"value": float(total), "currency": "usd"},
        "line_item": group.get("line_item"),
        "project_id": group.get("project_id"),
        "api_key_id": group.get("api_key_id"),
        "quantity": sum(item.quantity for item in items) if by_line_item else None,
        "quantity_unit": units.pop() if by_line_item and len(units) == 1 else None,
    }


# -- the endpoints -----------------------------------------------------------------------------


def _bearer(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def check_admin(key: str | None, config: SandboxConfig) -> None:
    """Raise the real API's 401 unless `key` is an admin key."""
    if key is None:
        raise invalid_api_key(None)
    if config.admin_keys is not None:
        is_admin = key in config.admin_keys
    else:
        is_admin = key.startswith(ADMIN_KEY_PREFIX)
    if is_admin:
        return
    if config.api_keys is None or key in config.api_keys:
        raise ApiError(401, MISSING_SCOPE, code="missing_scope")
    raise invalid_api_key(key)


def routes(sandbox: Sandbox) -> list[Route]:
    """The two endpoints, as routes of the sandbox app."""

    async def answer(
        request: Request,
        limits: dict[str, tuple[int, int]],
        groups: Sequence[str],
        filters: dict[str, str],
        to_items: Callable[[list[dict[str, Any]]], list[Item]],
        result: Callable[[list[Item], dict[str, Any]], Any],
    ) -> Response:
        config = sandbox.config
        key = _bearer(request)
        call_of(request.scope).key = key_hint(key)
        try:
            check_admin(key, config)
            query = parse_query(request.query_params, time.time(), limits, groups, filters)
            records = await run_in_threadpool(read_log, config.billing_log)
            body = page(to_items(records), query, result)
            response: Response = JSONResponse(body)
        except ApiError as error:
            response = JSONResponse(error.body(), status_code=error.status)
        sandbox.requests.record(request.scope, str(response.status_code))
        return response

    async def images(request: Request) -> Response:
        return await answer(
            request, IMAGE_LIMITS, IMAGE_GROUPS, IMAGE_FILTERS, image_items, image_result
        )

    async def costs(request: Request) -> Response:
        return await answer(
            request, COST_LIMITS, COST_GROUPS, COST_FILTERS, cost_items, cost_result
        )

    return [
        Route("/v1/organization/usage/images", images, methods=["GET"]),
        Route("/v1/organization/costs", costs, methods=["GET"]),
    ]
