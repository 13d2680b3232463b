"""Queue overhead: N short jobs through Redis, workers and PostgreSQL vs the engine in-process.

    python -m bench.queue [--jobs 512] [--max-tokens 16] [--model smollm2-135m | tiny]
                          [--workers 1] [--jobs-per-message K]

Both paths run the same prompts with the same engine settings; model loading
is outside the timings. In-process, every request is added at once and the
engine stepped to the end. Queued, `--workers` `pagedq worker` subprocesses
(threads pool, concurrency = max_num_seqs each; one broker, one set of queues,
one database) drain jobs that the client submits all at once, and each job's
end-to-end latency is the one recorded in SQL (submit to finished). `--model
tiny` is a random one-layer model (bench/common.py) fed token ids, an engine
fast enough that the queue's own cost shows.

Per job, the queued path also counts what it costs the servers:
- SQL transactions, from PostgreSQL's pg_stat_database (the scratch database
  holds nothing else; the bench client's own are subtracted), the pool's
  pre-ping at each checkout included (it runs in a transaction of its own);
- the workers' statements and round trips, from SQLAlchemy events installed in
  each worker process by this script's wrapper around `pagedq worker`, summed
  over the workers (a round trip: each statement, BEGIN, COMMIT and the pool's
  pre-ping at checkout);
- Redis commands, from INFO commandstats of a private redis-server this
  script starts (producer and workers together; `--broker-url` uses another
  server instead, whose other clients then count too).
Engine steps are summed over the workers; peak running is the highest worker's.

After each queued round the bench reads from SQL which worker ran each job, and
fails unless every job ran exactly once: one attempt, one metrics row. Under the
table it prints each worker's jobs and share, and the jobs run twice (0).
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
from sqlalchemy import Engine, func, make_url, select  # noqa: E402

from bench.queue_counts import (  # noqa: E402
    COUNTS_COMMAND,
    SqlCounts,
    count_sql,
    start_redis,
)
from worker.client import Client  # noqa: E402
from worker.migrate import run_alembic  # noqa: E402
from worker.models import Job, JobStatus, Metrics  # noqa: E402
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
class Runs:
    """Per round, from SQL: how many jobs each worker ran (None: a job without a
    metrics row), and how many jobs ran more than once."""

    by_worker: Counter[str | None]
    twice: int


@dataclass(slots=True)
class Result:
    wall_s: float
    latencies: list[float]
    steps: int
    peak_running: int
    cost: Cost | None = None
    submit_s: float | None = None  # queued: the producer's own time to store and publish
    runs: Runs | None = None  # queued


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
    """`pagedq worker` subprocesses on one broker, queues and database, fed through
    Redis; results read back from SQL."""

    def __init__(self, fields: dict, max_tokens: int, database: str,
                 admin: psycopg.Connection, workers: int) -> None:
        settings = load_settings(**fields)
        run_alembic(settings.database_url)
        self.database, self.admin = database, admin
        tag = uuid.uuid4().hex[:6]
        self.hostnames = [f"bench-{tag}-{i}@local" for i in range(workers)]
        env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                                if v is not None}}
        self.workers = [start_worker(hostname, env) for hostname in self.hostnames]
        self.client_sql = SqlCounts()
        count_sql(self.client_sql)  # the bench's own statements, to subtract
        self.client = Client(settings)
        self.redis = redis.Redis.from_url(settings.broker_url)
        self.params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        try:
            self._await_workers()
        except BaseException:
            self.close()
            raise

    def _await_workers(self) -> None:
        """Return once every worker has answered a ping, its engine loaded."""
        answered: set[str] = set()
        while answered != set(self.hostnames):
            if any(worker.poll() is not None for worker in self.workers):
                raise RuntimeError("a worker exited during start-up")
            replies = self.client.app.control.ping(destination=self.hostnames, timeout=0.5)
            answered |= {hostname for reply in replies for hostname in reply}

    def run(self, texts: list[Any]) -> Result:
        client = self.client
        steps, _ = self._engine_stats()
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
        steps_now, peak_running = self._engine_stats()
        # Read after the cost: these statements are the bench's, not the round's.
        runs = count_runs(client.store.engine, ids)
        if runs.twice or None in runs.by_worker:
            raise RuntimeError(f"{runs.twice} jobs ran more than once, "
                               f"{runs.by_worker[None]} finished without a metrics row")
        return Result(wall, [r.metrics.e2e_s for r in records], steps_now - steps,
                      peak_running, cost, submit_s, runs)

    def _answers(self, replies: list[dict[str, Any]] | None, what: str) -> dict[str, Any]:
        """Every worker's reply to a control message, by hostname."""
        answers = {hostname: answer for reply in replies or [] for hostname, answer
                   in reply.items()}
        missing = set(self.hostnames) - answers.keys()
        if missing:
            raise RuntimeError(f"no {what} from {', '.join(sorted(missing))}")
        return answers

    def _engine_stats(self) -> tuple[int, int]:
        """Engine steps summed over the workers, and the highest worker's peak of
        requests running at once since it started."""
        replies = self.client.app.control.inspect(
            destination=self.hostnames, timeout=10, limit=len(self.hostnames)).stats()
        engines = [stats["engine"] for stats in self._answers([replies or {}], "stats").values()]
        return (sum(engine["steps"] for engine in engines),
                max(engine["peak_running"] for engine in engines))

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
        """The workers' SQL counts, summed."""
        replies = self.client.app.control.broadcast(
            COUNTS_COMMAND, destination=self.hostnames, reply=True, timeout=10,
            limit=len(self.hostnames))
        total = SqlCounts()
        for counts in self._answers(replies, "SQL counts").values():
            total = total.plus(SqlCounts(**counts))
        return total

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
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.wait(120)
        self.client.close()
        self.redis.close()


def start_worker(hostname: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`pagedq worker` through counted_worker, so that COUNTS_COMMAND answers."""
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from bench.queue_counts import counted_worker; "
         "sys.exit(counted_worker(sys.argv[1:]))", "worker",
         f"--hostname={hostname}", "--loglevel=warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def count_runs(engine: Engine, ids: list[str]) -> Runs:
    """Who ran each job, and how many ran more than once: an attempt claimed again
    (Job.attempts), or a second metrics row (one is written per finished attempt)."""
    query = (select(Job.attempts, func.count(Metrics.id), func.min(Metrics.worker))
             .outerjoin(Metrics).where(Job.id.in_(ids)).group_by(Job.id, Job.attempts))
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return Runs(Counter(worker for _, _, worker in rows),
                sum(attempts > 1 or finished > 1 for attempts, finished, _ in rows))


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
    if args.jobs_per_message is not None:
        fields["jobs_per_message"] = args.jobs_per_message
    token_ids = args.model == "tiny"
    local, remote = [], []
    try:
        baseline = InProcess(kwargs, args.max_tokens)
        queue = Queued(fields, args.max_tokens, database, admin, args.workers)
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
    workers = "worker" if args.workers == 1 else f"{args.workers} workers"
    for name, r in (("in-process engine", local), (f"Redis + {workers} + PostgreSQL", remote)):
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
    assert remote.runs is not None
    for hostname, jobs in sorted(remote.runs.by_worker.items()):
        print(f"worker {hostname}: {jobs} jobs run, share {jobs / args.jobs:.2f}")
    print(f"jobs run twice: {remote.runs.twice}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m",
                        help="a model name or folder, or `tiny` (random, token-id prompts)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate the two paths this often; the best round of each counts")
    parser.add_argument("--workers", type=int, default=1,
                        help="`pagedq worker` processes sharing the broker, queues and database")
    parser.add_argument("--jobs-per-message", type=int, default=None,
                        help="PAGEDQ_JOBS_PER_MESSAGE of client and workers (default: the "
                        "setting's own)")
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
