"""One attempt at one job: claim the row, generate in the shared engine, record the end.

Both the Celery task and the in-process `pagedq run` go through here, so a
job behaves the same with or without a broker. With a StreamWriter, a job asking
to stream runs with DELTA outputs, and every job's end is announced on its stream.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.db import is_transient
from worker.engine_service import EngineFailure, EngineService, Generation, JobCancelled
from worker.group_commit import GroupCommit
from worker.leases import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.models import JobStatus
from worker.records import (
    Claim,
    ClaimAsk,
    ClaimOutcome,
    Completion,
    FinishWrite,
    JobMetrics,
    JobSpec,
)
from worker.schemas import engine_params
from worker.settings import Settings
from worker.store import JobStore
from worker.streams import StreamWriter

if TYPE_CHECKING:
    from engine import RequestOutput

log = logging.getLogger(__name__)

DEADLINE_REASON = "deadline exceeded"
# Claims that end a job without running it, as the status they record.
ENDED_BY_CLAIM = {ClaimOutcome.CANCELLED: JobStatus.CANCELLED,
                  ClaimOutcome.EXPIRED: JobStatus.EXPIRED,
                  ClaimOutcome.EXHAUSTED: JobStatus.FAILED}
# The engine resolves every request by its deadline; waiting longer than this
# past it means the loop thread is gone, and the job is better retried.
RESULT_GRACE_S = 60.0


@dataclass(slots=True)
class Outcome:
    job_id: str
    claim: ClaimOutcome
    status: JobStatus | None = None  # what this attempt recorded; None when it ran nothing
    error: str | None = None
    recorded: bool = True  # False: a newer attempt took the job over meanwhile


def is_retryable(exc: BaseException) -> bool:
    """Failures of the machinery rather than of the job: another attempt may succeed."""
    return is_transient(exc) or isinstance(exc, EngineFailure | TimeoutError)


class JobRunner:
    def __init__(self, store: JobStore, service: EngineService, settings: Settings,
                 streams: StreamWriter | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        """`streams`: the writer `service` streams to; `metrics`: where finished
        attempts are counted. Neither: no streaming, no metrics."""
        self.store = store
        self.service = service
        self.settings = settings
        self.streams = streams
        self.metrics = metrics
        self.leases = LeaseKeeper(store, settings.lease_s, service.alive,
                                  service.abort_attempt)
        self.leases.start()
        # The claims that arrive together, and the ends of the jobs that finish in
        # one engine step, each go to the database in one transaction.
        self._claims: GroupCommit[ClaimAsk, Claim] = GroupCommit(
            "pagedq-claims", self._claim_batch, key=lambda ask: ask.job_id)
        self._finishes: GroupCommit[FinishWrite, bool] = GroupCommit(
            "pagedq-finishes", store.finish_many, key=lambda write: write.job_id)

    def close(self) -> None:
        self.leases.close()
        self._claims.close()
        self._finishes.close()

    def _claim_batch(self, asks: Sequence[ClaimAsk]) -> list[Claim]:
        return self.store.claim_many(asks, self.settings.max_attempts, self.settings.lease_s)

    def run(self, job_id: str, worker: str) -> Outcome:
        """One delivery of a job. Raises a retryable error, with the job given back
        uncharged where the database allows, when the machinery failed it."""
        # A worker whose engine is gone must not take (and charge) jobs it cannot run.
        if not self.service.alive(self.settings.lease_s):
            raise EngineFailure("this worker's engine loop is not running")
        with self.service.arriving():
            claim = self._claims.submit(ClaimAsk(job_id, worker))
            if claim.spec is None:
                log.info("job %s not run: %s", job_id, claim.outcome.value)
                if claim.outcome in ENDED_BY_CLAIM:
                    self._ended(job_id, "", ENDED_BY_CLAIM[claim.outcome], None)
                return Outcome(job_id, claim.outcome)
            spec = claim.spec
            self.leases.hold(spec.id, spec.lease_id)
        try:
            return self._attempt(spec, worker)
        finally:
            self.leases.drop(spec.lease_id)

    def _attempt(self, spec: JobSpec, worker: str) -> Outcome:
        try:
            with self.service.arriving():
                started = self._start(spec)
            if isinstance(started, Outcome):
                return started
            return self._collect(spec, started, worker)
        except Exception as exc:
            if is_retryable(exc):
                self._give_back(spec, exc)
                raise
            log.exception("job %s failed unexpectedly", spec.id)
            return self._finish(spec, JobStatus.FAILED, error=f"internal error: {exc!r}")

    def _give_back(self, spec: JobSpec, cause: Exception) -> None:
        """Requeue a job the machinery failed, without charging its attempt. If the
        database is away too, the lease runs out and the sweep requeues it."""
        self.service.abort_attempt(spec.id, spec.lease_id)  # if the engine still holds it
        try:
            self.store.release(spec.id, spec.lease_id)
        except Exception as exc:
            log.warning("job %s: could not give it back after %r (%r); the sweep takes "
                        "it once its lease expires", spec.id, cause, exc)

    def _start(self, spec: JobSpec) -> Future[Generation] | Outcome:
        from engine import RequestOutputKind

        # Only a streaming job pays for reporting every step.
        kind = RequestOutputKind.DELTA if spec.stream and self.streams is not None \
            else RequestOutputKind.FINAL_ONLY
        try:
            params = engine_params(spec.params, kind)
            prompt = self._render(spec)
        except ValueError as exc:
            return self._finish(spec, JobStatus.FAILED, error=f"invalid job: {exc}")
        # Beam search has no output kind: its beams are known only at the end.
        stream = getattr(params, "output_kind", None) is RequestOutputKind.DELTA
        return self.service.submit(spec.id, spec.lease_id, prompt, params, spec.engine_priority,
                                   time.time() + self._deadline_s(spec), stream=stream)

    def _collect(self, spec: JobSpec, future: Future[Generation], worker: str) -> Outcome:
        deadline_s = self._deadline_s(spec)
        try:
            generation = future.result(timeout=deadline_s + RESULT_GRACE_S)
        except JobCancelled:
            return self._finish(spec, JobStatus.CANCELLED, error="cancelled before it started")
        except ValueError as exc:
            return self._finish(spec, JobStatus.FAILED, error=f"rejected by the engine: {exc}")
        status, error = _judge(generation, deadline_s)
        return self._finish(spec, status, error=error, output=generation.output, worker=worker)

    def _deadline_s(self, spec: JobSpec) -> float:
        return min(spec.deadline_s or math.inf, self.settings.job_deadline_s)

    def _render(self, spec: JobSpec) -> str | list[int]:
        if spec.messages is None and not spec.chat:
            assert spec.prompt is not None
            return spec.prompt
        field = "messages" if spec.messages is not None else "chat"
        tokenizer = self.service.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{field}: the model has no chat template")
        messages = spec.messages or [{"role": "user", "content": spec.prompt}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # a template may refuse an order of roles
            raise ValueError(f"{field}: the chat template refused them: {exc}") from exc

    def _finish(self, spec: JobSpec, status: JobStatus, *, error: str | None = None,
                output: RequestOutput | None = None, worker: str | None = None) -> Outcome:
        completions = [] if output is None else [
            Completion(o.index, o.text, list(o.token_ids), o.finish_reason,
                       None if o.stop_reason is None else str(o.stop_reason),
                       o.cumulative_logprob, o.score, o.logprobs)
            for o in output.outputs
        ]
        metrics = None if output is None else _metrics(spec, output, worker)
        # Renewal stops before the write that ends the lease, or a renewal racing
        # it would take the ended lease for one lost to another worker.
        self.leases.drop(spec.lease_id)
        recorded = self._finishes.submit(FinishWrite(
            spec.id, spec.lease_id, status, error, completions, metrics,
            None if output is None else output.prompt_logprobs))
        if recorded:
            self._ended(spec.id, spec.lease_id, status, metrics)
        else:
            log.warning("job %s attempt %d lost its lease to a newer attempt; result dropped",
                        spec.id, spec.attempt)
        return Outcome(spec.id, ClaimOutcome.CLAIMED, status, error, recorded)

    def _ended(self, job_id: str, attempt: str, status: JobStatus,
               metrics: JobMetrics | None) -> None:
        """The job's row is final: tell its stream's readers, and count it."""
        if self.streams is not None:
            self.streams.end(job_id, attempt, status)
        if self.metrics is not None:
            self.metrics.observe(status, metrics)


def _judge(generation: Generation, deadline_s: float) -> tuple[JobStatus, str | None]:
    output = generation.output
    if all(o.finish_reason != "abort" for o in output.outputs):
        return JobStatus.SUCCEEDED, None
    if generation.cancelled:
        return JobStatus.CANCELLED, "cancelled while running"
    if output.abort_reason == DEADLINE_REASON:
        return JobStatus.FAILED, f"deadline exceeded: still generating after {deadline_s:g} s"
    return JobStatus.FAILED, f"aborted by the engine: {output.abort_reason}"


def _metrics(spec: JobSpec, output: RequestOutput, worker: str | None) -> JobMetrics:
    m = output.metrics
    submitted = spec.created_at.timestamp()

    def since_submit(t: float | None) -> float | None:
        return None if t is None else t - submitted

    longest = max((len(o.token_ids) for o in output.outputs), default=0)
    tpot = None
    if m.first_token_time is not None and m.finished_time is not None and longest > 1:
        tpot = (m.finished_time - m.first_token_time) / (longest - 1)
    return JobMetrics(
        attempt=spec.attempt,
        queue_time_s=since_submit(m.first_scheduled_time),
        ttft_s=since_submit(m.first_token_time),
        tpot_s=tpot,
        e2e_s=(m.finished_time or time.time()) - submitted,
        prompt_tokens=m.num_prompt_tokens,
        generated_tokens=sum(len(o.token_ids) for o in output.outputs),
        cached_tokens=m.num_cached_tokens,
        preemptions=m.num_preemptions,
        swapped_out_blocks=m.num_swapped_out_blocks,
        swapped_in_blocks=m.num_swapped_in_blocks,
        worker=worker,
    )
