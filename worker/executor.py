"""One attempt at one job: claim the row, generate in the shared engine, record the end.

Both the Celery task and the in-process `pagedq run` go through here, so a
job behaves the same with or without a broker. With a StreamWriter, a job asking
to stream runs with DELTA outputs, and every job's end is announced on its stream.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, as_completed
from dataclasses import dataclass, field
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


@dataclass(slots=True)
class Report:
    """What one delivery of a message did with its jobs."""

    outcomes: list[Outcome] = field(default_factory=list)
    # Given back uncharged because the machinery failed them: to run again.
    retry: list[str] = field(default_factory=list)
    error: Exception | None = None  # the first such failure


@dataclass(slots=True)
class _Write:
    """A job's end, queued for the database."""

    spec: JobSpec
    status: JobStatus
    error: str | None
    metrics: JobMetrics | None
    future: Future[bool]


@dataclass(slots=True)
class _Batch:
    """A delivery in progress: its report, and the ends not yet settled."""

    report: Report
    on_end: Callable[[Outcome], None] | None
    writes: list[_Write] = field(default_factory=list)
    # A claim that failed for a reason of its own, raised once the rest is settled.
    unclaimable: Exception | None = None

    def settled(self, outcome: Outcome) -> None:
        self.report.outcomes.append(outcome)
        if self.on_end is not None:
            self.on_end(outcome)

    def retry(self, job_id: str, exc: Exception) -> None:
        self.report.retry.append(job_id)
        if self.report.error is None:
            self.report.error = exc

    def settle_done(self, settle: Callable[[_Write, _Batch], None]) -> None:
        """Settle the writes already committed, keeping the others' order."""
        done = [write for write in self.writes if write.future.done()]
        self.writes = [write for write in self.writes if not write.future.done()]
        for write in done:
            settle(write, self)


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
        """One delivery of one job. Raises a retryable error, with the job given back
        uncharged where the database allows, when the machinery failed it."""
        report = self.run_many([job_id], worker)
        if report.error is not None:
            raise report.error
        return report.outcomes[0]

    def run_many(self, job_ids: Sequence[str], worker: str,
                 on_end: Callable[[Outcome], None] | None = None) -> Report:
        """One delivery of a message's jobs: claimed together, generated together in
        the engine, their ends written as they finish. `on_end(outcome)` is called as
        each job's outcome is settled. The jobs the machinery failed are given back
        uncharged and named in `Report.retry`. Raises when this worker cannot run
        jobs at all (nothing claimed), and once the others are settled when a claim
        failed for a reason other than the database being away."""
        # A worker whose engine is gone must not take (and charge) jobs it cannot run.
        if not self.service.alive(self.settings.lease_s):
            raise EngineFailure("this worker's engine loop is not running")
        batch = _Batch(Report(), on_end)
        held: list[JobSpec] = []
        try:
            with self.service.arriving():
                for spec in self._claim(job_ids, worker, batch):
                    self.leases.hold(spec.id, spec.lease_id)
                    held.append(spec)
                running = {future: spec for spec in held
                           if (future := self._start(spec, batch)) is not None}
            self._collect(running, worker, batch)
            for pending in batch.writes:
                self._settle(pending, batch)
        finally:
            for spec in held:
                self.leases.drop(spec.lease_id)
        if batch.unclaimable is not None:
            raise batch.unclaimable  # the others are settled: now the task fails
        return batch.report

    def _claim(self, job_ids: Sequence[str], worker: str, batch: _Batch) -> list[JobSpec]:
        """Claim every job in one transaction; returns the claimed ones' specs and
        settles the others (not run, or ended by the claim itself)."""
        futures = self._claims.submit_later([ClaimAsk(job_id, worker) for job_id in job_ids])
        specs = []
        for job_id, future in zip(job_ids, futures, strict=True):
            try:
                claim = future.result()
            except Exception as exc:
                if is_retryable(exc):
                    batch.retry(job_id, exc)
                else:
                    # Not retried: a claim that fails for a reason of its own would
                    # fail every time. The row stays queued for the sweep.
                    log.error("job %s could not be claimed", job_id, exc_info=exc)
                    batch.unclaimable = batch.unclaimable or exc
                continue
            if claim.spec is not None:
                specs.append(claim.spec)
                continue
            log.info("job %s not run: %s", job_id, claim.outcome.value)
            if claim.outcome in ENDED_BY_CLAIM:
                self._ended(job_id, "", ENDED_BY_CLAIM[claim.outcome], None)
            batch.settled(Outcome(job_id, claim.outcome))
        return specs

    def _start(self, spec: JobSpec, batch: _Batch) -> Future[Generation] | None:
        """Hand the job to the engine; None when it ended (or was given back) instead."""
        from engine import RequestOutputKind

        # Only a streaming job pays for reporting every step.
        kind = RequestOutputKind.DELTA if spec.stream and self.streams is not None \
            else RequestOutputKind.FINAL_ONLY
        try:
            params = engine_params(spec.params, kind)
            prompt = self._render(spec)
        except ValueError as exc:
            self._finish(spec, batch, JobStatus.FAILED, error=f"invalid job: {exc}")
            return None
        except Exception as exc:
            self._failed(spec, batch, exc)
            return None
        # Beam search has no output kind: its beams are known only at the end.
        stream = getattr(params, "output_kind", None) is RequestOutputKind.DELTA
        return self.service.submit(spec.id, spec.lease_id, prompt, params, spec.engine_priority,
                                   time.time() + self._deadline_s(spec), stream=stream)

    def _collect(self, running: dict[Future[Generation], JobSpec], worker: str,
                 batch: _Batch) -> None:
        """Record each job's end as its generation comes back."""
        if not running:
            return
        wait_s = max(self._deadline_s(spec) for spec in running.values()) + RESULT_GRACE_S
        try:
            for future in as_completed(running, timeout=wait_s):
                spec = running.pop(future)
                try:
                    self._judged(spec, future, worker, batch)
                except Exception as exc:
                    self._failed(spec, batch, exc)
                batch.settle_done(self._settle)
        except TimeoutError as exc:
            for spec in running.values():
                self._failed(spec, batch, exc)

    def _judged(self, spec: JobSpec, future: Future[Generation], worker: str,
                batch: _Batch) -> None:
        try:
            generation = future.result()
        except JobCancelled:
            self._finish(spec, batch, JobStatus.CANCELLED, error="cancelled before it started")
            return
        except ValueError as exc:
            self._finish(spec, batch, JobStatus.FAILED, error=f"rejected by the engine: {exc}")
            return
        status, error = _judge(generation, self._deadline_s(spec))
        self._finish(spec, batch, status, error=error, output=generation.output, worker=worker)

    def _failed(self, spec: JobSpec, batch: _Batch, exc: Exception) -> None:
        """A job that raised: given back for a retry when the machinery failed it,
        recorded as failed otherwise."""
        if is_retryable(exc):
            self._give_back(spec, exc)
            batch.retry(spec.id, exc)
            return
        log.error("job %s failed unexpectedly", spec.id, exc_info=exc)
        self._finish(spec, batch, JobStatus.FAILED, error=f"internal error: {exc!r}")

    def _give_back(self, spec: JobSpec, cause: Exception) -> None:
        """Requeue a job the machinery failed, without charging its attempt. If the
        database is away too, the lease runs out and the sweep requeues it."""
        self.service.abort_attempt(spec.id, spec.lease_id)  # if the engine still holds it
        try:
            self.store.release(spec.id, spec.lease_id)
        except Exception as exc:
            log.warning("job %s: could not give it back after %r (%r); the sweep takes "
                        "it once its lease expires", spec.id, cause, exc)

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

    def _finish(self, spec: JobSpec, batch: _Batch, status: JobStatus, *,
                error: str | None = None, output: RequestOutput | None = None,
                worker: str | None = None) -> None:
        """Queue the write that ends the job; _settle waits for it."""
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
        [future] = self._finishes.submit_later([FinishWrite(
            spec.id, spec.lease_id, status, error, completions, metrics,
            None if output is None else output.prompt_logprobs)])
        batch.writes.append(_Write(spec, status, error, metrics, future))

    def _settle(self, write: _Write, batch: _Batch) -> None:
        spec = write.spec
        try:
            recorded = write.future.result()
        except Exception as exc:
            if is_retryable(exc):
                self._give_back(spec, exc)
                batch.retry(spec.id, exc)
                return
            log.error("job %s: its end could not be written", spec.id, exc_info=exc)
            # Recorded as failed instead; should that fail too, the lease runs out
            # and the sweep requeues the job.
            if write.status is not JobStatus.FAILED:
                self._finish(spec, batch, JobStatus.FAILED, error=f"internal error: {exc!r}")
                self._settle(batch.writes.pop(), batch)
            return
        if recorded:
            self._ended(spec.id, spec.lease_id, write.status, write.metrics)
        else:
            log.warning("job %s attempt %d lost its lease to a newer attempt; result dropped",
                        spec.id, spec.attempt)
        batch.settled(Outcome(spec.id, ClaimOutcome.CLAIMED, write.status, write.error,
                              recorded))

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
