"""Every state a job, a batch or an attempt can be in, and the moves between them, as data
(and the review decision a person gives an output).

This module is the one place where state names are written. The database stores the values;
every change of a job's or a batch's state goes through `pipeline.db.jobs`, which refuses a
move that is not in JOB_MOVES / BATCH_MOVES (`InvalidTransition`). The diagrams below are
rendered from the tables (`job_diagram()`, `batch_diagram()`); a test holds them equal.

Job states:

    rejected   preflight failed, never sent (terminal)
    queued     waiting for a worker
    running    claimed by a worker (lease + claim token)
    retrying   claimed, waiting for its next attempt after a transient error
    submitted  its request is a line of a provider batch (the batch route): the provider has it
    succeeded  outputs recorded (terminal; collection is a separate, re-runnable step)
    failed     permanent error or attempts used up (terminal until `editbatch retry --failed`)
    held       its batch stopped (budget, quota, auth, pause, a model gone, an API outage);
               resume queues it
    cancelled  (terminal)

    A job is created queued or rejected (JOB_INITIAL): by submit, one per manifest row, and
    by a re-run of a rejected output (a new queued job pointing at the one it re-runs).

    queued    -> running, submitted, failed, held, cancelled
    running   -> queued, running, retrying, succeeded, failed, held, cancelled
    retrying  -> queued, running, held, cancelled
    submitted -> queued, succeeded, failed, held, cancelled
    failed    -> queued
    held      -> queued, failed, cancelled

    running -> running is a claim taken over after the lease ran out (its worker is gone);
    running|retrying -> queued hands a job back without spending (no permit in time, an
    identical job in flight, a database error, an expired lease); running -> held|cancelled
    parks a claimed job whose batch stopped before its call; failed -> queued is
    `retry --failed`; queued|held -> failed is `resume --model-map` for a job whose parameters
    do not fit its new model (it fails without a call, naming the field). queued -> submitted
    puts a job's request in a provider batch; its line decides where it goes next (a 5xx or
    an expired line: queued again; a line never run in a cancelled batch: cancelled).

Batch states:

    running   -> held, paused, finished, cancelled
    held      -> running, finished, cancelled
    paused    -> running, held, finished, cancelled
    finished  -> running
    cancelled (terminal)

    finished -> running reopens a batch for `retry --failed`.

Provider batch states (the batch route: one OpenAI Batch per model and chunk of jobs; the
provider's own status is kept beside it, in `provider_batches.provider_status`):

    preparing   the intent is recorded (jobs submitted, attempts in flight) before any call:
                inputs and the JSONL are uploaded, the batch is created (or found again)
    open        created at the provider; polled until it is completed, expired, cancelled
                or failed there
    collecting  its output and error files are read line by line, each line booked once
    collected   every line booked, the provider's files deleted (terminal)
    abandoned   the batch was stopped before the provider batch was created: nothing was
                sent (terminal)

    preparing  -> open, abandoned
    open       -> collecting
    collecting -> collected
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import TypeVar

from pipeline.errors import InvalidTransition

__all__ = [
    "BATCH_CLOSED",
    "BATCH_MOVES",
    "BATCH_OPEN",
    "BATCH_STOPPED",
    "JOB_CLAIMED",
    "JOB_INITIAL",
    "JOB_MOVES",
    "JOB_PENDING",
    "JOB_TERMINAL",
    "JOB_TO_RUN",
    "PROVIDER_BATCH_MOVES",
    "PROVIDER_FINAL",
    "PROVIDER_OPEN",
    "AttemptOutcome",
    "BatchState",
    "HoldCode",
    "InvalidTransition",
    "JobState",
    "ProviderBatchState",
    "ReviewDecision",
    "Route",
    "batch_diagram",
    "check_batch_move",
    "check_job_creation",
    "check_job_move",
    "check_provider_batch_move",
    "job_diagram",
    "provider_batch_diagram",
]


class JobState(StrEnum):
    """A job's state (listed in the order status tables show them)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUBMITTED = "submitted"
    HELD = "held"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


class BatchState(StrEnum):
    RUNNING = "running"
    HELD = "held"
    PAUSED = "paused"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class AttemptOutcome(StrEnum):
    """What one call did. The gateway classifies an answer as OK, TRANSIENT, HOLD or FAILED."""

    IN_FLIGHT = "in_flight"  # recorded before the call; replaced by the outcome after it
    OK = "ok"  # images came back
    TRANSIENT = "transient"  # try again later (429, 5xx, timeout, unreadable answer)
    HOLD = "hold"  # stop the batch (quota, auth, a model that is gone)
    FAILED = "failed"  # this job cannot succeed as asked (invalid request, moderation)
    INTERRUPTED = "interrupted"  # the worker died during the call: its fate is unknown


class HoldCode(StrEnum):
    """Why a batch is held or paused (`batches.hold_code`; `hold_reason` says it in words)."""

    PAUSED = "paused"  # a person paused it
    BUDGET = "budget"  # the batch's budget is reached
    DAILY_BUDGET = "daily_budget"  # EDITBATCH_DAILY_BUDGET_USD is reached
    QUOTA = "quota"  # 429 insufficient_quota and friends
    AUTH = "auth"  # 401 / 403
    MODEL_UNAVAILABLE = "model_unavailable"  # the API says the model does not exist (any more)
    PROVIDER = "provider"  # a provider's setting is wrong (Azure: no such deployment, api-version)
    PROVIDER_REFUSED = "provider_refused"  # the Batch API refused a whole provider batch
    INPUT_UNREADABLE = "input_unreadable"  # an input file went missing after preflight
    API_UNREACHABLE = "api_unreachable"  # the outage breaker tripped: probing, resumes by itself
    OUTAGE = "outage"  # the outage outlasted EDITBATCH_BREAKER_GIVE_UP_SECONDS: a person resumes


class Route(StrEnum):
    """How a batch's calls reach the provider (`batches.route`; a job may override it)."""

    SYNC = "sync"  # one `images.edit` call per attempt
    BATCH = "batch"  # OpenAI's Batch API: one JSONL line per attempt, half price, within 24 h


class ProviderBatchState(StrEnum):
    """Where one provider batch of the batch route is, on our side (`provider_batches.state`)."""

    PREPARING = "preparing"
    OPEN = "open"
    COLLECTING = "collecting"
    COLLECTED = "collected"
    ABANDONED = "abandoned"


PROVIDER_FINAL = frozenset({"completed", "expired", "cancelled", "failed"})
"""The provider's statuses after which a batch's files are final: collect them."""


class ReviewDecision(StrEnum):
    """A person's decision on one output in the review gallery (`reviews.decision`); an output
    without a row in `reviews` is unreviewed. A job with a rejected output can be re-run."""

    APPROVED = "approved"
    REJECTED = "rejected"


S = TypeVar("S", bound=StrEnum)
J = JobState
B = BatchState

JOB_MOVES: Mapping[JobState, frozenset[JobState]] = {
    J.QUEUED: frozenset({J.RUNNING, J.SUBMITTED, J.HELD, J.FAILED, J.CANCELLED}),
    J.RUNNING: frozenset(
        {J.RUNNING, J.RETRYING, J.SUCCEEDED, J.FAILED, J.QUEUED, J.HELD, J.CANCELLED}
    ),
    J.RETRYING: frozenset({J.RUNNING, J.QUEUED, J.HELD, J.CANCELLED}),
    J.SUBMITTED: frozenset({J.QUEUED, J.SUCCEEDED, J.FAILED, J.HELD, J.CANCELLED}),
    J.HELD: frozenset({J.QUEUED, J.FAILED, J.CANCELLED}),
    J.FAILED: frozenset({J.QUEUED}),
    J.SUCCEEDED: frozenset(),
    J.REJECTED: frozenset(),
    J.CANCELLED: frozenset(),
}

BATCH_MOVES: Mapping[BatchState, frozenset[BatchState]] = {
    B.RUNNING: frozenset({B.HELD, B.PAUSED, B.FINISHED, B.CANCELLED}),
    B.HELD: frozenset({B.RUNNING, B.FINISHED, B.CANCELLED}),
    B.PAUSED: frozenset({B.RUNNING, B.HELD, B.FINISHED, B.CANCELLED}),
    B.FINISHED: frozenset({B.RUNNING}),
    B.CANCELLED: frozenset(),
}

JOB_INITIAL = frozenset({J.QUEUED, J.REJECTED})
"""States a job is created in (`pipeline.db.jobs.insert_jobs` refuses any other)."""
JOB_TERMINAL = frozenset({J.SUCCEEDED, J.FAILED, J.REJECTED, J.CANCELLED})
"""States no worker will move a job out of by itself."""
JOB_CLAIMED = frozenset({J.RUNNING, J.RETRYING})
"""A worker holds the job (lease + claim token)."""
JOB_TO_RUN = frozenset({J.QUEUED, J.SUBMITTED, *JOB_CLAIMED})
"""Work a worker (or the provider, for a submitted job) has or will have."""
JOB_PENDING = frozenset({*JOB_TO_RUN, J.HELD})
"""Not finished: a batch with any such job is not done."""

BATCH_OPEN = frozenset({B.RUNNING, B.HELD, B.PAUSED})
"""Not finished: its jobs may still run (after a resume)."""
BATCH_STOPPED = frozenset({B.HELD, B.PAUSED})
"""Open, but no new call may start until a person (or the system) resumes it."""
BATCH_CLOSED = frozenset({B.FINISHED, B.CANCELLED})

P = ProviderBatchState
PROVIDER_BATCH_MOVES: Mapping[ProviderBatchState, frozenset[ProviderBatchState]] = {
    P.PREPARING: frozenset({P.OPEN, P.ABANDONED}),
    P.OPEN: frozenset({P.COLLECTING}),
    P.COLLECTING: frozenset({P.COLLECTED}),
    P.COLLECTED: frozenset(),
    P.ABANDONED: frozenset(),
}
PROVIDER_OPEN = frozenset({P.PREPARING, P.OPEN, P.COLLECTING})
"""Provider batches with lines not yet booked."""


def _check(kind: str, moves: Mapping[S, frozenset[S]], sources: Iterable[S], target: S) -> None:
    bad = sorted(str(s) for s in sources if target not in moves[s])
    if bad:
        raise InvalidTransition(
            f"a {kind} cannot move from {', '.join(bad)} to {target}: "
            f"allowed moves are listed in pipeline/states.py"
        )


def check_job_move(sources: Iterable[JobState], target: JobState) -> None:
    """Raise InvalidTransition unless every `source -> target` is in JOB_MOVES."""
    _check("job", JOB_MOVES, sources, target)


def check_job_creation(states: Iterable[JobState]) -> None:
    """Raise InvalidTransition unless every state is one a job may be created in."""
    bad = sorted(str(s) for s in states if s not in JOB_INITIAL)
    if bad:
        raise InvalidTransition(
            f"a job cannot be created {', '.join(bad)}: new jobs are "
            f"{' or '.join(sorted(JOB_INITIAL))} (pipeline/states.py)"
        )


def check_batch_move(sources: Iterable[BatchState], target: BatchState) -> None:
    """Raise InvalidTransition unless every `source -> target` is in BATCH_MOVES."""
    _check("batch", BATCH_MOVES, sources, target)


def check_provider_batch_move(
    sources: Iterable[ProviderBatchState], target: ProviderBatchState
) -> None:
    """Raise InvalidTransition unless every `source -> target` is in PROVIDER_BATCH_MOVES."""
    _check("provider batch", PROVIDER_BATCH_MOVES, sources, target)


def _diagram(moves: Mapping[S, frozenset[S]], order: Iterable[S]) -> str:
    ranks = {state: i for i, state in enumerate(order)}
    width = max(len(str(s)) for s in moves)
    lines = []
    for state in order:
        targets = sorted(moves[state], key=ranks.__getitem__)
        if targets:
            lines.append(f"{state!s:<{width}} -> {', '.join(str(t) for t in targets)}")
    return "\n".join(lines)


def job_diagram() -> str:
    """The job moves as the docstring writes them (one line per state that can move)."""
    order = (
        J.QUEUED,
        J.RUNNING,
        J.RETRYING,
        J.SUBMITTED,
        J.SUCCEEDED,
        J.FAILED,
        J.HELD,
        J.CANCELLED,
    )
    return _diagram(JOB_MOVES, (*order, J.REJECTED))


def batch_diagram() -> str:
    """The batch moves as the docstring writes them."""
    return _diagram(BATCH_MOVES, tuple(BatchState))


def provider_batch_diagram() -> str:
    """The provider batch moves as the docstring writes them."""
    return _diagram(PROVIDER_BATCH_MOVES, tuple(ProviderBatchState))
