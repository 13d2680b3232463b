"""Flower on a free loopback port: always behind a login, never open to other origins;
it lists the worker with its engine and shows finished jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from tests.worker.services import REPO, free_port
from worker.models import JobStatus
from worker.settings import SettingsError, load_settings

USER = "admin"
PASSWORD = "Sup3r-long:secret"  # a colon is fine in a password, only the user splits at one
ENQUEUE = "/api/task/async-apply/pagedq.generate"
# What a browser adds to a request that a page of another site makes.
CROSS_SITE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
GENERATED = re.compile(r"log in as user '(?P<user>[^']+)' with password '(?P<password>[^']+)'")


@dataclass(slots=True)
class Reply:
    status: int
    headers: Message
    body: bytes


def call(url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None,
         login: tuple[str, str] | None = None, body: bytes | None = None) -> Reply:
    request = urllib.request.Request(url, method=method, headers=dict(headers or {}), data=body)
    if login is not None:
        token = b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


def flower_env(broker_url: str, **flower: str) -> dict[str, str]:
    """This process's environment without any Flower settings, plus `flower`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("FLOWER_", "PAGEDQ_FLOWER_"))}
    env["PAGEDQ_BROKER_URL"] = broker_url
    env.update({f"PAGEDQ_FLOWER_{name.upper()}": value for name, value in flower.items()})
    return env


def flower_command(port: int) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "flower", f"--port={port}"]


@contextmanager
def running_flower(env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """`pagedq flower` in a subprocess, its stdout and stderr in log_dir; yields its URL."""
    port = free_port()
    with (log_dir / "flower.out").open("wb") as out, (log_dir / "flower.err").open("wb") as err:
        process = subprocess.Popen(flower_command(port), cwd=REPO, env=env,
                                   stdout=out, stderr=err)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _listening(base):
            assert process.poll() is None, (log_dir / "flower.err").read_text()
            assert time.monotonic() < deadline, "Flower did not come up"
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def _listening(base: str) -> bool:
    try:
        urllib.request.urlopen(f"{base}/healthcheck", timeout=1)
    except (urllib.error.URLError, ConnectionError):
        return False
    return True


@pytest.fixture(scope="module")
def flower(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = flower_env(redis_url, user=USER, password=PASSWORD)
    with running_flower(env, tmp_path_factory.mktemp("flower")) as base:
        yield base


def get_json(url: str) -> dict:
    reply = call(url, login=(USER, PASSWORD))
    if reply.status != 200:
        raise urllib.error.HTTPError(url, reply.status, reply.body.decode(), reply.headers, None)
    return json.loads(reply.body)


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


def assert_no_cors(reply: Reply) -> None:
    assert reply.headers.get("Access-Control-Allow-Origin") is None, dict(reply.headers)


@pytest.mark.parametrize("method, path", [("GET", "/api/workers"), ("GET", "/api/tasks"),
                                          ("POST", ENQUEUE), ("POST", "/api/task/revoke/x")])
def test_the_api_needs_a_login(flower, method, path):
    body = b'{"args": ["x"]}' if method == "POST" else None
    for login in (None, (USER, "wrong"), (USER, PASSWORD.split(":")[0])):
        reply = call(f"{flower}{path}", method=method, login=login, body=body)
        assert reply.status == 401, (login, reply)
        assert_no_cors(reply)


@pytest.mark.parametrize("login", [None, (USER, PASSWORD)])
def test_another_site_cannot_call_the_api(flower, login):
    # Without credentials a cross-site read is refused at the login...
    reply = call(f"{flower}/api/workers", headers=CROSS_SITE, login=login)
    assert reply.status == (401 if login is None else 200)
    assert_no_cors(reply)  # ...and with them the browser keeps the answer from the page.
    # Writes are refused before the login is even checked, so a browser that
    # remembers the password cannot be made to enqueue or revoke.
    reply = call(f"{flower}{ENQUEUE}", method="POST", headers=CROSS_SITE, login=login,
                 body=b'{"args": ["x"]}')
    assert reply.status == 403, reply
    assert_no_cors(reply)
    # The preflight a page would need for a JSON POST grants nothing either.
    reply = call(f"{flower}{ENQUEUE}", method="OPTIONS", login=login, headers={
        **CROSS_SITE, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert_no_cors(reply)
    assert reply.headers.get("Access-Control-Allow-Methods") is None


def test_the_api_answers_with_the_login(flower):
    assert isinstance(get_json(f"{flower}/api/workers"), dict)
    # A write passes the login and stops only at the unknown task: nothing is enqueued.
    reply = call(f"{flower}/api/task/async-apply/pagedq.no-such-task", method="POST",
                 login=(USER, PASSWORD), body=b'{"args": []}')
    assert reply.status == 404, reply


@pytest.mark.parametrize("variable, value", [
    ("password", "Sup3r-long-secret,x"),  # Flower would let "x" alone log in
    ("password", ""),
    ("user", "ad:min"),
    ("user", "ad,min"),
])
def test_flower_refuses_logins_it_would_misread(redis_url, variable, value):
    env = flower_env(redis_url, **{variable: value})
    result = subprocess.run(flower_command(free_port()), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"PAGEDQ_FLOWER_{variable.upper()}" in result.stderr
    assert "Sup3r-long-secret" not in result.stderr + result.stdout


def test_a_generated_password_is_printed_once_and_works(redis_url, tmp_path):
    with running_flower(flower_env(redis_url), tmp_path) as base:
        err = (tmp_path / "flower.err").read_text()
        match = GENERATED.search(err)
        assert match, err
        password = match["password"]
        assert "PAGEDQ_FLOWER_PASSWORD" in err[match.start():].splitlines()[0]
        assert call(f"{base}/api/workers", login=(match["user"], password)).status == 200
        assert call(f"{base}/api/workers", login=(USER, password[:-1])).status == 401
        out = (tmp_path / "flower.out").read_text()
    assert len(password) >= 40
    assert match["user"] == USER
    assert err.count(password) == 1 and password not in out


def test_a_fresh_password_each_run():
    from worker.flower import generate_password

    assert len({generate_password() for _ in range(100)}) == 100


def test_flower_refuses_to_listen_openly_without_a_password():
    from worker.flower import flower_environment, flower_password

    with pytest.raises(SettingsError, match="PAGEDQ_FLOWER_PASSWORD"):
        flower_password(load_settings(flower_address="0.0.0.0"))
    settings = load_settings(flower_address="0.0.0.0", flower_password="s3cret")
    assert flower_password(settings) == "s3cret"
    assert flower_environment(settings, "s3cret") == {"FLOWER_BASIC_AUTH": "admin:s3cret"}
    # On loopback a password is generated instead; the API is never left open.
    assert flower_password(load_settings()) is None


@pytest.mark.parametrize("fields, variable", [
    ({"flower_password": ""}, "PAGEDQ_FLOWER_PASSWORD"),
    ({"flower_password": "Sup3r-long-secret,x"}, "PAGEDQ_FLOWER_PASSWORD"),
    ({"flower_user": "ad:min"}, "PAGEDQ_FLOWER_USER"),
    ({"flower_user": "ad,min"}, "PAGEDQ_FLOWER_USER"),
    ({"flower_user": ""}, "PAGEDQ_FLOWER_USER"),
])
def test_settings_refuse_logins_flower_would_misread(fields, variable):
    with pytest.raises(SettingsError, match=variable) as refused:
        load_settings(**fields)
    assert "Sup3r-long-secret" not in str(refused.value)
