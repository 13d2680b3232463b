"""The database goes away while a job runs: the job is retried, not lost."""

import time

import pytest
from sqlalchemy import make_url

from tests.worker.services import TcpProxy, WorkerProcess, engine_fields, wait_for
from worker.client import Client
from worker.migrate import run_alembic
from worker.models import JobStatus
from worker.settings import load_settings


@pytest.mark.parametrize("jobs", [pytest.param(1, marks=pytest.mark.slow), 3],
                         ids=["alone", "one message of three"])
def test_job_survives_a_database_outage(jobs, redis_url, new_pg_database, tiny_llama_dir,
                                        tmp_path):
    direct = new_pg_database()
    run_alembic(direct)
    url = make_url(direct)
    proxy = TcpProxy((url.host, url.port or 5432))
    proxy.start()
    # The worker reaches PostgreSQL only through the proxy; the test talks to it directly.
    # A short lease: the final write and the give-back both fail while the database is
    # away, so the job comes back when its lease runs out.
    worker_fields = engine_fields(tiny_llama_dir, database_url=url.set(
        host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        lease_s=3, sweep_interval_s=1)
    client = Client(load_settings(**{**worker_fields, "database_url": direct}))
    worker = WorkerProcess(worker_fields, tmp_path, "outage")
    try:
        worker.start(client)
        generated_before = worker.engine_stats(client)["generated_tokens"]
        params = {"max_tokens": 48, "ignore_eos": True, "temperature": 0}
        # Submitted together, several jobs share a message: they are retried together.
        job_ids = client.submit_many([{"prompt": f"through the outage {i}", "params": params}
                                      for i in range(jobs)])
        wait_for(lambda: all(r.status is JobStatus.RUNNING
                             for r in client.store.get_many(job_ids)), timeout=60)
        proxy.cut()
        # Let the engine finish the requests while the database is away, so the
        # worker's final writes are the ones that fail.
        wait_for(lambda: worker.engine_stats(client)["generated_tokens"]
                 >= generated_before + 48 * jobs, timeout=60)
        time.sleep(1.0)
        assert all(r.status is JobStatus.RUNNING for r in client.store.get_many(job_ids))
        proxy.start()
        for job_id in job_ids:
            record = client.wait(job_id, timeout=60)
            assert record.status is JobStatus.SUCCEEDED
            assert record.attempts == 2  # the lost attempt, then the retry
            assert record.metrics.attempt == 2 and len(record.outputs[0].token_ids) == 48
        assert "retrying" in worker.log_tail(20_000)
    finally:
        worker.stop()
        client.close()
        proxy.cut()
