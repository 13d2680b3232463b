"""The interactive reserve: a worker full of bulk jobs still takes interactive ones at once."""

import time

import pytest

from tests.worker.services import engine_fields, stack
from worker.models import JobStatus
from worker.reserve import BulkGate
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
FLOOD = [_bulk(LONG_TOKENS)] * SLOTS + [_bulk(16)] * SLOTS


def test_gate_counts_bulk_messages_by_task_id():
    gate = BulkGate(limit=2)
    assert not gate.take("a")
    assert gate.take("a")  # a redelivered copy holds a thread too
    assert gate.full and gate.held == 2
    assert not gate.release("interactive")  # never counted: no slot freed
    assert gate.release("a") and not gate.full
    assert gate.release("a") and gate.held == 0
    assert not gate.release("a")


def test_gate_counts_the_jobs_of_a_message_and_frees_each_as_it_ends():
    gate = BulkGate(limit=4)
    assert not gate.take("a", 3)
    assert gate.take("b", 3) and gate.held == 6
    assert not gate.job_ended("a") and not gate.job_ended("a")  # 4: still full
    assert gate.job_ended("a") and gate.held == 3  # the slot that frees them
    assert not gate.job_ended("a")  # a's three jobs are all counted already
    assert gate.release("a") and gate.held == 3  # a's message ends: nothing left of it
    assert not gate.job_ended("interactive")
    assert gate.release("b") and gate.held == 0


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


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_interactive_job_overtakes_a_bulk_flood(flooded):
    client = flooded.client
    assert _stats(flooded)["pool"]["max-concurrency"] == SLOTS + RESERVE
    bulk = client.submit_many(FLOOD)
    _wait_for(lambda: sum(r.status is JobStatus.RUNNING
                          for r in client.store.get_many(bulk)) == SLOTS)
    # Every slot holds a bulk job; the worker took no further bulk message.
    intake = _intake(flooded)
    assert intake == {"bulk_held": SLOTS, "bulk_limit": SLOTS, "bulk_paused": True}, intake
    running_before = {r.id for r in client.store.get_many(bulk) if r.status is JobStatus.RUNNING}

    urgent = client.wait(client.submit("urgent question", {"max_tokens": 8}), timeout=30)

    assert urgent.status is JobStatus.SUCCEEDED
    queued_s = (urgent.started_at - urgent.created_at).total_seconds()
    records = [client.wait(job_id, timeout=240) for job_id in bulk]
    bulk_run_s = min((r.finished_at - r.started_at).total_seconds() for r in records
                     if r.id in running_before)
    # Claimed at once, not after a bulk job's lifetime; it came into the engine
    # ahead of the bulk jobs (the engine preempts one of them for it).
    assert queued_s < bulk_run_s / 5, (queued_s, bulk_run_s)
    assert urgent.metrics.queue_time_s < bulk_run_s / 5, urgent.metrics
    # ...and finished while the bulk jobs that filled the slots still ran.
    assert all(r.finished_at > urgent.finished_at for r in records if r.id in running_before)
    # Every bulk job finished, once, with all its tokens.
    for record, job in zip(records, FLOOD, strict=True):
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.attempts == 1 and record.metrics.attempt == 1
        assert len(record.outputs[0].token_ids) == job["params"]["max_tokens"]
    # Never more bulk jobs taken at once than slots, but for the rest of the message
    # that took the last one: a message is taken once a slot frees.
    spans = sorted((r.started_at, r.finished_at) for r in records)
    for started, _ in spans:
        assert sum(s <= started < f for s, f in spans) <= SLOTS + PER_MESSAGE - 1
    _wait_for(lambda: _intake(flooded)["bulk_held"] == 0, timeout=10)
    assert not _intake(flooded)["bulk_paused"]
