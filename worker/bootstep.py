"""Worker bootsteps: one engine per worker process, its state in `inspect stats` and
on its Prometheus port, its jobs' tokens on their Redis Streams; the sweep that
publishes again the jobs whose message Redis lost.

The engine is built inside the worker process, after Celery has started
(never before a fork: CUDA cannot be initialised again in a forked child),
and before the consumer takes its first message. WorkController.stats()
merges every bootstep's info(), which is how Flower's worker page and
`celery inspect stats` show the engine's live state.
"""

from __future__ import annotations

import logging
from os import EX_SOFTWARE
from typing import Any
from wsgiref.simple_server import WSGIServer

from celery import bootsteps
from celery.worker import state as worker_state
from celery.worker.control import control_command

from worker.celery_app import CANCEL_COMMAND, TASK_NAME, PagedqCelery
from worker.engine_service import EngineService
from worker.executor import RESULT_GRACE_S, JobRunner
from worker.job_events import JobEvents
from worker.metrics import WorkerMetrics
from worker.migrate import check_current
from worker.reserve import install_reserve
from worker.store import JobStore
from worker.streams import StreamWriter
from worker.sweeper import Sweeper
from worker.tasks import register_tasks

log = logging.getLogger(__name__)


class EngineStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.runner: JobRunner | None = None
        self.metrics_server: WSGIServer | None = None

    def start(self, parent: Any) -> None:
        app: PagedqCelery = parent.app
        settings = app.settings
        # parent.concurrency: the pool's threads, the interactive reserve included.
        store = JobStore.from_url(settings.database_url, pool_size=min(parent.concurrency, 24))
        check_current(store.engine)

        def build() -> Any:
            from engine import EngineConfig, LLMEngine

            return LLMEngine(EngineConfig(**settings.engine_kwargs()))

        streams = StreamWriter(settings.broker_url, settings.stream_maxlen,
                               settings.stream_ttl_s)
        streams.start()
        service = EngineService(build, on_death=lambda: _exit_worker(app), streams=streams)
        metrics = WorkerMetrics(service.stats)
        log.info("starting the engine on %s", settings.model)
        service.start()
        self.runner = app.runner = JobRunner(store, service, settings, streams, metrics)
        app.job_events = JobEvents(app, parent.hostname, TASK_NAME)
        if settings.metrics_port is not None:
            self.metrics_server = metrics.serve(settings.metrics_port, settings.metrics_address)
        log.info("engine ready")

    def stop(self, parent: Any) -> None:
        if self.runner is None:
            return
        # The consumer has stopped taking messages; let the jobs already in the
        # engine finish so their threads can record them.
        self.runner.service.stop(timeout=self.runner.settings.job_deadline_s + RESULT_GRACE_S)
        self.runner.close()
        self.runner.store.close()
        # An end entry a job thread writes after this is lost: its readers take the
        # end from SQL at their next poll.
        if self.runner.streams is not None:
            self.runner.streams.close()
        if parent.app.job_events is not None:
            parent.app.job_events.close()
            parent.app.job_events = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None
        parent.app.runner = self.runner = None

    def info(self, parent: Any) -> dict[str, Any]:
        return {"engine": self.runner.service.stats() if self.runner else {}}


def _exit_worker(app: PagedqCelery) -> None:
    """The engine loop died and has failed its jobs, which give themselves back:
    stop taking messages and exit non-zero, for the supervisor to restart us."""
    log.critical("the engine loop died; the worker shuts down (exit status %d)", EX_SOFTWARE)
    # Celery's own exit code is lost on the way out of worker_main; `pagedq
    # worker` returns this one.
    app.exit_status = worker_state.should_stop = EX_SOFTWARE


class SweepStep(bootsteps.StartStopStep):
    """Every sweep_interval, publish again the jobs whose message may be lost.

    Started after the engine step, which has checked the schema this reads."""

    requires = {"celery.worker.components:Timer", EngineStep}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: Sweeper | None = None
        self._timer_entry: Any = None

    def start(self, parent: Any) -> None:
        app: PagedqCelery = parent.app
        self.sweeper = Sweeper(JobStore.from_url(app.settings.database_url, pool_size=1), app)
        self._timer_entry = parent.timer.call_repeatedly(app.settings.sweep_interval,
                                                         self.sweeper.sweep_in_background)

    def stop(self, parent: Any) -> None:
        if self.sweeper is None:
            return
        self._timer_entry.cancel()
        self.sweeper.close()
        self.sweeper = None


@control_command(name=CANCEL_COMMAND, args=[("job_id", str)], signature="<job_id>")
def cancel_job(state: Any, job_id: str) -> dict[str, str]:
    """Abort a job's request in this worker's engine (a no-op if it holds none)."""
    runner = state.consumer.app.runner
    if runner is None:
        return {"error": "no engine in this worker"}
    runner.service.cancel(job_id)
    return {"ok": f"cancel sent for {job_id}"}


def install(app: PagedqCelery) -> None:
    """Make `app` a worker: the task, the engine, the sweep and the interactive reserve."""
    register_tasks(app)
    app.steps["worker"].add(EngineStep)
    app.steps["worker"].add(SweepStep)
    install_reserve(app)
