"""The API key never lands anywhere a run writes: database, logs, console, reports, images.

A recognisable canary key is used for a whole run (`editbatch run`, and the Celery shape),
including a call the API answers 401 with the key in its message, and then everything the run
wrote is searched for it. The sandbox masks the key in its 401 message as OpenAI does
(`sk-*****abcd`), so this test makes it echo the key whole: the worst an API could do.
"""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest
import redis
from PIL import Image
from sqlalchemy import select

from pipeline.db.models import Attempt, Job
from pipeline.sandbox import app as sandbox_app
from pipeline.sandbox.errors import ApiError
from tests.factories import write_manifest
from tests.integration.test_crash_safety import Stack, small_rows, stack, wait_for

CANARY = "sk-canary-" + secrets.token_hex(16)
ECHO = "Incorrect API key provided: "
NO_REDIS = "redis://127.0.0.1:1/0"


def _echoing_invalid_api_key(key: str | None) -> ApiError:
    return ApiError(
        401,
        f"{ECHO}{key}. You can find your API key at https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


@pytest.fixture
def echo_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_app, "invalid_api_key", _echoing_invalid_api_key)


def _needles() -> list[bytes]:
    """The key, and every 12-character piece of its secret part."""
    secret = CANARY.removeprefix("sk-canary-")
    pieces = {secret[i : i + 12] for i in range(len(secret) - 11)}
    return [CANARY.encode(), *(p.encode() for p in sorted(pieces))]


def _leaks(name: str, data: bytes) -> list[str]:
    return [f"{name}: {needle.decode()}" for needle in _needles() if needle in data]


def _png_text(path: Path) -> bytes:
    """Every text chunk of an image (zTXt/iTXt are compressed, so a byte search misses them)."""
    with Image.open(path) as img:
        img.load()
        chunks = {**img.info, **getattr(img, "text", {})}
    return repr(sorted(chunks.items(), key=str)).encode()


def _sql_dump(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump()).encode()
    finally:
        conn.close()


def _redis_dump(url: str) -> bytes:
    client = redis.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        for key in client.scan_iter():
            kind = client.type(key)
            parts.append(key)
            if kind == b"string":
                parts.append(client.get(key) or b"")
            elif kind == b"list":
                parts.extend(client.lrange(key, 0, -1))
            elif kind == b"hash":
                for k, v in client.hgetall(key).items():
                    parts += [k, v]
            elif kind == b"set":
                parts.extend(client.smembers(key))
            elif kind == b"zset":
                parts.extend(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    finally:
        client.close()
    return b"\n".join(parts)


def _search_everything(st: Stack, consoles: dict[str, str]) -> tuple[list[str], int]:
    """Every leak of the canary in what the run wrote; and how many files were searched."""
    leaks: list[str] = []
    searched = 0
    for path in st.tmp.rglob("*"):
        if not path.is_file() or path.name == "billing.jsonl":  # that one is the API's side
            continue
        searched += 1
        data = path.read_bytes()
        leaks += _leaks(str(path), data)
        if path.suffix == ".png":
            leaks += _leaks(f"{path} text chunks", _png_text(path))
        if path.suffix == ".db":
            leaks += _leaks(f"{path} SQL dump", _sql_dump(path))
    for name, text in consoles.items():
        leaks += _leaks(name, text.encode())
    return leaks, searched


def _check_the_401_was_echoed_and_stored_redacted(st: Stack, batch_id: int) -> None:
    assert st.sandbox.sandbox.stats.snapshot()["by_status"].get("401") == 1
    with st.db.session() as s:
        messages = list(
            s.scalars(
                select(Attempt.error_message)
                .join(Job, Job.id == Attempt.job_id)
                .where(Job.batch_id == batch_id, Attempt.http_status == 401)
            )
        )
    assert len(messages) == 1 and ECHO in str(messages[0]), messages


def _rows(folder: Path) -> list[dict[str, object]]:
    rows = small_rows(folder, 4)
    rows[1]["prompt"] = "white studio background, auth trouble #sandbox:401x1"
    rows[2]["n"] = 2
    return rows


def test_editbatch_run_writes_the_key_nowhere(tmp_path: Path, echo_key: None) -> None:
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", _rows(tmp_path / "in"))
    with stack(
        tmp_path, NO_REDIS, f"sqlite:///{tmp_path / 'editbatch.db'}", OPENAI_API_KEY=CANARY
    ) as st:
        consoles: dict[str, str] = {}
        args = ["run", str(manifest), "--output", str(st.out)]
        first = st.cli(*args)
        assert first.returncode == 3, first.stdout + first.stderr  # held: 401
        assert "held" in first.stdout
        second = st.cli(*args)  # the same command again: the key works now
        assert second.returncode == 0, second.stdout + second.stderr
        _check_the_401_was_echoed_and_stored_redacted(st, 1)
        for name, proc in {
            "run": first,
            "run again": second,
            "status": st.cli("status", "1"),
            "status --json": st.cli("status", "1", "--json"),
            "config": st.cli("config"),
            "config --json": st.cli("config", "--json"),
        }.items():
            consoles[f"{name} stdout"] = proc.stdout
            consoles[f"{name} stderr"] = proc.stderr
        assert "openai_api_key" in consoles["config --json stdout"]
        assert list(st.out.glob("*.png")) and (st.out / "report-1.csv").is_file()
        leaks, searched = _search_everything(st, consoles)
        assert searched > 10
        assert not leaks, leaks


def test_celery_workers_write_the_key_nowhere(
    tmp_path: Path, redis_url: str, echo_key: None
) -> None:
    manifest = write_manifest(tmp_path / "in" / "manifest.csv", _rows(tmp_path / "in"))
    with stack(
        tmp_path, redis_url, f"sqlite:///{tmp_path / 'editbatch.db'}", OPENAI_API_KEY=CANARY
    ) as st:
        st.worker("w1", concurrency=2)
        consoles: dict[str, str] = {}
        submitted = st.cli("submit", str(manifest), "--output", str(st.out))
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        consoles["submit stdout"], consoles["submit stderr"] = submitted.stdout, submitted.stderr
        wait_for(lambda: st.batch_state(1) == "held", 60, "the 401 to hold the batch")
        resumed = st.cli("resume", "1")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        consoles["resume stdout"], consoles["resume stderr"] = resumed.stdout, resumed.stderr
        st.wait_finished(1, 60)
        _check_the_401_was_echoed_and_stored_redacted(st, 1)
        for name, args in {"status": ("status", "1"), "config": ("config", "--json")}.items():
            proc = st.cli(*args)
            consoles[f"{name} stdout"], consoles[f"{name} stderr"] = proc.stdout, proc.stderr
        consoles["redis"] = _redis_dump(redis_url).decode(errors="replace")
        for w in st.workers:
            w.stop()  # flush and close the log before reading it
        leaks, searched = _search_everything(st, consoles)
        assert searched > 10
        assert "editbatch.edit" in st.workers[0].log.read_text()  # the log was searched too
        assert not leaks, leaks
