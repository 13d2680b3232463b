"""Producer side: bad input is rejected before anything is stored or enqueued."""

import pytest
import redis
from sqlalchemy import func, select

from tests.worker.services import engine_fields, free_port, purge_queues
from worker.client import BrokerUnavailable, Client
from worker.migrate import run_alembic
from worker.models import Job
from worker.schemas import InvalidJob
from worker.settings import load_settings


@pytest.fixture
def client(redis_url, sqlite_url, tiny_llama_dir):
    run_alembic(sqlite_url)
    with Client(load_settings(**engine_fields(tiny_llama_dir, database_url=sqlite_url))) as c:
        yield c
        purge_queues(c)


def job_count(client):
    with client.store.engine.connect() as db:
        return db.scalar(select(func.count()).select_from(Job))


def queue_length(client, kind="interactive_queue"):
    return redis.Redis.from_url(client.settings.broker_url).llen(getattr(client.settings, kind))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": "x", "params": {"temperature": -0.5}}, "params.temperature"),
    ({"prompt": "x", "params": {"n": 0}}, "params.n"),
    ({"prompt": "x", "params": {"nucleus": 0.9}}, "params.nucleus"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "queue": "realtime"}, "queue"),
])
def test_invalid_submit_stores_and_enqueues_nothing(client, kwargs, field):
    with pytest.raises(InvalidJob, match=field.replace(".", r"\.")):
        client.submit(**kwargs)
    assert job_count(client) == 0
    assert queue_length(client) == 0


def test_oversize_prompt_is_rejected_at_submit(client):
    limit = client.settings.max_prompt_chars
    with pytest.raises(InvalidJob, match="PAGEDQ_MAX_PROMPT_CHARS"):
        client.submit("x" * (limit + 1))
    assert job_count(client) == 0


def test_one_bad_job_rejects_the_whole_bulk_submit(client):
    with pytest.raises(InvalidJob, match=r"job 1: params\.top_p"):
        client.submit_many([{"prompt": "fine"}, {"prompt": "bad", "params": {"top_p": 2}}])
    assert job_count(client) == 0


def test_submit_writes_the_row_then_publishes(client):
    job_id = client.submit("hello", {"max_tokens": 4}, queue="bulk", priority=3)
    record = client.get(job_id)
    assert record.status.value == "queued" and record.queue == "bulk" and record.priority == 3
    assert queue_length(client, "bulk_queue") == 1 and queue_length(client) == 0
    # The same idempotency key twice: one job, one message.
    first = client.submit("once", idempotency_key="order-42")
    assert client.submit("once", idempotency_key="order-42") == first
    assert queue_length(client) == 1
    assert client.cancel(job_id) and client.get(job_id).status.value == "cancelled"


def test_redis_down_at_submit_leaves_no_orphan(sqlite_url, tiny_llama_dir):
    run_alembic(sqlite_url)
    fields = engine_fields(tiny_llama_dir, database_url=sqlite_url,
                           broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with Client(load_settings(**fields)) as down:
        with pytest.raises(BrokerUnavailable, match="could not enqueue"):
            down.submit("hello")
        with pytest.raises(BrokerUnavailable):
            down.submit_many([{"prompt": f"doc {i}"} for i in range(3)])
        assert job_count(down) == 0
