"""Chaos: short jobs on two workers while workers die, Redis forgets and PostgreSQL
drops its connections; every job must still end exactly once.

    python bench/chaos.py [--jobs 1000] [--kill-every 20]

The same jobs run twice on the same two `pagedq worker` subprocesses (a tiny
random Llama with SmolLM2's tokenizer, built in a temporary folder), in a
scratch PostgreSQL database: first without faults, then with them. Each run
submits its jobs as fast as the producer can, 50 a call: greedy, 8 tokens,
distinct prompts; 2% are poison
(a stop token outside the vocabulary, which the engine rejects), and about 10%
get 1-3 extra copies of their message while they run. The faults: every
`--kill-every` seconds one worker (in turn) is killed with SIGKILL and started
again at once, as a supervisor would; once a third of the jobs are done the
broker's Redis database is flushed (a restart without persistence); once two
thirds are, every connection to the job database is terminated.

Leases, sweeps and re-publishes are short so that recovery is quick; Redis'
visibility timeout is 3600 s, so that recovery cannot come from Redis
redelivery. The run ends by itself at `--deadline-s`; a job not
finished by then counts as lost. Prints one table and the faults' log.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/chaos.py` puts bench/ first on sys.path, where bench/queue.py would
# shadow the standard library's `queue` that Celery imports: import from the root.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager, suppress  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import psycopg  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import func, make_url, select  # noqa: E402

from bench.common import machine_name, markdown_table  # noqa: E402
from worker.client import Client, publish  # noqa: E402
from worker.db import is_transient  # noqa: E402
from worker.migrate import run_alembic  # noqa: E402
from worker.models import Job, JobStatus, Metrics, Output  # noqa: E402
from worker.schemas import QueueKind  # noqa: E402
from worker.settings import load_settings  # noqa: E402
from worker.store import JobStore  # noqa: E402

T = TypeVar("T")

# Recovery settings of this run: a dead worker's jobs are taken over about
# LEASE_S + SWEEP_INTERVAL_S after it died, a lost message REPUBLISH_AFTER_S
# after it was sent.
RECOVERY = {"lease_s": 5.0, "sweep_interval_s": 1.0, "republish_after_s": 10.0}
# Set, not left to the default, so that recovery can never come from Redis handing
# an abandoned message out again: the leases and the sweep must do it alone.
VISIBILITY_TIMEOUT_S = 3600.0
PARAMS = {"max_tokens": 8, "temperature": 0}
POISON_EVERY = 50  # 2% of the jobs
POISON_STOP_ID = 1_000_000_000  # passes the producer, which does not know the vocabulary
DUPLICATED_SHARE = 0.10
MAX_EXTRA_COPIES = 3
FLUSH_AT, DROP_AT = 1 / 3, 2 / 3  # share of jobs finished when each one-off fault fires
TICK_S = 0.2
SUBMIT_CHUNK = 50
PROGRESS_EVERY_S = 10.0
STOP_WAIT_S = 30.0
QUEUE = QueueKind.BULK
# What the workers log, counted per run.
LOG_EVENTS = {
    "sweep re-publishes": "re-published:",
    "duplicate deliveries dropped (busy)": "not run: busy",
    "deliveries of finished jobs dropped": "not run: finished",
    "stale results fenced off": "lost its lease to a newer attempt",
    "transient-error retries": "; retrying in",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """The jobs of one run, by position: the same plan runs without and with faults."""

    requests: list[dict[str, Any]]
    poison: frozenset[int]
    extra_copies: dict[int, int]  # position -> duplicate messages to send while it runs


def make_plan(num_jobs: int, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    topics = ["rivers", "bridges", "printing", "bees", "glass", "tides", "maps", "salt"]
    poison = frozenset(i for i in range(num_jobs) if i % POISON_EVERY == POISON_EVERY - 1)
    requests = []
    for i in range(num_jobs):
        params = {**PARAMS, "stop_token_ids": [POISON_STOP_ID]} if i in poison else PARAMS
        # Under one 16-token block: the second run cannot hit the first one's prefix cache.
        requests.append({"prompt": f"Job {i}: a line on {topics[i % len(topics)]}",
                         "params": params, "queue": QUEUE.value})
    healthy = [i for i in range(num_jobs) if i not in poison]
    chosen = rng.sample(healthy, round(DUPLICATED_SHARE * num_jobs))
    return Plan(requests, poison, {i: rng.randint(1, MAX_EXTRA_COPIES) for i in chosen})


def build_checkpoint(path: Path) -> str:
    """The tests' tiny random Llama (tests/conftest.py) with SmolLM2's tokenizer; returns
    a description of it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from engine.model_loader import resolve_model_path

    hf_logging.disable_progress_bar()  # a bar drawn with carriage returns in the output file
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer),
        max_position_embeddings=1024, initializer_range=0.25, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return (f"random Llama, 2 layers, hidden 64, 4 heads over 2 KV heads, vocabulary "
            f"{len(tokenizer)} (SmolLM2-135M's tokenizer), float32")


class Worker:
    """`pagedq worker` in a subprocess. Each start is a new incarnation with its own
    hostname, so that SQL tells which incarnation ran a job; all write one log."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.incarnation = 0
        self.hostname = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.incarnation += 1
        self.hostname = f"{self.name}-{self.incarnation}@chaos"
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.hostname} at {time.time():.3f}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker", f"--hostname={self.hostname}",
                 "--loglevel=info"], cwd=ROOT, env=self.env, stdout=log,
                stderr=subprocess.STDOUT)

    def wait_ready(self, client: Client, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not client.app.control.ping(destination=[self.hostname], timeout=0.5):
            if self.exit_code() is not None:
                raise RuntimeError(f"{self.hostname} exited during start-up; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.hostname} not ready after {timeout} s")

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass(slots=True)
class Kill:
    at: float  # epoch seconds, just before SIGKILL
    hostname: str
    orphans: list[str]  # the jobs it had running
    recovery_s: float | None = None  # until every orphan finished; None: not all did
    claimed_s: float | None = None  # until the last orphan's final attempt was claimed


@dataclass(slots=True)
class FaultLog:
    kills: list[Kill] = field(default_factory=list)
    flushed: tuple[float, int] | None = None  # when, messages dropped
    dropped: tuple[float, int] | None = None  # when, backends terminated
    unexpected_exits: list[str] = field(default_factory=list)


def with_retries(fn: Callable[..., T], *args: Any, attempts: int = 20) -> T:
    """Call fn; on a transient database error (the faults cause them) wait and retry."""
    for attempt in range(attempts):
        try:
            return fn(*args)
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def running_on(store: JobStore, hostname: str) -> list[str]:
    with store.engine.connect() as db:
        return list(db.scalars(select(Job.id).where(Job.worker == hostname,
                                                    Job.status == JobStatus.RUNNING)))


class Faults:
    """The chaos run's faults, fired from its polling loop."""

    def __init__(self, workers: Sequence[Worker], store: JobStore, broker: redis.Redis,
                 admin: psycopg.Connection, database: str, queues: list[str],
                 kill_every: float) -> None:
        self.workers = workers
        self.store = store
        self.broker = broker
        self.admin = admin
        self.database = database
        self.queues = queues
        self.kill_every = kill_every
        self.next_kill = time.time() + kill_every
        self.log = FaultLog()

    def tick(self, done_share: float) -> None:
        if time.time() >= self.next_kill:
            self.kill_one()
            # From now, not from the last due time: a slow tick never fires kills back to back.
            self.next_kill = time.time() + self.kill_every
        if self.log.flushed is None and done_share >= FLUSH_AT:
            self.flush_broker()
        if self.log.dropped is None and done_share >= DROP_AT:
            self.drop_connections()

    def kill_one(self) -> None:
        worker = self.workers[len(self.log.kills) % len(self.workers)]
        at, hostname = time.time(), worker.hostname
        worker.kill()
        # Dead now: the rows it holds stay running until their lease runs out.
        orphans = with_retries(running_on, self.store, hostname)
        worker.start()
        self.log.kills.append(Kill(at, hostname, orphans))
        say(f"killed {hostname} holding {len(orphans)} running jobs; started {worker.hostname}")

    def flush_broker(self) -> None:
        queued = sum(self.broker.llen(queue) for queue in self.queues)
        # This database only (checked to be ours at start): as after a restart
        # without persistence, every queued and unacked message is gone.
        self.broker.flushdb()
        self.log.flushed = (time.time(), queued)
        say(f"flushed the broker's Redis db: {queued} queued messages dropped")

    def drop_connections(self) -> None:
        rows = self.admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (self.database,)).fetchall()
        self.log.dropped = (time.time(), len(rows))
        say(f"terminated {len(rows)} PostgreSQL backends of {self.database}")

    def supervise(self) -> None:
        """Restart a worker that exited by itself, as a supervisor would; note it."""
        for worker in self.workers:
            code = worker.exit_code()
            if code is not None:
                self.log.unexpected_exits.append(f"{worker.hostname} (exit {code})")
                say(f"{worker.hostname} exited by itself with status {code}; restarting")
                worker.start()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Run:
    name: str
    ids: list[str]
    start: float
    submit_s: float | None = None  # until the producer had sent every job
    duplicated_jobs: int = 0
    duplicate_messages: int = 0
    faults: FaultLog | None = None
    log_counts: dict[str, int] = field(default_factory=dict)


def statuses(store: JobStore, ids: list[str]) -> dict[str, JobStatus]:
    with store.engine.connect() as db:
        return dict(db.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())


class Duplicator:
    """Sends extra copies of chosen jobs' messages once they are seen running, as a
    sweep, Flower or any Redis client can."""

    def __init__(self, client: Client, plan: Plan) -> None:
        self.client = client
        self.due = dict(plan.extra_copies)  # position -> copies
        self.jobs = self.messages = 0

    def tick(self, ids: list[str], now_running: set[str]) -> None:
        for position in [i for i in self.due if i < len(ids) and ids[i] in now_running]:
            copies = self.due.pop(position)
            for _ in range(copies):  # a message each: in one call they would share one
                publish(self.client.app, [(ids[position], QUEUE)])
            self.jobs += 1
            self.messages += copies


def submit_chunk(client: Client, plan: Plan, ids: list[str]) -> None:
    """Submit the next SUBMIT_CHUNK jobs. In chunks, so that the faults and the
    duplicates keep their clock while a large run is still being submitted."""
    chunk = plan.requests[len(ids):len(ids) + SUBMIT_CHUNK]
    try:
        ids += client.submit_many(chunk)
    except Exception as exc:
        if not is_transient(exc):
            raise  # BrokerUnavailable too: Redis stays up here, so that would be a bug
        # The rows are written all or none: the chunk is sent again next tick.
        say(f"submit refused ({exc!r:.80}); trying again")


def poll(client: Client, ids: list[str]) -> dict[str, JobStatus]:
    try:
        return statuses(client.store, ids)
    except Exception as exc:
        if not is_transient(exc):
            raise
        return {}  # the connections were just dropped; look again next tick


def run_jobs(name: str, client: Client, plan: Plan, deadline: float,
             faults: Faults | None, log_dir: Path) -> Run:
    before = count_log_events(log_dir)
    run = Run(name, [], time.time(), faults=None if faults is None else faults.log)
    duplicator = Duplicator(client, plan)
    last_report, total = run.start, len(plan.requests)
    while time.time() < deadline:
        if len(run.ids) < total:
            submit_chunk(client, plan, run.ids)
            if len(run.ids) == total:
                run.submit_s = time.time() - run.start
        now = poll(client, run.ids)
        done = sum(status.finished for status in now.values())
        if done == total:
            break
        duplicator.tick(run.ids, {job_id for job_id, s in now.items()
                                  if s is JobStatus.RUNNING})
        if faults is not None:
            faults.supervise()
            faults.tick(done / total)
        if time.time() - last_report >= PROGRESS_EVERY_S:
            say(f"{name}: {len(run.ids)} submitted, {done} finished after "
                f"{time.time() - run.start:.0f} s")
            last_report = time.time()
        time.sleep(TICK_S)
    after = count_log_events(log_dir)
    run.duplicated_jobs, run.duplicate_messages = duplicator.jobs, duplicator.messages
    run.log_counts = {event: after[event] - before[event] for event in LOG_EVENTS}
    return run


def count_log_events(log_dir: Path) -> dict[str, int]:
    text = "".join(path.read_text(errors="replace") for path in sorted(log_dir.glob("*.log")))
    return {event: text.count(needle) for event, needle in LOG_EVENTS.items()}


@dataclass(slots=True)
class Tally:
    """What SQL holds about one run's jobs at its end."""

    jobs: int
    lost: int
    duplicate_outputs: int  # jobs with two output rows for one index
    duplicate_metrics: int  # jobs with two metrics rows (two recorded attempts)
    succeeded_without_result: int
    healthy_failed: list[str]  # their errors
    poison_failed: int
    poison_total: int
    wall_s: float
    tokens: dict[int, list[int]]  # position -> first output's token ids


def tally(store: JobStore, run: Run, plan: Plan) -> Tally:
    position = {job_id: i for i, job_id in enumerate(run.ids)}
    with store.engine.connect() as db:
        rows = db.execute(select(Job.id, Job.status, Job.error, Job.finished_at)
                          .where(Job.id.in_(run.ids))).all()
        output_dupes = db.scalars(
            select(Output.job_id).where(Output.job_id.in_(run.ids))
            .group_by(Output.job_id, Output.index).having(func.count() > 1)).all()
        metrics_count = dict(db.execute(
            select(Metrics.job_id, func.count()).where(Metrics.job_id.in_(run.ids))
            .group_by(Metrics.job_id)).all())
        tokens = {position[job_id]: ids for job_id, ids in db.execute(
            select(Output.job_id, Output.token_ids)
            .where(Output.job_id.in_(run.ids), Output.index == 0))}
    finished = [r for r in rows if r.status.finished]
    healthy = [r for r in rows if position[r.id] not in plan.poison]
    poison = [r for r in rows if position[r.id] in plan.poison]
    return Tally(
        jobs=len(plan.requests), lost=len(plan.requests) - len(finished),
        duplicate_outputs=len(set(output_dupes)),
        duplicate_metrics=sum(count > 1 for count in metrics_count.values()),
        succeeded_without_result=sum(r.status is JobStatus.SUCCEEDED
                                     and (r.id not in metrics_count
                                          or position[r.id] not in tokens) for r in rows),
        healthy_failed=[f"{r.id}: {r.status.value}: {r.error}" for r in healthy
                        if r.status.finished and r.status is not JobStatus.SUCCEEDED],
        poison_failed=sum(r.status is JobStatus.FAILED and "stop_token_ids" in (r.error or "")
                          for r in poison),
        poison_total=len(plan.poison),
        wall_s=_last(finished, run.start) - run.start,
        tokens=tokens,
    )


def _last(rows: Sequence[Any], default: float) -> float:
    return max((r.finished_at.timestamp() for r in rows), default=default)


def measure_recovery(store: JobStore, kills: list[Kill]) -> None:
    """Each kill's recovery: from the kill to the last of its orphans finishing."""
    for kill in kills:
        if not kill.orphans:
            continue  # nothing to recover; left out of the percentiles
        with store.engine.connect() as db:
            rows = db.execute(select(Job.started_at, Job.finished_at)
                              .where(Job.id.in_(kill.orphans))).all()
        kill.claimed_s = _latest_after(kill.at, [r.started_at for r in rows])
        if len(rows) == len(kill.orphans) and all(r.finished_at for r in rows):
            kill.recovery_s = _latest_after(kill.at, [r.finished_at for r in rows])


def _latest_after(at: float, times: list[datetime | None]) -> float | None:
    if not times or any(t is None for t in times):
        return None
    # A commit sent just before the kill can land just after it: never negative.
    return max(0.0, max(t.timestamp() for t in times if t) - at)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- services ---------------------------------------------------------------

def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def scratch_database(admin: psycopg.Connection, server_url: str) -> Iterator[tuple[str, str]]:
    """A fresh, migrated database, dropped at the end; yields its name and URL."""
    name = f"pagedq_chaos_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
        run_alembic(url)
        yield name, url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def own_broker_db(url: str) -> redis.Redis:
    """The broker's Redis db, which the run flushes: never db 0, and empty at start, so
    that nobody else's data is in it."""
    broker = redis.Redis.from_url(url)
    db = broker.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        raise SystemExit(f"--broker-url {url}: use a dedicated Redis db (not 0); it is flushed")
    if broker.dbsize():
        raise SystemExit(f"--broker-url {url}: Redis db {db} is not empty; pick an unused one")
    return broker


def worker_env(fields: dict[str, Any]) -> dict[str, str]:
    env = {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()}}
    # Two workers share the cores with Redis, PostgreSQL and this process; one torch
    # thread each keeps them from spinning against each other on a tiny model.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def purge(client: Client, broker: redis.Redis) -> None:
    """Drop messages left over from a finished run (its duplicates and re-publishes)."""
    for queue in (client.settings.interactive_queue, client.settings.bulk_queue):
        broker.delete(queue)


# -- report -----------------------------------------------------------------

def fmt_recovery(kills: list[Kill]) -> str:
    times = [k.recovery_s for k in kills if k.recovery_s is not None]
    unrecovered = sum(bool(k.orphans) and k.recovery_s is None for k in kills)
    text = "n/a" if not times else (f"{percentile(times, 0.5):.1f} / "
                                    f"{percentile(times, 0.99):.1f} / {max(times):.1f}")
    return text + (f" ({unrecovered} not recovered)" if unrecovered else "")


def report(calm: Run, chaos: Run, calm_tally: Tally, chaos_tally: Tally, plan: Plan) -> None:
    assert chaos.faults is not None
    faults = chaos.faults
    healthy = [i for i in range(len(plan.requests)) if i not in plan.poison]
    same = sum(i in chaos_tally.tokens and chaos_tally.tokens[i] == calm_tally.tokens.get(i)
               for i in healthy)
    rows: list[list[object]] = [
        ["jobs", calm_tally.jobs, chaos_tally.jobs],
        ["jobs lost (not finished by the deadline)", calm_tally.lost, chaos_tally.lost],
        ["jobs with two result sets: outputs / metrics",
         f"{calm_tally.duplicate_outputs} / {calm_tally.duplicate_metrics}",
         f"{chaos_tally.duplicate_outputs} / {chaos_tally.duplicate_metrics}"],
        ["succeeded jobs without outputs or metrics", calm_tally.succeeded_without_result,
         chaos_tally.succeeded_without_result],
        ["healthy jobs failed", len(calm_tally.healthy_failed),
         len(chaos_tally.healthy_failed)],
        ["poison jobs failed (of)", f"{calm_tally.poison_failed} ({calm_tally.poison_total})",
         f"{chaos_tally.poison_failed} ({chaos_tally.poison_total})"],
        ["healthy outputs token-identical to the fault-free run", "-",
         f"{same} / {len(healthy)}"],
        ["duplicated jobs (extra messages)", f"{calm.duplicated_jobs} "
         f"({calm.duplicate_messages})", f"{chaos.duplicated_jobs} ({chaos.duplicate_messages})"],
        ["worker kills (jobs they held running)", 0,
         f"{len(faults.kills)} ({sum(len(k.orphans) for k in faults.kills)})"],
        ["recovery after a kill holding jobs, p50 / p99 / max s", "-",
         fmt_recovery(faults.kills)],
        ["workers that exited by themselves", 0, len(faults.unexpected_exits)],
        *[[event, calm.log_counts[event], chaos.log_counts[event]] for event in LOG_EVENTS],
        ["s until every job was submitted", _seconds(calm.submit_s), _seconds(chaos.submit_s)],
        ["wall s (first submit to last finish)", f"{calm_tally.wall_s:.1f}",
         f"{chaos_tally.wall_s:.1f}"],
        ["jobs/s (finished jobs / wall)", f"{jobs_per_s(calm_tally):.2f}",
         f"{jobs_per_s(chaos_tally):.2f}"],
    ]
    print(markdown_table(["", "no faults", "faults"], rows))
    ratio = jobs_per_s(chaos_tally) / jobs_per_s(calm_tally)
    print(f"\nthroughput with faults / without: {ratio:.2f}")
    print_fault_log(chaos)
    for tally_, run in ((calm_tally, calm), (chaos_tally, chaos)):
        for line in tally_.healthy_failed[:10]:
            print(f"{run.name}: healthy job failed: {line}")


def _seconds(value: float | None) -> str:
    return "not all" if value is None else f"{value:.1f}"


def jobs_per_s(t: Tally) -> float:
    return (t.jobs - t.lost) / t.wall_s if t.wall_s > 0 else 0.0


def _recovery_steps(kill: Kill) -> str:
    if not kill.orphans:
        return ", nothing to recover"
    if kill.recovery_s is None:
        return ", NOT all recovered"
    return (f"; the last of them claimed again {kill.claimed_s:.1f} s and finished "
            f"{kill.recovery_s:.1f} s after the kill")


def print_fault_log(chaos: Run) -> None:
    assert chaos.faults is not None
    faults = chaos.faults
    print("\nfaults (seconds from the chaos run's submit):")
    for kill in faults.kills:
        print(f"  {kill.at - chaos.start:6.1f}  kill -9 {kill.hostname}: "
              f"{len(kill.orphans)} running jobs{_recovery_steps(kill)}")
    if faults.flushed:
        print(f"  {faults.flushed[0] - chaos.start:6.1f}  FLUSHDB of the broker's db: "
              f"{faults.flushed[1]} queued messages dropped")
    else:
        print("     -    FLUSHDB: not done, the run ended first")
    if faults.dropped:
        print(f"  {faults.dropped[0] - chaos.start:6.1f}  pg_terminate_backend: "
              f"{faults.dropped[1]} connections of the job database")
    else:
        print("     -    pg_terminate_backend: not done, the run ended first")
    for line in faults.unexpected_exits:
        print(f"  exited by itself: {line}")


# -- main -------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--kill-every", type=float, default=20.0,
                        help="seconds between two kills (alternating workers)")
    parser.add_argument("--deadline-s", type=float, default=900.0,
                        help="the whole run ends by then; unfinished jobs count as lost")
    parser.add_argument("--max-num-seqs", type=int, default=32,
                        help="engine batch and task threads per worker")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/11",
                        help="a Redis db of its own: the run flushes it")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where the workers' logs go (default: a new temporary folder, "
                             "kept)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    broker = own_broker_db(args.broker_url)
    deadline = time.time() + args.deadline_s
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pagedq-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args.jobs)
    admin = psycopg.connect(libpq(args.postgres_url), autocommit=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pagedq-chaos-model-") as model_dir, \
                scratch_database(admin, args.postgres_url) as (database, url):
            model = build_checkpoint(Path(model_dir))
            run = uuid.uuid4().hex[:8]
            fields = {
                "model": model_dir, "dtype": "float32", "device": "cpu",
                "num_device_blocks": 512, "swap_space_gib": 0.05,
                "max_num_seqs": args.max_num_seqs, "broker_url": args.broker_url,
                "database_url": url, "interactive_queue": f"chaos-{run}.interactive",
                "bulk_queue": f"chaos-{run}.bulk", **RECOVERY,
                "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
            }
            print_header(args, model, fields, log_dir)
            runs = run_both(args, plan, fields, broker, admin, database, deadline, log_dir)
            report(*runs, plan)
    finally:
        admin.close()
        broker.flushdb()  # our own db (checked empty at start): leave it as found
    print(f"\nworker logs: {log_dir}")


def print_header(args: argparse.Namespace, model: str, fields: dict[str, Any],
                 log_dir: Path) -> None:
    print(f"chaos: {args.jobs} jobs x {PARAMS['max_tokens']} tokens (greedy, distinct prompts; "
          f"{len(range(POISON_EVERY - 1, args.jobs, POISON_EVERY))} poison), two workers, "
          f"{machine_name(torch.device('cpu'))}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"model: {model}")
    recovery = " ".join(f"PAGEDQ_{name.upper()}={fields[name]:g}"
                        for name in (*RECOVERY, "visibility_timeout_s"))
    print(f"workers: max_num_seqs = concurrency {fields['max_num_seqs']}, 1 torch thread each; "
          f"{recovery} PAGEDQ_MAX_ATTEMPTS={load_settings(**fields).max_attempts}")
    print(f"faults: kill -9 every {args.kill_every:g} s (alternating, restarted at once); "
          f"FLUSHDB at {FLUSH_AT:.0%} done; pg_terminate_backend at {DROP_AT:.0%} done; "
          f"deadline {args.deadline_s:g} s for both runs")
    print(f"worker logs: {log_dir}\n", flush=True)


def run_both(args: argparse.Namespace, plan: Plan, fields: dict[str, Any], broker: redis.Redis,
             admin: psycopg.Connection, database: str, deadline: float,
             log_dir: Path) -> tuple[Run, Run, Tally, Tally]:
    env = worker_env(fields)
    workers = [Worker(name, env, log_dir / f"{name}.log") for name in ("a", "b")]
    client = Client(load_settings(**fields))
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(client, timeout=180)
        # The fault-free run first, with at most a third of the time: the chaos run's
        # length is the unknown one.
        calm_deadline = min(deadline, time.time() + args.deadline_s / 3)
        calm = run_jobs("no faults", client, plan, calm_deadline, None, log_dir)
        purge(client, broker)
        faults = Faults(workers, client.store, broker, admin, database,
                        [fields["interactive_queue"], fields["bulk_queue"]], args.kill_every)
        chaos = run_jobs("faults", client, plan, deadline, faults, log_dir)
        measure_recovery(client.store, faults.log.kills)
        return (calm, chaos, with_retries(tally, client.store, calm, plan),
                with_retries(tally, client.store, chaos, plan))
    finally:
        with suppress(Exception):
            purge(client, broker)
        for worker in workers:
            worker.stop()
        client.close()


if __name__ == "__main__":
    main()
