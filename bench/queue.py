"""Queue overhead: N short jobs through Redis, a worker and PostgreSQL vs the engine in-process.

    python -m bench.queue [--jobs 512] [--max-tokens 16] [--model smollm2-135m | tiny]

Both paths run the same prompts with the same engine settings; model loading
is outside the timings. In-process, every request is added at once and the
engine stepped to the end. Queued, a `pagedq worker` subprocess (threads pool,
concurrency = max_num_seqs) drains jobs that the client submits all at once,
and each job's end-to-end latency is the one recorded in SQL (submit to
finished). `--model tiny` is a random one-layer model (bench/common.py) fed
token ids, an engine fast enough that the queue's own cost shows.

Per job, the queued path also counts what it costs the servers:
- SQL transactions, from PostgreSQL's pg_stat_database (the scratch database
  holds nothing else; the bench client's own are subtracted), the pool's
  pre-ping at each checkout included (it runs in a transaction of its own);
- the worker's statements and round trips, from SQLAlchemy events installed in
  the worker process by this script's wrapper around `pagedq worker` (a round
  trip: each statement, BEGIN, COMMIT and the pool's pre-ping at checkout);
- Redis commands, from INFO commandstats of a private redis-server this
  script starts (producer and worker together; `--broker-url` uses another
  server instead, whose other clients then count too).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and the file
# itself would shadow the standard library's `queue` that Celery imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from typing import Any  # noqa: E402

import psycopg  # noqa: E402
import redis  # noqa: E402
from sqlalchemy import make_url  # noqa: E402

from bench.queue_counts import (  # noqa: E402
    COUNTS_COMMAND,
    SqlCounts,
    count_sql,
    start_redis,
)
from worker.client import Client  # noqa: E402
from worker.migrate import run_alembic  # noqa: E402
from worker.models import JobStatus  # noqa: E402
from worker.settings import load_settings  # noqa: E402

REPO = _HERE.parent
# PostgreSQL 15 backends report their statistics when idle, at the latest 10 s
# after their last report; wait that long before reading pg_stat_database.
PG_STATS_SETTLE_S = 11.0


def prompts(n: int, round_: int, token_ids: bool) -> list[Any]:
    # Each round asks new questions, so the prefix cache of an earlier round
    # cannot help either path.
    if token_ids:
        return [[3 + (round_ * 7919 + i * 31 + k) % 500 for k in range(8 + i % 8)]
                for i in range(n)]
    topics = ["rivers", "bridges", "printing", "bees", "glass", "tides", "maps", "salt"]
    return [f"Round {round_}, question {i}: write one line about {topics[i % len(topics)]}"
            + " and why it matters" * (i % 4) for i in range(n)]


@dataclass(slots=True)
class Cost:
    """Per round, what the servers did for the queued path."""

    pg_transactions: int = 0
    worker: SqlCounts = field(default_factory=SqlCounts)
    redis: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class Result:
    wall_s: float
    latencies: list[float]
    steps: int
    peak_running: int
    cost: Cost | None = None
    submit_s: float | None = None  # queued: the producer's own time to store and publish


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class InProcess:
    """The baseline: one LLMEngine in this process, every request added at once."""

    def __init__(self, engine_kwargs: dict, max_tokens: int) -> None:
        from engine import EngineConfig, LLMEngine, SamplingParams

        self.engine = LLMEngine(EngineConfig(**engine_kwargs))
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run(self, texts: list[Any]) -> Result:
        engine = self.engine
        steps = engine.stats().num_steps
        start = time.time()
        for i, text in enumerate(texts):
            engine.add_request(f"{start}-{i}", text, self.params)
        latencies = []
        while engine.has_unfinished_requests():
            latencies += [out.metrics.finished_time - start for out in engine.step()
                          if out.finished]
        stats = engine.stats()
        return Result(time.time() - start, latencies, stats.num_steps - steps,
                      stats.peak_num_running)


class Queued:
    """A `pagedq worker` subprocess fed through Redis, results read back from SQL."""

    def __init__(self, fields: dict, max_tokens: int, database: str,
                 admin: psycopg.Connection) -> None:
        settings = load_settings(**fields)
        run_alembic(settings.database_url)
        self.database, self.admin = database, admin
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@local"
        env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                                if v is not None}}
        self.worker = subprocess.Popen(
            [sys.executable, "-c", "import sys; from bench.queue_counts import counted_worker; "
             "sys.exit(counted_worker(sys.argv[1:]))", "worker",
             f"--hostname={self.hostname}", "--loglevel=warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client_sql = SqlCounts()
        count_sql(self.client_sql)  # the bench's own statements, to subtract
        self.client = Client(settings)
        self.redis = redis.Redis.from_url(settings.broker_url)
        self.params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        while not self.client.app.control.ping(destination=[self.hostname], timeout=0.5):
            if self.worker.poll() is not None:
                raise RuntimeError("the worker exited during start-up")

    def run(self, texts: list[Any]) -> Result:
        client = self.client
        steps = self._engine_stats()["steps"]
        time.sleep(PG_STATS_SETTLE_S)
        before = self._snapshot()
        start = time.time()
        ids = client.submit_many([{"prompt": text, "params": self.params, "queue": "bulk"}
                                  for text in texts])
        submit_s = time.time() - start
        pending, records = set(ids), []
        while pending:
            done = client.store.get_many(pending, finished_only=True)
            records += done
            pending -= {r.id for r in done}
            if pending:
                time.sleep(0.25)
        failed = [r for r in records if r.status is not JobStatus.SUCCEEDED]
        if failed:
            raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0].error}")
        wall = max(r.finished_at.timestamp() for r in records) - start
        time.sleep(PG_STATS_SETTLE_S)
        cost = self._cost(before)
        stats = self._engine_stats()
        return Result(wall, [r.metrics.e2e_s for r in records], stats["steps"] - steps,
                      stats["peak_running"], cost, submit_s)

    def _engine_stats(self) -> dict:
        replies = self.client.app.control.inspect(destination=[self.hostname],
                                                  timeout=10).stats()
        return replies[self.hostname]["engine"]

    def _snapshot(self) -> tuple[int, SqlCounts, SqlCounts, Counter[str]]:
        """Taken in an order that leaves the control message out of the Redis counts."""
        worker = self._worker_sql()
        commands = self._redis_commands()
        xacts = self._pg_transactions()
        return xacts, worker, replace(self.client_sql), commands

    def _cost(self, before: tuple[int, SqlCounts, SqlCounts, Counter[str]]) -> Cost:
        xacts, worker, client, commands = before
        # Each pre-ping at checkout is a transaction of its own (autocommit).
        mine = self.client_sql.minus(client)
        pg = self._pg_transactions() - xacts - mine.transactions - mine.checkouts
        redis_now = self._redis_commands()
        redis_now.subtract(commands)
        return Cost(pg, self._worker_sql().minus(worker), +redis_now)

    def _worker_sql(self) -> SqlCounts:
        replies = self.client.app.control.broadcast(
            COUNTS_COMMAND, destination=[self.hostname], reply=True, timeout=10)
        return SqlCounts(**replies[0][self.hostname])

    def _redis_commands(self) -> Counter[str]:
        stats = self.redis.info("commandstats")
        return Counter({name.removeprefix("cmdstat_"): entry["calls"]
                        for name, entry in stats.items()})

    def _pg_transactions(self) -> int:
        self.admin.execute("SELECT pg_stat_clear_snapshot()")
        row = self.admin.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                 "WHERE datname = %s", (self.database,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait(120)
        self.client.close()
        self.redis.close()



def engine_kwargs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    if args.model != "tiny":
        return {"model": args.model, "max_num_seqs": args.max_num_seqs}
    import torch

    from bench.common import build_random_checkpoint

    path = build_random_checkpoint("tiny", workdir / "tiny", torch.float32,
                                   torch.device("cpu"))
    return {"model": str(path), "dtype": "float32", "device": "cpu",
            "max_num_seqs": args.max_num_seqs}


def run_rounds(args: argparse.Namespace, kwargs: dict[str, Any], broker_url: str
               ) -> tuple[list[Result], list[Result]]:
    admin_url = make_url(args.postgres_url)
    database = f"pagedq_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(admin_url.set(drivername="postgresql")
                            .render_as_string(hide_password=False), autocommit=True)
    admin.execute(f'CREATE DATABASE "{database}"')
    fields = {**kwargs, "broker_url": broker_url,
              "database_url": admin_url.set(database=database)
              .render_as_string(hide_password=False),
              "interactive_queue": f"bench-{database}.interactive",
              "bulk_queue": f"bench-{database}.bulk"}
    token_ids = args.model == "tiny"
    local, remote = [], []
    try:
        baseline = InProcess(kwargs, args.max_tokens)
        queue = Queued(fields, args.max_tokens, database, admin)
        try:
            # A warm-up round, then alternate, so that load from elsewhere on the
            # machine hits both paths alike.
            baseline.run(prompts(8, -1, token_ids))
            queue.run(prompts(8, -1, token_ids))
            for round_ in range(args.rounds):
                local.append(baseline.run(prompts(args.jobs, round_, token_ids)))
                remote.append(queue.run(prompts(args.jobs, round_, token_ids)))
        finally:
            queue.close()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
    return local, remote


def report(args: argparse.Namespace, local: Result, remote: Result) -> None:
    print(f"{args.jobs} jobs x {args.max_tokens} tokens, model {args.model}, "
          f"max_num_seqs {args.max_num_seqs}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, best of {args.rounds} alternating rounds")
    print("| path | jobs/s | wall s | of it submit s | p50 e2e s | p99 e2e s | engine steps "
          "| peak running | SQL transactions / job | worker SQL statements / job "
          "| worker SQL round trips / job | Redis commands / job |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in (("in-process engine", local), ("Redis + worker + PostgreSQL", remote)):
        counts = "| - | - | - | - |"
        if r.cost is not None:
            c, n = r.cost, args.jobs
            counts = (f"| {c.pg_transactions / n:.2f} | {c.worker.statements / n:.2f} "
                      f"| {c.worker.round_trips / n:.2f} | {c.redis.total() / n:.2f} |")
        submit = "-" if r.submit_s is None else f"{r.submit_s:.2f}"
        print(f"| {name} | {args.jobs / r.wall_s:.1f} | {r.wall_s:.2f} | {submit} | "
              f"{statistics.median(r.latencies):.2f} | {percentile(r.latencies, 0.99):.2f} | "
              f"{r.steps} | {r.peak_running} {counts}")
    assert remote.cost is not None
    top = ", ".join(f"{name} {calls / args.jobs:.2f}"
                    for name, calls in remote.cost.redis.most_common(12))
    print(f"Redis commands per job, by command: {top}")
    print(f"queued / in-process throughput: {local.wall_s / remote.wall_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a model name or folder, or `tiny` (random, token-id prompts)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate the two paths this often; the best round of each counts")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of both paths (default: torch's own choice); 1 "
                        "suits the tiny model on a loaded machine")
    parser.add_argument("--broker-url", default=None,
                        help="default: a private redis-server on a free port")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    args = parser.parse_args()

    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the worker's
    with tempfile.TemporaryDirectory(prefix="pagedq-bench-") as tmp:
        workdir = Path(tmp)
        kwargs = engine_kwargs(args, workdir)
        server, broker_url = (None, args.broker_url) if args.broker_url \
            else start_redis(workdir)
        try:
            local, remote = run_rounds(args, kwargs, broker_url)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report(args, min(local, key=lambda r: r.wall_s), min(remote, key=lambda r: r.wall_s))


if __name__ == "__main__":
    main()
