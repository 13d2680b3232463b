"""Flower on a free loopback port: it lists the worker with its engine and shows finished jobs."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.worker.services import REPO, as_env, free_port
from worker.models import JobStatus
from worker.settings import SettingsError, load_settings


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def flower(pg_stack, tmp_path):
    port = free_port()
    env = {**os.environ, **as_env(pg_stack.fields)}
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "worker.cli", "flower", f"--port={port}"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthcheck", timeout=1)
            break
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, (tmp_path / "flower.log").read_text()
            assert time.monotonic() < deadline, "Flower did not come up"
            time.sleep(0.2)
    yield base
    process.terminate()
    process.wait(10)
    log.close()


def test_flower_shows_the_worker_engine_and_a_finished_job(pg_stack, flower):
    workers = get_json(f"{flower}/api/workers?refresh=1")
    hostname = pg_stack.worker.hostname
    assert hostname in workers
    engine = workers[hostname]["stats"]["engine"]
    for key in ("running", "waiting", "swapped", "kv_blocks_used", "tokens_per_s"):
        assert key in engine
    # Flower only knows jobs whose events it saw: probe until one shows up.
    client, deadline = pg_stack.client, time.monotonic() + 60
    while True:
        job_id = client.submit("watched by flower", {"max_tokens": 4})
        assert client.wait(job_id, timeout=30).status is JobStatus.SUCCEEDED
        time.sleep(0.5)
        try:
            info = get_json(f"{flower}/api/task/info/{job_id}")
        except urllib.error.HTTPError:
            info = {}
        if info.get("state") == "SUCCESS":
            break
        assert time.monotonic() < deadline, info
    assert info["name"] == "pagedq.generate" and info["worker"] == hostname


def test_flower_refuses_to_listen_openly_without_a_password():
    from worker.flower import flower_environment

    with pytest.raises(SettingsError, match="PAGEDQ_FLOWER_PASSWORD"):
        flower_environment(load_settings(flower_address="0.0.0.0"))
    assert flower_environment(load_settings(flower_address="0.0.0.0", flower_password="s3cret")) \
        == {"FLOWER_BASIC_AUTH": "admin:s3cret"}
    assert flower_environment(load_settings()) == {"FLOWER_UNAUTHENTICATED_API": "true"}
