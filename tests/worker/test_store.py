"""The SQL job store on PostgreSQL and SQLite: idempotent submit, safe claims, fenced
finish, and re-publish claims that concurrent sweeps never share."""

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.worker.services import backdate
from worker.models import JobStatus
from worker.records import ClaimOutcome, Completion, JobMetrics
from worker.schemas import QueueKind, parse_job


def job(prompt="hello", **fields):
    return parse_job({"prompt": prompt, **fields})


def metrics(attempt):
    return JobMetrics(attempt, 0.1, 0.2, 0.01, 0.3, 4, 2, 0, 0, 0, 0, "w")


def test_idempotency_key_returns_the_same_job(store):
    first, other, again = store.create([job(idempotency_key="k"), job(), job(idempotency_key="k")])
    assert first.created and other.created and not again.created
    assert again.job_id == first.job_id != other.job_id
    assert store.create([job(idempotency_key="k")])[0].job_id == first.job_id


def test_failed_job_gives_its_key_up(store):
    sub = store.create([job(idempotency_key="k")])[0]
    claim = store.claim(sub.job_id, "w", max_attempts=3)
    store.finish(sub.job_id, claim.spec.attempt, JobStatus.FAILED, error="boom")
    retry = store.create([job(idempotency_key="k")])[0]
    assert retry.created and retry.job_id != sub.job_id


def test_only_one_of_concurrent_claims_wins(store):
    job_id = store.create([job()])[0].job_id
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda _: store.claim(job_id, "w", max_attempts=100), range(8)))
    attempts = sorted(c.spec.attempt for c in claims if c.spec is not None)
    # Each claim that got through holds a distinct attempt number: the fence.
    assert attempts == list(range(1, len(attempts) + 1))


def test_finish_is_fenced_by_the_attempt(store):
    job_id = store.create([job()])[0].job_id
    old = store.claim(job_id, "dead", max_attempts=3).spec
    new = store.claim(job_id, "alive", max_attempts=3).spec  # redelivered after a crash
    assert (old.attempt, new.attempt) == (1, 2)
    outputs = [Completion(0, "hi", [1, 2], "length")]
    assert store.finish(job_id, new.attempt, JobStatus.SUCCEEDED, outputs=outputs,
                        metrics=metrics(new.attempt))
    assert not store.finish(job_id, old.attempt, JobStatus.SUCCEEDED, outputs=outputs,
                            metrics=metrics(old.attempt))
    record = store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED and record.attempts == 2
    assert [o.token_ids for o in record.outputs] == [[1, 2]]
    assert record.metrics.attempt == 2
    assert store.claim(job_id, "late", max_attempts=3).outcome is ClaimOutcome.FINISHED


def test_too_many_attempts_fail_the_job(store):
    job_id = store.create([job()])[0].job_id
    for _ in range(2):
        assert store.claim(job_id, "w", max_attempts=2).outcome is ClaimOutcome.CLAIMED
    assert store.claim(job_id, "w", max_attempts=2).outcome is ClaimOutcome.EXHAUSTED
    record = store.get(job_id)
    assert record.status is JobStatus.FAILED and "2 attempts" in record.error


def test_cancel_queued_and_running(store):
    queued, running = (s.job_id for s in store.create([job(), job()]))
    store.claim(running, "w", max_attempts=3)
    assert store.request_cancel(queued) is JobStatus.QUEUED
    assert store.request_cancel(running) is JobStatus.RUNNING
    assert store.get(queued).status is JobStatus.CANCELLED
    assert store.claim(queued, "w", 3).outcome is ClaimOutcome.FINISHED
    # A running job flagged for cancel is not started again after a crash.
    assert store.claim(running, "w", 3).outcome is ClaimOutcome.CANCELLED
    assert store.request_cancel("no-such-job") is None


def test_token_prompt_and_params_round_trip(store):
    job_id = store.create([job([3, 1, 4], params={"temperature": 0, "stop": ["."]})])[0].job_id
    spec = store.claim(job_id, "w", 3).spec
    assert spec.prompt == [3, 1, 4]
    assert spec.params["temperature"] == 0 and spec.params["stop"] == ["."]
    assert spec.created_at.tzinfo is not None


def test_generated_nul_characters_are_stored(store):
    job_id = store.create([job()])[0].job_id
    attempt = store.claim(job_id, "w", 3).spec.attempt
    assert store.finish(job_id, attempt, JobStatus.SUCCEEDED,
                        outputs=[Completion(0, "a\x00b", [7, 0, 8], "stop", "\x00")])
    output = store.get(job_id).outputs[0]
    assert output.text == "a\ufffdb" and output.token_ids == [7, 0, 8]


def test_only_jobs_queued_long_after_their_publish_are_due(store):
    queued, bulk, running, finished, cancelled = (
        s.job_id for s in store.create([job(), job(queue="bulk"), job(), job(), job()]))
    in_process = store.create([job()], published=False)[0].job_id  # `pagedq run`
    store.claim(running, "w", 3)
    store.finish(finished, store.claim(finished, "w", 3).spec.attempt, JobStatus.SUCCEEDED)
    store.request_cancel(cancelled)
    backdate(store, [queued, bulk, running, finished, cancelled, in_process])
    store.create([job()])  # queued, but its message has just gone out
    due = store.claim_republish(60, limit=100)
    assert sorted(due) == sorted([(queued, QueueKind.INTERACTIVE), (bulk, QueueKind.BULK)])
    # Taken now: due again only once another threshold has passed.
    assert store.claim_republish(60, limit=100) == []
    assert store.get(queued).status is JobStatus.QUEUED


def test_due_jobs_come_oldest_first_a_batch_at_a_time(store):
    ids = [s.job_id for s in store.create([job() for _ in range(5)])]
    for age, job_id in enumerate(ids):
        backdate(store, [job_id], seconds=3600 - age)
    batches = [[job_id for job_id, _ in store.claim_republish(60, limit=2)] for _ in range(4)]
    assert batches == [ids[0:2], ids[2:4], ids[4:5], []]


def test_concurrent_sweeps_take_each_job_once(store):
    ids = [s.job_id for s in store.create([job() for _ in range(40)])]
    backdate(store, ids)
    together = threading.Barrier(8)

    def sweep(_):
        together.wait()
        return store.claim_republish(60, limit=10)

    with ThreadPoolExecutor(8) as pool:
        taken = [job_id for batch in pool.map(sweep, range(8)) for job_id, _ in batch]
    assert sorted(taken) == sorted(ids)


def test_a_released_job_is_due_again_at_once(store):
    job_id = store.create([job()])[0].job_id
    backdate(store, [job_id])
    assert store.claim_republish(60, limit=10) == [(job_id, QueueKind.INTERACTIVE)]
    store.release_republish([job_id])
    assert store.claim_republish(60, limit=10) == [(job_id, QueueKind.INTERACTIVE)]
