"""Webhook signing, verification, delivery (retries, give-up) and what the body may contain."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import update

from pipeline.db.models import Job
from pipeline.db.session import Database
from pipeline.observe import webhook
from pipeline.observe.webhook import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookConfig,
    encode_body,
    send,
    sign,
    signed_headers,
    verify_signature,
)
from pipeline.settings import Settings
from tests.conftest import FAKE_KEY
from tests.factories import product_rows, write_manifest
from tests.unit.helpers import new_batch

SECRET = "whsec-test-0123456789"
BODY = b'{"batch_id":7,"event":"batch.finished","state":"finished"}'
NOW = 1_767_229_200.0


def _signed(body: bytes = BODY, secret: str = SECRET, now: float = NOW) -> tuple[str, str]:
    headers = signed_headers(secret, body, now)
    return headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]


# --- signing and verification ------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    timestamp, header = _signed()
    assert timestamp == "1767229200"
    expected = hmac.new(SECRET.encode(), b"1767229200." + BODY, hashlib.sha256).hexdigest()
    assert header == f"sha256={expected}" == sign(SECRET, timestamp, BODY)


def test_verify_accepts_a_fresh_untouched_request() -> None:
    timestamp, header = _signed()
    assert verify_signature(SECRET, timestamp, BODY, header, 300, now=NOW + 299)


def test_verify_rejects_a_tampered_body() -> None:
    timestamp, header = _signed()
    tampered = BODY.replace(b'"batch_id":7', b'"batch_id":8')
    assert not verify_signature(SECRET, timestamp, tampered, header, now=NOW)
    assert not verify_signature(SECRET, timestamp, BODY + b" ", header, now=NOW)


def test_verify_rejects_a_wrong_secret() -> None:
    timestamp, header = _signed()
    assert not verify_signature("whsec-other", timestamp, BODY, header, now=NOW)
    _, forged = _signed(secret="whsec-attacker")
    assert not verify_signature(SECRET, timestamp, BODY, forged, now=NOW)


def test_verify_rejects_a_stale_or_future_timestamp() -> None:
    timestamp, header = _signed()
    assert not verify_signature(SECRET, timestamp, BODY, header, 300, now=NOW + 301)
    assert not verify_signature(SECRET, timestamp, BODY, header, 300, now=NOW - 301)


def test_verify_rejects_a_replayed_signature_with_a_new_timestamp() -> None:
    _, header = _signed()
    assert not verify_signature(SECRET, str(int(NOW) + 60), BODY, header, now=NOW + 60)


@pytest.mark.parametrize(
    ("timestamp", "header"),
    [("", "sha256=00"), ("12.5", "sha256=00"), ("-5", "sha256=00"), ("1767229200", "md5=00")],
)
def test_verify_rejects_malformed_headers(timestamp: str, header: str) -> None:
    assert not verify_signature(SECRET, timestamp, BODY, header, now=NOW)


# --- delivery ----------------------------------------------------------------------------------


def _config(attempts: int = 4) -> WebhookConfig:
    return WebhookConfig(
        url="https://hooks.example.test/editbatch/T0KEN", secret=SECRET, attempts=attempts
    )


def _client(statuses: list[int], seen: list[httpx.Request]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses[min(len(seen), len(statuses)) - 1]
        if status == 0:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(status)

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_send_retries_transient_answers_then_delivers_signed_each_time() -> None:
    seen: list[httpx.Request] = []
    waits: list[float] = []
    clock = iter([NOW, NOW + 5, NOW + 9])
    ok = send(
        _config(),
        BODY,
        client=_client([503, 0, 200], seen),
        sleep=waits.append,
        clock=lambda: next(clock),
    )
    assert ok and len(seen) == 3 and len(waits) == 2
    assert [r.headers[TIMESTAMP_HEADER] for r in seen] == ["1767229200", "1767229205", "1767229209"]
    for request in seen:
        assert request.method == "POST" and request.content == BODY
        assert request.headers["content-type"] == "application/json"
        assert verify_signature(
            SECRET,
            request.headers[TIMESTAMP_HEADER],
            request.content,
            request.headers[SIGNATURE_HEADER],
            now=int(request.headers[TIMESTAMP_HEADER]),
        )


def test_send_gives_up_after_its_attempts_and_logs_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[httpx.Request] = []
    with caplog.at_level(logging.WARNING, "editbatch.webhook"):
        ok = send(_config(3), BODY, client=_client([500], seen), sleep=lambda _s: None)
    assert not ok and len(seen) == 3
    assert "not delivered after 3 attempts" in caplog.text
    assert "T0KEN" not in caplog.text and SECRET not in caplog.text  # host only in logs
    assert "https://hooks.example.test" in caplog.text


def test_send_does_not_retry_a_client_error(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[httpx.Request] = []
    ok = send(_config(), BODY, client=_client([400, 200], seen), sleep=lambda _s: None)
    assert not ok and len(seen) == 1
    assert "HTTP 400" in caplog.text


def test_send_survives_an_unusable_url() -> None:
    config = WebhookConfig(url="not a url", secret=SECRET, attempts=2)
    assert send(config, BODY, sleep=lambda _s: None) is False


def test_no_secret_means_no_webhook(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(webhook_url="https://hooks.example.test/x")
    assert WebhookConfig.from_settings(settings) is None
    assert "EDITBATCH_WEBHOOK_SECRET is not set" in caplog.text
    assert WebhookConfig.from_settings(Settings()) is None


# --- the body ----------------------------------------------------------------------------------


def test_body_masks_the_api_key_and_key_shaped_text_but_not_skus() -> None:
    payload = {
        "message": f"Incorrect API key provided: {FAKE_KEY}",
        "other": "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz012345",
        "auth": "Authorization: Bearer abc.def.ghi-123",
        "sku": "sk-red-42",
    }
    body = encode_body(payload, secrets=(FAKE_KEY,)).decode()
    assert FAKE_KEY not in body and "sk-proj-" not in body and "abc.def" not in body
    assert json.loads(body)["sku"] == "sk-red-42"


def _finished_batch(tmp_path: Path, db: Database) -> int:
    rows = product_rows(tmp_path / "in", 2)
    manifest = write_manifest(tmp_path / "in" / "m.csv", rows)
    result = new_batch(db, manifest, str(tmp_path / "out"), name="wh")
    with db.session() as session:
        session.execute(
            update(Job)
            .where(Job.batch_id == result.batch_id)
            .values(
                state="failed",
                last_error_code="invalid_api_key",
                last_error_message=f"Incorrect API key provided: {FAKE_KEY}.",
            )
        )
        session.commit()
    return result.batch_id


def test_notify_sends_the_summary_without_the_key(
    tmp_path: Path, db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = _finished_batch(tmp_path, db)
    sent: list[tuple[WebhookConfig, bytes]] = []
    monkeypatch.setattr(
        webhook, "send", lambda config, body, **_kw: sent.append((config, body)) or True
    )
    configured = settings.model_copy(
        update={"webhook_url": "https://hooks.example.test/x", "webhook_secret": SecretStr(SECRET)}
    )
    report = ("s3://b/out/report-1.csv", "s3://b/out/report-1.json")
    assert webhook.notify_batch_finished(configured, db, batch_id, report)
    ((config, body),) = sent
    assert config.secret == SECRET
    text = body.decode()
    assert FAKE_KEY not in text and SECRET not in text
    summary = json.loads(text)
    assert summary["event"] == "batch.finished" and summary["batch_id"] == batch_id
    assert summary["report"] == {"csv": report[0], "json": report[1]}
    assert summary["counts"]["failed"] == 2 and summary["jobs_total"] == 2
    assert summary["failures"][0]["code"] == "invalid_api_key"


def test_notify_never_raises(
    tmp_path: Path, db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    configured = settings.model_copy(
        update={"webhook_url": "https://hooks.example.test/x", "webhook_secret": SecretStr(SECRET)}
    )
    # No batch 999: building the summary fails; it is logged, not raised.
    assert webhook.notify_batch_finished(configured, db, 999, None) is False
    assert "batch 999: webhook not sent" in caplog.text
