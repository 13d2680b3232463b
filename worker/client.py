"""The producer API: what a web backend or a bulk script calls.

A job is written to SQL first (status queued) and published second, alone or
with the jobs submitted with it in one Celery message; if publishing fails the
row is removed again, so a job is either in both places or in neither. Should
Redis lose the message later, the workers' sweep publishes it again
(worker/sweeper.py). Nothing here imports the engine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import groupby
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import ColumnElement

from worker.cancel import BatchCancel, CancelReport, cancel_batch, cancel_jobs, tell_workers
from worker.celery_app import TASK_NAME, PagedqCelery, create_app
from worker.db import make_sessionmaker
from worker.job_rows import JobOwner
from worker.records import JobRecord
from worker.redact import mask_url
from worker.schemas import GenerationParams, InvalidJob, JobRequest, QueueKind, parse_job
from worker.settings import ENV_PREFIX, Settings, load_settings
from worker.store import JobStore
from worker.streams import StreamDelta, read_stream

POLL_START_S = 0.02
POLL_MAX_S = 0.5


class BrokerUnavailable(RuntimeError):
    """Jobs could not be enqueued; `unsent` names them. From Client.submit: none
    of them was stored either."""

    def __init__(self, message: str, unsent: list[str]) -> None:
        super().__init__(message)
        self.unsent = unsent


def publish(app: PagedqCelery, jobs: Sequence[tuple[str, QueueKind]],
            resumed: bool = False) -> None:
    """Send the jobs' messages: the one way a job reaches the broker, on submit and
    again (`resumed`, to the queue drained first) when a worker's sweep finds its
    message or its worker lost. Consecutive jobs of one queue share a message, up to
    `jobs_per_message`; a message of one job is the job's own task (its id the
    job's), so that a lone job shows in Flower as itself.

    Raises BrokerUnavailable naming the jobs whose message was not sent."""
    if not jobs:
        return
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for kind, job_ids in _messages(jobs, app.settings.jobs_per_message):
                if len(job_ids) == 1:
                    args, task_id = [job_ids[0]], job_ids[0]
                else:
                    args, task_id = [job_ids], str(uuid.uuid4())
                app.send_task(TASK_NAME, args=args, task_id=task_id,
                              queue=app.queue_name(kind, resumed), producer=producer,
                              retry=True)
                sent += len(job_ids)
    except (BrokerError, OSError) as exc:
        raise BrokerUnavailable(
            f"could not enqueue {len(jobs) - sent} job(s) "
            f"on {mask_url(app.conf.broker_url)}: {exc}",
            [job_id for job_id, _ in jobs[sent:]],
        ) from exc


def _messages(jobs: Sequence[tuple[str, QueueKind]], per_message: int
              ) -> Iterator[tuple[QueueKind, list[str]]]:
    """Runs of consecutive jobs of one queue, `per_message` at most: the order
    jobs were submitted in is the order their messages go out."""
    for kind, run in groupby(jobs, key=lambda job: job[1]):
        ids = [job_id for job_id, _ in run]
        for start in range(0, len(ids), per_message):
            yield kind, ids[start:start + per_message]


def _cap(field: str, size: int, unit: str, limit: int, variable: str) -> None:
    if size > limit:
        raise InvalidJob(f"{field}: {size} {unit} is over {ENV_PREFIX}{variable} ({limit})")


class Client:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.app = create_app(self.settings)
        self.store = JobStore.from_url(self.settings.database_url)
        self._sessions = make_sessionmaker(self.store.engine)

    def close(self) -> None:
        self.store.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, prompt: str | list[int] | None = None,
               params: GenerationParams | Mapping[str, Any] | None = None, *,
               priority: int = 0, queue: QueueKind | str = QueueKind.INTERACTIVE,
               idempotency_key: str | None = None, deadline_s: float | None = None,
               chat: bool = False, messages: list[Mapping[str, str]] | None = None,
               stream: bool = False, ttl_s: float | None = None) -> str:
        """Validate, store and enqueue one job; returns its id. A job has a prompt, or
        chat `messages` ([{"role": "system" | "user" | "assistant", "content": ...}]).
        `stream`: its text can be read as it is generated (`stream`). `ttl_s`: not
        started within this many seconds, the job ends expired without running.

        Raises InvalidJob (naming the field) or BrokerUnavailable."""
        if isinstance(params, GenerationParams):
            params = params.model_dump()
        job = self.parse({"prompt": prompt, "params": dict(params or {}), "priority": priority,
                          "queue": queue, "idempotency_key": idempotency_key,
                          "deadline_s": deadline_s, "ttl_s": ttl_s, "chat": chat,
                          "stream": stream,
                          "messages": None if messages is None else list(messages)})
        return self._submit([job])[0]

    def submit_many(self, requests: Iterable[JobRequest | Mapping[str, Any]],
                    owner: JobOwner | None = None) -> list[str]:
        """Validate every request first, then store and enqueue them all; one id each.
        `owner`: the API key, batch and expiry the jobs belong to."""
        jobs = []
        for number, request in enumerate(requests):
            try:
                jobs.append(self.parse(request))
            except InvalidJob as exc:
                raise InvalidJob(f"job {number}: {exc}") from None
        return self._submit(jobs, owner)

    def parse(self, request: JobRequest | Mapping[str, Any]) -> JobRequest:
        """A valid request within this producer's size caps; InvalidJob naming the field."""
        job = parse_job(request if isinstance(request, JobRequest) else dict(request))
        s, params = self.settings, job.params
        if job.messages is not None:
            _cap("messages", sum(len(m.content) for m in job.messages), "characters",
                 s.max_prompt_chars, "MAX_PROMPT_CHARS")
        elif isinstance(job.prompt, str):
            _cap("prompt", len(job.prompt), "characters", s.max_prompt_chars, "MAX_PROMPT_CHARS")
        else:
            _cap("prompt", len(job.prompt), "token ids", s.max_prompt_token_ids,
                 "MAX_PROMPT_TOKEN_IDS")
        _cap("params.stop", len(params.stop or ()), "strings", s.max_stop, "MAX_STOP")
        _cap("params.stop_token_ids", len(params.stop_token_ids or ()), "ids", s.max_stop,
             "MAX_STOP")
        return job

    def _submit(self, jobs: list[JobRequest], owner: JobOwner | None = None) -> list[str]:
        submissions = self.store.create(jobs, owner=owner)
        fresh = [(s.job_id, job.queue)
                 for s, job in zip(submissions, jobs, strict=True) if s.created]
        try:
            publish(self.app, fresh)
        except BrokerUnavailable as exc:
            self.store.discard_unpublished(exc.unsent)
            raise
        return [s.job_id for s in submissions]

    def get(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job has finished; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = POLL_START_S
        while True:
            record = self.store.get(job_id)
            if record is None:
                raise KeyError(f"no job {job_id}")
            if record.finished:
                return record
            if deadline is not None and time.monotonic() + pause > deadline:
                raise TimeoutError(f"job {job_id} still {record.status.value} after {timeout} s")
            time.sleep(pause)
            pause = min(pause * 2, POLL_MAX_S)

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[StreamDelta]:
        """The job's output as it is generated (a job submitted with stream=True; any
        other job's arrives whole at its end), then what the stored output holds
        beyond it: the deltas of each completion concatenate to its stored text.
        Read the record with get() once it ends. KeyError for no such job;
        TimeoutError after `timeout` seconds; StreamDiverged if a retried attempt
        generated other text than was sent."""
        with redis.Redis.from_url(self.settings.broker_url, decode_responses=True) as r:
            for item in read_stream(r, job_id, lambda: self.store.get(job_id),
                                    timeout=timeout):
                if isinstance(item, StreamDelta):
                    yield item

    def cancel(self, job_id: str) -> bool:
        """Cancel a job. A queued job is cancelled at once; a running one is
        aborted by its worker's engine within a step. False if it had already
        finished (or does not exist)."""
        report = self.cancel_jobs([job_id])
        return bool(report.cancelled or report.flagged)

    def cancel_jobs(self, job_ids: Iterable[str]) -> CancelReport:
        """Cancel every unfinished job of these; the report counts what it did and
        names the ids that are no job."""
        with self._sessions() as session, session.begin():
            report = cancel_jobs(session, job_ids)
        report.unreached = not tell_workers(self.app, report.flagged)
        return report

    def cancel_batch(self, batch_id: str, *owned: ColumnElement[bool]) -> BatchCancel | None:
        """Cancel every unfinished job of an in-progress batch (worker/cancel.py);
        None: no such batch. `owned`: conditions the batch must meet (an API key's)."""
        with self._sessions() as session, session.begin():
            cancelled = cancel_batch(session, batch_id, *owned)
        if cancelled is not None:
            cancelled.report.unreached = not tell_workers(self.app, cancelled.report.flagged)
        return cancelled
