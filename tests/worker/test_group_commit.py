"""Group commit of claims and finishes: many job threads, few transactions, and each
job still gets exactly what a transaction of its own would give it."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from worker.cancel import cancel_jobs
from worker.executor import is_retryable
from worker.group_commit import GroupCommit
from worker.models import Job, JobStatus, Metrics, Output
from worker.records import ClaimAsk, ClaimOutcome, Completion, FinishWrite, JobMetrics
from worker.schemas import parse_job
from worker.store import JobStore

LEASE_S = 30.0


def jobs(store, n, **fields):
    return [s.job_id for s in store.create([parse_job({"prompt": f"p{i}", **fields})
                                            for i in range(n)])]


def write(spec, lease_id=None):
    return FinishWrite(spec.id, lease_id or spec.lease_id, JobStatus.SUCCEEDED,
                       outputs=[Completion(0, f"text of {spec.id}", [1, 2], "length")],
                       metrics=JobMetrics(spec.attempt, 0.1, 0.2, 0.01, 0.3, 4, 2, 0, 0, 0, 0,
                                          "w"))


def commits(store):
    counted = []
    event.listen(store.engine, "commit", lambda _conn: counted.append(1))
    return counted


def rows_per_job(store, model, job_ids):
    with store.engine.connect() as db:
        return dict(db.execute(select(model.job_id, func.count())
                               .where(model.job_id.in_(job_ids)).group_by(model.job_id)).all())


def test_concurrent_claims_and_finishes_share_few_transactions(store):
    job_ids = jobs(store, 64)
    counted = commits(store)
    claims = GroupCommit("claims", lambda asks: store.claim_many(asks, 3, LEASE_S),
                         key=lambda ask: ask.job_id)
    finishes = GroupCommit("finishes", store.finish_many, key=lambda w: w.job_id)
    barrier = threading.Barrier(len(job_ids))

    def one_job(job_id):
        barrier.wait()
        spec = claims.submit(ClaimAsk(job_id, "w")).spec
        barrier.wait()  # all finish together, as the jobs of one engine step do
        return finishes.submit(write(spec))

    with ThreadPoolExecutor(len(job_ids)) as pool:
        assert all(pool.map(one_job, job_ids))
    claims.close()
    finishes.close()
    assert len(counted) <= 16, f"{len(counted)} transactions for 64 claims and 64 finishes"
    records = store.get_many(job_ids)
    assert {(r.status, r.attempts, r.text) for r in records} == {
        (JobStatus.SUCCEEDED, 1, f"text of {r.id}") for r in records}
    assert rows_per_job(store, Output, job_ids) == dict.fromkeys(job_ids, 1)
    assert rows_per_job(store, Metrics, job_ids) == dict.fromkeys(job_ids, 1)


def test_a_lost_lease_drops_only_its_own_finish(store):
    specs = [c.spec for c in store.claim_many([ClaimAsk(j, "w") for j in jobs(store, 3)],
                                              3, LEASE_S)]
    stale = write(specs[1], lease_id="a-lease-taken-over")
    assert store.finish_many([write(specs[0]), stale, write(specs[2])]) == [True, False, True]
    first, lost, last = (store.get(spec.id) for spec in specs)
    assert first.status is last.status is JobStatus.SUCCEEDED
    assert lost.status is JobStatus.RUNNING and lost.outputs == [] and lost.metrics is None
    # The attempt that holds it still records its own end.
    assert store.finish_many([write(specs[1])]) == [True]


def test_one_batch_of_claims_keeps_every_outcome(store):
    queued, done, busy, cancelled, exhausted = jobs(store, 5)
    (expired,) = jobs(store, 1, ttl_s=0.01)
    store.finish_many([write(store.claim(done, "w", 3, LEASE_S).spec)])
    store.claim(busy, "other", 3, LEASE_S)
    store.claim(cancelled, "w", 3, lease_s=0.01)
    with Session(store.engine) as session, session.begin():
        cancel_jobs(session, [cancelled])
    store.claim(exhausted, "w", 1, lease_s=0.01)
    time.sleep(0.05)  # the short leases and the ttl run out
    asks = [ClaimAsk(j, "w2") for j in (queued, done, busy, cancelled, exhausted, expired,
                                        "no-such-job")]
    outcomes = [claim.outcome for claim in store.claim_many(asks, 1, LEASE_S)]
    assert outcomes == [ClaimOutcome.CLAIMED, ClaimOutcome.FINISHED, ClaimOutcome.BUSY,
                        ClaimOutcome.CANCELLED, ClaimOutcome.EXHAUSTED, ClaimOutcome.EXPIRED,
                        ClaimOutcome.MISSING]
    statuses = {r.id: r.status for r in store.get_many([cancelled, exhausted, expired])}
    assert statuses == {cancelled: JobStatus.CANCELLED, exhausted: JobStatus.FAILED,
                        expired: JobStatus.EXPIRED}
    with store.engine.connect() as db:
        assert db.scalar(select(Job.worker).where(Job.id == queued)) == "w2"
        assert db.scalar(select(Job.worker).where(Job.id == busy)) == "other"


def test_duplicate_claims_in_one_burst_claim_once(store):
    (job_id,) = jobs(store, 1)
    claims = GroupCommit("claims", lambda asks: store.claim_many(asks, 3, LEASE_S),
                         key=lambda ask: ask.job_id)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: claims.submit(ClaimAsk(job_id, "w")).outcome,
                                 range(8)))
    claims.close()
    assert sorted(o.value for o in outcomes) == ["busy"] * 7 + ["claimed"]


def test_a_database_outage_fails_every_write_of_the_batch_retryably():
    away = JobStore.from_url("postgresql+psycopg://postgres@127.0.0.1:9/none")
    finishes = GroupCommit("finishes", away.finish_many, key=lambda w: w.job_id)
    errors = []

    def finish(i):
        try:
            finishes.submit(FinishWrite(f"job-{i}", "lease", JobStatus.SUCCEEDED))
        except Exception as exc:
            errors.append(exc)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(finish, range(16)))
    finishes.close()
    away.close()
    assert len(errors) == 16 and all(is_retryable(exc) for exc in errors)


def test_a_request_that_breaks_its_batch_fails_alone():
    def run(requests):
        if "bad" in requests:
            raise ValueError("bad data")
        return [f"done {r}" for r in requests]

    batcher = GroupCommit("test", run, key=str)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher.submit, r) for r in ["a", "b", "bad", "c"] * 2]
    batcher.close()
    for request, future in zip(["a", "b", "bad", "c"] * 2, futures, strict=True):
        if request == "bad":
            with pytest.raises(ValueError):
                future.result()
        else:
            assert future.result() == f"done {request}"


def test_a_batch_never_names_a_job_twice(store):
    (job_id,) = jobs(store, 1)
    with pytest.raises(ValueError):
        store.claim_many([ClaimAsk(job_id, "w"), ClaimAsk(job_id, "w")], 3, LEASE_S)
    spec = store.claim(job_id, "w", 3, LEASE_S).spec
    with pytest.raises(ValueError):
        store.finish_many([write(spec), write(spec)])
    assert store.get(job_id).outputs == []
