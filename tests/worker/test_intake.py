"""The gateway's Intake: submissions arriving together share a transaction and a publish."""

import asyncio
from collections.abc import Iterator

import pytest

from tests.worker.services import engine_fields, purge_queues
from worker.client import BrokerUnavailable, Client
from worker.gateway.intake import Intake
from worker.job_rows import JobOwner
from worker.keys import KeyStore
from worker.migrate import run_alembic
from worker.models import JobStatus
from worker.schemas import JobRequest
from worker.settings import load_settings

JOBS = 64


@pytest.fixture
def client(new_pg_database, tiny_llama_dir) -> Iterator[Client]:
    settings = load_settings(**engine_fields(tiny_llama_dir, database_url=new_pg_database()))
    run_alembic(settings.database_url)
    with Client(settings) as client:
        yield client
        purge_queues(client)


def _submit_all(intake: Intake, jobs: list[JobRequest], owners: list[JobOwner]
                ) -> list[str | BaseException]:
    async def run() -> list[str | BaseException]:
        return await asyncio.gather(*(intake.submit(job, owner)
                                      for job, owner in zip(jobs, owners, strict=True)),
                                    return_exceptions=True)

    return asyncio.run(run())


def test_a_burst_is_stored_in_few_transactions_each_job_its_own(client, monkeypatch):
    calls: list[int] = []
    submit_many = client.submit_many

    def counting(requests, owner=None):
        calls.append(len(requests))
        return submit_many(requests, owner)

    monkeypatch.setattr(client, "submit_many", counting)
    jobs = [JobRequest(prompt=f"prompt {i}", params={"max_tokens": 1 + i % 5}) for i in range(JOBS)]
    keys = KeyStore(client.settings.database_url)
    try:
        made = [keys.create(name)[0].id for name in ("team-a", "team-b")]
    finally:
        keys.close()
    owners = [JobOwner(api_key_id=made[i % 2]) for i in range(JOBS)]  # interleaved owners
    ids = _submit_all(Intake(client), jobs, owners)
    assert len(set(ids)) == JOBS and all(isinstance(i, str) for i in ids)
    # The first alone, then the rest together: one call for each owner.
    assert sum(calls) == JOBS and len(calls) <= 3
    records = {r.id: r for r in client.store.get_many(ids)}
    for job_id, job in zip(ids, jobs, strict=True):  # each id names its own request
        assert records[job_id].status is JobStatus.QUEUED
        assert records[job_id].params["max_tokens"] == job.params.max_tokens
    assert [records[i].api_key_id for i in ids] == [o.api_key_id for o in owners]


def test_a_failed_publish_fails_every_job_of_its_batch_and_stores_none(
        tiny_llama_dir, new_pg_database):
    settings = load_settings(**engine_fields(tiny_llama_dir, database_url=new_pg_database(),
                                             broker_url="redis://127.0.0.1:1/0"))
    run_alembic(settings.database_url)
    with Client(settings) as client:
        jobs = [JobRequest(prompt=f"prompt {i}") for i in range(8)]
        results = _submit_all(Intake(client), jobs, [JobOwner()] * 8)
        assert all(isinstance(r, BrokerUnavailable) for r in results), results
        with client.store.engine.connect() as db:
            assert db.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one() == 0
