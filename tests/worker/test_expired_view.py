"""An expired job says so where job statuses are shown: the bulk summary and its per-document
lines (`pagedq batch --ttl`), and Flower's task pages (state EXPIRED, not SUCCESS)."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.worker.services import as_env
from tests.worker.test_flower import PASSWORD, USER, call, flower_env, get_json, running_flower
from worker.cli import main
from worker.models import JobStatus
from worker.records import JobRecord

TINY_TTL = "0.000001"  # a microsecond: over before any worker can claim the job


def test_the_bulk_summary_counts_expired_jobs(pg_stack, tmp_path, monkeypatch, capsys):
    for name, value in as_env(pg_stack.fields).items():
        monkeypatch.setenv(name, value)
    docs, out = tmp_path / "docs.jsonl", tmp_path / "res.jsonl"
    docs.write_text("".join(json.dumps({"id": f"late-{i}", "text": f"Too late {i}."}) + "\n"
                            for i in range(2)))
    argv = ["batch", str(docs), "-o", str(out), "--max-tokens", "3", "--ttl", TINY_TTL, "-q"]
    assert main(argv) == 1  # not every job succeeded
    captured = capsys.readouterr()
    assert "requests          2 (0 succeeded, 0 failed, 2 expired)" in captured.out
    for i in range(2):
        assert f"document 'late-{i}' (job " in captured.err
    assert captured.err.count(": expired: expired before it started") == 2
    assert out.read_text() == ""  # the output holds results; a re-run retries these


def test_the_ttl_option_must_be_positive_seconds(capsys):
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            main(["batch", "docs.jsonl", "-o", "out.jsonl", "--ttl", bad])
        assert "positive number of seconds" in capsys.readouterr().err


@pytest.fixture(scope="module")
def flower(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = flower_env(redis_url, user=USER, password=PASSWORD)
    with running_flower(env, tmp_path_factory.mktemp("flower-expired")) as base:
        yield base


def shown_state(flower: str, job_id: str) -> str | None:
    """The state in Flower's task list, as its page fetches it."""
    query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 1000,
                                    "order[0][column]": 0, "order[0][dir]": "desc",
                                    "columns[0][data]": "received", "search[value]": ""})
    reply = call(f"{flower}/tasks/datatable?{query}", login=(USER, PASSWORD))
    assert reply.status == 200, reply
    rows = {row["uuid"]: row for row in json.loads(reply.body)["data"]}
    return rows[job_id]["state"] if job_id in rows else None


def test_flower_shows_an_expired_job_as_expired(pg_stack, flower):
    # Flower only knows jobs whose events it saw: probe until one shows up.
    client, deadline = pg_stack.client, time.monotonic() + 60
    while True:
        job_id = client.submit("expired in flower", {"max_tokens": 4}, ttl_s=float(TINY_TTL))
        record: JobRecord = client.wait(job_id, timeout=30)
        assert record.status is JobStatus.EXPIRED
        time.sleep(0.5)
        state = shown_state(flower, job_id)
        if state not in (None, "RECEIVED", "STARTED"):
            break
        assert time.monotonic() < deadline, state
    assert state == "EXPIRED"
    # The API hands Flower's record as it is: Celery's state, and what the task returned.
    info = get_json(f"{flower}/api/task/info/{job_id}")
    assert info["state"] == "SUCCESS" and info["result"] == "'expired'"
