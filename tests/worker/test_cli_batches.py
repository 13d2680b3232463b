"""`pagedq batch` and `pagedq run` file every job under a batch whose id they print first, a
re-run of a stopped run resumes it, and the gateway never shows it; `pagedq cancel` ends
queued jobs, flags running ones and leaves finished ones, by id or by batch."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.worker.services import as_env, engine_fields, private_queues
from worker.bulk_batch import BulkBatches
from worker.cli import main
from worker.client import Client
from worker.gateway.batch_store import BatchStore
from worker.job_rows import JobOwner
from worker.keys import KeyStore
from worker.migrate import run_alembic
from worker.models import Batch, BatchStatus, Job, JobStatus
from worker.records import Completion, JobMetrics
from worker.schemas import parse_job
from worker.store import JobStore

ANNOUNCED = re.compile(r"^batch (batch_[0-9a-f]{24}): (\d+) jobs \((\d+) already done(, "
                       r"resumed)?\)$", re.M)
DOCS = [{"id": f"doc-{i}", "text": f"Document {i} is about topic {i}."} for i in range(3)]


def write_docs(path: Path) -> Path:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS) + "{not json\n")
    return path


def announced(err: str) -> tuple[str, int, int, bool]:
    match = ANNOUNCED.search(err)
    assert match, err
    return match[1], int(match[2]), int(match[3]), match[4] is not None


def batch_of(store: JobStore, batch_id: str) -> tuple[Batch, dict[str, Job]]:
    with Session(store.engine) as session:
        batch = session.get_one(Batch, batch_id)
        jobs = {job.id: job for job in session.scalars(select(Job).where(
            Job.batch_id == batch_id))}
    return batch, jobs


def set_env(monkeypatch: pytest.MonkeyPatch, fields: dict) -> None:
    for name, value in as_env(fields).items():
        monkeypatch.setenv(name, value)


def test_run_files_its_jobs_under_the_printed_batch_and_a_rerun_resumes_it(
        tmp_path, tiny_llama_dir, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    set_env(monkeypatch, engine_fields(tiny_llama_dir, database_url=url))
    docs, out = write_docs(tmp_path / "docs.jsonl"), tmp_path / "res.jsonl"
    argv = ["run", str(docs), "-o", str(out), "--max-tokens", "3", "--temperature", "0", "-q"]
    assert main(argv) == 0
    batch_id, jobs, done, resumed = announced(capsys.readouterr().err)
    assert (jobs, done, resumed) == (3, 0, False)
    first = [json.loads(line) for line in out.read_text().splitlines()]
    store = JobStore.from_url(url)
    try:
        batch, rows = batch_of(store, batch_id)
        assert set(rows) == {line["job_id"] for line in first}
        assert batch.api_key_id is None and batch.endpoint == "pagedq run"
        assert batch.status == BatchStatus.COMPLETED and batch.completed_at is not None
        assert batch.total == 4 and [e["line"] for e in batch.line_errors] == [4]

        # The run stopped before its end: the re-run finds its batch through its jobs.
        with store.engine.begin() as db:
            db.execute(update(Batch).where(Batch.id == batch_id)
                       .values(status=BatchStatus.IN_PROGRESS, completed_at=None))
        out.write_text(json.dumps(first[0]) + "\n")
        assert main(argv) == 0
        assert announced(capsys.readouterr().err) == (batch_id, 2, 1, True)
        assert batch_of(store, batch_id)[0].status == BatchStatus.COMPLETED

        # An ended batch stays ended: a re-run is a batch of its own.
        out.write_text(json.dumps(first[0]) + "\n")
        assert main(argv) == 0
        again, jobs, _, resumed = announced(capsys.readouterr().err)
        assert again != batch_id and (jobs, resumed) == (2, False)
    finally:
        store.close()


def test_batch_files_its_jobs_under_the_printed_batch_hidden_from_the_gateway(
        pg_stack, tmp_path, monkeypatch, capsys):
    set_env(monkeypatch, pg_stack.fields)
    docs, out = write_docs(tmp_path / "docs.jsonl"), tmp_path / "res.jsonl"
    assert main(["batch", str(docs), "-o", str(out), "--max-tokens", "3", "-q"]) == 0
    batch_id, jobs, _, _ = announced(capsys.readouterr().err)
    assert jobs == 3
    batch, rows = batch_of(pg_stack.client.store, batch_id)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows) == {line["job_id"] for line in lines}
    assert batch.endpoint == "pagedq batch" and batch.status == BatchStatus.COMPLETED

    keys = KeyStore(pg_stack.settings.database_url)
    try:
        key, _ = keys.create(f"cli-batches-{batch_id}")
    finally:
        keys.close()
    gateway = BatchStore(pg_stack.client, pg_stack.settings.model)
    listed = gateway.list_batches(key.id, 100, None)
    assert listed is not None and batch_id not in {b["id"] for b in listed["data"]}
    assert gateway.get_batch(key.id, batch_id) is None
    assert gateway.cancel_batch(key.id, batch_id) is None


@pytest.fixture
def cli_env(store: JobStore, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI on the `store` database (PostgreSQL, then SQLite) and Redis, no worker."""
    set_env(monkeypatch, {"database_url": store.engine.url.render_as_string(False),
                          "broker_url": redis_url, **private_queues()})
    yield


def new_jobs(store: JobStore, names: str, batch_id: str | None = None) -> dict[str, str]:
    requests = [parse_job({"prompt": name, "params": {"max_tokens": 4}}) for name in names]
    made = store.create(requests, published=False, owner=JobOwner(batch_id=batch_id))
    return {name: s.job_id for name, s in zip(names, made, strict=True)}


def finish_one(store: JobStore, job_id: str) -> None:
    """Play the worker: run `job_id` to success."""
    spec = store.claim(job_id, "test", 3, 60).spec
    assert spec is not None
    assert store.finish(spec.id, spec.lease_id, JobStatus.SUCCEEDED,
                        outputs=[Completion(0, "done", [1, 2], "length")],
                        metrics=JobMetrics(1, 0.0, 0.1, 0.01, 0.2, 3, 2, 0, 0, 0, 0))


def test_cancel_batch_ends_queued_flags_running_keeps_finished(store, cli_env, tmp_path,
                                                               capsys):
    batch_id = BulkBatches(store.engine).open(
        "pagedq batch", [], tmp_path / "docs.jsonl", tmp_path / "out.jsonl", [], 3).id
    jobs = new_jobs(store, "abc", batch_id)
    outsider = new_jobs(store, "x")["x"]
    finish_one(store, jobs["a"])
    running = store.claim(jobs["b"], "test", 3, 60).spec
    assert running is not None

    assert main(["cancel", "--batch", batch_id]) == 0
    assert capsys.readouterr().out.strip() == (
        f"batch {batch_id} (cancelling): 1 queued cancelled, 1 running told to stop, "
        "1 already finished (untouched)")
    batch, rows = batch_of(store, batch_id)
    assert batch.status == BatchStatus.CANCELLING
    done = store.get(jobs["a"])
    assert done.status is JobStatus.SUCCEEDED and done.text == "done"
    assert rows[jobs["b"]].status == JobStatus.RUNNING and rows[jobs["b"]].cancel_requested
    assert rows[jobs["c"]].status == JobStatus.CANCELLED
    assert rows[jobs["c"]].error == "cancelled with its batch"
    assert store.get(outsider).status is JobStatus.QUEUED  # not of the batch

    # The worker aborts "b"; nothing runs anymore, so the next cancel ends the batch.
    assert store.finish(running.id, running.lease_id, JobStatus.CANCELLED)
    assert main(["cancel", "--batch", batch_id]) == 0
    assert f"batch {batch_id} (cancelled): 0 queued cancelled" in capsys.readouterr().out
    assert batch_of(store, batch_id)[0].cancelled_at is not None
    assert main(["cancel", "--batch", batch_id]) == 0
    assert capsys.readouterr().out.strip() == f"batch {batch_id} is cancelled: nothing to cancel"


def test_cancel_jobs_by_id_and_unknown_ids(store, cli_env, capsys):
    jobs = new_jobs(store, "qrf")
    finish_one(store, jobs["f"])
    assert store.claim(jobs["r"], "test", 3, 60).spec is not None

    assert main(["cancel", jobs["q"], jobs["r"], jobs["f"], "no-such-job"]) == 1
    captured = capsys.readouterr()
    assert "pagedq: no job 'no-such-job'" in captured.err
    assert captured.out.strip() == ("3 job(s): 1 queued cancelled, 1 running told to stop, "
                                    "1 already finished (untouched)")
    assert store.get(jobs["q"]).status is JobStatus.CANCELLED
    running = store.get(jobs["r"])
    assert running.status is JobStatus.RUNNING
    assert store.get(jobs["f"]).status is JobStatus.SUCCEEDED

    assert main(["cancel", "--batch", "batch_missing"]) == 1
    assert "pagedq: no batch 'batch_missing'" in capsys.readouterr().err
    with Client() as client:  # the same settings, from the environment
        assert not client.cancel(jobs["q"])  # already finished
        assert client.cancel(jobs["r"])  # still running: flagged again


def test_cancel_says_when_the_workers_could_not_be_told(sqlite_url, monkeypatch, capsys):
    run_alembic(sqlite_url)
    store = JobStore.from_url(sqlite_url)
    try:
        job_id = new_jobs(store, "r")["r"]
        assert store.claim(job_id, "test", 3, 60).spec is not None
        set_env(monkeypatch, {"database_url": sqlite_url, "broker_url": "redis://127.0.0.1:1/0"})
        assert main(["cancel", job_id]) == 0  # flagged: no retry will run it
        assert "1 running flagged (the broker was not reached" in capsys.readouterr().out
        assert store.get(job_id).status is JobStatus.RUNNING
    finally:
        store.close()
