"""The Celery application shared by producers (client, CLI) and the worker."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from celery import Celery
from celery.utils.dispatch import Signal
from kombu import Queue

from worker.schemas import QueueKind
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.executor import JobRunner
    from worker.job_events import JobEvents

TASK_NAME = "pagedq.generate"
RESUMED_SUFFIX = ".resumed"
CANCEL_COMMAND = "pagedq_cancel"
BRPOP_TIMEOUT_S = 0.1

# Sent from a task's thread as each job of its message ends (task_id: the message's),
# before the message itself ends: the interactive reserve frees the job's slot then.
job_ended = Signal(name="pagedq_job_ended")


class PagedqCelery(Celery):
    """Celery plus what the pagedq task needs at run time."""

    settings: Settings
    # Set by the engine bootstep in a worker process; None in producers.
    runner: JobRunner | None = None
    # Announces the jobs of many-job messages to Flower; set with the runner.
    job_events: JobEvents | None = None
    # The worker process's exit status: non-zero when its engine died.
    exit_status: int = 0

    def queue_name(self, kind: QueueKind, resumed: bool = False) -> str:
        """A kind's queue; `resumed`: the one for jobs a sweep publishes again (a
        dead worker's, or a lost message's), drained before it, since these jobs
        already waited their turn once."""
        name = {QueueKind.INTERACTIVE: self.settings.interactive_queue,
                QueueKind.BULK: self.settings.bulk_queue}[kind]
        return f"{name}{RESUMED_SUFFIX}" if resumed else name

    def queue_names(self, kinds: Iterable[QueueKind] = QueueKind) -> list[str]:
        """The queues a worker drains, in order: interactive before bulk, and each
        kind's resumed jobs before its new ones."""
        wanted = set(kinds)
        return [self.queue_name(kind, resumed) for kind in QueueKind if kind in wanted
                for resumed in (True, False)]


def create_app(settings: Settings) -> PagedqCelery:
    app = PagedqCelery("pagedq", broker=settings.broker_url, set_as_current=False)
    app.settings = settings
    visibility = settings.visibility_timeout_s
    app.conf.update(
        broker_transport_options={
            "visibility_timeout": visibility,
            # Take queues in the order the worker lists them (interactive first)
            # instead of kombu's default round robin.
            "queue_order_strategy": "priority",
            # One priority level: the engine orders a worker's jobs by priority,
            # and more Redis levels would let a bulk job overtake interactive ones.
            "priority_steps": [0],
            # Look for messages abandoned by a dead worker often enough that they
            # come back soon after their visibility timeout.
            "unacked_restore_interval": max(1, min(10, int(visibility / 10))),
            "unacked_restore_throttle": 1,
            # How long a worker's BRPOP waits on Redis (kombu's brpop_timeout). A queue
            # added back to a consumer (the bulk ones, when a slot frees up: see
            # worker/reserve.py) is read from only once the BRPOP in flight returns.
            # Redis 6 or later takes a fraction of a second.
            "polling_interval": BRPOP_TIMEOUT_S,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # A producer fails fast with a clear error when Redis is down instead
        # of hanging a web request.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0,
                                   "interval_step": 0.5, "interval_max": 1},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in SQL
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_queues=[Queue(name) for name in app.queue_names()],
        task_default_queue=settings.interactive_queue,
        task_create_missing_queues=False,
        # A threads-pool task cannot be killed, and the job is redelivered by
        # Redis anyway; let running jobs finish instead of warning about it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
