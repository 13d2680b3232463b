"""Fixtures of the worker tests: fresh databases on the real servers, shared worker stacks.

PAGEDQ_TEST_REDIS_URL and PAGEDQ_TEST_POSTGRES_URL point at the servers
(defaults: Redis db 13 and database `test` on loopback); a test that needs
one that is not running is skipped, or fails when CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import make_url

from tests.worker.services import POSTGRES_URL, REDIS_URL, Stack, engine_fields, stack
from worker.migrate import run_alembic
from worker.store import JobStore


def _missing(why: str) -> None:
    """Skip on a developer's machine without the servers; fail under CI, so that a
    green CI run always means the worker suite ran."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: the worker suite must run)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _missing(f"Redis not reachable at {REDIS_URL}: {exc}")
    return REDIS_URL


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def new_pg_database() -> Iterator[Callable[[], str]]:
    """Makes empty databases on the test server; all are dropped at the end."""
    try:
        admin = psycopg.connect(_libpq(POSTGRES_URL), autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _missing(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    made: list[str] = []

    def make() -> str:
        name = f"pagedq_test_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    for name in made:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[JobStore]:
    """A job store on a freshly migrated database, once on each backend."""
    url = request.getfixturevalue("new_pg_database")() if request.param == "postgres" \
        else sqlite_url
    run_alembic(url)
    store = JobStore.from_url(url)
    yield store
    store.close()


@pytest.fixture(scope="session")
def pg_stack(redis_url: str, new_pg_database: Callable[[], str], tiny_llama_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker on PostgreSQL, shared by the tests that only need a running worker."""
    fields = engine_fields(tiny_llama_dir, database_url=new_pg_database())
    with stack(fields, tmp_path_factory.mktemp("pg-worker"), "pg") as running:
        yield running
