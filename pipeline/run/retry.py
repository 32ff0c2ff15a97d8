"""The retry policy, in one place: what is retried, how long it waits, when it stops, and how
database errors around a call are retried.

What an answer means (`classify`, pure), per ARCHITECTURE.md's error classes:

    429 rate_limit_exceeded, 408, 409, >= 500, timeout,    TRANSIENT  retried with backoff
      connection reset, an unreadable 200
    429 insufficient_quota (and the spend-limit codes)       HOLD       the batch stops; no retry
    401, 403                                                 HOLD
    404 model_not_found, 400 with param "model"              HOLD       the model is gone (the
                                                                        live API answers both ways)
    400 moderation_blocked, or Azure's content filter        FAILED     this job's content; never
      (contentFilter, content_filter,                                   held, never retried
      content_policy_violation)
    Azure: 404 DeploymentNotFound / "Resource not found",    HOLD       a provider setting is
      400 "API version not supported"                                   wrong (fix it, resume)
    any other 4xx (invalid request)                          FAILED     the job fails with the code

How long it waits (`wait_api`): full-jitter exponential backoff (EDITBATCH_BACKOFF_BASE_SECONDS,
capped at EDITBATCH_BACKOFF_MAX_SECONDS), never shorter than the API's `retry-after-ms` /
`retry-after`. When it stops: after EDITBATCH_MAX_ATTEMPTS calls for the job, counted from its
last `retry --failed` (`RetryPolicy.attempts_left`). The SDK's own retries are off, so each
call is one recorded attempt.

Database errors: a write that records a call already made is retried in place for
`RECORD_RETRY_SECONDS` (`persist`): the call's outcome exists only in this process, and giving up
would drop its cost from the ledger and buy the edit again. Any other database error gives the
claim back, and the whole job is tried again `REDELIVER_SECONDS` later (`redeliver_after`), by
the Celery task and the local pool alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError
from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_attempt
from tenacity.wait import wait_random_exponential

from pipeline.settings import Settings
from pipeline.states import AttemptOutcome, HoldCode

log = logging.getLogger("editbatch.retry")

__all__ = [
    "CONTENT_FILTER_CODES",
    "QUOTA_CODES",
    "RECORD_RETRY_SECONDS",
    "REDELIVER_SECONDS",
    "RetryPolicy",
    "classify",
    "content_blocked",
    "hold_code",
    "model_unavailable",
    "parse_retry_after",
    "persist",
    "provider_misconfigured",
    "redeliver_after",
    "wait_api",
]

# 429 bodies that mean "no money / no quota": retrying cannot help and costs nothing but time.
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
        "billing_hard_limit_reached",
    }
)
# A 400 with one of these says the content was refused: the job fails with the provider's code
# and message. Azure answers `contentFilter` for images; reports also show `content_filter`
# and `content_policy_violation` (docs/sandbox.md, Azure).
CONTENT_FILTER_CODES = frozenset(
    {"moderation_blocked", "contentFilter", "content_filter", "content_policy_violation"}
)
TRANSIENT_STATUSES = frozenset({408, 409, 429})
HOLD_STATUSES = frozenset({401, 403})
MAX_RETRY_AFTER_SECONDS = 600.0

RECORD_RETRY_SECONDS = 30.0
"""How long the record of a call already made is retried through database errors."""
REDELIVER_SECONDS = 2.0
"""After any other database error, the job is tried again this much later."""


def model_unavailable(status: int | None, code: str | None, param: str | None) -> bool:
    """The API says the model does not exist (any more) or this key cannot use it: retrying
    cannot help, and every job of that model would fail the same way."""
    return (status == 404 and code == "model_not_found") or (status == 400 and param == "model")


def content_blocked(status: int | None, code: str | None) -> bool:
    """The provider refused this request's content (moderation, a content filter)."""
    return status == 400 and code in CONTENT_FILTER_CODES


def provider_misconfigured(status: int | None, code: str | None, message: str | None) -> bool:
    """Azure says the deployment, or the path and api-version, it was sent does not exist: every
    call on that lane would fail the same way until a setting is fixed."""
    if status == 404 and code in ("DeploymentNotFound", "404"):
        return True
    return status == 400 and code == "BadRequest" and "api version" in (message or "").lower()


def classify(
    status: int | None,
    error_type: str | None,
    code: str | None,
    param: str | None = None,
    message: str | None = None,
) -> AttemptOutcome:
    """Map an HTTP status and error type/code/param (and message) to TRANSIENT, HOLD or FAILED
    (pure)."""
    if status is None:
        return AttemptOutcome.TRANSIENT  # timeout, connection reset, unreadable body
    if content_blocked(status, code):
        return AttemptOutcome.FAILED
    if provider_misconfigured(status, code, message):
        return AttemptOutcome.HOLD
    if model_unavailable(status, code, param):
        return AttemptOutcome.HOLD
    if status == 429:
        if error_type in QUOTA_CODES or code in QUOTA_CODES:
            return AttemptOutcome.HOLD
        return AttemptOutcome.TRANSIENT
    if status in HOLD_STATUSES:
        return AttemptOutcome.HOLD
    if status in TRANSIENT_STATUSES or status >= 500:
        return AttemptOutcome.TRANSIENT
    return AttemptOutcome.FAILED


def hold_code(
    status: int | None, code: str | None, param: str | None, message: str | None = None
) -> HoldCode:
    """Why a HOLD outcome stops the batch (`batches.hold_code`)."""
    if provider_misconfigured(status, code, message):
        return HoldCode.PROVIDER
    if model_unavailable(status, code, param):
        return HoldCode.MODEL_UNAVAILABLE
    if status == 429:
        return HoldCode.QUOTA
    return HoldCode.AUTH


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred) or `retry-after`, if present and sane."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) / divisor
        except ValueError:
            continue
        if 0 <= value <= MAX_RETRY_AFTER_SECONDS:
            return value
    return None


class Retriable(Protocol):
    """What the policy reads of an attempt's outcome."""

    @property
    def kind(self) -> AttemptOutcome: ...

    @property
    def retry_after(self) -> float | None: ...


class wait_api:
    """Full-jitter exponential wait (base, cap) raised to the outcome's `retry_after` if longer."""

    def __init__(self, base: float, cap: float) -> None:
        self._jitter = wait_random_exponential(multiplier=base, max=cap)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = float(self._jitter(retry_state))
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            retry_after = getattr(outcome.result(), "retry_after", None)
            if retry_after is not None:
                return max(wait, float(retry_after))
        return wait


R = TypeVar("R", bound=Retriable)


@dataclass(frozen=True)
class RetryPolicy:
    """When to call again, how long to wait, when to stop."""

    max_attempts: int
    backoff_base: float
    backoff_max: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            settings.max_attempts, settings.backoff_base_seconds, settings.backoff_max_seconds
        )

    def attempts_left(self, attempts: int, attempt_base: int) -> int:
        """Calls this run may make for a job that has made `attempts` (`attempt_base` of them
        before its last `retry --failed`). Never less than one: a claimed job gets its call."""
        return max(self.max_attempts - (attempts - attempt_base), 1)

    def run(
        self,
        call: Callable[[], R],
        *,
        attempts: int,
        sleep: Callable[[float], None],
        before_call: Callable[[int], None],
        before_wait: Callable[[float], None],
    ) -> R:
        """Call until the outcome is not TRANSIENT or `attempts` calls were made; the last
        outcome. `before_call(n)` runs before the n-th call (1-based), `before_wait(seconds)`
        before each wait. Exceptions from `call` propagate at once."""

        def before(state: RetryCallState) -> None:
            before_call(state.attempt_number)

        def before_sleep(state: RetryCallState) -> None:
            before_wait(state.next_action.sleep if state.next_action else 0.0)

        retrying = Retrying(
            stop=stop_after_attempt(attempts),
            wait=wait_api(self.backoff_base, self.backoff_max),
            retry=retry_if_result(lambda o: o.kind == AttemptOutcome.TRANSIENT),
            retry_error_callback=lambda rs: rs.outcome.result() if rs.outcome else None,
            before=before,
            before_sleep=before_sleep,
            sleep=sleep,
            reraise=True,
        )
        result: R = retrying(call)
        return result


T = TypeVar("T")


def persist(what: str, write: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `write` (safe to run twice) again after a database error, for RECORD_RETRY_SECONDS."""
    delay = 0.1
    deadline = time.monotonic() + RECORD_RETRY_SECONDS
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database error, trying again in %.1f s: %s", what, delay, exc.orig)
            sleep(delay)
            delay = min(delay * 2, 5.0)


def redeliver_after(job_id: int, exc: DBAPIError) -> float:
    """A database error stopped job `job_id` (its claim was given back): log it, and the
    seconds after which to try the job again."""
    log.warning(
        "job %s: database error, trying again in %.0f s: %s", job_id, REDELIVER_SECONDS, exc.orig
    )
    return REDELIVER_SECONDS
