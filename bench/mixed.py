"""Interactive jobs during a bulk flood, through Redis, a `pagedq worker` and PostgreSQL.

    python -m bench.mixed [--bulk 512] [--max-tokens 256] [--interactive 32]
                          [--model smollm2-135m | --random-model tiny] [--out FILE]

One worker (threads pool, PAGEDQ_INTERACTIVE_RESERVE threads beyond max_num_seqs) runs
three kinds of round, --rounds times each, in ABBA order: the bulk flood alone (every
bulk job submitted at once on the bulk queue); the interactive jobs alone on the idle
worker, each submitted at its arrival time; the flood again with the interactive jobs
arriving at those times, drawn at random over the first 70% of the first flood's time.
With --compare (the default) a second worker without a reserve runs one more mixed
round. Prompts are random token ids, new each round (no prefix cache hits); every job
is greedy and ignores EOS. TTFT and queue time are what SQL records (from submit),
pooled over the rounds; bulk throughput is the bulk jobs' generated tokens over the
time from submit to the last bulk job's end (best round and mean); bulk slot use is
the share of max_num_seqs x that time that bulk jobs held a slot (first scheduled to
end).
Targets (issue 17): interactive TTFT p99 <= 3x idle; bulk throughput lost <= 10%.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from sqlalchemy import make_url

from bench.common import log, markdown_table, parse_setting, print_report
from bench.queue import percentile
from worker.client import Client
from worker.migrate import run_alembic
from worker.models import JobStatus
from worker.records import JobRecord
from worker.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300
# Prompt token ids: above the special tokens at the start of a vocabulary, and below
# the smallest vocabulary of bench/common.py's random models.
TOKEN_IDS = range(100, 512)
ARRIVAL_WINDOW = 0.7  # interactive jobs arrive over this share of the flood's time alone


@dataclass(slots=True)
class Round:
    interactive: list[JobRecord]
    bulk: list[JobRecord]
    bulk_wall_s: float  # from submit to the last bulk job's end; 0 without bulk jobs

    @property
    def bulk_tokens_per_s(self) -> float:
        return sum(r.metrics.generated_tokens for r in self.bulk) / self.bulk_wall_s

    @property
    def arrived_during_flood(self) -> int:
        """Interactive jobs submitted before the last bulk job ended (all of them, unless
        the machine sped up a lot after the first flood set the arrival times)."""
        if not self.bulk:
            return 0
        end = max(r.finished_at for r in self.bulk)
        return sum(j.created_at < end for j in self.interactive)

    def __str__(self) -> str:
        parts = []
        if self.interactive:
            ttft = [j.metrics.ttft_s for j in self.interactive]
            parts.append(f"interactive TTFT p50 {statistics.median(ttft):.3f} s, "
                         f"max {max(ttft):.3f} s")
        if self.bulk:
            parts.append(f"bulk {self.bulk_tokens_per_s:.0f} tokens/s")
        if self.bulk and self.interactive:
            parts.append(f"{self.arrived_during_flood}/{len(self.interactive)} interactive "
                         "during the flood")
        return "; ".join(parts)

    def bulk_slot_use(self, slots: int) -> float:
        """The share of the slots' time that bulk jobs held them (first scheduled to
        end; a claimed job may wait in the engine's queue first): what the worker's
        intake leaves idle, whatever the machine's speed."""
        held = sum((r.finished_at - r.created_at).total_seconds() - r.metrics.queue_time_s
                   for r in self.bulk)
        return held / (self.bulk_wall_s * slots)


@dataclass(slots=True)
class Series:
    """One kind of round, repeated: the interactive jobs of every round pooled; the
    best round's bulk throughput (load from elsewhere on the machine only slows) and
    the mean."""

    rounds: list[Round] = field(default_factory=list)

    def ttft(self, q: float) -> float:
        return percentile([j.metrics.ttft_s for r in self.rounds for j in r.interactive], q)

    def queue_time(self, q: float) -> float:
        return percentile([j.metrics.queue_time_s for r in self.rounds for j in r.interactive],
                          q)

    @property
    def bulk_tokens_per_s(self) -> float:
        return max(r.bulk_tokens_per_s for r in self.rounds)

    @property
    def mean_bulk_tokens_per_s(self) -> float:
        return statistics.mean(r.bulk_tokens_per_s for r in self.rounds)

    def bulk_slot_use(self, slots: int) -> float:
        return statistics.mean(r.bulk_slot_use(slots) for r in self.rounds)

    @property
    def has_interactive(self) -> bool:
        return bool(self.rounds[0].interactive)

    @property
    def has_bulk(self) -> bool:
        return bool(self.rounds[0].bulk)


class Workload:
    """Seeded prompts and arrival times: each round draws new prompts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)

    def prompts(self, n: int, low: int, high: int) -> list[list[int]]:
        return [[self.rng.choice(TOKEN_IDS) for _ in range(self.rng.randint(low, high))]
                for _ in range(n)]

    def bulk(self) -> list[dict]:
        params = {"temperature": 0, "max_tokens": self.args.max_tokens, "ignore_eos": True}
        return [{"prompt": p, "params": params, "queue": "bulk"}
                for p in self.prompts(self.args.bulk, 16, 128)]

    def interactive(self) -> list[dict]:
        params = {"temperature": 0, "max_tokens": self.args.interactive_tokens,
                  "ignore_eos": True}
        return [{"prompt": p, "params": params} for p in self.prompts(self.args.interactive, 8, 64)]


def run_round(client: Client, bulk: list[dict], interactive: list[dict],
              arrivals: list[float]) -> Round:
    """Submit the bulk jobs at once, each interactive one at its arrival time; wait for all."""
    start = time.time()
    bulk_ids = client.submit_many(bulk) if bulk else []
    interactive_ids = []
    for at, job in zip(arrivals, interactive, strict=True):
        time.sleep(max(0.0, start + at - time.time()))
        interactive_ids.append(client.submit_many([job])[0])
    records = wait_all(client, bulk_ids + interactive_ids)
    bulk_records = [records[i] for i in bulk_ids]
    wall = max(r.finished_at.timestamp() for r in bulk_records) - start if bulk else 0.0
    return Round([records[i] for i in interactive_ids], bulk_records, wall)


def wait_all(client: Client, ids: list[str]) -> dict[str, JobRecord]:
    pending, records = set(ids), {}
    while pending:
        for record in client.store.get_many(pending, finished_only=True):
            if record.status is not JobStatus.SUCCEEDED:
                raise RuntimeError(f"job {record.id} ended {record.status}: {record.error}")
            records[record.id] = record
            pending.discard(record.id)
        if pending:
            time.sleep(0.25)
    return records


@contextmanager
def worker(fields: dict, log_path: Path) -> Iterator[Client]:
    """A `pagedq worker` subprocess and a client of its queues."""
    settings = load_settings(**fields)
    run_alembic(settings.database_url)
    hostname = f"bench-{uuid.uuid4().hex[:6]}@local"
    env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                            if v is not None}}
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", f"--hostname={hostname}",
             "--loglevel=warning"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        with Client(settings) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not client.app.control.ping(destination=[hostname], timeout=0.5):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start; see {log_path}")
            yield client
    finally:
        process.terminate()
        process.wait(120)


@contextmanager
def scratch_database(postgres_url: str) -> Iterator[str]:
    admin_url = make_url(postgres_url)
    database = f"pagedq_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(admin_url.set(drivername="postgresql")
                            .render_as_string(hide_password=False), autocommit=True)
    admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield admin_url.set(database=database).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def measure(args: argparse.Namespace, model: str) -> dict[str, Series]:
    """The rounds, alternated so that load from elsewhere on the machine hits each alike."""
    workload = Workload(args)
    series = {name: Series() for name in ("flood", "idle", "mixed", "no reserve")}
    with scratch_database(args.postgres_url) as database_url:
        run = uuid.uuid4().hex[:8]
        fields = {"model": model, "max_num_seqs": args.max_num_seqs,
                  "broker_url": args.broker_url, "database_url": database_url,
                  "interactive_queue": f"bench-{run}.interactive",
                  "bulk_queue": f"bench-{run}.bulk", **dict(args.set or [])}
        with worker({**fields, "interactive_reserve": args.reserve},
                    args.log_dir / "bench-mixed-worker.log") as client:
            arrivals = with_reserve(client, workload, args.rounds, series)
        if args.compare:
            with worker({**fields, "interactive_reserve": 0},
                        args.log_dir / "bench-mixed-worker-no-reserve.log") as client:
                series["no reserve"].rounds.append(
                    run_round(client, workload.bulk(), workload.interactive(), arrivals))
                log(f"mixed, without a reserve: {series['no reserve'].rounds[0]}")
    return {name: s for name, s in series.items() if s.rounds}


def with_reserve(client: Client, workload: Workload, rounds: int,
                 series: dict[str, Series]) -> list[float]:
    """The flood, idle and mixed rounds on one worker; returns the arrival times."""
    run_round(client, workload.bulk()[:8], workload.interactive()[:4], [0.0] * 4)  # warm-up
    series["flood"].rounds.append(run_round(client, workload.bulk(), [], []))
    log(f"round 1, flood: {series['flood'].rounds[0]}")
    window = ARRIVAL_WINDOW * series["flood"].rounds[0].bulk_wall_s
    arrivals = sorted(workload.rng.uniform(0, window) for _ in range(workload.args.interactive))
    jobs = {"flood": lambda: (workload.bulk(), [], []),
            "idle": lambda: ([], workload.interactive(), arrivals),
            "mixed": lambda: (workload.bulk(), workload.interactive(), arrivals)}
    for round_ in range(rounds):
        # ABBA: drifting load from elsewhere on the machine hits each kind alike.
        order = ["idle", "mixed"] if round_ == 0 else \
            ["flood", "idle", "mixed"][::1 if round_ % 2 == 0 else -1]
        for kind in order:
            series[kind].rounds.append(run_round(client, *jobs[kind]()))
            log(f"round {round_ + 1}, {kind}: {series[kind].rounds[-1]}")
    return arrivals


def report(args: argparse.Namespace, series: dict[str, Series]) -> str:
    idle, flood, mixed = series["idle"], series["flood"], series["mixed"]
    rows = []
    for name, label in (("idle", "interactive alone, idle worker"),
                        ("flood", "bulk flood alone"),
                        ("mixed", f"flood + interactive, reserve {args.reserve}"),
                        ("no reserve", "flood + interactive, reserve 0")):
        s = series.get(name)
        if s is None:
            continue
        interactive = [f"{s.ttft(0.5):.3f}", f"{s.ttft(0.99):.3f}",
                       f"{s.queue_time(0.99):.3f}"] if s.has_interactive else ["-"] * 3
        bulk = [f"{s.bulk_tokens_per_s:.0f}", f"{s.mean_bulk_tokens_per_s:.0f}",
                f"{s.bulk_slot_use(args.max_num_seqs):.1%}"] if s.has_bulk else ["-"] * 3
        rows.append([label, len(s.rounds), *interactive, *bulk])
    lines = [
        f"{args.bulk} bulk jobs x {args.max_tokens} tokens + {args.interactive} interactive x "
        f"{args.interactive_tokens} tokens, model {args.model_label}, max_num_seqs "
        f"{args.max_num_seqs}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}; "
        "interactive jobs of all rounds pooled; bulk throughput of the best round and the "
        "mean; mean slot use",
        "",
        markdown_table(["round", "rounds", "interactive TTFT p50 s", "TTFT p99 s",
                        "queue time p99 s", "bulk tokens/s best", "mean",
                        "bulk slot use"], rows),
        "",
        f"interactive TTFT p99, flood / idle: {mixed.ttft(0.99) / idle.ttft(0.99):.2f} "
        f"(target <= 3); p50: {mixed.ttft(0.5) / idle.ttft(0.5):.2f}",
        f"bulk throughput lost to the interactive jobs: "
        f"{1 - mixed.bulk_tokens_per_s / flood.bulk_tokens_per_s:.1%} best round, "
        f"{1 - mixed.mean_bulk_tokens_per_s / flood.mean_bulk_tokens_per_s:.1%} mean "
        "(target <= 10%)",
    ]
    if "no reserve" in series:
        lines.append(f"without a reserve, TTFT p99 flood / idle: "
                     f"{series['no reserve'].ttft(0.99) / idle.ttft(0.99):.2f}")
    return "\n".join(lines)


def random_checkpoint(shape: str, device_name: str | None, folder: Path) -> str:
    import torch

    from bench.common import build_random_checkpoint, resolve_device

    device = resolve_device(device_name or "auto")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    log(f"building a random {shape} checkpoint")
    return str(build_random_checkpoint(shape, folder / shape, dtype, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bulk", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256, help="per bulk job")
    parser.add_argument("--interactive", type=int, default=32)
    parser.add_argument("--interactive-tokens", type=int, default=32)
    parser.add_argument("--reserve", type=int, default=8, help="PAGEDQ_INTERACTIVE_RESERVE")
    parser.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                        help="run the mixed round again on a worker without a reserve")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-model", help="a bench/common.py RANDOM_MODELS shape, built "
                                               "in a temporary folder (instead of --model)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate flood, idle and mixed rounds this often")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", type=parse_setting, action="append", metavar="NAME=VALUE",
                        help="another worker setting (e.g. device=cpu)")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pagedq-mixed-") as tmp:
        model = args.model
        if args.random_model:
            model = random_checkpoint(args.random_model, dict(args.set or []).get("device"),
                                      Path(tmp))
        args.model_label = f"random {args.random_model}" if args.random_model else args.model
        series = measure(args, model)
    print_report(report(args, series), args.out)


if __name__ == "__main__":
    main()
