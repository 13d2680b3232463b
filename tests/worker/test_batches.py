"""OpenAI's Files and Batch APIs through `pagedq serve`, with the official `openai` SDK:
batches run on a real worker (PostgreSQL, the tiny Llama), or on none at all where the
test plays the worker itself (cancel) or wants nothing to run (expiry)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import Completion as OpenAICompletion
from openai.types.chat import ChatCompletion
from sqlalchemy import func, select

from tests.worker.gateway_server import new_key, running_gateway
from tests.worker.services import Stack, as_env, engine_fields, purge_queues
from worker.cli import main
from worker.client import Client
from worker.migrate import run_alembic
from worker.models import Job, JobStatus, StoredFile
from worker.records import ClaimOutcome, Completion, JobMetrics
from worker.settings import Settings, load_settings
from worker.store import JobStore

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MAX_FILE_BYTES = 64 * 1024
WINDOW_S = 4.0  # the "24h" of the gateway without a worker
ENDED = {"completed", "failed", "expired", "cancelled"}


@dataclass(slots=True)
class Served:
    url: str
    settings: Settings

    def sdk(self, name: str | None = None, key: str | None = None) -> openai.OpenAI:
        """An SDK client with a fresh key called `name`, or with `key`."""
        key = key or new_key(self.settings, name or "anonymous")
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def served(pg_stack: Stack) -> Iterator[Served]:
    """The gateway in front of the shared PostgreSQL worker."""
    settings = load_settings(**{**pg_stack.fields, "max_file_bytes": MAX_FILE_BYTES})
    with running_gateway(settings) as url:
        yield Served(url, settings)


@pytest.fixture(scope="module")
def idle(tiny_llama_dir: Path, new_pg_database: Callable[[], str],
         redis_url: str) -> Iterator[Served]:
    """A gateway with a short batch window and no worker: its jobs stay queued."""
    settings = load_settings(**engine_fields(tiny_llama_dir, database_url=new_pg_database(),
                                             batch_window_s=WINDOW_S))
    run_alembic(settings.database_url)
    try:
        with running_gateway(settings) as url:
            yield Served(url, settings)
    finally:
        with Client(settings) as client:
            purge_queues(client)


def body(endpoint: str, model: str, text: str) -> dict[str, Any]:
    if endpoint == CHAT:
        return {"model": model, "messages": [{"role": "user", "content": text}],
                "max_tokens": 4}
    return {"model": model, "prompt": text, "max_tokens": 4}


def line(custom_id: str, endpoint: str, request: dict[str, Any]) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint,
                       "body": request}).encode() + b"\n"


def upload(sdk: openai.OpenAI, content: bytes) -> str:
    return sdk.files.create(file=("requests.jsonl", content), purpose="batch").id


def wait_ended(sdk: openai.OpenAI, batch_id: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := sdk.batches.retrieve(batch_id)).status not in ENDED:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)
    return batch


def lines(sdk: openai.OpenAI, file_id: str | None) -> dict[str | None, dict[str, Any]]:
    """A result file's lines by custom_id."""
    assert file_id is not None
    text = sdk.files.content(file_id).text
    return {entry["custom_id"]: entry for entry in map(json.loads, text.splitlines())}


def batch_jobs(settings: Settings, batch_id: str) -> dict[str, Job]:
    store = JobStore.from_url(settings.database_url, pool_size=1)
    try:
        with store.engine.connect() as db:
            return {row.custom_id: row for row in db.execute(
                select(Job).where(Job.batch_id == batch_id))}
    finally:
        store.close()


def files_named(settings: Settings, filename: str) -> int:
    store = JobStore.from_url(settings.database_url, pool_size=1)
    try:
        with store.engine.connect() as db:
            return db.scalar(select(func.count()).where(StoredFile.filename == filename))
    finally:
        store.close()


def test_files_upload_list_read_and_delete(served: Served) -> None:
    sdk = served.sdk("files")
    content = line("a", CHAT, {"model": "m"})
    first = sdk.files.create(file=("first.jsonl", content), purpose="batch")
    assert (first.object, first.bytes, first.filename, first.purpose, first.status) == \
        ("file", len(content), "first.jsonl", "batch", "processed")
    assert first.id.startswith("file-") and first.expires_at is None
    assert sdk.files.retrieve(first.id) == first
    assert sdk.files.content(first.id).read() == content
    second = upload(sdk, b"{}\n")
    page = sdk.files.list(purpose="batch")
    assert [f.id for f in page.data] == [second, first.id]  # newest first
    assert sdk.files.list(purpose="batch_output").data == []

    with pytest.raises(openai.BadRequestError) as refused:
        sdk.files.create(file=("x.jsonl", content), purpose="assistants")
    assert refused.value.param == "purpose"
    for size in (MAX_FILE_BYTES + 1, 4 * MAX_FILE_BYTES):
        with pytest.raises(openai.APIStatusError) as too_big:
            sdk.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
        assert too_big.value.status_code == 413
    assert chunked_upload(served.url, sdk.api_key, 4 * MAX_FILE_BYTES) == 413

    deleted = sdk.files.delete(first.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (first.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(first.id)


def chunked_upload(url: str, key: str, size: int) -> int:
    """Upload `size` bytes without a Content-Length, as a stream would; the status."""
    boundary = "pagedq-test"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.jsonl"\r\n\r\n').encode()
    parts = [head, *(b"x" * 16384 for _ in range(size // 16384)), f"\r\n--{boundary}--\r\n"
             .encode()]
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/v1/files", body=iter(parts), encode_chunked=True,
                           headers={"Authorization": f"Bearer {key}",
                                    "Content-Type": f"multipart/form-data; boundary={boundary}"})
        return connection.getresponse().status
    finally:
        connection.close()


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_batch_round_trip(served: Served, pg_stack: Stack, endpoint: str) -> None:
    sdk, model = served.sdk(f"round-trip {endpoint}"), served.settings.model
    content = (line("a", endpoint, body(endpoint, model, "Hello"))
               + line("b", endpoint, body(endpoint, model, "Bonjour"))
               + b'{"custom_id": "broken", "method": \n'
               + line("hot", endpoint, {**body(endpoint, model, "Hi"), "temperature": "hot"}))
    batch = sdk.batches.create(input_file_id=upload(sdk, content), endpoint=endpoint,
                               completion_window="24h", metadata={"run": "1"})
    assert (batch.status, batch.endpoint, batch.metadata) == ("in_progress", endpoint,
                                                              {"run": "1"})
    assert batch.id.startswith("batch_") and batch.request_counts.total == 4

    done = wait_ended(sdk, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)
    assert None not in (done.in_progress_at, done.finalizing_at, done.completed_at)
    assert done.errors is None

    output = lines(sdk, done.output_file_id)
    assert sorted(output) == ["a", "b"]
    kind = ChatCompletion if endpoint == CHAT else OpenAICompletion
    for custom_id, entry in output.items():
        response = entry["response"]
        assert entry["id"] == f"batch_req_{response['request_id']}" and entry["error"] is None
        assert response["status_code"] == 200
        answer = kind.model_validate(response["body"])
        assert answer.model == model and 0 < answer.usage.completion_tokens <= 4
        job = pg_stack.client.get(response["request_id"])
        assert (job.custom_id, job.batch_id, job.queue) == (custom_id, batch.id, "bulk")
        text = answer.choices[0].message.content if endpoint == CHAT else answer.choices[0].text
        assert text == job.text

    errors = lines(sdk, done.error_file_id)
    assert sorted(errors, key=str) == [None, "hot"]
    assert errors[None]["error"]["code"] == "invalid_request"
    assert errors[None]["error"]["message"].startswith("line 3: not valid JSON")
    assert errors["hot"]["error"]["message"].startswith("line 4: body.temperature")
    assert errors["hot"]["response"] is None


def test_batch_without_a_valid_line_fails_and_batches_list(served: Served) -> None:
    sdk, model = served.sdk("listing"), served.settings.model
    bad = sdk.batches.create(input_file_id=upload(sdk, b"not json\n"), endpoint=CHAT,
                             completion_window="24h")
    assert bad.status == "failed" and bad.failed_at is not None
    assert [(e.code, e.line) for e in bad.errors.data] == [("invalid_request", 1)]
    empty = sdk.batches.create(input_file_id=upload(sdk, b"\n"), endpoint=CHAT,
                               completion_window="24h")
    assert empty.status == "failed" and empty.errors.data[0].code == "empty_file"

    first = sdk.batches.list(limit=1)
    assert [b.id for b in first.data] == [empty.id] and first.has_more
    rest = sdk.batches.list(limit=1, after=empty.id)
    assert [b.id for b in rest.data] == [bad.id] and not rest.has_more

    good = upload(sdk, line("a", CHAT, body(CHAT, model, "Hi")))
    for field, kwargs in (("endpoint", {"endpoint": "/v1/embeddings"}),
                          ("completion_window", {"completion_window": "1h"})):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.batches.create(**{"input_file_id": good, "endpoint": CHAT,
                                  "completion_window": "24h", **kwargs})
        assert refused.value.param == field
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-missing", endpoint=CHAT,
                           completion_window="24h")


def test_cancel_ends_queued_aborts_running_and_keeps_finished(idle: Served) -> None:
    sdk, model = idle.sdk("cancel"), idle.settings.model
    content = b"".join(line(c, COMPLETIONS, body(COMPLETIONS, model, c)) for c in "abc")
    batch = sdk.batches.create(input_file_id=upload(sdk, content), endpoint=COMPLETIONS,
                               completion_window="24h")
    jobs = batch_jobs(idle.settings, batch.id)
    store = JobStore.from_url(idle.settings.database_url, pool_size=1)
    try:
        # This test is the worker: "a" has finished, "b" is running.
        finished = store.claim(jobs["a"].id, "test", 3, 60).spec
        assert finished is not None
        store.finish(finished.id, finished.lease_id, JobStatus.SUCCEEDED,
                     outputs=[Completion(0, "done", [1, 2], "length")],
                     metrics=JobMetrics(1, 0.0, 0.1, 0.01, 0.2, 3, 2, 0, 0, 0, 0))
        running = store.claim(jobs["b"].id, "test", 3, 60).spec
        assert running is not None

        cancelling = sdk.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        now = batch_jobs(idle.settings, batch.id)
        assert now["c"].status is JobStatus.CANCELLED
        assert now["b"].status is JobStatus.RUNNING and now["b"].cancel_requested
        assert sdk.batches.retrieve(batch.id).status == "cancelling"  # "b" still runs
        assert store.finish(running.id, running.lease_id, JobStatus.CANCELLED)
    finally:
        store.close()

    done = sdk.batches.retrieve(batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    kept = lines(sdk, done.output_file_id)["a"]["response"]["body"]
    assert kept["choices"][0]["text"] == "done" and kept["usage"]["completion_tokens"] == 2
    errors = lines(sdk, done.error_file_id)
    assert {c: e["error"]["code"] for c, e in errors.items()} == {
        "b": "batch_cancelled", "c": "batch_cancelled"}
    assert sdk.batches.cancel(batch.id).status == "cancelled"  # an ended batch stays so


def test_unstarted_jobs_expire_with_the_window(idle: Served) -> None:
    sdk, model = idle.sdk("expiry"), idle.settings.model
    content = b"".join(line(c, CHAT, body(CHAT, model, c)) for c in "xy")
    batch = sdk.batches.create(input_file_id=upload(sdk, content), endpoint=CHAT,
                               completion_window="24h")
    assert batch.expires_at - batch.created_at == pytest.approx(WINDOW_S, abs=1)
    assert sdk.batches.retrieve(batch.id).status == "in_progress"
    time.sleep(max(0.0, batch.expires_at + 1.2 - time.time()))

    # Replicas (here: concurrent requests) looking at once finalize it once.
    with ThreadPoolExecutor(4) as pool:
        seen = set(pool.map(lambda _: sdk.batches.retrieve(batch.id).status, range(4)))
    assert seen <= {"finalizing", "expired"}
    done = sdk.batches.retrieve(batch.id)
    assert done.status == "expired" and done.expired_at is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 2)
    assert done.output_file_id is None
    errors = lines(sdk, done.error_file_id)
    assert {c: e["error"]["code"] for c, e in errors.items()} == {
        "x": "batch_expired", "y": "batch_expired"}
    jobs = batch_jobs(idle.settings, batch.id)
    assert {job.status for job in jobs.values()} == {JobStatus.EXPIRED}
    assert files_named(idle.settings, f"{batch.id}_error.jsonl") == 1  # one finalization
    # A delivery that arrives now finds the job ended, and runs nothing.
    store = JobStore.from_url(idle.settings.database_url, pool_size=1)
    try:
        assert store.claim(jobs["x"].id, "late", 3, 60).outcome is ClaimOutcome.FINISHED
    finally:
        store.close()


def test_a_batch_whose_jobs_cannot_be_published_fails(idle: Served) -> None:
    down = idle.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with running_gateway(down) as url:
        sdk = Served(url, down).sdk("no broker")
        content = line("a", CHAT, body(CHAT, down.model, "Hi"))
        batch = sdk.batches.create(input_file_id=upload(sdk, content), endpoint=CHAT,
                                   completion_window="24h")
    assert batch.status == "failed" and batch.errors.data[0].code == "broker_unavailable"
    assert batch_jobs(idle.settings, batch.id) == {}  # no job left to run unseen


def test_a_key_sees_only_its_own(served: Served) -> None:
    owner, other = served.sdk("owner"), served.sdk("other")
    file_id = upload(owner, line("a", CHAT, body(CHAT, served.settings.model, "Hi")))
    batch = owner.batches.create(input_file_id=file_id, endpoint=CHAT,
                                 completion_window="24h")
    for call in (lambda: other.files.retrieve(file_id),
                 lambda: other.files.content(file_id),
                 lambda: other.files.delete(file_id),
                 lambda: other.batches.retrieve(batch.id),
                 lambda: other.batches.cancel(batch.id),
                 lambda: other.batches.create(input_file_id=file_id, endpoint=CHAT,
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == [] and other.batches.list().data == []
    assert owner.batches.retrieve(batch.id).id == batch.id

    with pytest.raises(urllib.error.HTTPError) as unkeyed:
        urllib.request.urlopen(f"{served.url}/v1/batches", timeout=5)
    assert unkeyed.value.code == 401
    assert json.loads(unkeyed.value.read())["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        served.sdk(key="pq-made-up").files.list()


def test_keys_cli_create_list_revoke(served: Served, pg_stack: Stack,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in as_env(pg_stack.fields).items():
        monkeypatch.setenv(name, value)
    assert main(["keys", "create", "cli-key"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert served.sdk(key=key).batches.list().data == []
    assert main(["keys", "list"]) == 0
    listed = {row.split("\t")[0]: row.split("\t") for row in capsys.readouterr().out
              .splitlines()}
    assert listed["cli-key"][1] == f"{key[:10]}..." and listed["cli-key"][3] == "active"
    assert main(["keys", "revoke", "cli-key"]) == 0
    assert main(["keys", "revoke", "cli-key"]) == 1
    # The running gateway may trust its cached answer for 5 s; a fresh one never does.
    with running_gateway(served.settings) as url, pytest.raises(openai.AuthenticationError):
        Served(url, served.settings).sdk(key=key).batches.list()
