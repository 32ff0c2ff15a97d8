"""SQLAlchemy models: the database is the source of truth for batches, jobs, attempts, outputs,
and the provider batches and uploaded files of the batch route.

Every table and index the migrations create is declared here, so `alembic check` finds nothing
to add or drop. The per-batch counter tables (migrations 0005 and 0007) and `job_metadata` are
written only by triggers; `pipeline.batch.status` and the dashboard read them. State columns
hold the values of `pipeline.states`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from pipeline.states import BatchState, JobState, ProviderBatchState, Route

# USD with micro-dollar precision; Numeric keeps it exact on both SQLite and PostgreSQL.
Money = Numeric(18, 6, asdecimal=True)
# What a call cost, exactly: tokens x a batch price (half of a sync price) can have 9 decimal
# places, and rounding each line would drift from the provider's bill over 50,000 lines.
ExactMoney = Numeric(20, 9, asdecimal=True)


def utcnow() -> datetime:
    return datetime.now(UTC)


# The predicate of the partial index ix_jobs_failures. A query must repeat it word for word to
# use the index (SQLite matches the expression, never a bound parameter): see web/queries.py.
FAILURES_WHERE = f"state IN ('{JobState.FAILED}', '{JobState.REJECTED}')"


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    manifest_uri: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    output_uri: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=BatchState.RUNNING, index=True)
    hold_code: Mapped[str | None] = mapped_column(String(32))  # a HoldCode while held/paused
    hold_reason: Mapped[str | None] = mapped_column(Text)
    budget_usd: Mapped[Decimal | None] = mapped_column(Money)
    reserved_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    settings: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    report_uri: Mapped[str | None] = mapped_column(Text)
    route: Mapped[str] = mapped_column(String(8), default=Route.SYNC, server_default=Route.SYNC)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch", lazy="raise")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("batch_id", "row_number", name="uq_jobs_batch_row"),
        # The dashboard's pages walk these in id order (keyset pagination, migration 0007).
        Index("ix_jobs_batch_state_id", "batch_id", "state", "id"),
        Index("ix_jobs_batch_model", "batch_id", "model", "id"),
        Index(
            "ix_jobs_batch_code",
            "batch_id",
            "last_error_code",
            "id",
            sqlite_where=text("last_error_code IS NOT NULL"),
            postgresql_where=text("last_error_code IS NOT NULL"),
        ),
        Index("ix_jobs_batch_key", "batch_id", "external_key"),
        Index("ix_jobs_batch_finished", "batch_id", "finished_at"),
        # Failures grouped by error code: an index-only scan of the few failed/rejected jobs.
        Index(
            "ix_jobs_failures",
            "batch_id",
            "state",
            "last_error_code",
            sqlite_where=text(FAILURES_WHERE),
            postgresql_where=text(FAILURES_WHERE),
        ),
        Index("ix_jobs_rerun_of", "rerun_of_job_id", unique=True),  # a job is re-run once
        Index("ix_jobs_fingerprint_state", "fingerprint", "state"),
        # Jobs reused from a twin are few: status joins just those to their donors.
        Index(
            "ix_jobs_reused",
            "batch_id",
            "reused_from_job_id",
            sqlite_where=text("reused_from_job_id IS NOT NULL"),
            postgresql_where=text("reused_from_job_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    row_number: Mapped[int] = mapped_column(Integer)
    external_key: Mapped[str | None] = mapped_column(String(500))
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    spec: Mapped[str] = mapped_column(Text)  # EditSpec JSON
    model: Mapped[str | None] = mapped_column(String(100))  # copies of the spec's, for reports
    quality: Mapped[str | None] = mapped_column(String(20))
    provider: Mapped[str | None] = mapped_column(String(64))  # NULL: before providers (openai)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # attempts made before the last `editbatch retry`; max_attempts counts from here
    attempt_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claim_token: Mapped[str | None] = mapped_column(String(32))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error_code: Mapped[str | None] = mapped_column(String(100))
    last_error_message: Mapped[str | None] = mapped_column(Text)
    estimated_usd: Mapped[Decimal | None] = mapped_column(Money)
    cost_usd: Mapped[Decimal] = mapped_column(ExactMoney, default=Decimal(0))
    reused_from_job_id: Mapped[int | None] = mapped_column(Integer)
    # The rejected job this one re-runs with an amended prompt (controls.rerun_rejected).
    rerun_of_job_id: Mapped[int | None] = mapped_column(Integer)
    route: Mapped[str | None] = mapped_column(String(8))  # overrides the batch's (a fallback)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    batch: Mapped[Batch] = relationship(back_populates="jobs", lazy="raise")


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16))  # an AttemptOutcome
    http_status: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(100))
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    retry_after_s: Mapped[float | None] = mapped_column(Float)
    text_input_tokens: Mapped[int | None] = mapped_column(Integer)
    image_input_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_input_tokens: Mapped[int | None] = mapped_column(Integer)
    image_output_tokens: Mapped[int | None] = mapped_column(Integer)
    text_output_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(ExactMoney, default=Decimal(0))
    cost_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    priced: Mapped[bool] = mapped_column(Boolean, default=True)
    # Where the call went: the provider and the deployment (lane) it took (migration 0011).
    provider: Mapped[str | None] = mapped_column(String(64))
    deployment: Mapped[str | None] = mapped_column(String(128))
    # The batch route: the provider batch this attempt is a line of, and the budget it holds.
    provider_batch_id: Mapped[int | None] = mapped_column(Integer, index=True)
    reserved_usd: Mapped[Decimal | None] = mapped_column(Money)


class Output(Base):
    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_outputs_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    spool_path: Mapped[str | None] = mapped_column(Text)
    uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    format: Mapped[str | None] = mapped_column(String(10))
    drift: Mapped[float | None] = mapped_column(Float)
    collected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    collect_error: Mapped[str | None] = mapped_column(Text)


class ProviderBatch(Base):
    """One OpenAI Batch of the batch route: one model, at most 50,000 lines and 200 MB.

    Recorded (`preparing`, with its `token`) before anything is uploaded or created, so a crash
    between `batches.create` and the commit finds it again by the token in its metadata.
    `output_offset` / `error_offset` are the bytes of each file already booked: reading starts
    again there. `lease_*`: the process preparing or collecting it.
    """

    __tablename__ = "provider_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    token: Mapped[str] = mapped_column(String(32), unique=True)
    model: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16), default=ProviderBatchState.PREPARING, index=True)
    provider_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    provider_status: Mapped[str | None] = mapped_column(String(20))
    lines: Mapped[int] = mapped_column(Integer, default=0)
    input_bytes: Mapped[int | None] = mapped_column(BigInteger)
    input_file_id: Mapped[str | None] = mapped_column(String(100))
    output_file_id: Mapped[str | None] = mapped_column(String(100))
    error_file_id: Mapped[str | None] = mapped_column(String(100))
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    booked: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(ExactMoney, default=Decimal(0))
    reserved_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    reserved_on: Mapped[date | None] = mapped_column(Date)
    output_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    error_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    create_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refreshed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_token: Mapped[str | None] = mapped_column(String(32))


class ProviderFile(Base):
    """An input image or mask uploaded to the provider's Files API, keyed by its sha256.

    At most one live row per sha256 (`deleted_at` NULL): every line that sends those bytes
    refers to its `file_id`, across batches, until it is deleted (after collection, unless the
    batch keeps its provider files) or found gone.
    """

    __tablename__ = "provider_files"
    __table_args__ = (
        Index(
            "uq_provider_files_live_sha256",
            "sha256",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    file_id: Mapped[str] = mapped_column(String(100), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    purpose: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ProviderBatchFile(Base):
    """Which uploaded files the lines of a provider batch refer to (not deleted while in use)."""

    __tablename__ = "provider_batch_files"

    provider_batch_id: Mapped[int] = mapped_column(
        ForeignKey("provider_batches.id", ondelete="CASCADE"), primary_key=True
    )
    provider_file_id: Mapped[int] = mapped_column(
        ForeignKey("provider_files.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class BatchEvent(Base):
    """Something that happened to a batch as a whole, for `status` and the log (the outage
    breaker's trips, resumes and give-ups)."""

    __tablename__ = "batch_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # a pipeline.db.events kind
    message: Mapped[str] = mapped_column(Text)
    # The provider an outage event is about (its breaker); NULL: before providers (openai).
    provider: Mapped[str | None] = mapped_column(String(64))


class DailySpend(Base):
    """Committed spend plus in-flight reservations of one UTC day, across all batches."""

    __tablename__ = "daily_spend"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    reserved_usd: Mapped[Decimal] = mapped_column(
        Money, default=Decimal(0), server_default=text("0")
    )


# -- counters kept by triggers (migrations 0005, 0009); money in integer nano-dollars --------


class BatchJobCount(Base):
    """Jobs of a batch by (model, quality, state): count, cost, estimates, kept cost."""

    __tablename__ = "batch_job_counts"

    batch_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(100), primary_key=True)  # '' for none
    quality: Mapped[str] = mapped_column(String(20), primary_key=True)  # '' for none
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    jobs: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)
    estimated_nanos: Mapped[int] = mapped_column(BigInteger)
    unestimated: Mapped[int] = mapped_column(BigInteger)
    kept_nanos: Mapped[int] = mapped_column(BigInteger)


class BatchAttemptCount(Base):
    """Attempts of a batch by outcome: count, unpriced, estimated, cost."""

    __tablename__ = "batch_attempt_counts"

    batch_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    attempts: Mapped[int] = mapped_column(BigInteger)
    unpriced: Mapped[int] = mapped_column(BigInteger)
    estimated: Mapped[int] = mapped_column(BigInteger)
    cost_nanos: Mapped[int] = mapped_column(BigInteger)


class BatchOutputCount(Base):
    """Outputs of a batch: count, uncollected, and the mask drift figures."""

    __tablename__ = "batch_output_counts"

    batch_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    outputs: Mapped[int] = mapped_column(BigInteger)
    uncollected: Mapped[int] = mapped_column(BigInteger)
    drift_n: Mapped[int] = mapped_column(BigInteger)
    drift_sum: Mapped[float] = mapped_column(Float)
    drift_max: Mapped[float | None] = mapped_column(Float)


class Review(Base):
    """A person's decision on one output (a `ReviewDecision`, with a note); none: unreviewed."""

    __tablename__ = "reviews"
    __table_args__ = (
        Index("ix_reviews_batch_decision", "batch_id", "decision", "job_id", "output_id"),
    )

    output_id: Mapped[int] = mapped_column(
        ForeignKey("outputs.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    job_id: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(10))
    note: Mapped[str | None] = mapped_column(Text)
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobMetadata(Base):
    """A job's metadata columns, copied from jobs.spec by an INSERT trigger (migration 0007),
    so a filter on one is an index range; keys cut to 100 characters, values to 200."""

    __tablename__ = "job_metadata"

    batch_id: Mapped[int] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(200), primary_key=True)
    # No foreign key to jobs: a cascade from each deleted job would scan this table.
    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)


class BatchReviewCount(Base):
    """Outputs of a batch per review decision, kept by triggers on reviews (migration 0007)."""

    __tablename__ = "batch_review_counts"

    batch_id: Mapped[int] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    decision: Mapped[str] = mapped_column(String(10), primary_key=True)
    outputs: Mapped[int] = mapped_column(BigInteger)
