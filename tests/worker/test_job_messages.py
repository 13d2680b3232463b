"""Jobs submitted together travel several to a Celery message, and still run once each."""

import time

import pytest

from tests.worker.services import engine_fields, purge_queues, queued_messages, stack
from worker.celery_app import TASK_NAME
from worker.client import Client, publish
from worker.migrate import run_alembic
from worker.models import JobStatus
from worker.schemas import QueueKind
from worker.settings import SettingsError, load_settings

PER_MESSAGE = 3


@pytest.fixture
def client(redis_url, sqlite_url, tiny_llama_dir):
    run_alembic(sqlite_url)
    fields = engine_fields(tiny_llama_dir, database_url=sqlite_url,
                           jobs_per_message=PER_MESSAGE)
    with Client(load_settings(**fields)) as c:
        yield c
        purge_queues(c)


def test_jobs_submitted_together_share_messages_in_order(client):
    kinds = ["bulk"] * 4 + ["interactive"] * 2 + ["bulk"] * 3
    ids = client.submit_many([{"prompt": f"doc {i}", "queue": kind}
                              for i, kind in enumerate(kinds)])
    bulk = queued_messages(client, client.settings.bulk_queue)
    interactive = queued_messages(client, client.settings.interactive_queue)
    # Runs of one queue, cut at PER_MESSAGE; a job alone is its message's task.
    assert [args for _, args in bulk] == [ids[0:3], ids[3], ids[6:9]]
    assert bulk[1][0] == ids[3]
    assert not {task_id for task_id, _ in bulk} & (set(ids) - {ids[3]})
    assert interactive == [(interactive[0][0], ids[4:6])]
    # One job submitted alone: args and task id as they always were.
    alone = client.submit("alone")
    assert queued_messages(client, client.settings.interactive_queue)[-1] == (alone, alone)


def test_jobs_per_message_must_be_positive(monkeypatch):
    monkeypatch.setenv("PAGEDQ_JOBS_PER_MESSAGE", "0")
    with pytest.raises(SettingsError, match="PAGEDQ_JOBS_PER_MESSAGE"):
        load_settings()


def test_a_message_of_many_jobs_runs_each_once(redis_url, new_pg_database, tiny_llama_dir,
                                               tmp_path):
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(),
                           jobs_per_message=PER_MESSAGE)
    with stack(fields, tmp_path, "many") as running:
        client = running.client
        requests = [{"prompt": f"story {i}", "params": {"max_tokens": 5, "temperature": 0},
                     "queue": "bulk"} for i in range(7)]
        requests[4] = {"prompt": "bad", "params": {"max_tokens": 5, "stop_token_ids": [10**9]},
                       "queue": "bulk"}
        ids = client.submit_many(requests)
        records = [client.wait(job_id, timeout=60) for job_id in ids]
        # A job the engine refuses fails alone; its message's other jobs run.
        assert records[4].status is JobStatus.FAILED and "stop_token_ids" in records[4].error
        for record in records[:4] + records[5:]:
            assert record.status is JobStatus.SUCCEEDED, record.error
            assert record.attempts == 1 and len(record.outputs[0].token_ids) == 5
        # The same jobs delivered again (a redelivered message): nothing runs twice.
        publish(client.app, [(job_id, QueueKind.BULK) for job_id in ids[:PER_MESSAGE]])
        _wait_until_idle(running, messages=4)  # 3, 3 and 1 jobs, then the copy
        after = {r.id: r for r in client.store.get_many(ids)}
        for before in records:
            assert after[before.id].attempts == 1
            assert after[before.id].finished_at == before.finished_at


def _wait_until_idle(running, messages: int, timeout: float = 30.0) -> None:
    """Until the worker has taken `messages` messages and runs none."""
    inspect = running.client.app.control.inspect(destination=[running.worker.hostname],
                                                 timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        taken = inspect.stats()[running.worker.hostname]["total"].get(TASK_NAME, 0)
        if taken >= messages and not inspect.active()[running.worker.hostname]:
            return
        assert time.monotonic() < deadline, f"{taken} messages taken"
        time.sleep(0.1)
