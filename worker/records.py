"""Plain records of jobs, detached from the SQL session that loaded them."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from engine.logprob import Logprob
from worker.models import Job, JobStatus, Metrics, Output
from worker.schemas import QueueKind


@dataclass(slots=True)
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | None = None
    cumulative_logprob: float | None = None
    score: float | None = None  # beam search: outputs come best first
    # When the job asked for logprobs: per generated token, token id -> Logprob.
    logprobs: list[dict[int, Logprob]] | None = None

    @classmethod
    def from_row(cls, row: Output) -> Completion:
        return cls(row.index, row.text, list(row.token_ids), row.finish_reason,
                   row.stop_reason, row.cumulative_logprob, row.score,
                   logprobs_from_json(row.logprobs))


def logprobs_to_json(logprobs: list[dict[int, Logprob] | None] | None
                     ) -> list[dict[str, dict[str, Any]] | None] | None:
    """Logprobs as JSON can hold them: string keys, and null for -inf. A position
    without logprobs (a prompt's first token) stays null."""
    if logprobs is None:
        return None
    return [None if position is None else
            {str(token): {"logprob": lp.logprob if lp.logprob is not None
                          and math.isfinite(lp.logprob) else None,
                          "rank": lp.rank, "decoded_token": lp.decoded_token}
             for token, lp in position.items()} for position in logprobs]


def logprobs_from_json(data: list[dict[str, dict[str, Any]] | None] | None
                       ) -> list[dict[int, Logprob] | None] | None:
    if data is None:
        return None
    return [None if position is None else
            {int(token): Logprob(**lp) for token, lp in position.items()} for position in data]


@dataclass(slots=True)
class JobMetrics:
    """Token metrics of one attempt. Times are seconds since the job was submitted."""

    attempt: int
    queue_time_s: float | None
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float
    prompt_tokens: int
    generated_tokens: int
    cached_tokens: int
    preemptions: int
    swapped_out_blocks: int
    swapped_in_blocks: int
    worker: str | None = None

    @classmethod
    def from_row(cls, row: Metrics) -> JobMetrics:
        return cls(row.attempt, row.queue_time_s, row.ttft_s, row.tpot_s, row.e2e_s,
                   row.prompt_tokens, row.generated_tokens, row.cached_tokens, row.preemptions,
                   row.swapped_out_blocks, row.swapped_in_blocks, row.worker)


@dataclass(slots=True)
class JobRecord:
    """A job as a producer sees it: state, outputs and the metrics of its last attempt."""

    id: str
    status: JobStatus
    queue: str
    priority: int
    attempts: int
    cancel_requested: bool
    worker: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    outputs: list[Completion] = field(default_factory=list)
    metrics: JobMetrics | None = None
    # When the job asked for prompt_logprobs: per prompt token (None for the first).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    custom_id: str | None = None
    batch_id: str | None = None
    api_key_id: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # a chat job: a prompt as one user message, or messages

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def text(self) -> str:
        """The first completion's text, the usual answer when n == 1."""
        return self.outputs[0].text if self.outputs else ""

    @classmethod
    def from_row(cls, row: Job) -> JobRecord:
        return cls(
            id=row.id, status=row.status, queue=row.queue, priority=row.priority,
            attempts=row.attempts, cancel_requested=row.cancel_requested, worker=row.worker,
            error=row.error, created_at=row.created_at, started_at=row.started_at,
            finished_at=row.finished_at,
            outputs=[Completion.from_row(o) for o in row.outputs],
            prompt_logprobs=logprobs_from_json(row.prompt_logprobs),
            metrics=JobMetrics.from_row(row.metrics[-1]) if row.metrics else None,
            custom_id=row.custom_id, batch_id=row.batch_id, api_key_id=row.api_key_id,
            params=dict(row.params), chat=row.chat or row.messages is not None,
        )


@dataclass(slots=True)
class JobSpec:
    """What a worker needs to run a job it has claimed."""

    id: str
    attempt: int
    lease_id: str  # fences this attempt's writes
    prompt: str | list[int] | None  # None: a chat job's `messages`
    params: dict[str, Any]
    priority: int
    chat: bool
    deadline_s: float | None
    created_at: datetime
    messages: list[dict[str, str]] | None = None
    stream: bool = False  # append the text to the job's Redis Stream as it comes
    queue: str = QueueKind.INTERACTIVE

    @property
    def engine_priority(self) -> int:
        """The engine's priority: the job's level, interactive before bulk within it."""
        return 2 * self.priority + (self.queue == QueueKind.BULK)


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"
    MISSING = "missing"  # no such row: the producer gave up on it
    FINISHED = "finished"  # a duplicate delivery of a job already done
    BUSY = "busy"  # a duplicate delivery of a job that a live lease holds
    CANCELLED = "cancelled"  # cancelled before it could start
    EXHAUSTED = "exhausted"  # too many attempts; now failed
    EXPIRED = "expired"  # not started before its expires_at; now expired


@dataclass(slots=True)
class Claim:
    outcome: ClaimOutcome
    spec: JobSpec | None = None


@dataclass(slots=True)
class ClaimAsk:
    """One delivery's request to take a job."""

    job_id: str
    worker: str


@dataclass(slots=True)
class FinishWrite:
    """How one attempt ended, to be recorded if its lease is still the job's."""

    job_id: str
    lease_id: str
    status: JobStatus
    error: str | None = None
    outputs: Sequence[Completion] = ()
    metrics: JobMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
