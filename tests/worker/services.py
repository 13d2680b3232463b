"""Test plumbing: real Redis and PostgreSQL, worker subprocesses, a cuttable DB link."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import update

from worker.client import Client
from worker.models import Job, utcnow
from worker.settings import Settings, load_settings
from worker.store import JobStore

REPO = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("PAGEDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get("PAGEDQ_TEST_POSTGRES_URL",
                              "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def engine_fields(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Settings for a worker on the tiny checkpoint: small pools, fast on CPU."""
    return {
        "model": str(model_dir), "dtype": "float32", "device": "cpu",
        "num_device_blocks": 512, "swap_space_gib": 0.05, "max_num_seqs": 16,
        "broker_url": REDIS_URL,
        **private_queues(),
        **overrides,
    }


def private_queues() -> dict[str, str]:
    """Queue names of their own, so that concurrent test runs never share jobs."""
    run = uuid.uuid4().hex[:8]
    return {"interactive_queue": f"pagedq-test-{run}.interactive",
            "bulk_queue": f"pagedq-test-{run}.bulk"}


def backdate(store: JobStore, job_ids: list[str], seconds: float = 3600.0) -> None:
    """Move jobs `seconds` into the past: created then, and published then if they were."""
    then = utcnow() - timedelta(seconds=seconds)
    with store.engine.begin() as db:
        db.execute(update(Job).where(Job.id.in_(job_ids)).values(created_at=then))
        db.execute(update(Job).where(Job.id.in_(job_ids), Job.published_at.is_not(None))
                   .values(published_at=then))


def as_env(fields: dict[str, Any]) -> dict[str, str]:
    return {f"PAGEDQ_{name.upper()}": str(value) for name, value in fields.items()
            if value is not None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`pagedq worker` in a subprocess, with its log in a file."""

    def __init__(self, fields: dict[str, Any], log_dir: Path, name: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.fields = fields
        self.extra_env = extra_env or {}
        self.hostname = f"{name}-{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, client: Client, timeout: float = 90.0) -> WorkerProcess:
        env = {**os.environ, **as_env(self.fields), **self.extra_env}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", f"--hostname={self.hostname}",
                 "--loglevel=info"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_tail()}")
            if client.app.control.ping(destination=[self.hostname], timeout=0.5):
                return self
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log_tail()}")

    def engine_stats(self, client: Client) -> dict[str, Any]:
        replies = client.app.control.inspect(destination=[self.hostname], timeout=5).stats()
        return replies[self.hostname]["engine"]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@dataclass(slots=True)
class Stack:
    settings: Settings
    fields: dict[str, Any]
    client: Client
    worker: WorkerProcess


@contextmanager
def stack(fields: dict[str, Any], log_dir: Path, name: str) -> Iterator[Stack]:
    """Migrated database, a client and one running worker."""
    from worker.migrate import run_alembic

    settings = load_settings(**fields)
    run_alembic(settings.database_url)
    client = Client(settings)
    worker = WorkerProcess(fields, log_dir, name)
    try:
        worker.start(client)
        yield Stack(settings, fields, client, worker)
    finally:
        worker.stop()
        purge_queues(client)
        client.close()


def purge_queues(client: Client) -> None:
    with client.app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in client.app.queue_names():
            with suppress(Exception):
                channel.queue_purge(queue)


class TcpProxy:
    """Forwards a local port to PostgreSQL; cut() drops every link, as an outage would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socket.socket | None = None
        self._links: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            assert self._server is not None
            # shutdown() wakes the thread blocked in accept(); close() alone
            # would leave the port bound until then.
            with suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
            for link in self._links:
                with suppress(OSError):
                    link.shutdown(socket.SHUT_RDWR)
                link.close()
            self._links.clear()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._links += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def queued_messages(client: Client, queue: str) -> list[tuple[str, str | list[str]]]:
    """(task id, job id or ids) of each pagedq.generate message waiting in `queue`,
    oldest first."""
    raw = redis.Redis.from_url(client.settings.broker_url).lrange(queue, 0, -1)
    found = []
    for payload in reversed(raw):  # kombu pushes on the left and pops on the right
        message = json.loads(payload)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["id"], args[0]))
    return found


def queued_job_ids(client: Client, queue: str) -> list[str]:
    """Every job id the messages waiting in `queue` carry."""
    return [job_id for _, jobs in queued_messages(client, queue)
            for job_id in ([jobs] if isinstance(jobs, str) else jobs)]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, pause: float = 0.05) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(pause)

