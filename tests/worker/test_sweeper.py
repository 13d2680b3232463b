"""The sweep for lost messages on real Redis: a job whose message is gone goes back
on its queue, as the client sent it, once; a worker then runs it."""

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tests.worker.services import (
    backdate,
    engine_fields,
    free_port,
    private_queues,
    purge_queues,
    queued_job_ids,
    stack,
)
from worker.celery_app import create_app
from worker.client import Client
from worker.models import JobStatus
from worker.schemas import QueueKind, parse_job
from worker.settings import load_settings
from worker.store import JobStore
from worker.sweeper import Sweeper


@pytest.fixture
def client(store, redis_url):
    """A client on the `store` database (PostgreSQL, then SQLite) and queues of its own."""
    url = store.engine.url.render_as_string(hide_password=False)
    settings = load_settings(broker_url=redis_url, database_url=url, republish_after_s=60,
                             **private_queues())
    with Client(settings) as c:
        yield c
        purge_queues(c)


def broker(client):
    return redis.Redis.from_url(client.settings.broker_url)


def lost_jobs(client, count):
    """Queued rows whose message went out an hour ago and is gone."""
    ids = [s.job_id for s in client.store.create([parse_job({"prompt": f"lost {i}"})
                                                  for i in range(count)])]
    backdate(client.store, ids)
    return ids


def essentials(message):
    """What makes a message run a job: task, id, arguments, priority and queue."""
    headers, properties = message["headers"], message["properties"]
    return (headers["task"], headers["id"], message["body"], properties.get("priority"),
            properties["delivery_info"]["routing_key"])


def test_a_lost_message_is_sent_again_as_the_client_sent_it(client, caplog):
    job_id = client.submit("lost on the way", {"max_tokens": 4}, queue="bulk", priority=3)
    bulk = client.settings.bulk_queue
    original = json.loads(broker(client).rpop(bulk))  # the message Redis loses
    backdate(client.store, [job_id])
    sweeper = Sweeper(client.store, client.app)
    with caplog.at_level(logging.INFO, logger="worker.sweeper"):
        assert sweeper.sweep() == [job_id]
    assert f"job {job_id} re-published" in caplog.text
    assert broker(client).llen(client.settings.interactive_queue) == 0
    again = json.loads(broker(client).rpop(bulk))
    assert essentials(again) == essentials(original)
    assert sweeper.sweep() == []  # at most once per threshold


def test_racing_sweepers_send_each_job_once(client):
    ids = lost_jobs(client, 12)
    url = client.store.engine.url.render_as_string(hide_password=False)
    stores = [JobStore.from_url(url) for _ in range(4)]
    together = threading.Barrier(len(stores))

    def sweep(store):
        together.wait()
        return Sweeper(store, client.app).sweep()

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            sent = [job_id for batch in pool.map(sweep, stores) for job_id in batch]
    finally:
        for store in stores:
            store.close()
    assert sorted(sent) == sorted(ids)
    assert sorted(queued_job_ids(client, client.settings.interactive_queue)) == sorted(ids)


def test_a_failed_resend_is_tried_again_at_the_next_sweep(client, caplog):
    [job_id] = lost_jobs(client, 1)
    down = create_app(client.settings.model_copy(
        update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"}))
    try:
        assert Sweeper(client.store, down).sweep() == []
    finally:
        down.close()
    assert "the next sweep tries again" in caplog.text
    assert Sweeper(client.store, client.app).sweep() == [job_id]


def test_a_worker_runs_a_job_whose_message_was_lost(redis_url, new_pg_database, tiny_llama_dir,
                                                    tmp_path):
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(),
                           republish_after_s=1, sweep_interval_s=0.2)
    with stack(fields, tmp_path, "sweeper") as running:
        client = running.client
        # A row whose message never reached Redis, and a job that runs for longer
        # than the threshold: running jobs are never sent again.
        lost = client.store.create([parse_job({"prompt": "lost", "params": {"max_tokens": 4}})])
        lost_id = lost[0].job_id
        long_id = client.submit("a long story", {"max_tokens": 800, "ignore_eos": True})
        records = [client.wait(job_id, timeout=60) for job_id in (lost_id, long_id)]
        assert [(r.status, r.attempts) for r in records] == [(JobStatus.SUCCEEDED, 1)] * 2
        time.sleep(1.5)  # more sweeps: a finished job stays finished
        log = running.worker.log_tail(50_000)
        assert log.count(f"job {lost_id} re-published") == 1
        assert f"job {long_id} re-published" not in log


def test_workers_drain_resumed_jobs_before_new_ones(client):
    interactive, bulk = client.settings.interactive_queue, client.settings.bulk_queue
    assert client.app.queue_names() == [f"{interactive}.resumed", interactive,
                                        f"{bulk}.resumed", bulk]
    assert client.app.queue_names([QueueKind.BULK]) == [f"{bulk}.resumed", bulk]


def test_a_dead_workers_job_goes_to_the_resumed_queue(client, caplog):
    job_id = client.submit("orphan", {"max_tokens": 4}, queue="bulk")
    bulk = client.settings.bulk_queue
    original = json.loads(broker(client).rpop(bulk))  # taken by a worker that then died
    assert client.store.claim(job_id, "killed", 3, lease_s=0.01).spec is not None
    time.sleep(0.02)
    with caplog.at_level(logging.INFO, logger="worker.sweeper"):
        assert Sweeper(client.store, client.app).sweep() == [job_id]
    assert f"job {job_id} re-published: its worker was lost" in caplog.text
    assert broker(client).llen(bulk) == 0
    again = json.loads(broker(client).rpop(client.app.queue_name(QueueKind.BULK, resumed=True)))
    assert essentials(again) == (*essentials(original)[:-1], f"{bulk}.resumed")
