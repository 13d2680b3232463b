"""The interactive reserve: a worker full of bulk jobs still takes interactive ones at once."""


import pytest

from tests.worker.services import engine_fields, queued_job_ids, stack, wait_for
from worker.models import JobStatus
from worker.reserve import LOOKAHEAD, BulkGate
from worker.settings import SettingsError, load_settings

SLOTS = 4
RESERVE = 2
PER_MESSAGE = 2  # bulk jobs travel two to a message
LONG_TOKENS = 300


def _bulk(max_tokens: int) -> dict:
    return {"prompt": "bulk document", "params": {"max_tokens": max_tokens, "ignore_eos": True},
            "queue": "bulk"}


# A long job in every slot, then short ones waiting their turn: a flood that keeps the
# worker full for LONG_TOKENS steps without making the test run several waves of it.
# The worker holds two jobs per slot (LOOKAHEAD); the last two messages stay in Redis.
FLOOD = [_bulk(LONG_TOKENS)] * SLOTS + [_bulk(16)] * (2 * SLOTS)
HELD = LOOKAHEAD * SLOTS


def test_gate_counts_bulk_messages_by_task_id():
    gate = BulkGate(slots=2)
    assert not gate.take("a")
    assert gate.take("a")  # a redelivered copy holds a thread too
    assert gate.full and gate.messages == 2
    assert not gate.release("interactive")  # never counted: no slot freed
    assert gate.release("a") and not gate.full
    assert gate.release("a") and gate.held == gate.messages == 0
    assert not gate.release("a")


def test_gate_counts_the_jobs_of_messages_and_frees_each_as_it_ends():
    gate = BulkGate(slots=4)  # at most 4 messages and 8 jobs
    assert not gate.take("a", 5)
    assert gate.take("b", 5) and gate.held == 10
    assert not gate.job_ended("a") and not gate.job_ended("a")  # 8: still full
    assert gate.job_ended("a") and gate.held == 7  # the job that opens the gate
    assert not gate.job_ended("a") and not gate.job_ended("a")  # already open
    assert not gate.job_ended("a")  # a's five jobs are all counted already
    assert gate.release("a") and gate.held == 5  # a's message ends: nothing left of it
    assert not gate.job_ended("interactive")
    assert gate.release("b") and gate.held == gate.messages == 0


def test_reserve_defaults_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.delenv("PAGEDQ_INTERACTIVE_RESERVE", raising=False)
    assert load_settings().interactive_reserve == 8
    monkeypatch.setenv("PAGEDQ_INTERACTIVE_RESERVE", "0")
    assert load_settings().interactive_reserve == 0
    for bad in ("-1", "a few", "1.5"):
        monkeypatch.setenv("PAGEDQ_INTERACTIVE_RESERVE", bad)
        with pytest.raises(SettingsError, match="PAGEDQ_INTERACTIVE_RESERVE"):
            load_settings()


@pytest.fixture
def flooded(redis_url, new_pg_database, tiny_llama_dir, tmp_path):
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database(), max_num_seqs=SLOTS,
                           interactive_reserve=RESERVE, jobs_per_message=PER_MESSAGE)
    with stack(fields, tmp_path, "reserve") as running:
        yield running


def _stats(running) -> dict:
    replies = running.client.app.control.inspect(destination=[running.worker.hostname],
                                                 timeout=5).stats()
    return replies[running.worker.hostname]


def _intake(running) -> dict:
    return _stats(running)["intake"]


def test_interactive_job_overtakes_a_bulk_flood(flooded):
    client = flooded.client
    assert _stats(flooded)["pool"]["max-concurrency"] == SLOTS + RESERVE
    bulk = client.submit_many(FLOOD)
    wait_for(lambda: sum(r.status is JobStatus.RUNNING
                          for r in client.store.get_many(bulk)) == HELD)
    # Every slot holds a bulk job and as many wait in the engine; the worker took no
    # further bulk message.
    intake = _intake(flooded)
    assert intake == {"bulk_held": HELD, "bulk_limit": HELD, "bulk_messages": SLOTS,
                      "bulk_paused": True}, intake
    assert len(queued_job_ids(client, client.settings.bulk_queue)) == len(FLOOD) - HELD
    long_jobs = {job_id for job_id, job in zip(bulk, FLOOD, strict=True)
                 if job["params"]["max_tokens"] == LONG_TOKENS}

    urgent = client.wait(client.submit("urgent question", {"max_tokens": 8}), timeout=30)

    assert urgent.status is JobStatus.SUCCEEDED
    queued_s = (urgent.started_at - urgent.created_at).total_seconds()
    records = [client.wait(job_id, timeout=240) for job_id in bulk]
    bulk_run_s = min((r.finished_at - r.started_at).total_seconds() for r in records
                     if r.id in long_jobs)
    # Claimed at once, not after a bulk job's lifetime; it came into the engine
    # ahead of the bulk jobs (the engine preempts one of them for it).
    assert queued_s < bulk_run_s / 5, (queued_s, bulk_run_s)
    assert urgent.metrics.queue_time_s < bulk_run_s / 5, urgent.metrics
    # ...and finished while the bulk jobs that filled the slots still ran.
    assert all(r.finished_at > urgent.finished_at for r in records if r.id in long_jobs)
    # Every bulk job finished, once, with all its tokens.
    for record, job in zip(records, FLOOD, strict=True):
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.attempts == 1 and record.metrics.attempt == 1
        assert len(record.outputs[0].token_ids) == job["params"]["max_tokens"]
    # Never more bulk jobs taken at once than the gate holds, but for the rest of the
    # message that took the last one: a message is taken once a job ends.
    spans = sorted((r.started_at, r.finished_at) for r in records)
    for started, _ in spans:
        assert sum(s <= started < f for s, f in spans) <= HELD + PER_MESSAGE - 1
    wait_for(lambda: _intake(flooded)["bulk_held"] == 0, timeout=10)
    assert not _intake(flooded)["bulk_paused"]
