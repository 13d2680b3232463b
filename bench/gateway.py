"""Gateway overhead: N concurrent streaming chat requests through `pagedq serve` (the
OpenAI SDK, server-sent events) against the same jobs through the Python client.

    python -m bench.gateway [--requests 256] [--max-tokens 64] [--model smollm2-135m]
    python -m bench.gateway --gateway-url http://host:8000 --api-key pq-...   # a running one

By default one `pagedq worker` and one `pagedq serve` subprocess run on a scratch
database; with --gateway-url the client path reads PAGEDQ_* (database, broker, queues)
from the environment, which must be the gateway's. Every request is greedy with
ignore_eos, so both paths generate the same tokens. The gateway path sends all requests
at once from one AsyncOpenAI client; the client path submits the same jobs with one
Client.submit_many and reads each with Client.stream on a thread of its own. TTFT: from
sending to the first text; output tokens/s: all generated tokens over the round's wall
time. Prints a table and the gateway/client ratios (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
import psycopg
from sqlalchemy import make_url

from bench.common import parse_setting
from bench.queue import percentile
from worker.client import Client
from worker.keys import KeyStore
from worker.migrate import run_alembic
from worker.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300


@dataclass(slots=True)
class Round:
    ttft_s: list[float]
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def conversations(n: int, round_: int) -> list[list[dict[str, str]]]:
    # New questions each round, so that no round is helped by an earlier one's cache.
    topics = ["rivers", "bridges", "printing", "bees", "glass", "tides", "maps", "salt"]
    return [[{"role": "user", "content": f"Round {round_}, question {i}: tell me about "
              f"{topics[i % len(topics)]}" + " and why it matters" * (i % 4)}]
            for i in range(n)]


async def _one_request(api: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]],
                       max_tokens: int, start: float) -> tuple[float, int, float]:
    stream = await api.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first, tokens = None, 0
    async for chunk in stream:
        if first is None and any(c.delta.content for c in chunk.choices):
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise RuntimeError("a streamed answer held no text")
    return first, tokens, time.perf_counter()


def through_gateway(url: str, key: str, model: str, batch: list[list[dict[str, str]]],
                    max_tokens: int) -> Round:
    async def run() -> Round:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0,
                                      timeout=3600) as api:
            start = time.perf_counter()
            done = await asyncio.gather(*(_one_request(api, model, m, max_tokens, start)
                                          for m in batch))
        return Round([d[0] for d in done], sum(d[1] for d in done),
                     max(d[2] for d in done) - start)

    return asyncio.run(run())


def through_client(client: Client, batch: list[list[dict[str, str]]],
                   max_tokens: int) -> Round:
    params = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    start = time.perf_counter()
    ids = client.submit_many([{"messages": m, "params": params, "stream": True}
                              for m in batch])

    def read(job_id: str) -> tuple[float, int, float]:
        first = None
        for delta in client.stream(job_id, timeout=3600):
            if first is None and delta.text:
                first = time.perf_counter() - start
        record = client.get(job_id)
        if first is None or record is None or record.metrics is None:
            raise RuntimeError(f"job {job_id} streamed no text")
        return first, record.metrics.generated_tokens, time.perf_counter()

    with ThreadPoolExecutor(len(ids)) as pool:
        done = list(pool.map(read, ids))
    return Round([d[0] for d in done], sum(d[1] for d in done),
                 max(d[2] for d in done) - start)


def _env(fields: dict) -> dict[str, str]:
    return {**os.environ, **{f"PAGEDQ_{k.upper()}": str(v) for k, v in fields.items()
                             if v is not None}}


def _wait_ready(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.2)


def _gateway_up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


@contextmanager
def _process(args: list[str], fields: dict, log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", *args], cwd=REPO,
                                   env=_env(fields), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(120)


@contextmanager
def own_stack(args: argparse.Namespace) -> Iterator[tuple[str, str, Settings]]:
    """A scratch database, a worker and a gateway; yields (gateway URL, key, settings)."""
    admin_url = make_url(args.postgres_url)
    database = f"pagedq_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(admin_url.set(drivername="postgresql")
                            .render_as_string(hide_password=False), autocommit=True)
    admin.execute(f'CREATE DATABASE "{database}"')
    fields = {"model": args.model, "max_num_seqs": args.max_num_seqs,
              "broker_url": args.broker_url, "served_model_name": "bench",
              "database_url": admin_url.set(database=database)
              .render_as_string(hide_password=False),
              "interactive_queue": f"bench-{database}.interactive",
              "bulk_queue": f"bench-{database}.bulk", **dict(args.set or [])}
    try:
        settings = load_settings(**fields)
        run_alembic(settings.database_url)
        keys = KeyStore(settings.database_url)
        key = keys.create("bench")[1]
        keys.close()
        port, hostname = args.port or _free_port(), f"bench-{uuid.uuid4().hex[:6]}@local"
        url = f"http://127.0.0.1:{port}"
        with ExitStack() as stack, Client(settings) as client:
            worker = stack.enter_context(_process(
                ["worker", f"--hostname={hostname}", "--loglevel=warning"], fields,
                args.log_dir / "bench-gateway-worker.log"))
            _wait_ready(worker, lambda: client.app.control.ping(destination=[hostname],
                                                                timeout=0.5), "the worker")
            gateway = stack.enter_context(_process(
                ["serve", f"--port={port}", "--loglevel=warning"], fields,
                args.log_dir / "bench-gateway-serve.log"))
            _wait_ready(gateway, lambda: _gateway_up(url), "the gateway")
            yield url, key, settings
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row(name: str, r: Round) -> str:
    return (f"| {name} | {statistics.median(r.ttft_s):.3f} | {percentile(r.ttft_s, 0.99):.3f} "
            f"| {r.tokens_per_s:.1f} | {r.tokens} | {r.wall_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternate the two paths this often; the best round of each counts")
    parser.add_argument("--set", type=parse_setting, action="append", metavar="NAME=VALUE",
                        help="another worker setting (e.g. dtype=float32, device=cpu)")
    parser.add_argument("--gateway-url", help="a running gateway (else one is started)")
    parser.add_argument("--api-key", help="its key (with --gateway-url)")
    parser.add_argument("--port", type=int, help="the started gateway's port (default: a "
                                                 "free one)")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "PAGEDQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
        help="server where a scratch database is created and dropped")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    if args.gateway_url and not args.api_key:
        parser.error("--gateway-url needs --api-key")

    with ExitStack() as stack:
        if args.gateway_url:
            url, key, settings = args.gateway_url, args.api_key, load_settings()
        else:
            url, key, settings = stack.enter_context(own_stack(args))
        client = stack.enter_context(Client(settings))
        model = openai.OpenAI(base_url=f"{url}/v1", api_key=key).models.list().data[0].id
        # A warm-up of each path, then alternating rounds, so that load from elsewhere
        # on the machine hits both alike.
        through_gateway(url, key, model, conversations(8, -1), args.max_tokens)
        through_client(client, conversations(8, -1), args.max_tokens)
        gateway_rounds, client_rounds = [], []
        for round_ in range(args.rounds):
            batch = conversations(args.requests, round_)
            gateway_rounds.append(through_gateway(url, key, model, batch, args.max_tokens))
            client_rounds.append(through_client(client, batch, args.max_tokens))

    via_gateway = max(gateway_rounds, key=lambda r: r.tokens_per_s)
    via_client = max(client_rounds, key=lambda r: r.tokens_per_s)
    served = model if args.gateway_url else f"{args.model} (served as {model})"
    print(f"{args.requests} concurrent streaming chats x {args.max_tokens} tokens, model "
          f"{served}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"best of {args.rounds} alternating rounds")
    print("| path | TTFT p50 s | TTFT p99 s | output tokens/s | tokens | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(_row("gateway (OpenAI SDK, SSE)", via_gateway))
    print(_row("Python client (submit_many + stream)", via_client))
    print(f"gateway / client output tokens/s: "
          f"{via_gateway.tokens_per_s / via_client.tokens_per_s:.2f} (target >= 0.9); "
          f"TTFT p50 client / gateway: "
          f"{statistics.median(via_client.ttft_s) / statistics.median(via_gateway.ttft_s):.2f}")


if __name__ == "__main__":
    main()
