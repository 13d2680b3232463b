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


def prompts(n: int) -> list[str]:
    topics = ["rivers", "bridges", "printing", "bees", "glass", "tides", "maps", "salt"]
    return [f"Question {i}: write one line about {topics[i % len(topics)]}"
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


def in_process(engine_kwargs: dict, texts: list[str], max_tokens: int) -> Result:
    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(**engine_kwargs))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("warmup", texts[0], params)
    while engine.has_unfinished_requests():
        engine.step()
    steps = engine.stats().num_steps
    start = time.time()
    for i, text in enumerate(texts):
        engine.add_request(f"r{i}", text, params)
    latencies = []
    while engine.has_unfinished_requests():
        latencies += [out.metrics.finished_time - start for out in engine.step() if out.finished]
    stats = engine.stats()
    return Result(time.time() - start, latencies, stats.num_steps - steps, stats.peak_num_running)


def queued(fields: dict, texts: list[str], max_tokens: int) -> Result:
    settings = load_settings(**fields)
    run_alembic(settings.database_url)
    hostname = f"bench-{uuid.uuid4().hex[:6]}@local"
    env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                            if v is not None}}
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker",
                               f"--hostname={hostname}", "--loglevel=warning"],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    client = Client(settings)
    try:
        while not client.app.control.ping(destination=[hostname], timeout=0.5):
            if worker.poll() is not None:
                raise RuntimeError("the worker exited during start-up")
        warmup = client.submit(texts[0], {"max_tokens": max_tokens, "ignore_eos": True})
        client.wait(warmup, timeout=600)
        steps = engine_stats(client, hostname)["steps"]
        params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        start = time.time()
        ids = client.submit_many([{"prompt": text, "params": params, "queue": "bulk"}
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
        stats = engine_stats(client, hostname)
        return Result(wall, [r.metrics.e2e_s for r in records], stats["steps"] - steps,
                      stats["peak_running"])
    finally:
        worker.terminate()
        worker.wait(120)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    args = parser.parse_args()

    texts = prompts(args.jobs)
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
    try:
        local = in_process(engine_kwargs, texts, args.max_tokens)
        remote = queued(fields, texts, args.max_tokens)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()

    print(f"{args.jobs} jobs x {args.max_tokens} tokens, model {args.model}, "
          f"max_num_seqs {args.max_num_seqs}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| path | jobs/s | wall s | p50 e2e s | p99 e2e s | engine steps | peak running |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (("in-process engine", local), ("Redis + worker + PostgreSQL", remote)):
        print(f"| {name} | {args.jobs / r.wall_s:.1f} | {r.wall_s:.2f} | "
              f"{statistics.median(r.latencies):.2f} | {percentile(r.latencies, 0.99):.2f} | "
              f"{r.steps} | {r.peak_running} |")
    print(f"queued / in-process throughput: {local.wall_s / remote.wall_s:.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
