"""bench/queue.py's instruments: SQLAlchemy counters (installed in the bench's worker
process by `counted_worker`, read back by a Celery control command, so that nothing
of them lives in the worker's own code) and a private redis-server whose INFO
commandstats counts only the bench's traffic."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Engine, event
from sqlalchemy.pool import Pool

COUNTS_COMMAND = "bench_sql_counts"


@dataclass(slots=True)
class SqlCounts:
    """What one process's SQLAlchemy engines sent."""

    statements: int = 0
    transactions: int = 0  # commits and rollbacks
    checkouts: int = 0  # each pre-pinged

    @property
    def round_trips(self) -> int:
        return self.statements + 2 * self.transactions + self.checkouts

    def minus(self, before: SqlCounts) -> SqlCounts:
        return SqlCounts(*(now - then for now, then in zip(astuple(self), astuple(before),
                                                           strict=True)))

    def plus(self, other: SqlCounts) -> SqlCounts:
        return SqlCounts(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other),
                                                                 strict=True)))


def count_sql(counts: SqlCounts) -> None:
    """Count every engine's statements, transactions and checkouts in this process."""
    def statement(*_: Any) -> None:
        counts.statements += 1

    def transaction(*_: Any) -> None:
        counts.transactions += 1

    def checkout(*_: Any) -> None:
        counts.checkouts += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Engine, "commit", transaction)
    event.listen(Engine, "rollback", transaction)
    event.listen(Pool, "checkout", checkout)


def counted_worker(argv: list[str]) -> int:
    """`pagedq worker` with its SQL counted, and read by the control command
    COUNTS_COMMAND: the bench's instrument, kept out of the worker's own code."""
    from celery.worker.control import control_command

    from worker.cli import main

    counts = SqlCounts()
    count_sql(counts)

    @control_command(name=COUNTS_COMMAND)
    def _counts(_state: Any) -> dict[str, int]:
        return asdict(counts)

    return main(argv)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server of the bench's own, so that INFO commandstats counts only it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not on PATH: pass --broker-url")
    port = free_port()
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return server, url
        except redis.ConnectionError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the private redis-server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
