"""The lines of the batch route, as plain values (pure: no I/O, no database).

    custom_id(batch, job, attempt)   "b7-j1234-a2": names the job and its attempt
    request_line(...)                one JSONL request line: the edit as a JSON body whose
                                     images and mask are Files API ids
    read_answer(raw)                 one line of an output or error file -> `Answer`, classified
                                     as the sync route classifies a call
    split_lines(chunks, start)       a stream of chunks -> (line, offset after it): a file is
                                     never held whole, and reading can start again at an offset

Line shapes: ../shared/API-FACTS.md ("The Batch API for edits").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from pipeline.cost.pricing import Usage
from pipeline.run.gateway import decode_images, usage_from_response
from pipeline.run.retry import classify
from pipeline.spec import EditSpec
from pipeline.states import AttemptOutcome

ENDPOINT = "/v1/images/edits"
# A Files API id in a line is at most this long (OpenAI's are ~30 characters): line sizes are
# bounded before the files are uploaded, when the provider batches are cut.
MAX_FILE_ID_CHARS = 64
_CUSTOM_ID = re.compile(r"^b(\d+)-j(\d+)-a(\d+)$")
EXPIRED = "batch_expired"
FILE_GONE = "input_file_gone"


def custom_id(batch_id: int, job_id: int, attempt: int) -> str:
    """The custom_id of a job's attempt: unique in a provider batch and across them."""
    return f"b{batch_id}-j{job_id}-a{attempt}"


def parse_custom_id(text: str) -> tuple[int, int, int] | None:
    """(batch id, job id, attempt number) of one of our custom_ids; None for any other."""
    match = _CUSTOM_ID.match(text)
    if match is None:
        return None
    batch_id, job_id, attempt = (int(g) for g in match.groups())
    return batch_id, job_id, attempt


def body(spec: EditSpec, file_ids: Mapping[str, str]) -> dict[str, Any]:
    """The JSON body of one edit: the spec's API parameters, images and mask by file id."""
    out: dict[str, Any] = spec.api_params()
    out["images"] = [{"file_id": file_ids[path]} for path in spec.images]
    if spec.mask:
        out["mask"] = {"file_id": file_ids[spec.mask]}
    if spec.markup:
        out["markup"] = {"file_id": file_ids[spec.markup]}
    return out


def request_line(cid: str, spec: EditSpec, file_ids: Mapping[str, str]) -> bytes:
    """One line of a batch input file (with its newline)."""
    line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body(spec, file_ids)}
    return json.dumps(line, separators=(",", ":")).encode("utf-8") + b"\n"


def line_size_bound(spec: EditSpec, cid: str) -> int:
    """The most bytes `request_line` can take for `spec`, whatever its file ids turn out to be
    (each counted at MAX_FILE_ID_CHARS)."""
    placeholder = "f" * MAX_FILE_ID_CHARS
    paths = [*spec.images, spec.mask, spec.markup]
    return len(request_line(cid, spec, {p: placeholder for p in paths if p}))


def input_paths(spec: EditSpec) -> list[str]:
    """The files a spec's line refers to: its images, mask and markup."""
    return [p for p in (*spec.images, spec.mask, spec.markup) if p]


@dataclass(frozen=True)
class Answer:
    """One line of an output or error file, classified like a sync call's outcome."""

    custom_id: str
    kind: AttemptOutcome
    status: int | None = None
    request_id: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    usage: Usage | None = None
    images: tuple[bytes, ...] = ()
    file_gone: str | None = None  # the input file id the API no longer has


def _namespace(value: Any) -> Any:
    """JSON objects as attribute namespaces: the gateway's helpers read SDK objects."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_namespace(v) for v in value]
    return value


def read_answer(raw: bytes) -> Answer:
    """Parse and classify one answer line. ValueError if it is not one (no custom_id).

    200 with images: OK. 200 whose images cannot be read: TRANSIENT (billed, as on the sync
    route). An error body: classified by status, type and code. `batch_expired` (the window
    ran out before the line ran): TRANSIENT. A 400 naming an input `file_id` the API no longer
    has: TRANSIENT (`input_file_gone`: upload it again, send the line again).
    """
    entry = json.loads(raw)
    if not isinstance(entry, dict) or not isinstance(entry.get("custom_id"), str):
        raise ValueError("not an answer line: no custom_id")
    cid = entry["custom_id"]
    response = entry.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    request_id = response.get("request_id") if isinstance(response, dict) else None
    payload = response.get("body") if isinstance(response, dict) else None
    if status == 200 and isinstance(payload, dict):
        usage = usage_from_response(_namespace(payload.get("usage")))
        decoded = decode_images(_namespace(payload.get("data") or []))
        if isinstance(decoded, str):
            return Answer(
                cid,
                AttemptOutcome.TRANSIENT,
                200,
                request_id,
                "bad_output",
                "bad_image_data",
                decoded,
                usage,
            )
        return Answer(cid, AttemptOutcome.OK, 200, request_id, usage=usage, images=decoded)
    error = entry.get("error")
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = payload["error"]
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    message = str(error.get("message") or "no message")[:2000]
    error_type = error.get("type")
    if code == EXPIRED:
        return Answer(cid, AttemptOutcome.TRANSIENT, None, None, "expired", EXPIRED, message)
    param = str(error.get("param") or "")
    if status == 400 and param.endswith("file_id") and "no such file" in message.lower():
        gone = re.search(r"'(file-[^']+)'", message)
        return Answer(
            cid,
            AttemptOutcome.TRANSIENT,
            status,
            request_id,
            error_type,
            FILE_GONE,
            message,
            file_gone=gone.group(1) if gone else None,
        )
    kind = classify(status if isinstance(status, int) else None, error_type, code)
    return Answer(
        cid,
        kind,
        status if isinstance(status, int) else None,
        request_id,
        error_type,
        str(code) if code else None,
        message,
    )


def split_lines(chunks: Iterable[bytes], start: int = 0) -> Iterator[tuple[bytes, int]]:
    """Lines of a byte stream that begins at offset `start`, each with the offset just past it
    (its newline). A last line without a newline is yielded too; blank lines are skipped. Only
    the line being assembled is held, never the stream."""
    buffer = bytearray()
    offset = start  # where `buffer` begins in the file
    for chunk in chunks:
        searched = len(buffer)
        buffer += chunk
        pos = 0  # consumed bytes of `buffer`, dropped once per chunk (not once per line)
        while True:
            end = buffer.find(b"\n", max(searched, pos))
            if end < 0:
                break
            line = bytes(buffer[pos:end])
            pos = end + 1
            if line.strip():
                yield line, offset + pos
        if pos:
            del buffer[:pos]
            offset += pos
    if buffer.strip():
        yield bytes(buffer), offset + len(buffer)
