"""Queue overhead: N short jobs through Redis, a worker and PostgreSQL vs the engine in-process.

    python -m bench.queue [--jobs 512] [--max-tokens 16] [--model smollm2-135m]

Both paths run the same prompts with the same engine settings; model loading
is outside the timings. In-process, every request is added at once and the
engine stepped to the end. Queued, a `pagedq worker` subprocess (threads pool,
concurrency = max_num_seqs) drains jobs that the client submits all at once,
and each job's end-to-end latency is the one recorded in SQL (submit to
finished). Prints jobs/s, p50/p99 latency and the queued/in-process ratio.
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
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import psycopg  # noqa: E402
from sqlalchemy import make_url  # noqa: E402

from worker.client import Client  # noqa: E402
from worker.migrate import run_alembic  # noqa: E402
from worker.models import JobStatus  # noqa: E402
from worker.settings import load_settings  # noqa: E402

REPO = _HERE.parent


def prompts(n: int, round_: int) -> list[str]:
    # Each round asks new questions, so the prefix cache of an earlier round
    # cannot help either path.
    topics = ["rivers", "bridges", "printing", "bees", "glass", "tides", "maps", "salt"]
    return [f"Round {round_}, question {i}: write one line about {topics[i % len(topics)]}"
            + " and why it matters" * (i % 4) for i in range(n)]


@dataclass(slots=True)
class Result:
    wall_s: float
    latencies: list[float]
    steps: int
    peak_running: int


def engine_stats(client: Client, hostname: str) -> dict:
    replies = client.app.control.inspect(destination=[hostname], timeout=10).stats()
    return replies[hostname]["engine"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class InProcess:
    """The baseline: one LLMEngine in this process, every request added at once."""

    def __init__(self, engine_kwargs: dict, max_tokens: int) -> None:
        from engine import EngineConfig, LLMEngine, SamplingParams

        self.engine = LLMEngine(EngineConfig(**engine_kwargs))
        self.params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run(self, texts: list[str]) -> Result:
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

    def __init__(self, fields: dict, max_tokens: int) -> None:
        settings = load_settings(**fields)
        run_alembic(settings.database_url)
        self.hostname = f"bench-{uuid.uuid4().hex[:6]}@local"
        env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                                if v is not None}}
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", f"--hostname={self.hostname}",
             "--loglevel=warning"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        self.client = Client(settings)
        self.params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        while not self.client.app.control.ping(destination=[self.hostname], timeout=0.5):
            if self.worker.poll() is not None:
                raise RuntimeError("the worker exited during start-up")

    def run(self, texts: list[str]) -> Result:
        client = self.client
        steps = engine_stats(client, self.hostname)["steps"]
        start = time.time()
        ids = client.submit_many([{"prompt": text, "params": self.params, "queue": "bulk"}
                                  for text in texts])
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
        stats = engine_stats(client, self.hostname)
        return Result(wall, [r.metrics.e2e_s for r in records], stats["steps"] - steps,
                      stats["peak_running"])

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait(120)
        self.client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate the two paths this often; the best round of each counts")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    args = parser.parse_args()

    engine_kwargs = {"model": args.model, "max_num_seqs": args.max_num_seqs}
    admin_url = make_url(args.postgres_url)
    database = f"pagedq_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(admin_url.set(drivername="postgresql")
                            .render_as_string(hide_password=False), autocommit=True)
    admin.execute(f'CREATE DATABASE "{database}"')
    fields = {**engine_kwargs, "broker_url": args.broker_url,
              "database_url": admin_url.set(database=database)
              .render_as_string(hide_password=False),
              "interactive_queue": f"bench-{database}.interactive",
              "bulk_queue": f"bench-{database}.bulk"}
    local, remote = [], []
    try:
        baseline = InProcess(engine_kwargs, args.max_tokens)
        queue = Queued(fields, args.max_tokens)
        try:
            # A warm-up round, then alternate, so that load from elsewhere on the
            # machine hits both paths alike.
            baseline.run(prompts(8, -1))
            queue.run(prompts(8, -1))
            for round_ in range(args.rounds):
                local.append(baseline.run(prompts(args.jobs, round_)))
                remote.append(queue.run(prompts(args.jobs, round_)))
        finally:
            queue.close()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()

    local = min(local, key=lambda r: r.wall_s)
    remote = min(remote, key=lambda r: r.wall_s)
    print(f"{args.jobs} jobs x {args.max_tokens} tokens, model {args.model}, "
          f"max_num_seqs {args.max_num_seqs}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, best of {args.rounds} alternating rounds")
    print("| path | jobs/s | wall s | p50 e2e s | p99 e2e s | engine steps | peak running |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (("in-process engine", local), ("Redis + worker + PostgreSQL", remote)):
        print(f"| {name} | {args.jobs / r.wall_s:.1f} | {r.wall_s:.2f} | "
              f"{statistics.median(r.latencies):.2f} | {percentile(r.latencies, 0.99):.2f} | "
              f"{r.steps} | {r.peak_running} |")
    print(f"queued / in-process throughput: {local.wall_s / remote.wall_s:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
