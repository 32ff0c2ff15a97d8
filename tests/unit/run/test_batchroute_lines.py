"""The batch route's pure pieces: custom ids, request lines, answers classified like sync
calls, a byte stream split into lines at any chunk boundary."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image

from pipeline.run.batchroute import lines
from pipeline.spec import EditSpec
from pipeline.states import AttemptOutcome


def spec(**kw: object) -> EditSpec:
    values: dict[str, object] = {
        "row": 1,
        "key": "SKU1",
        "images": ("/in/a.png", "/in/b.png"),
        "prompt": "white sweep",
        "model": "gpt-image-2",
        "mask": "/in/m.png",
        "size": "1024x1024",
        "quality": "low",
        "background": "opaque",
    }
    values.update(kw)
    return EditSpec(**values)  # type: ignore[arg-type]


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_custom_ids_name_the_batch_job_and_attempt_and_nothing_else_parses() -> None:
    cid = lines.custom_id(7, 1234, 2)
    assert cid == "b7-j1234-a2"
    assert lines.parse_custom_id(cid) == (7, 1234, 2)
    for other in ("b7-j1234", "x-b7-j1-a1", "b7-j1-a1-extra", "request-1"):
        assert lines.parse_custom_id(other) is None


def test_a_request_line_is_the_api_facts_shape_with_file_ids() -> None:
    """One JSON object per line: custom_id, POST, /v1/images/edits, a JSON body whose images
    and mask are Files API references; parameters a row leaves out stay out."""
    ids = {"/in/a.png": "file-a", "/in/b.png": "file-b", "/in/m.png": "file-m"}
    raw = lines.request_line("b1-j2-a1", spec(), ids)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    line = json.loads(raw)
    assert line["custom_id"] == "b1-j2-a1"
    assert (line["method"], line["url"]) == ("POST", "/v1/images/edits")
    body = line["body"]
    assert body["images"] == [{"file_id": "file-a"}, {"file_id": "file-b"}]
    assert body["mask"] == {"file_id": "file-m"}
    assert body["model"] == "gpt-image-2" and body["background"] == "opaque"
    assert "input_fidelity" not in body and "markup" not in body


def test_the_size_bound_holds_for_any_file_id_up_to_the_bound() -> None:
    s = spec(prompt="x" * 5000)
    cid = lines.custom_id(1, 99999, 9)
    longest = {p: "file-" + "z" * (lines.MAX_FILE_ID_CHARS - 5) for p in lines.input_paths(s)}
    assert len(lines.request_line(cid, s, longest)) <= lines.line_size_bound(s, cid)
    short = {p: "file-1" for p in lines.input_paths(s)}
    assert len(lines.request_line(cid, s, short)) < lines.line_size_bound(s, cid)


def _ok(images: list[str], usage: dict[str, object] | None = None) -> bytes:
    body: dict[str, object] = {"created": 1, "data": [{"b64_json": b} for b in images]}
    if usage is not None:
        body["usage"] = usage
    entry = {
        "id": "batch_req_1",
        "custom_id": "b1-j2-a1",
        "response": {"status_code": 200, "request_id": "req_1", "body": body},
        "error": None,
    }
    return json.dumps(entry).encode()


def _error(status: int, error: dict[str, object]) -> bytes:
    entry = {
        "id": "batch_req_1",
        "custom_id": "b1-j2-a1",
        "response": {"status_code": status, "request_id": "req_2", "body": {"error": error}},
        "error": None,
    }
    return json.dumps(entry).encode()


USAGE = {
    "input_tokens": 210,
    "input_tokens_details": {"image_tokens": 194, "text_tokens": 16},
    "output_tokens": 272,
    "output_tokens_details": {"image_tokens": 272, "text_tokens": 0},
    "total_tokens": 482,
}


def test_a_200_line_carries_its_images_usage_and_request_id() -> None:
    answer = lines.read_answer(_ok([png(), png()], USAGE))
    assert answer.kind == AttemptOutcome.OK and answer.request_id == "req_1"
    assert len(answer.images) == 2 and answer.images[0].startswith(b"\x89PNG")
    assert answer.usage is not None
    assert (answer.usage.image_input, answer.usage.text_input) == (194, 16)
    assert answer.usage.image_output == 272


def test_a_200_line_with_unreadable_images_is_transient_and_keeps_its_usage() -> None:
    """Billed all the same (as on the sync route): the usage is kept to price it."""
    answer = lines.read_answer(_ok(["!!!not base64"], USAGE))
    assert answer.kind == AttemptOutcome.TRANSIENT and answer.error_code == "bad_image_data"
    assert answer.usage is not None and answer.status == 200


@pytest.mark.parametrize(
    ("status", "error", "kind", "code"),
    [
        (
            500,
            {"message": "boom", "type": "server_error", "code": "server_error"},
            "transient",
            "server_error",
        ),
        (
            400,
            {
                "message": "blocked",
                "type": "image_generation_user_error",
                "code": "moderation_blocked",
            },
            "failed",
            "moderation_blocked",
        ),
        (
            400,
            {
                "message": "bad size",
                "type": "invalid_request_error",
                "param": "size",
                "code": "invalid_value",
            },
            "failed",
            "invalid_value",
        ),
        (
            429,
            {"message": "no money", "type": "insufficient_quota", "code": "insufficient_quota"},
            "hold",
            "insufficient_quota",
        ),
        (
            429,
            {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"},
            "transient",
            "rate_limit_exceeded",
        ),
        (403, {"message": "verify", "type": "invalid_request_error", "code": None}, "hold", None),
    ],
)
def test_error_lines_take_the_sync_routes_classes(
    status: int, error: dict[str, object], kind: str, code: str | None
) -> None:
    answer = lines.read_answer(_error(status, error))
    assert (answer.kind, answer.status, answer.error_code) == (kind, status, code)
    assert answer.error_message == error["message"]


def test_an_expired_line_is_transient_and_was_not_answered() -> None:
    entry = {
        "id": "batch_req_9",
        "custom_id": "b1-j2-a1",
        "response": None,
        "error": {"code": "batch_expired", "message": "window ran out"},
    }
    answer = lines.read_answer(json.dumps(entry).encode())
    assert (answer.kind, answer.error_code, answer.status) == ("transient", "batch_expired", None)


def test_a_line_naming_a_gone_input_file_is_transient_and_names_it() -> None:
    gone = {
        "message": "Invalid file id 'file-abc123': no such file.",
        "type": "invalid_request_error",
        "param": "images[0].file_id",
        "code": None,
    }
    answer = lines.read_answer(_error(400, gone))
    assert (answer.kind, answer.error_code) == ("transient", lines.FILE_GONE)
    assert answer.file_gone == "file-abc123"


def test_a_line_without_a_custom_id_is_not_an_answer() -> None:
    with pytest.raises(ValueError):
        lines.read_answer(b'{"id": "x"}')
    with pytest.raises(ValueError):
        lines.read_answer(b"not json")


def test_split_lines_is_the_same_at_every_chunk_boundary_and_keeps_offsets() -> None:
    """Whatever the chunking, the same lines come out with the offset just past each; reading
    again from any of those offsets gives the rest."""
    rng = random.Random(7)
    payload = [bytes(rng.choice(b"abcdef") for _ in range(rng.randint(1, 300))) for _ in range(50)]
    data = b"\n".join(payload[:20]) + b"\n\n" + b"\n".join(payload[20:])  # a blank line, no end
    expected = list(lines.split_lines([data]))
    assert [line for line, _ in expected] == payload
    assert expected[-1][1] == len(data)
    for size in (1, 2, 3, 7, 64, 4096):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert list(lines.split_lines(chunks)) == expected
    _, middle = expected[24]
    rest = list(lines.split_lines([data[middle:]], middle))
    assert rest == expected[25:]
