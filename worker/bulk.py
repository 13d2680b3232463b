"""Bulk jobs over a JSONL file, through the queue (`batch`) or in-process (`run`).

Both write every job to SQL with an idempotency key derived from the
document, so a re-run of the same file finds the jobs of the earlier run
instead of redoing them, and skips the ids already in the output file.
Every job of a run belongs to its batch (worker/bulk_batch.py), whose id is
printed first: `pagedq cancel --batch ID` stops the run's work.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TextIO

from tqdm import tqdm

from worker.bulk_batch import BulkBatches, OpenBatch
from worker.client import Client
from worker.documents import (
    BadLine,
    Document,
    JobOptions,
    finished_ids,
    read_documents,
    result_line,
)
from worker.executor import JobRunner
from worker.job_rows import JobOwner
from worker.models import JobStatus, utcnow
from worker.records import JobRecord
from worker.store import JobStore

POLL_S = 0.2


class Backend(Protocol):
    endpoint: str  # the command, as its batch records it
    store: JobStore

    def submit(self, documents: list[Document], owner: JobOwner) -> list[str]: ...
    def results(self, job_ids: list[str]) -> Iterator[JobRecord]: ...


class QueueBackend:
    """Jobs go through Redis to whatever workers are running."""

    endpoint = "pagedq batch"

    def __init__(self, client: Client) -> None:
        self.client = client
        self.store = client.store

    def submit(self, documents: list[Document], owner: JobOwner) -> list[str]:
        return self.client.submit_many([d.request for d in documents], owner)

    def results(self, job_ids: list[str]) -> Iterator[JobRecord]:
        pending = set(job_ids)
        while pending:
            finished = self.client.store.get_many(pending, finished_only=True)
            for record in finished:
                pending.discard(record.id)
                yield record
            if pending and not finished:
                time.sleep(POLL_S)


class LocalBackend:
    """Jobs run in this process on a thread pool, through the same JobRunner as a worker."""

    endpoint = "pagedq run"

    def __init__(self, runner: JobRunner, threads: int) -> None:
        self.runner = runner
        self.threads = threads
        self.store = runner.store

    def submit(self, documents: list[Document], owner: JobOwner) -> list[str]:
        # This process runs them itself: should a worker share the database,
        # its sweep must not send them to the queue.
        jobs = self.store.create([d.request for d in documents], published=False, owner=owner)
        return [s.job_id for s in jobs]

    def results(self, job_ids: list[str]) -> Iterator[JobRecord]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="pagedq-job") as pool:
            futures = {pool.submit(self.runner.run, job_id, "local"): job_id for job_id in job_ids}
            for future in as_completed(futures):
                future.result()
                record = self.runner.store.get(futures[future])
                assert record is not None
                yield record


@dataclass(slots=True)
class Summary:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0  # not started before their ttl: they never ran
    skipped_lines: int = 0
    already_done: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Tokens of the jobs that finished during this run: a job done by an earlier run
    # (its line written again from the database) costs this run no generation.
    generated_now: int = 0
    wall_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    started_at: datetime = field(default_factory=utcnow)

    @property
    def all_succeeded(self) -> bool:
        return self.succeeded == self.requests

    def add(self, record: JobRecord) -> None:
        self.requests += 1
        if record.status is JobStatus.SUCCEEDED:
            self.succeeded += 1
        elif record.status is JobStatus.CANCELLED:
            self.cancelled += 1
        elif record.status is JobStatus.EXPIRED:
            self.expired += 1
        else:
            self.failed += 1
        if record.metrics is not None:
            self._add_metrics(record)

    def _add_metrics(self, record: JobRecord) -> None:
        assert record.metrics is not None
        self.prompt_tokens += record.metrics.prompt_tokens
        self.generated_tokens += record.metrics.generated_tokens
        finished = record.finished_at
        # SQLite hands back naive datetimes; every stored time is UTC.
        if finished is not None and finished.tzinfo is None:
            finished = finished.replace(tzinfo=UTC)
        if finished is not None and finished >= self.started_at:
            self.generated_now += record.metrics.generated_tokens
        if record.metrics.ttft_s is not None:
            self.ttfts.append(record.metrics.ttft_s)

    def outcomes(self) -> str:
        """"6 (4 succeeded, 1 failed, 1 expired)": cancelled and expired when there are any."""
        counts = [f"{self.succeeded} succeeded", f"{self.failed} failed"]
        counts += [f"{n} {name}" for n, name in ((self.cancelled, "cancelled"),
                                                 (self.expired, "expired")) if n]
        return f"{self.requests} ({', '.join(counts)})"

    def table(self) -> str:
        rate = self.generated_now / self.wall_s if self.wall_s > 0 else 0.0
        ttft = f"{sum(self.ttfts) / len(self.ttfts):.3f} s" if self.ttfts else "-"
        rows = [
            ("requests", self.outcomes()),
            ("already done", str(self.already_done)),
            ("skipped lines", str(self.skipped_lines)),
            ("prompt tokens", str(self.prompt_tokens)),
            ("generated tokens", str(self.generated_tokens)),
            ("wall time", f"{self.wall_s:.2f} s"),
            ("tokens/s", f"{rate:.1f} (jobs that ran now)"),
            ("mean TTFT", ttft),
        ]
        width = max(len(name) for name, _ in rows)
        rule = "-" * (width + 2 + max(len(value) for _, value in rows))
        return "\n".join([rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])


def run_bulk(docs: Path, out: Path, options: JobOptions, backend: Backend,
             errors: TextIO | None = None, progress: bool = True) -> Summary:
    errors = errors or sys.stderr
    summary = Summary()
    todo, bad = _read(docs, out, options, summary, errors)
    batches = BulkBatches(backend.store.engine)
    batch = batches.open(backend.endpoint, [d.request.idempotency_key or "" for d in todo],
                         docs, out, bad, len(todo) + summary.already_done + len(bad))
    print(_announce(batch, len(todo), summary.already_done), file=errors, flush=True)
    started = time.perf_counter()
    job_ids = backend.submit(todo, JobOwner(batch_id=batch.id))
    doc_ids = {job_id: doc.id for job_id, doc in zip(job_ids, todo, strict=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as sink, \
            tqdm(total=len(todo), desc="documents", unit="doc", disable=not progress) as bar:
        for record in backend.results(list(doc_ids)):
            summary.add(record)
            bar.update(1)
            if record.status is JobStatus.SUCCEEDED:
                sink.write(json.dumps(result_line(doc_ids[record.id], record)) + "\n")
                sink.flush()  # a crash loses at most the line being written
            else:
                print(f"document {doc_ids[record.id]!r} (job {record.id}): "
                      f"{record.status.value}: {record.error}", file=errors)
    summary.wall_s = time.perf_counter() - started
    batches.close(batch.id)
    return summary


def _read(docs: Path, out: Path, options: JobOptions, summary: Summary,
          errors: TextIO) -> tuple[list[Document], list[BadLine]]:
    """The documents still to run, and the bad lines (each reported on `errors`)."""
    done = finished_ids(out)
    todo: list[Document] = []
    bad: list[BadLine] = []
    for item in read_documents(docs, options):
        if isinstance(item, BadLine):
            bad.append(item)
            print(f"{docs}: {item} (skipped)", file=errors)
        elif item.id in done:
            summary.already_done += 1
        else:
            todo.append(item)
    summary.skipped_lines = len(bad)
    return todo, bad


def _announce(batch: OpenBatch, jobs: int, already_done: int) -> str:
    resumed = ", resumed" if batch.resumed else ""
    return f"batch {batch.id}: {jobs} jobs ({already_done} already done{resumed})"
