"""The Batch API for image edits through the real openai SDK: files in, a batch through its
life cycle, output and error files out, billed at half the sync price."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx2
import openai
import pytest
from openai.types import Batch
from PIL import Image, ImageChops

from pipeline.sandbox import SandboxServer
from tests.sandbox import schema
from tests.sandbox.helpers import (
    admin,
    billing_lines,
    changed_share,
    decode,
    mask_png,
    png,
    raw_edit,
    upload,
)

MODEL = "gpt-image-2"
FINAL = ("completed", "failed", "expired", "cancelled")
# Sync prices of gpt-image-2 in the sandbox (USD per 1M tokens): text in, image in, image out.
PRICE = (Decimal(5), Decimal(8), Decimal(30))


@pytest.fixture
def fast(sandbox: SandboxServer) -> SandboxServer:
    """Batches that run in a fraction of a second."""
    sandbox.config.update(
        {
            "batch_validating_seconds": 0.02,
            "batch_lines_per_second": 500,
            "batch_finalizing_seconds": 0.02,
        }
    )
    return sandbox


def _check(raw: Any, name: str = "Batch") -> Any:
    """Parse a raw SDK response after checking its body against the contract."""
    body = json.loads(raw.http_response.content)
    assert schema.check(body, name, schema.FILES_BATCHES) == [], body
    return raw.parse()


def _line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/images/edits",
        "body": {"model": MODEL, "size": "256x256", "quality": "low", **body},
    }


def _input(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else "".join(json.dumps(x) + "\n" for x in lines)
    return client.files.create(
        file=("input.jsonl", data if isinstance(data, bytes) else data.encode()), purpose="batch"
    ).id


def _submit(client: openai.OpenAI, lines: list[dict[str, Any]] | bytes, **extra: Any) -> Batch:
    raw = client.batches.with_raw_response.create(
        input_file_id=_input(client, lines),
        endpoint="/v1/images/edits",
        completion_window="24h",
        **extra,
    )
    batch: Batch = _check(raw)
    assert batch.status == "validating"
    return batch


def _wait(
    client: openai.OpenAI,
    batch_id: str,
    until: Callable[[Batch], bool] = lambda b: b.status in FINAL,
    seen: list[str] | None = None,
) -> Batch:
    deadline = time.monotonic() + 30
    while True:
        batch: Batch = _check(client.batches.with_raw_response.retrieve(batch_id))
        if seen is not None and (not seen or seen[-1] != batch.status):
            seen.append(batch.status)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.01)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    with client.files.with_streaming_response.content(file_id) as response:
        return [json.loads(text) for text in response.iter_lines() if text]


def _image_id(client: openai.OpenAI, data: bytes, name: str = "image.png") -> str:
    return client.files.create(file=(name, data), purpose="user_data").id


def _expected_cost(usage: dict[str, Any], factor: Decimal = Decimal("0.5")) -> Decimal:
    exact = (
        usage["input_tokens_details"]["text_tokens"] * PRICE[0]
        + usage["input_tokens_details"]["image_tokens"] * PRICE[1]
        + usage["output_tokens_details"]["image_tokens"] * PRICE[2]
    ) / 1_000_000
    if factor == 1:  # a sync answer is rounded to the micro-dollar; a batch line is not
        return Decimal(exact).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    return Decimal(exact * factor)


def test_a_batch_with_file_id_images_and_a_mask_completes(
    client: openai.OpenAI, fast: SandboxServer
) -> None:
    image = _image_id(client, png(256, 256))
    mask = _image_id(client, mask_png(256, 256, (0, 0, 128, 128)), "mask.png")
    lines = [
        _line(
            f"sku-{i}",
            images=[{"file_id": image}],
            mask={"file_id": mask},
            prompt=f"bg {i}",
            size="1024x1024",  # a size the contract's ImagesResponse enum lists
        )
        for i in range(3)
    ]
    created = _submit(client, lines, metadata={"run": "nightly"})
    assert created.metadata == {"run": "nightly"}
    assert created.expires_at == created.created_at + 24 * 3600
    batch = _wait(client, created.id)

    assert batch.status == "completed" and batch.model == MODEL and batch.errors is None
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (3, 3)
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert created.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

    assert batch.output_file_id is not None
    output = _check(client.files.with_raw_response.retrieve(batch.output_file_id), "OpenAIFile")
    assert (output.purpose, output.filename) == ("batch_output", f"{batch.id}_output.jsonl")
    assert output.expires_at == batch.created_at + 30 * 24 * 3600
    answers = _lines(client, batch.output_file_id)
    assert sorted(a["custom_id"] for a in answers) == ["sku-0", "sku-1", "sku-2"]
    source = Image.open(io.BytesIO(png(256, 256))).convert("RGB")
    source = source.resize((1024, 1024), Image.Resampling.LANCZOS)
    edit_area = Image.new("L", (1024, 1024), 0)
    edit_area.paste(255, (0, 0, 512, 512))
    tokens = 0
    for answer in answers:
        assert answer["id"].startswith("batch_req_") and answer["error"] is None
        response = answer["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        assert schema.check(response["body"], "ImagesResponse") == []
        out = decode(response["body"]["data"][0]["b64_json"])
        assert out.size == (1024, 1024)
        assert changed_share(out, source, edit_area) == 1.0
        assert changed_share(out, source, ImageChops.invert(edit_area)) == 0.0
        tokens += response["body"]["usage"]["total_tokens"]
    assert batch.usage is not None and batch.usage.total_tokens == tokens


def test_the_batch_goes_through_each_status(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.update(
        {
            "batch_validating_seconds": 0.3,
            "batch_lines_per_second": 5,
            "batch_finalizing_seconds": 0.3,
        }
    )
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(2)]
    seen: list[str] = []
    _wait(client, _submit(client, lines).id, seen=seen)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]


def test_time_scale_speeds_the_pace(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.update(
        {
            "batch_validating_seconds": 30,
            "batch_lines_per_second": 0.1,
            "batch_finalizing_seconds": 30,
            "time_scale": 0.002,  # 30 s -> 0.06 s, 10 s per line -> 0.02 s
        }
    )
    image = _image_id(client, png(64, 64))
    started = time.monotonic()
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(3)]
    batch = _wait(client, _submit(client, lines).id)
    assert batch.status == "completed"
    assert 0.18 <= time.monotonic() - started < 10


def test_billing_log_at_half_the_sync_price_summed_exactly(
    client: openai.OpenAI, fast: SandboxServer
) -> None:
    image = _image_id(client, png(96, 64))
    second = _image_id(client, png(64, 192))
    lines = [
        _line(
            f"r{i}",
            images=[{"file_id": image}] + ([{"file_id": second}] if i % 2 else []),
            prompt="studio sweep " * (i + 1),
            quality=("low", "medium", "high")[i % 3],
            n=1 + i % 3,
            size=("256x256", "1024x1024", "1536x864")[i % 3],
        )
        for i in range(7)
    ]
    batch = _wait(client, _submit(client, lines).id)
    answers = {a["custom_id"]: a["response"] for a in _lines(client, batch.output_file_id)}
    billed = billing_lines(fast.config.billing_log)
    assert len(billed) == len(answers) == 7
    total = Decimal(0)
    for entry in billed:
        answer = answers[entry["custom_id"]]
        assert (entry["route"], entry["batch_id"], entry["delivered"]) == ("batch", batch.id, True)
        assert entry["request_id"] == answer["request_id"]
        assert entry["usage"] == answer["body"]["usage"]
        assert Decimal(entry["cost_usd"]) == _expected_cost(entry["usage"])
        total += Decimal(entry["cost_usd"])
    assert total == sum(_expected_cost(a["body"]["usage"]) for a in answers.values())
    stats = admin(fast.base_url, "stats")
    assert stats["batches"] == {"by_status": {"completed": 1}, "lines_done": 7, "lines_billed": 7}
    assert stats["billed"] == 0  # sync requests only


def test_a_batch_line_costs_half_of_the_same_sync_request(
    client: openai.OpenAI, fast: SandboxServer
) -> None:
    data = png(128, 128)
    sync = client.images.edit(
        image=upload(data), prompt="same", model=MODEL, size="1024x1024", quality="high", n=2
    )
    [sync_line] = billing_lines(fast.config.billing_log)
    image = _image_id(client, data)
    lines = [_line("r", images=[{"file_id": image}], prompt="same", size="1024x1024", n=2)]
    lines[0]["body"]["quality"] = "high"
    batch = _wait(client, _submit(client, lines).id)
    [answer] = _lines(client, batch.output_file_id)
    assert answer["response"]["body"]["data"] == [
        d.model_dump(exclude_none=True) for d in sync.data or []
    ]
    batch_line = billing_lines(fast.config.billing_log)[1]
    assert batch_line["usage"] == sync_line["usage"]
    exact_sync = _expected_cost(sync_line["usage"], Decimal(1))
    assert Decimal(sync_line["cost_usd"]) == exact_sync
    assert Decimal(batch_line["cost_usd"]) == _expected_cost(sync_line["usage"])


def test_bad_lines_get_the_sync_error_bodies_in_the_error_file(
    client: openai.OpenAI, fast: SandboxServer
) -> None:
    image = _image_id(client, png(64, 64))
    data_url = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()
    ref = [{"file_id": image}]
    lines = [
        _line("ok-file", images=ref, prompt="p"),
        _line("ok-data-url", images=[{"image_url": data_url}], prompt="p"),
        _line("n", images=ref, prompt="p", n=11),
        _line("n-type", images=ref, prompt="p", n="2"),
        _line("unknown", images=ref, prompt="p", styel="x"),
        _line("no-prompt", images=ref),
        _line("no-file", images=[{"file_id": "file-nope"}], prompt="p"),
        _line("url", images=[{"image_url": "https://example.com/a.png"}], prompt="p"),
        _line("both", images=[{"file_id": image, "image_url": data_url}], prompt="p"),
        _line("text-file", images=[{"file_id": _image_id(client, b"hello", "a.png")}], prompt="p"),
        _line("directive", images=ref, prompt="p #sandbox:explode"),
    ]
    batch = _wait(client, _submit(client, lines).id)
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 9)
    assert {a["custom_id"] for a in _lines(client, batch.output_file_id)} == {
        "ok-file",
        "ok-data-url",
    }
    errors = {e["custom_id"]: e["response"] for e in _lines(client, batch.error_file_id)}
    got = {
        k: (r["status_code"], r["body"]["error"]["code"], r["body"]["error"]["param"])
        for k, r in errors.items()
    }
    assert got == {
        "n": (400, "integer_above_max_value", "n"),
        "n-type": (400, "invalid_type", "n"),
        "unknown": (400, "unknown_parameter", "styel"),
        "no-prompt": (400, "missing_required_parameter", "prompt"),
        "no-file": (400, "invalid_value", "images[0].file_id"),
        "url": (400, "invalid_value", "images[0].image_url"),
        "both": (400, "invalid_value", "images[0]"),
        "text-file": (400, "unsupported_file_mimetype", "images[0]"),
        "directive": (400, "invalid_value", "prompt"),
    }
    for response in errors.values():
        assert schema.check(response["body"], "ErrorResponse") == []
    # The same mistake made synchronously gets the same body.
    sync = raw_edit(fast.base_url, fields={"prompt": "p", "model": MODEL, "n": "11"})
    assert errors["n"]["body"] == sync.json()
    assert len(billing_lines(fast.config.billing_log)) == 2


@pytest.mark.parametrize(
    ("content", "code", "line"),
    [
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/images/edits", "body": {}}\n{oops\n',
            "invalid_json_line",
            2,
        ),
        (None, "duplicate_custom_id", 2),
        (None, "url_mismatch", 1),
        (None, "model_mismatch", 2),
        (b"", "empty_file", None),
        (b"\n\n", "empty_file", None),
        (None, "missing_required_parameter", 1),
    ],
    ids=["json", "duplicate", "url", "two-models", "empty", "blank", "no-custom-id"],
)
def test_a_malformed_input_file_fails_the_batch(
    client: openai.OpenAI, fast: SandboxServer, content: bytes | None, code: str, line: int | None
) -> None:
    if content is None:
        lines = [_line("a", prompt="p"), _line("b", prompt="p")]
        if code == "duplicate_custom_id":
            lines[1]["custom_id"] = "a"
        elif code == "url_mismatch":
            lines[0]["url"] = "/v1/images/generations"
        elif code == "model_mismatch":
            lines[1]["body"]["model"] = "gpt-image-2.5-flare"
        else:
            del lines[0]["custom_id"]
        content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    batch = _wait(client, _submit(client, content).id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data
    error = batch.errors.data[0]
    assert (error.code, error.line) == (code, line)
    assert error.message
    assert batch.output_file_id is None and batch.error_file_id is None
    assert billing_lines(fast.config.billing_log) == []


@pytest.mark.parametrize(
    ("setting", "code"),
    [
        ({"batch_max_requests": 2}, "too_many_tasks"),
        ({"batch_max_file_bytes": 100}, "file_too_large"),
    ],
)
def test_input_limits_fail_the_batch(
    client: openai.OpenAI, fast: SandboxServer, setting: dict[str, int], code: str
) -> None:
    fast.config.update(setting)
    batch = _wait(client, _submit(client, [_line(f"r{i}", prompt="p") for i in range(3)]).id)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == code


def test_per_line_faults_and_directives(client: openai.OpenAI, fast: SandboxServer) -> None:
    fast.config.update({"batch_line_error_rate": 0.3, "batch_line_moderation_rate": 0.3, "seed": 4})
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt=f"p{i}") for i in range(30)]
    batch = _wait(client, _submit(client, lines).id)
    errors = [e["response"] for e in _lines(client, batch.error_file_id)]
    codes = sorted({(r["status_code"], r["body"]["error"]["code"]) for r in errors})
    assert codes == [(400, "moderation_blocked"), (500, "server_error")]
    assert batch.request_counts is not None
    done = len(_lines(client, batch.output_file_id))
    assert done == batch.request_counts.completed > 0
    assert done + len(errors) == 30
    assert len(billing_lines(fast.config.billing_log)) == done

    fast.config.update({"batch_line_error_rate": 0.0, "batch_line_moderation_rate": 0.0})
    directed = [
        _line("retry-me", images=[{"file_id": image}], prompt="p #sandbox:500x1"),
        _line("blocked", images=[{"file_id": image}], prompt="q #sandbox:moderation"),
        _line("fine", images=[{"file_id": image}], prompt="p #sandbox:500x1"),
    ]
    batch = _wait(client, _submit(client, directed).id)
    failed = {
        e["custom_id"]: e["response"]["status_code"] for e in _lines(client, batch.error_file_id)
    }
    assert failed == {"retry-me": 500, "blocked": 400}
    assert [a["custom_id"] for a in _lines(client, batch.output_file_id)] == ["fine"]


def _slow(sandbox: SandboxServer) -> None:
    sandbox.config.update(
        {
            "batch_validating_seconds": 0.01,
            "batch_lines_per_second": 8,
            "batch_finalizing_seconds": 0.01,
        }
    )


def test_expiring_a_batch_midway_keeps_and_bills_the_finished_lines(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    _slow(sandbox)
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(8)]
    created = _submit(client, lines)
    _wait(
        client,
        created.id,
        lambda b: b.request_counts is not None and b.request_counts.completed >= 2,
    )
    root = sandbox.base_url.removesuffix("/v1")
    response = httpx2.post(f"{root}/sandbox/batches/{created.id}/expire", timeout=30)
    assert response.status_code == 200
    expired = response.json()
    assert schema.check(expired, "Batch", schema.FILES_BATCHES) == []
    assert expired["status"] == "expired" and expired["expired_at"]

    batch = client.batches.retrieve(created.id)
    assert batch.request_counts is not None
    done, failed = batch.request_counts.completed, batch.request_counts.failed
    assert done >= 2 and done + failed == 8 and failed > 0
    finished = _lines(client, batch.output_file_id)
    unfinished = _lines(client, batch.error_file_id)
    assert len(finished) == done and len(unfinished) == failed
    for entry in unfinished:
        assert entry["response"] is None
        assert entry["error"]["code"] == "batch_expired" and entry["error"]["message"]
    assert {e["custom_id"] for e in finished} | {e["custom_id"] for e in unfinished} == {
        f"r{i}" for i in range(8)
    }
    assert len(billing_lines(sandbox.config.billing_log)) == done
    again = httpx2.post(f"{root}/sandbox/batches/{created.id}/expire", timeout=30)
    assert again.status_code == 400


def test_batch_expire_after_seconds(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    _slow(sandbox)
    sandbox.config.batch_expire_after_seconds = 0.4
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(20)]
    created = _submit(client, lines)
    assert created.expires_at == created.created_at  # 0.4 s rounds to the same second
    batch = _wait(client, created.id)
    assert batch.status == "expired"
    assert batch.request_counts is not None
    assert 0 < batch.request_counts.completed < 20
    assert batch.request_counts.completed + batch.request_counts.failed == 20


def test_cancel_midway(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    _slow(sandbox)
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(8)]
    created = _submit(client, lines)
    _wait(
        client,
        created.id,
        lambda b: b.request_counts is not None and b.request_counts.completed >= 2,
    )
    cancelling = _check(client.batches.with_raw_response.cancel(created.id))
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = _wait(client, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.request_counts is not None
    done = batch.request_counts.completed
    assert 2 <= done < 8 and batch.request_counts.failed == 0
    assert len(_lines(client, batch.output_file_id)) == done
    assert batch.error_file_id is None  # the lines not run are in no file
    assert len(billing_lines(sandbox.config.billing_log)) == done
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(created.id)


def test_cancel_while_validating(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.batch_validating_seconds = 30
    created = _submit(client, [_line("a", prompt="p")])
    assert client.batches.cancel(created.id).status == "cancelling"
    batch = _wait(client, created.id)
    assert batch.status == "cancelled" and batch.output_file_id is None


def test_a_model_that_goes_away_mid_batch(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    _slow(sandbox)
    image = _image_id(client, png(64, 64))
    lines = [_line(f"r{i}", images=[{"file_id": image}], prompt="p") for i in range(6)]
    created = _submit(client, lines)
    _wait(
        client,
        created.id,
        lambda b: b.request_counts is not None and b.request_counts.completed >= 1,
    )
    admin(sandbox.base_url, "config", {"unavailable_models": [MODEL]})
    batch = _wait(client, created.id)
    assert batch.status == "completed"
    gone = [e["response"] for e in _lines(client, batch.error_file_id)]
    assert gone and all(r["status_code"] == 404 for r in gone)
    assert {r["body"]["error"]["code"] for r in gone} == {"model_not_found"}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"endpoint": "/v1/unknown"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
            "output_expires_after.seconds",
        ),
        ({"priority": "high"}, "priority"),
    ],
)
def test_bad_creates_are_refused(
    client: openai.OpenAI, fast: SandboxServer, change: dict[str, Any], param: str
) -> None:
    body = {
        "input_file_id": _input(client, [_line("a", prompt="p")]),
        "endpoint": "/v1/images/edits",
        "completion_window": "24h",
        **change,
    }
    response = httpx2.post(
        f"{fast.base_url}/batches", json=body, headers={"Authorization": "Bearer sk-t"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert client.batches.list().data == []


def test_an_input_file_needs_purpose_batch(client: openai.OpenAI, fast: SandboxServer) -> None:
    file_id = client.files.create(file=("in.jsonl", b"{}\n"), purpose="user_data").id
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/images/edits", completion_window="24h"
        )
    assert info.value.param == "input_file_id"


def test_list_is_newest_first_and_pages(client: openai.OpenAI, fast: SandboxServer) -> None:
    ids = [_submit(client, [_line("a", prompt="p")]).id for _ in range(3)]
    first = _check(client.batches.with_raw_response.list(limit=2), "ListBatchesResponse")
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more is True
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]
    rest = client.batches.list(after=ids[2])
    assert [b.id for b in rest.data] == ids[1::-1] and rest.has_more is False
    for batch_id in ids:
        _wait(client, batch_id)
    assert admin(fast.base_url, "stats")["batches"]["by_status"] == {"completed": 3}


def test_unknown_batch_is_404(client: openai.OpenAI) -> None:
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError):
            call("batch_nope")


def test_batches_need_a_key(sandbox: SandboxServer) -> None:
    response = httpx2.get(f"{sandbox.base_url}/batches")
    assert response.status_code == 401


def test_reset_stops_running_batches(client: openai.OpenAI, sandbox: SandboxServer) -> None:
    sandbox.config.batch_validating_seconds = 30
    created = _submit(client, [_line("a", prompt="p")])
    admin(sandbox.base_url, "reset")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(created.id)
    assert admin(sandbox.base_url, "stats")["batches"]["by_status"] == {}
