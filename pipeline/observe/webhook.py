"""The batch-finished webhook: a JSON summary POSTed to `webhook_url`, signed with HMAC-SHA256.

Signing (what a receiver checks; `verify_signature` below is the reference, copy it):

    X-Editbatch-Timestamp: 1767229200                 (Unix seconds when the request was signed)
    X-Editbatch-Signature: sha256=<hex>               (lower-case hex)
    <hex> = HMAC-SHA256(key=webhook_secret as UTF-8,
                        msg=timestamp as ASCII + b"." + the raw request body bytes)

The receiver recomputes the HMAC over the body bytes exactly as received (before any JSON
parsing), compares in constant time, and refuses a timestamp further than a few minutes from its
own clock, so a captured request cannot be replayed later.

Delivery: a few attempts with exponential backoff and jitter (tenacity) on connection errors,
timeouts, 408, 429 and 5xx; any other answer is final. Failures are logged and never raised: a
webhook that cannot be delivered must not fail the worker that finished the batch. The body never
contains the OpenAI API key: it is built from the database (which never stores the key) and any
API-key-shaped text, and the key itself, are masked before signing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from pipeline.batch.status import batch_status
from pipeline.db.models import Batch
from pipeline.db.session import Database
from pipeline.errors import EditbatchError
from pipeline.settings import Settings

__all__ = [
    "EVENT_BATCH_FINISHED",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookConfig",
    "batch_summary",
    "encode_body",
    "notify_batch_finished",
    "origin",
    "redact",
    "send",
    "sign",
    "signed_headers",
    "verify_signature",
]

log = logging.getLogger("editbatch.webhook")

SIGNATURE_HEADER = "X-Editbatch-Signature"
TIMESTAMP_HEADER = "X-Editbatch-Timestamp"
EVENT_HEADER = "X-Editbatch-Event"
EVENT_BATCH_FINISHED = "batch.finished"
DEFAULT_TOLERANCE_S = 300
FAILURES_IN_SUMMARY = 20
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))

# OpenAI keys (sk-..., sk-proj-..., sk-svcacct-...; long, so a SKU like sk-red-42 is left alone)
# and bearer tokens, wherever they appear.
_KEY_SHAPED = re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}|(?i:bearer\s+)[A-Za-z0-9._\-]{8,}")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value: `sha256=` + hex HMAC-SHA256 of `timestamp.body`."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, "sha256")
    return "sha256=" + mac.hexdigest()


def signed_headers(secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    """Content type, event, timestamp and signature headers for one request body."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        "Content-Type": "application/json",
        "User-Agent": "editbatch-webhook/1",
        EVENT_HEADER: EVENT_BATCH_FINISHED,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def verify_signature(
    secret: str,
    timestamp: str,
    body: bytes,
    header: str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when `header` signs `timestamp.body` with `secret` and `timestamp` is fresh.

    Self-contained on purpose (hashlib, hmac, time only) so a receiver can copy it.
    `body` must be the raw request bytes; `now` defaults to the receiver's clock.
    """
    if not timestamp.isdigit() or not header.startswith("sha256="):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_s:
        return False  # stale or from the future: a replay, or a badly wrong clock
    expected = hmac.new(
        secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, header.removeprefix("sha256="))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with each of `secrets` and anything shaped like an API key masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "****")
    return _KEY_SHAPED.sub("****", text)


def encode_body(payload: Mapping[str, Any], secrets: Iterable[str] = ()) -> bytes:
    """The exact bytes that are signed and sent: compact JSON, secrets masked."""
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str)
    return redact(text, secrets).encode("utf-8")


def batch_summary(
    db: Database,
    batch_id: int,
    report: tuple[str, str] | None,
    report_error: str | None = None,
) -> dict[str, Any]:
    """What the webhook says about a finished batch (no prompts, no images, no key)."""
    with db.session() as session:
        status = batch_status(session, batch_id, failures_limit=FAILURES_IN_SUMMARY)
        batch = session.get(Batch, batch_id)
        assert batch is not None
        manifest_uri, manifest_sha = batch.manifest_uri, batch.manifest_sha256
        nightly = batch.settings.get("nightly") if isinstance(batch.settings, dict) else None
    full = status.to_json()
    return {
        "event": EVENT_BATCH_FINISHED,
        "batch_id": batch_id,
        "name": status.name,
        "state": status.state,
        "hold_reason": status.hold_reason,
        "created_at": status.created_at.isoformat(),
        "finished_at": status.finished_at.isoformat() if status.finished_at else None,
        "manifest_uri": manifest_uri,
        "manifest_sha256": manifest_sha,
        "output_uri": status.output_uri,
        "report": {"csv": report[0], "json": report[1]} if report else None,
        "report_error": report_error,
        "jobs_total": status.jobs_total,
        "counts": full["counts"],
        "cost_usd": full["cost_usd"],
        "budget_usd": full["budget_usd"],
        "attempts": status.attempts,
        "outputs": status.outputs,
        "outputs_uncollected": status.outputs_uncollected,
        "reused": status.reused,
        "saved_usd": full["saved_usd"],
        "failures": full["failures"],
        "nightly": nightly,
    }


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how to deliver; built from settings by `from_settings`."""

    url: str
    secret: str
    timeout_s: float = 10.0
    attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookConfig | None:
        """None when no webhook is configured (or it cannot be signed: logged)."""
        if not settings.webhook_url:
            return None
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        if not secret:
            log.error(
                "webhook to %s not sent: EDITBATCH_WEBHOOK_SECRET is not set (the webhook is "
                "always signed); set it, and give the same secret to the receiver",
                origin(settings.webhook_url),
            )
            return None
        return cls(
            url=settings.webhook_url,
            secret=secret,
            timeout_s=settings.webhook_timeout_seconds,
            attempts=settings.webhook_attempts,
        )


class _Retryable(EditbatchError):
    """An answer worth another try (408, 429, 5xx)."""


def origin(url: str) -> str:
    """scheme://host[:port] only: a webhook URL's path or query may itself be a secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


def send(
    config: WebhookConfig,
    body: bytes,
    *,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> bool:
    """POST `body` (signed afresh on every attempt); True when the receiver answered 2xx.

    Never raises: every failure is logged (host only, never the URL's path or the secret).
    """
    own = client is None
    http = client or httpx.Client(timeout=config.timeout_s, follow_redirects=False)
    where = origin(config.url)

    def attempt() -> int:
        headers = signed_headers(config.secret, body, clock())
        response = http.post(config.url, content=body, headers=headers)
        if response.status_code in RETRY_STATUSES:
            raise _Retryable(f"HTTP {response.status_code}")
        return response.status_code

    retrying = Retrying(
        stop=stop_after_attempt(max(config.attempts, 1)),
        wait=wait_exponential_jitter(initial=config.backoff_initial_s, max=config.backoff_max_s),
        retry=retry_if_exception_type((_Retryable, httpx.TransportError)),
        sleep=sleep,
        before_sleep=lambda state: log.warning(
            "webhook to %s: attempt %s failed (%s); retrying",
            where,
            state.attempt_number,
            state.outcome.exception() if state.outcome else "?",
        ),
    )
    try:
        status = retrying(attempt)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        log.error("webhook to %s not delivered after %s attempts: %s", where, config.attempts, last)
        return False
    except Exception as exc:  # a bad URL, a TLS setup error: logged, never raised
        log.error("webhook to %s not delivered: %s: %s", where, type(exc).__name__, exc)
        return False
    finally:
        if own:
            http.close()
    if not 200 <= status < 300:
        log.error("webhook to %s refused with HTTP %s (not retried)", where, status)
        return False
    log.info("webhook to %s delivered (HTTP %s)", where, status)
    return True


def notify_batch_finished(
    settings: Settings,
    db: Database,
    batch_id: int,
    report: tuple[str, str] | None,
    report_error: str | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Send the summary of a finished batch if a webhook is configured; never raises."""
    try:
        config = WebhookConfig.from_settings(settings)
        if config is None:
            return False
        payload = batch_summary(db, batch_id, report, report_error)
        body = encode_body(payload, secrets=(settings.api_key(), config.secret))
        return send(config, body, sleep=sleep)
    except Exception:
        log.exception("batch %s: webhook not sent", batch_id)
        return False
