"""The SQL schema: jobs, their completions and their token metrics."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so that migrations can name what they drop.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(UTC)")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # not started before its expires_at: it never ran

    @property
    def finished(self) -> bool:
        return self is not JobStatus.QUEUED and self is not JobStatus.RUNNING


def _values(enum_class: type[enum.Enum]) -> list[str]:
    return [member.value for member in enum_class]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The sweeper's look-up: queued jobs, oldest message first. Named by hand:
        # the convention would call it ix_jobs_status, the name of the status index.
        Index("ix_jobs_status_published_at", "status", "published_at"),
        # The sweeper's other look-up: running jobs whose lease has expired.
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the Celery task id
    status: Mapped[JobStatus] = mapped_column(
        # Stored as plain strings: a native PostgreSQL enum would need its own
        # migration for every new state.
        Enum(JobStatus, native_enum=False, length=16, values_callable=_values),
        default=JobStatus.QUEUED,
        index=True,
    )
    queue: Mapped[str] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(SmallInteger, default=0)
    prompt_text: Mapped[str | None] = mapped_column(Text)
    prompt_token_ids: Mapped[list[int] | None] = mapped_column(JSON)
    # A chat job's messages ({"role", "content"} each): the worker renders them with
    # the model's chat template. None: the job has a prompt.
    messages: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    # When the job asked for prompt_logprobs: per prompt token, as outputs.logprobs.
    prompt_logprobs: Mapped[list[dict[str, dict[str, Any]] | None] | None] = mapped_column(JSON)
    params: Mapped[dict[str, Any]]
    chat: Mapped[bool] = mapped_column(Boolean, default=False)
    deadline_s: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # When the job's message last went to the broker; a worker publishes it again
    # when the job is still queued long after. None: `pagedq run` runs the job in
    # its own process, and no message is ever sent.
    published_at: Mapped[datetime | None]
    # The claim of the attempt now running: its id fences every write of that
    # attempt (a newer claim changes it), and it holds the job only until it
    # expires, unless the worker's live engine loop renews it.
    lease_id: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None]
    # Hash of what the job computes (prompt, params, chat), to tell a retry of
    # the same request from a different request reusing its idempotency key.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # The worker appends the job's text to its Redis Stream after each step.
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    # Not started by then, the job ends expired without running (a batch's window).
    expires_at: Mapped[datetime | None]
    # The gateway's API key that submitted the job; None: a Python or CLI producer.
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"),
                                                 index=True)
    # The caller's name for the job within its batch or file (a batch line's custom_id).
    custom_id: Mapped[str | None] = mapped_column(String(255))

    outputs: Mapped[list[Output]] = relationship(
        back_populates="job", order_by="Output.index", cascade="all, delete-orphan"
    )
    metrics: Mapped[list[Metrics]] = relationship(
        back_populates="job", order_by="Metrics.attempt", cascade="all, delete-orphan"
    )


class Output(Base):
    """One completion of a job (a job with n > 1 has n of them)."""

    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_outputs_job_id_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    stop_reason: Mapped[str | None] = mapped_column(Text)
    cumulative_logprob: Mapped[float | None] = mapped_column(Float)
    # Beam search: cumulative_logprob / length ** length_penalty; outputs are best first.
    score: Mapped[float | None] = mapped_column(Float)
    # When the job asked for logprobs: per generated token, {token id (a string, as JSON
    # keys are): {"logprob", "rank", "decoded_token"}}; a -inf logprob is stored as null.
    logprobs: Mapped[list[dict[str, dict[str, Any]]] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="outputs")


class Metrics(Base):
    """Token metrics of one attempt; times are seconds since the job was submitted."""

    __tablename__ = "metrics"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_metrics_job_id_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    queue_time_s: Mapped[float | None] = mapped_column(Float)
    ttft_s: Mapped[float | None] = mapped_column(Float)
    tpot_s: Mapped[float | None] = mapped_column(Float)
    e2e_s: Mapped[float] = mapped_column(Float)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    generated_tokens: Mapped[int] = mapped_column(Integer)
    cached_tokens: Mapped[int] = mapped_column(Integer)
    preemptions: Mapped[int] = mapped_column(Integer)
    swapped_out_blocks: Mapped[int] = mapped_column(Integer)
    swapped_in_blocks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics")


class ApiKey(Base):
    """A gateway API key; only its SHA-256 is stored, the key is shown once."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, to tell keys apart in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class StoredFile(Base):
    """A file of OpenAI's Files API: a batch's input, output or errors."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class Batch(Base):
    """A batch of OpenAI's Batch API: one job per valid line of its input file."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    api_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    status: Mapped[BatchStatus] = mapped_column(
        Enum(BatchStatus, native_enum=False, length=16, values_callable=_values))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    # OpenAI's `metadata` ("metadata" itself is taken by SQLAlchemy's declarative base).
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # Lines refused at validation ({"line", "custom_id", "code", "message"} each), and
    # the batch's own errors when it failed as a whole.
    line_errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer, default=0)  # lines, valid or not
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
