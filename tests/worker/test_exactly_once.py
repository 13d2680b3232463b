"""Every job ends exactly once, whatever its neighbours do: poison jobs, duplicate
messages, frozen and dying workers. Real Redis, PostgreSQL and worker processes."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable

from sqlalchemy import func, select

from tests.worker.services import WorkerProcess, engine_fields, purge_queues, stack
from worker.client import Client, publish
from worker.migrate import run_alembic
from worker.models import JobStatus, Metrics, Output
from worker.schemas import QueueKind
from worker.settings import load_settings

LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def status(client: Client, job_id: str) -> JobStatus:
    record = client.get(job_id)
    assert record is not None
    return record.status


def result_sets(client: Client, job_ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Output rows and metrics rows per job: exactly once means one of each."""
    with client.store.engine.connect() as db:
        outputs = dict(db.execute(select(Output.job_id, func.count())
                                  .where(Output.job_id.in_(job_ids))
                                  .group_by(Output.job_id)).all())
        metrics = dict(db.execute(select(Metrics.job_id, func.count())
                                  .where(Metrics.job_id.in_(job_ids))
                                  .group_by(Metrics.job_id)).all())
    return outputs, metrics


def test_a_poison_job_fails_alone(pg_stack):
    client = pg_stack.client
    healthy = client.submit_many([{"prompt": f"healthy {i}",
                                   "params": {"max_tokens": 8, "temperature": 0}}
                                  for i in range(20)])
    # Passes every producer check (the producer does not know the vocabulary);
    # it used to raise inside the engine's step and fail every job beside it.
    poison = client.submit("poison", {"stop_token_ids": [1_000_000_000], "min_tokens": 2})
    records = [client.wait(job_id, timeout=120) for job_id in healthy]
    assert [(r.status, r.attempts) for r in records] == [(JobStatus.SUCCEEDED, 1)] * 20
    bad = client.wait(poison, timeout=60)
    assert bad.status is JobStatus.FAILED and bad.attempts == 1
    assert "stop_token_ids" in bad.error


def test_duplicate_deliveries_leave_the_running_attempt_alone(pg_stack):
    client = pg_stack.client
    job_id = client.submit("duplicated", LONG)
    wait_for(lambda: status(client, job_id) is JobStatus.RUNNING, 60, "the job to start")
    # Three more copies of its message, as a sweep, Flower or any Redis client can send.
    publish(client.app, [(job_id, QueueKind.INTERACTIVE)] * 3)
    record = client.wait(job_id, timeout=120)
    assert record.status is JobStatus.SUCCEEDED and record.attempts == 1
    assert len(record.outputs[0].token_ids) == LONG["max_tokens"]
    assert result_sets(client, [job_id]) == ({job_id: 1}, {job_id: 1})


def test_cancel_and_deadline_give_every_block_back(pg_stack):
    client = pg_stack.client
    cancelled = client.submit("cancel me", LONG)
    timed_out = client.submit("too slow", LONG, deadline_s=0.5)
    wait_for(lambda: status(client, cancelled) is JobStatus.RUNNING, 60, "the job to start")
    wait_for(lambda: pg_stack.worker.engine_stats(client)["kv_blocks_used"] > 0, 30,
             "the job to hold blocks in the engine")
    assert client.cancel(cancelled)
    assert client.wait(cancelled, timeout=60).status is JobStatus.CANCELLED
    deadline = client.wait(timed_out, timeout=60)
    assert deadline.status is JobStatus.FAILED and "deadline" in deadline.error
    wait_for(lambda: pg_stack.worker.engine_stats(client)["kv_blocks_used"] == 0, 30,
             "the engine to free the blocks of the cancelled and the timed-out job")


def test_a_frozen_worker_cannot_write_over_the_attempt_that_took_over(
        redis_url, new_pg_database, tiny_llama_dir, tmp_path):
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(),
                           lease_s=2, sweep_interval_s=0.5)
    with stack(fields, tmp_path, "frozen") as running:
        client = running.client
        job_id = client.submit("frozen mid-job", {**LONG, "max_tokens": 600})
        wait_for(lambda: status(client, job_id) is JobStatus.RUNNING, 60, "the job to start")
        frozen = running.worker
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        rescuer = WorkerProcess(fields, tmp_path, "rescuer")
        try:
            rescuer.start(client)
            record = client.wait(job_id, timeout=120)
            assert record.status is JobStatus.SUCCEEDED and record.worker == rescuer.hostname
            frozen.process.send_signal(signal.SIGCONT)
            # Awake, it finds its lease gone and drops its attempt, whether its renewal
            # notices first or the attempt ends first and its fenced write is refused.
            wait_for(lambda: any(sign in frozen.log_tail(20_000) for sign in
                                 ("lease lost", "lost its lease to a newer attempt")), 30,
                     "the frozen worker to notice its lost lease")
            wait_for(lambda: frozen.engine_stats(client)["jobs_in_engine"] == 0, 30,
                     "the frozen worker to abort its stale attempt")
        finally:
            frozen.process.send_signal(signal.SIGCONT)
            rescuer.stop()
        again = client.get(job_id)
        assert again is not None and again.worker == rescuer.hostname
        assert again.status is JobStatus.SUCCEEDED and again.attempts == 2
        assert result_sets(client, [job_id]) == ({job_id: 1}, {job_id: 1})


# Installed into the dying worker's interpreter only: its engine loop dies as
# soon as it holds a job, the way an unexpected bug in the loop would kill it.
KILL_THE_LOOP = textwrap.dedent("""
    from worker import engine_service

    original = engine_service.EngineService._refresh_stats

    def _refresh_stats(self):
        if self._live:
            raise RuntimeError("injected: the engine loop breaks")
        original(self)

    engine_service.EngineService._refresh_stats = _refresh_stats
""")


def test_a_worker_whose_engine_loop_died_gives_its_jobs_back_and_exits(
        redis_url, new_pg_database, tiny_llama_dir, tmp_path):
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(), lease_s=2,
                           sweep_interval_s=0.5)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_THE_LOOP)
    python_path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    settings = load_settings(**fields)
    run_alembic(settings.database_url)
    with Client(settings) as client:
        dying = WorkerProcess(fields, tmp_path, "dying", extra_env={"PYTHONPATH": python_path})
        rescuer = WorkerProcess(fields, tmp_path, "rescuer")
        try:
            dying.start(client)
            job_id = client.submit("outlives its worker", {"max_tokens": 8, "temperature": 0})
            assert dying.process is not None
            code = dying.process.wait(timeout=120)
            assert code != 0, dying.log_tail()
            assert "engine loop died" in dying.log_tail(20_000)
            # Given back uncharged: the loop's death was not the job's fault.
            rescuer.start(client)
            record = client.wait(job_id, timeout=90)
        finally:
            dying.stop()
            rescuer.stop()
            purge_queues(client)
        assert record.status is JobStatus.SUCCEEDED and record.attempts == 1
        assert record.worker == rescuer.hostname
        assert result_sets(client, [job_id]) == ({job_id: 1}, {job_id: 1})
