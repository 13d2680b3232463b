"""Producer side: bad input is rejected before anything is stored or enqueued."""

import pytest
import redis
from sqlalchemy import delete, func, select

from tests.worker.services import engine_fields, free_port, purge_queues
from worker.client import BrokerUnavailable, Client
from worker.migrate import run_alembic
from worker.models import Job
from worker.schemas import IdempotencyConflict, InvalidJob
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


@pytest.fixture(scope="module")
def pg_url(new_pg_database):
    url = new_pg_database()
    run_alembic(url)
    return url


@pytest.fixture
def pg_client(redis_url, pg_url, tiny_llama_dir):
    """On PostgreSQL, whose types reject what SQLite would store; emptied after each test."""
    with Client(load_settings(**engine_fields(tiny_llama_dir, database_url=pg_url,
                                              max_prompt_token_ids=64, max_prompt_chars=64,
                                              max_stop=4))) as c:
        yield c
        purge_queues(c)
        with c.store.engine.begin() as db:
            db.execute(delete(Job))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"prompt": "x", "params": {"temperature": float("inf")}}, "params.temperature"),
    ({"prompt": "x", "params": {"top_p": float("nan")}}, "params.top_p"),
    ({"prompt": "x", "params": {"n": 2, "temperature": 0}}, "params.n"),
    ({"prompt": "x", "params": {"seed": 2**70}}, "params.seed"),
    ({"prompt": "x", "params": {"logprobs": 10**6}}, "params.logprobs"),
    ({"prompt": "x", "params": {"structured_outputs": {"json": {"type": "nope"}}}},
     "params.structured_outputs.json"),
    ({"prompt": "x", "params": {"structured_outputs": {"regex": "a("}}},
     "params.structured_outputs.regex"),
    ({"prompt": "x", "params": {"structured_outputs": {"grammar": "root ::= x"}}},
     "params.structured_outputs.grammar"),
    ({"prompt": "x", "params": {"max_token": 5}}, "params.max_token"),
    ({"prompt": "x", "params": {"stop": ["ok", "\ud800"]}}, "params.stop"),
    ({"prompt": "x", "params": {"stop": ["nul\x00"]}}, "params.stop"),
    ({"prompt": "x", "params": {"stop": ["a", "b", "c", "d", "e"]}}, "PAGEDQ_MAX_STOP"),
    ({"prompt": "x", "params": {"stop_token_ids": list(range(5))}}, "PAGEDQ_MAX_STOP"),
    ({"prompt": list(range(65))}, "PAGEDQ_MAX_PROMPT_TOKEN_IDS"),
    ({"prompt": [2**40]}, "prompt"),
    ({"prompt": "lone \udfff surrogate"}, "prompt"),
    ({"prompt": "x", "idempotency_key": "key-\ud800"}, "idempotency_key"),
    ({"prompt": "x", "idempotency_key": "key-\x00"}, "idempotency_key"),
    ({"prompt": "x", "deadline_s": float("inf")}, "deadline_s"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
     "messages.1.role"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user"}]},
     "messages.1.content"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 70}]}, "PAGEDQ_MAX_PROMPT_CHARS"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ({}, "prompt"),
    ({"messages": [{"role": "user", "content": "x"}], "chat": True}, "chat"),
    ({"prompt": "x", "params": {"beam_width": 0}}, "params.beam_width"),
    ({"prompt": "x", "params": {"beam_width": 2, "temperature": 0.7}}, "params.temperature"),
    ({"prompt": "x", "params": {"beam_width": 2, "n": 2, "temperature": 0.7}}, "params.n"),
    ({"prompt": "x", "params": {"beam_width": 2, "top_p": 0.5}}, "params.top_p"),
    ({"prompt": "x", "params": {"length_penalty": 2.0}}, "params.length_penalty"),
    ({"prompt": "x", "params": {"prompt_logprobs": 21}}, "params.prompt_logprobs"),
    ({"prompt": "x", "params": {"beam_width": 2, "prompt_logprobs": 1}},
     "params.prompt_logprobs"),
    ({"prompt": "x", "params": {"beam_width": 2, "length_penalty": float("nan")}},
     "params.length_penalty"),
])
def test_what_the_worker_or_database_would_refuse_is_refused_at_submit(pg_client, kwargs,
                                                                        field):
    with pytest.raises(InvalidJob, match=field.replace(".", r"\.")):
        pg_client.submit(**kwargs)
    assert job_count(pg_client) == 0
    assert queue_length(pg_client) == 0


def test_a_reused_idempotency_key_with_other_work_is_a_conflict(pg_client):
    first = pg_client.submit("summarise this", idempotency_key="doc-7")
    assert pg_client.submit("summarise this", idempotency_key="doc-7") == first
    with pytest.raises(IdempotencyConflict, match="'doc-7'"):
        pg_client.submit("summarise that", idempotency_key="doc-7")
    assert job_count(pg_client) == 1 and queue_length(pg_client) == 1


def test_submit_many_is_all_or_nothing(pg_client):
    jobs = [{"prompt": f"doc {i}"} for i in range(700)]
    jobs[600] = {"prompt": "doc 600", "params": {"temperature": float("inf")}}
    with pytest.raises(InvalidJob, match=r"job 600: params\.temperature"):
        pg_client.submit_many(jobs)
    pg_client.submit("taken", idempotency_key="k")
    jobs[600] = {"prompt": "other work", "idempotency_key": "k"}
    with pytest.raises(IdempotencyConflict):
        pg_client.submit_many(jobs)  # found in the database, past the first insert chunk
    assert job_count(pg_client) == 1 and queue_length(pg_client) == 1
