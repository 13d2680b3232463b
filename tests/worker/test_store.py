"""The SQL job store on PostgreSQL and SQLite: idempotent submit, safe claims, fenced
finish, and re-publish claims that concurrent sweeps never share."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.worker.services import backdate
from worker.cancel import cancel_jobs
from worker.job_rows import JobOwner
from worker.models import Job, JobStatus, utcnow
from worker.records import ClaimOutcome, Completion, JobMetrics
from worker.schemas import IdempotencyConflict, InvalidJob, QueueKind, parse_job
from worker.store import INSERT_CHUNK, Due

LEASE_S = 30.0


def job(prompt="hello", **fields):
    return parse_job({"prompt": prompt, **fields})


def job_count(store):
    with store.engine.connect() as db:
        return db.scalar(select(func.count()).select_from(Job))


def metrics(attempt):
    return JobMetrics(attempt, 0.1, 0.2, 0.01, 0.3, 4, 2, 0, 0, 0, 0, "w")


def test_idempotency_key_returns_the_same_job(store):
    first, other, again = store.create([job(idempotency_key="k"), job(), job(idempotency_key="k")])
    assert first.created and other.created and not again.created
    assert again.job_id == first.job_id != other.job_id
    assert store.create([job(idempotency_key="k")])[0].job_id == first.job_id


def test_failed_job_gives_its_key_up(store):
    sub = store.create([job(idempotency_key="k")])[0]
    claim = store.claim(sub.job_id, "w", 3, LEASE_S)
    store.finish(sub.job_id, claim.spec.lease_id, JobStatus.FAILED, error="boom")
    retry = store.create([job(idempotency_key="k")])[0]
    assert retry.created and retry.job_id != sub.job_id


def test_expired_job_gives_its_key_up(store):
    sub = store.create([job(idempotency_key="k", ttl_s=0.01)])[0]
    time.sleep(0.02)
    assert store.claim(sub.job_id, "w", 3, LEASE_S).outcome is ClaimOutcome.EXPIRED
    assert store.get(sub.job_id).status is JobStatus.EXPIRED
    retry = store.create([job(idempotency_key="k")])[0]
    assert retry.created and retry.job_id != sub.job_id


def test_a_key_reused_for_other_work_is_a_conflict(store):
    first = store.create([job("summarise a", idempotency_key="k")])[0]
    for other in (job("summarise b", idempotency_key="k"),
                  job("summarise a", idempotency_key="k", params={"max_tokens": 99}),
                  job("summarise a", idempotency_key="k", chat=True)):
        with pytest.raises(IdempotencyConflict, match="idempotency_key: 'k'"):
            store.create([job("fresh"), other])
    # The same work under the same key, even queued elsewhere, is the same job.
    again = store.create([job("summarise a", idempotency_key="k", queue="bulk", priority=4)])
    assert again[0].job_id == first.job_id and not again[0].created
    assert job_count(store) == 1  # the conflicting batches left nothing behind


def test_a_create_is_all_or_nothing_across_insert_chunks(store):
    store.create([job("taken", idempotency_key="dup")])
    batch = [job(f"doc {i}") for i in range(INSERT_CHUNK + 100)]
    batch.append(job("other work", idempotency_key="dup"))
    with pytest.raises(IdempotencyConflict):
        store.create(batch)
    assert job_count(store) == 1


def test_get_many_takes_more_ids_than_postgres_binds(store):
    ids = [s.job_id for s in store.create([job() for _ in range(20)])]
    wanted = ids + [f"missing-{i}" for i in range(70_000)]
    assert sorted(r.id for r in store.get_many(wanted)) == sorted(ids)


def test_only_one_of_concurrent_claims_wins(store):
    job_id = store.create([job()])[0].job_id
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: store.claim(job_id, "w", 100, LEASE_S), range(8)))
    outcomes = sorted(c.outcome.value for c in claims)
    # The others are duplicates of a job a live lease holds: nothing charged.
    assert outcomes == ["busy"] * 7 + ["claimed"]
    assert store.get(job_id).attempts == 1


def test_a_duplicate_delivery_leaves_the_running_attempt_alone(store):
    job_id = store.create([job()])[0].job_id
    running = store.claim(job_id, "w", 1, LEASE_S).spec
    for _ in range(3):  # at max_attempts, and still never failed "for attempts"
        assert store.claim(job_id, "w2", 1, LEASE_S).outcome is ClaimOutcome.BUSY
    assert store.finish(job_id, running.lease_id, JobStatus.SUCCEEDED,
                        outputs=[Completion(0, "hi", [1], "length")])
    record = store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED and record.attempts == 1


def test_an_expired_lease_is_taken_over_and_fences_the_old_attempt(store):
    job_id = store.create([job()])[0].job_id
    old = store.claim(job_id, "frozen", 3, lease_s=0.05).spec
    time.sleep(0.1)  # lapse of the old lease: a real expiry, no clock trick
    new = store.claim(job_id, "alive", 3, LEASE_S).spec
    assert (old.attempt, new.attempt) == (1, 2)
    assert store.renew([old.lease_id, new.lease_id], LEASE_S) == {old.lease_id}
    outputs = [Completion(0, "hi", [1, 2], "length")]
    assert not store.finish(job_id, old.lease_id, JobStatus.SUCCEEDED, outputs=outputs,
                            metrics=metrics(old.attempt))
    assert store.finish(job_id, new.lease_id, JobStatus.SUCCEEDED, outputs=outputs,
                        metrics=metrics(new.attempt))
    assert not store.finish(job_id, old.lease_id, JobStatus.SUCCEEDED, outputs=outputs,
                            metrics=metrics(old.attempt))
    record = store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED and record.attempts == 2
    assert [o.token_ids for o in record.outputs] == [[1, 2]]
    assert record.metrics.attempt == 2
    assert store.claim(job_id, "late", 3, LEASE_S).outcome is ClaimOutcome.FINISHED


def test_a_job_not_started_within_its_ttl_expires_without_running(store):
    fresh, stale, batch_like = (store.create([job("a", ttl_s=60)])[0].job_id,
                                store.create([job("b", ttl_s=0.05)])[0].job_id,
                                store.create([job("c", ttl_s=60)],
                                             owner=JobOwner(expires_at=utcnow()))[0].job_id)
    time.sleep(0.1)  # a real lapse of the short ttl, no clock trick
    assert store.claim(fresh, "w", 3, LEASE_S).outcome is ClaimOutcome.CLAIMED
    for job_id in (stale, batch_like):  # the earlier of the ttl and the owner's expiry
        assert store.claim(job_id, "w", 3, LEASE_S).outcome is ClaimOutcome.EXPIRED
        record = store.get(job_id)
        assert record.status is JobStatus.EXPIRED and record.attempts == 0
        assert record.error == "expired before it started" and record.finished
        assert store.claim(job_id, "w", 3, LEASE_S).outcome is ClaimOutcome.FINISHED
    # A running job is past expiry's reach: its lease decides, as before.
    assert store.get(fresh).status is JobStatus.RUNNING


@pytest.mark.parametrize("ttl_s", [0, -1, float("inf"), float("nan")])
def test_a_ttl_must_be_positive_and_finite(ttl_s):
    with pytest.raises(InvalidJob, match="ttl_s"):
        job(ttl_s=ttl_s)


def test_renewal_keeps_a_lease_live(store):
    job_id = store.create([job()])[0].job_id
    spec = store.claim(job_id, "w", 3, lease_s=0.3).spec
    for _ in range(4):
        time.sleep(0.1)
        assert store.renew([spec.lease_id], 0.3) == set()
    assert store.claim(job_id, "w2", 3, LEASE_S).outcome is ClaimOutcome.BUSY


def test_a_released_attempt_is_not_charged(store):
    job_id = store.create([job()])[0].job_id
    spec = store.claim(job_id, "w", 3, LEASE_S).spec
    assert store.release(job_id, spec.lease_id)
    assert not store.release(job_id, spec.lease_id)  # no longer held
    record = store.get(job_id)
    assert record.status is JobStatus.QUEUED and record.attempts == 0
    again = store.claim(job_id, "w", 3, LEASE_S).spec
    assert again.attempt == 1 and again.lease_id != spec.lease_id
    assert not store.finish(job_id, spec.lease_id, JobStatus.SUCCEEDED)


def test_too_many_attempts_fail_the_job(store):
    job_id = store.create([job()])[0].job_id
    for _ in range(2):
        assert store.claim(job_id, "w", 2, lease_s=0.01).outcome is ClaimOutcome.CLAIMED
        time.sleep(0.02)  # the worker died: its lease runs out
    assert store.claim(job_id, "w", 2, LEASE_S).outcome is ClaimOutcome.EXHAUSTED
    record = store.get(job_id)
    assert record.status is JobStatus.FAILED and "2 attempts" in record.error


def _cancel(store, *job_ids: str):
    with Session(store.engine) as session, session.begin():
        return cancel_jobs(session, job_ids)


def test_cancel_queued_and_running(store):
    queued, running = (s.job_id for s in store.create([job(), job()]))
    store.claim(running, "w", 3, lease_s=0.01)
    report = _cancel(store, queued, running, "no-such-job")
    assert (report.cancelled, report.flagged, report.missing) == (1, [running],
                                                                  ["no-such-job"])
    assert store.get(queued).status is JobStatus.CANCELLED
    assert store.claim(queued, "w", 3, LEASE_S).outcome is ClaimOutcome.FINISHED
    time.sleep(0.02)
    # A running job flagged for cancel is not started again after a crash.
    assert store.claim(running, "w", 3, LEASE_S).outcome is ClaimOutcome.CANCELLED


def test_token_prompt_and_params_round_trip(store):
    job_id = store.create([job([3, 1, 4], params={"temperature": 0, "stop": ["."]})])[0].job_id
    spec = store.claim(job_id, "w", 3, LEASE_S).spec
    assert spec.prompt == [3, 1, 4]
    assert spec.params["temperature"] == 0 and spec.params["stop"] == ["."]
    assert spec.created_at.tzinfo is not None


def test_generated_nul_characters_are_stored(store):
    job_id = store.create([job()])[0].job_id
    lease_id = store.claim(job_id, "w", 3, LEASE_S).spec.lease_id
    assert store.finish(job_id, lease_id, JobStatus.SUCCEEDED,
                        outputs=[Completion(0, "a\x00b", [7, 0, 8], "stop", "\x00")])
    output = store.get(job_id).outputs[0]
    assert output.text == "a\ufffdb" and output.token_ids == [7, 0, 8]


def test_only_jobs_queued_long_after_their_publish_are_due(store):
    queued, bulk, running, finished, cancelled = (
        s.job_id for s in store.create([job(), job(queue="bulk"), job(), job(), job()]))
    in_process = store.create([job()], published=False)[0].job_id  # `pagedq run`
    store.claim(running, "w", 3, LEASE_S)
    store.finish(finished, store.claim(finished, "w", 3, LEASE_S).spec.lease_id,
                 JobStatus.SUCCEEDED)
    _cancel(store, cancelled)
    backdate(store, [queued, bulk, running, finished, cancelled, in_process])
    store.create([job()])  # queued, but its message has just gone out
    due = store.claim_republish(60, limit=100)
    assert sorted(due) == sorted([Due(queued, QueueKind.INTERACTIVE, False),
                                  Due(bulk, QueueKind.BULK, False)])
    # Taken now: due again only once another threshold has passed.
    assert store.claim_republish(60, limit=100) == []
    assert store.get(queued).status is JobStatus.QUEUED


def test_due_jobs_come_oldest_first_a_batch_at_a_time(store):
    ids = [s.job_id for s in store.create([job() for _ in range(5)])]
    for age, job_id in enumerate(ids):
        backdate(store, [job_id], seconds=3600 - age)
    batches = [[due.job_id for due in store.claim_republish(60, limit=2)] for _ in range(4)]
    assert batches == [ids[0:2], ids[2:4], ids[4:5], []]


def test_concurrent_sweeps_take_each_job_once(store):
    ids = [s.job_id for s in store.create([job() for _ in range(40)])]
    backdate(store, ids)
    together = threading.Barrier(8)

    def sweep(_):
        together.wait()
        return store.claim_republish(60, limit=10)

    with ThreadPoolExecutor(8) as pool:
        taken = [due.job_id for batch in pool.map(sweep, range(8)) for due in batch]
    assert sorted(taken) == sorted(ids)


def test_a_released_job_is_due_again_at_once(store):
    job_id = store.create([job()])[0].job_id
    backdate(store, [job_id])
    assert store.claim_republish(60, limit=10) == [Due(job_id, QueueKind.INTERACTIVE, False)]
    store.release_republish([job_id])
    assert store.claim_republish(60, limit=10) == [Due(job_id, QueueKind.INTERACTIVE, False)]


def test_running_jobs_whose_lease_expired_are_due(store):
    lost, live = (s.job_id for s in store.create([job(), job(queue="bulk")]))
    store.claim(lost, "killed", 3, lease_s=0.01)
    store.claim(live, "alive", 3, LEASE_S)
    time.sleep(0.02)
    assert store.claim_republish(3600, limit=10) == [Due(lost, QueueKind.INTERACTIVE, True)]
    record = store.get(lost)
    assert record.status is JobStatus.QUEUED and record.attempts == 1  # stays charged
    assert store.claim_republish(3600, limit=10) == []
    assert store.get(live).status is JobStatus.RUNNING
