"""kill -9 a worker with jobs in flight: their leases run out, a sweep re-publishes them
(long before Redis would redeliver), and SQL keeps them exactly once."""

import time

from sqlalchemy import func, select

from tests.worker.services import WorkerProcess, engine_fields, stack
from worker.models import JobStatus, Metrics, Output


def test_killed_worker_loses_nothing(redis_url, new_pg_database, tiny_llama_dir, tmp_path):
    fields = engine_fields(
        tiny_llama_dir, database_url=new_pg_database(), worker_concurrency=32,
        # Redis keeps its default visibility timeout: the jobs that were running
        # come back through their leases, those taken but not claimed, through Redis.
        lease_s=3, sweep_interval_s=1,
    )
    with stack(fields, tmp_path, "doomed") as running:
        client = running.client
        ids = client.submit_many([{"prompt": f"crash test {i}",
                                   "params": {"max_tokens": 64, "temperature": 0}}
                                  for i in range(32)])
        deadline = time.monotonic() + 60
        # Every job claimed (32 threads), none left in the worker's hands unclaimed:
        # those would come back through Redis' visibility timeout, not the leases.
        while any(r.status is JobStatus.QUEUED for r in client.store.get_many(ids)):
            assert time.monotonic() < deadline, "jobs never started"
            time.sleep(0.02)
        running.worker.kill()
        interrupted = {r.id for r in client.store.get_many(ids) if r.status is JobStatus.RUNNING}
        assert interrupted, "every job finished before the kill"

        rescuer = WorkerProcess(fields, tmp_path, "rescuer")
        try:
            rescuer.start(client)
            records = [client.wait(job_id, timeout=90) for job_id in ids]
        finally:
            rescuer.stop()
        unsuccessful = [(r.status, r.error) for r in records if r.status is not JobStatus.SUCCEEDED]
        assert not unsuccessful
        # The interrupted attempt counts; the rescuer ran the second one.
        assert all(r.attempts == 2 and r.worker == rescuer.hostname
                   for r in records if r.id in interrupted)
        with client.store.engine.connect() as db:
            outputs = dict(db.execute(select(Output.job_id, func.count())
                                      .where(Output.job_id.in_(ids)).group_by(Output.job_id)).all())
            metrics = dict(db.execute(select(Metrics.job_id, func.count())
                                      .where(Metrics.job_id.in_(ids)).group_by(Metrics.job_id)).all())
        assert outputs == dict.fromkeys(ids, 1)  # one output set each, never two
        assert metrics == dict.fromkeys(ids, 1)
