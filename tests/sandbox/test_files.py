"""The Files API through the real openai SDK: upload, list, retrieve, content, delete."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any, Literal

import httpx2
import openai
import pytest

from pipeline.sandbox import SandboxServer
from tests.sandbox import schema
from tests.sandbox.helpers import admin, png

JSONL = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'


def _valid(raw: Any, schema_name: str) -> None:
    body = json.loads(raw.http_response.content)
    assert schema.check(body, schema_name, schema.FILES_BATCHES) == []


def test_contract_copy_is_current() -> None:
    shared = schema.SHARED_CONTRACT_DIR / schema.FILES_BATCHES
    if shared.exists():
        assert (schema.CONTRACT_DIR / schema.FILES_BATCHES).read_bytes() == shared.read_bytes()


def test_upload_retrieve_download_delete(client: openai.OpenAI) -> None:
    before = int(time.time())
    raw = client.files.with_raw_response.create(file=("input.jsonl", JSONL), purpose="batch")
    _valid(raw, "OpenAIFile")
    uploaded = raw.parse()
    assert uploaded.id.startswith("file-")
    assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        "file",
        len(JSONL),
        "input.jsonl",
        "batch",
    )
    assert uploaded.status == "processed" and uploaded.expires_at is None
    assert before <= uploaded.created_at <= int(time.time())

    retrieved = client.files.with_raw_response.retrieve(uploaded.id)
    _valid(retrieved, "OpenAIFile")
    assert retrieved.parse() == uploaded
    assert client.files.content(uploaded.id).content == JSONL

    deleted = client.files.with_raw_response.delete(uploaded.id)
    _valid(deleted, "DeleteFileResponse")
    assert (deleted.parse().id, deleted.parse().deleted) == (uploaded.id, True)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as info:
            call(uploaded.id)
        assert info.value.param == "id"
        assert isinstance(info.value.body, dict)
        assert info.value.body["message"] == f"No such File object: {uploaded.id}"


def test_images_upload_as_user_data_or_vision(client: openai.OpenAI) -> None:
    image = png(16, 16)
    purposes: tuple[Literal["user_data"], Literal["vision"]] = ("user_data", "vision")
    for purpose in purposes:
        uploaded = client.files.create(file=("shoe.png", image), purpose=purpose)
        assert uploaded.purpose == purpose
        assert client.files.content(uploaded.id).content == image


def test_expires_after_sets_expires_at(client: openai.OpenAI) -> None:
    uploaded = client.files.create(
        file=("a.jsonl", JSONL),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert uploaded.expires_at == uploaded.created_at + 3600


ONLY_PURPOSE = {"purpose": (None, b"batch")}  # a multipart body with no file part


@pytest.mark.parametrize(
    ("fields", "files", "code", "param"),
    [
        ({}, {"file": ("a.jsonl", JSONL)}, "missing_required_parameter", "purpose"),
        ({}, ONLY_PURPOSE, "missing_required_parameter", "file"),
        ({"purpose": "training"}, {"file": ("a.jsonl", JSONL)}, "invalid_value", "purpose"),
        ({"purpose": "assistants"}, {"file": ("a.jsonl", JSONL)}, "invalid_value", "purpose"),
        ({"purpose": "batch"}, {"file": ("a.csv", JSONL)}, None, "file"),
        (
            {"purpose": "batch", "colour": "red"},
            {"file": ("a.jsonl", JSONL)},
            "unknown_parameter",
            "colour",
        ),
        (
            {
                "purpose": "batch",
                "expires_after[anchor]": "created_at",
                "expires_after[seconds]": "60",
            },
            {"file": ("a.jsonl", JSONL)},
            "invalid_value",
            "expires_after.seconds",
        ),
    ],
)
def test_bad_uploads_are_refused(
    sandbox: SandboxServer,
    fields: dict[str, str],
    files: dict[str, tuple[str | None, bytes]],
    code: str | None,
    param: str,
) -> None:
    response = httpx2.post(
        f"{sandbox.base_url}/files",
        data=fields,
        files=files,
        headers={"Authorization": "Bearer sk-test"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    assert admin(sandbox.base_url, "stats")["uploads"]["count"] == 0


def test_list_filters_orders_and_pages(client: openai.OpenAI) -> None:
    ids = [client.files.create(file=(f"f{i}.jsonl", JSONL), purpose="batch").id for i in range(3)]
    image = client.files.create(file=("i.png", png(8, 8)), purpose="user_data").id

    raw = client.files.with_raw_response.list()
    _valid(raw, "ListFilesResponse")
    newest_first = [f.id for f in raw.parse().data]
    assert newest_first == [image, *reversed(ids)]
    assert [f.id for f in client.files.list(order="asc")] == [*ids, image]
    assert [f.id for f in client.files.list(purpose="batch", order="asc")] == ids

    first = client.files.list(limit=2, order="asc")
    assert [f.id for f in first.data] == ids[:2]
    assert first.has_more is True
    # The SDK pages with `after` until has_more is false.
    assert [f.id for f in client.files.list(limit=1, order="asc")] == [*ids, image]
    empty = client.files.list(purpose="vision")
    assert (empty.data, empty.has_more) == ([], False)


def test_bad_list_parameters(sandbox: SandboxServer) -> None:
    for query in ("limit=0", "limit=10001", "limit=x", "order=up"):
        response = httpx2.get(
            f"{sandbox.base_url}/files?{query}", headers={"Authorization": "Bearer sk"}
        )
        assert response.status_code == 400, query
        assert response.json()["error"]["param"] == query.split("=")[0]


def test_upload_stats_count_files_bytes_and_distinct_contents(
    client: openai.OpenAI, sandbox: SandboxServer
) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        client.files.create(file=(name, JSONL), purpose="batch")
    client.files.create(file=("c.png", png(8, 8)), purpose="vision")
    uploads = admin(sandbox.base_url, "stats")["uploads"]
    assert uploads == {"count": 3, "bytes": 2 * len(JSONL) + len(png(8, 8)), "distinct_sha256": 2}


def test_files_dir_holds_the_uploads(
    client: openai.OpenAI, sandbox: SandboxServer, tmp_path: Path
) -> None:
    sandbox.config.files_dir = str(tmp_path / "files")
    uploaded = client.files.create(file=("a.jsonl", JSONL), purpose="batch")
    assert (tmp_path / "files" / uploaded.id).read_bytes() == JSONL
    client.files.delete(uploaded.id)
    assert not (tmp_path / "files" / uploaded.id).exists()


def test_files_need_a_key(sandbox: SandboxServer) -> None:
    response = httpx2.get(f"{sandbox.base_url}/files")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_content_of_a_large_file_is_streamed_line_by_line(
    client: openai.OpenAI, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """A 48 MB output file reaches the client in chunks: neither side holds it in memory."""
    line = json.dumps({"custom_id": "x", "pad": "y" * 4000}) + "\n"
    lines = 12_000
    path = tmp_path / "big.jsonl"
    with path.open("w") as out:
        for _ in range(lines):
            out.write(line)
    size = path.stat().st_size
    stored = sandbox.sandbox.files.register(path, "file-big", "big.jsonl", "batch_output", None)
    assert stored.bytes == size > 45_000_000

    tracemalloc.start()
    try:
        count = 0
        with client.files.with_streaming_response.content(stored.id) as response:
            for text in response.iter_lines():
                count += bool(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == lines
    assert peak < size / 8, f"peak {peak} bytes for a {size}-byte file"


def test_the_temporary_files_folder_goes_away_with_the_server() -> None:
    with SandboxServer() as server:
        sdk = openai.OpenAI(api_key="sk-t", base_url=server.base_url, max_retries=0)
        uploaded = sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")
        path = server.sandbox.files.path_of(uploaded.id)
        assert path is not None and path.read_bytes() == JSONL
    assert not path.exists() and not path.parent.exists()
