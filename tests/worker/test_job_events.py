"""The jobs of a many-job message reach Flower's event state as tasks of their own,
many events to a message; a broker outage costs the events, never a job's time."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.events.receiver import EventReceiver
from celery.events.state import State

from tests.worker.services import free_port, private_queues
from worker.celery_app import TASK_NAME, PagedqCelery, create_app
from worker.executor import Outcome
from worker.flower import show_job_status
from worker.job_events import EVENTS_PER_MESSAGE, JobEvents
from worker.models import JobStatus
from worker.records import ClaimOutcome
from worker.settings import load_settings

HOSTNAME = "events-test@host"
WAIT_S = 5.0


class CountingReceiver(EventReceiver):
    """Counts task events, and the messages they arrive in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.messages = 0
        self.events = 0
        self.probes_heard = 0

    def _receive(self, body: Any, message: Any, **kwargs: Any) -> None:
        tasks = [e for e in (body if isinstance(body, list) else [body])
                 if e["type"].startswith("task-")]
        self.messages += bool(tasks)
        self.events += len(tasks)
        self.probes_heard += len(tasks) == 0
        super()._receive(body, message, **kwargs)


def make_app(broker_url: str) -> PagedqCelery:
    app = create_app(load_settings(broker_url=broker_url, **private_queues()))
    # An exchange of its own: no other run's events reach this test's receiver.
    app.conf.event_exchange = f"pagedq-test-{uuid.uuid4().hex[:8]}.ev"
    return app


@contextmanager
def watching(app: PagedqCelery) -> Iterator[tuple[State, CountingReceiver]]:
    """Flower's machinery: a receiver feeding a State, in a thread."""
    state = app.events.State()
    with app.connection_for_read() as connection:
        receiver = CountingReceiver(connection, handlers={"*": state.event}, app=app)
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False},
                                  daemon=True)
        thread.start()
        _wait_listening(app, receiver)
        try:
            yield state, receiver
        finally:
            receiver.should_stop = True
            thread.join(5)


def _wait_listening(app: PagedqCelery, receiver: CountingReceiver) -> None:
    """Redis forgets what it publishes to no subscriber: send probes until one arrives."""
    with app.connection_for_write() as connection, \
            app.events.Dispatcher(connection, hostname="probe@test") as probe:
        def heard() -> bool:
            probe.send("pagedq-probe")
            return receiver.probes_heard > 0

        wait_until(heard)


def wait_until(done: Callable[[], Any]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def ended(state: State, job_ids: list[str]) -> bool:
    tasks = [state.tasks.get(job_id) for job_id in job_ids]
    return all(task is not None and task.state in ("SUCCESS", "FAILURE") for task in tasks)


def test_each_job_shows_as_its_own_task(redis_url: str) -> None:
    app = make_app(redis_url)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    done, failed, expired, busy = ids
    parent = str(uuid.uuid4())
    with watching(app) as (state, receiver):
        events = JobEvents(app, HOSTNAME, TASK_NAME)
        events.received(ids, parent_id=parent)
        wait_until(lambda: all(state.tasks.get(job_id) is not None for job_id in ids))
        assert {state.tasks[job_id].state for job_id in ids} == {"STARTED"}
        events.ended(Outcome(done, ClaimOutcome.CLAIMED, JobStatus.SUCCEEDED))
        events.ended(Outcome(failed, ClaimOutcome.CLAIMED, JobStatus.FAILED, "bad prompt"))
        events.ended(Outcome(expired, ClaimOutcome.EXPIRED, JobStatus.EXPIRED))
        events.ended(Outcome(busy, ClaimOutcome.BUSY))
        events.close()
        wait_until(lambda: ended(state, [done, failed, expired]))
        sent = receiver.events
    tasks = {job_id: state.tasks[job_id] for job_id in ids}
    for job_id, task in tasks.items():
        assert (task.name, task.args, task.worker.hostname) == \
            (TASK_NAME, repr([job_id]), HOSTNAME)
        assert task.parent_id == parent
    assert tasks[done].state == "SUCCESS" and tasks[done].runtime >= 0
    assert (tasks[failed].state, tasks[failed].exception) == ("FAILURE", "bad prompt")
    assert (tasks[expired].state, tasks[expired].result) == ("SUCCESS", "'expired'")
    assert show_job_status(tasks[expired]).state == "EXPIRED"
    assert tasks[busy].state == "STARTED"  # the attempt running it reports its end
    assert sent == 2 * len(ids) + 3
    # The receipts go out together, and so do the ends.
    assert receiver.messages == 2


def test_ends_from_many_threads_share_messages(redis_url: str) -> None:
    app = make_app(redis_url)
    ids = [str(uuid.uuid4()) for _ in range(2 * EVENTS_PER_MESSAGE)]
    with watching(app) as (state, receiver):
        events = JobEvents(app, HOSTNAME, TASK_NAME)
        events.received(ids)
        threads = [threading.Thread(target=_end_all, args=(events, ids[i::8]))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_until(lambda: ended(state, ids))
        events.close()
    assert {state.tasks[job_id].state for job_id in ids} == {"SUCCESS"}
    # 600 events: at least 6 full messages, and far fewer than one per event.
    assert receiver.events == 3 * len(ids)
    assert receiver.messages <= 3 * len(ids) // EVENTS_PER_MESSAGE + 8


def _end_all(events: JobEvents, job_ids: list[str]) -> None:
    for job_id in job_ids:
        events.ended(Outcome(job_id, ClaimOutcome.CLAIMED, JobStatus.SUCCEEDED))


@pytest.mark.parametrize("enabled", [True, False])
def test_a_broker_outage_costs_the_jobs_nothing(enabled: bool,
                                                caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(f"redis://127.0.0.1:{free_port()}/0")
    app.conf.worker_send_task_events = enabled
    events = JobEvents(app, HOSTNAME, TASK_NAME, flush_interval_s=0.01)
    started = time.monotonic()
    for _ in range(3):
        job_id = str(uuid.uuid4())
        events.received([job_id])
        events.ended(Outcome(job_id, ClaimOutcome.CLAIMED, JobStatus.SUCCEEDED))
        time.sleep(0.05)
    events.close()
    assert time.monotonic() - started < 2
    warnings = [r for r in caplog.records if "could not send the task events" in r.message]
    # Three failed batches or more, one warning; none at all when events are off.
    assert len(warnings) == (1 if enabled else 0)
