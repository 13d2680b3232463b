"""Alembic: up, down and up again on empty databases; concurrent upgrades do not race;
the migrated schema is the models' one, and 0002 keeps the data both ways."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select
from sqlalchemy.exc import OperationalError, ProgrammingError

from worker.db import make_engine
from worker.migrate import SchemaOutOfDate, check_current, run_alembic
from worker.models import Base, Job

TABLES = {"jobs", "outputs", "metrics", "alembic_version"}


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request, sqlite_url):
    if request.param == "postgres":
        return request.getfixturevalue("new_pg_database")()
    return sqlite_url


def tables(url):
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_url):
    engine = make_engine(empty_url)
    with pytest.raises(SchemaOutOfDate, match="pagedq migrate"):
        check_current(engine)
    run_alembic(empty_url)
    assert tables(empty_url) >= TABLES
    check_current(engine)
    run_alembic(empty_url, "base", downgrade=True)
    assert tables(empty_url) == {"alembic_version"}
    run_alembic(empty_url)
    assert tables(empty_url) >= TABLES
    check_current(engine)
    engine.dispose()


def test_concurrent_upgrades_do_not_race(empty_url):
    spawn = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(4, mp_context=spawn) as pool:
            list(pool.map(run_alembic, [empty_url] * 4))
    except (OperationalError, ProgrammingError) as exc:  # "table already exists"
        pytest.fail(f"concurrent upgrades raced: {exc}")
    engine = make_engine(empty_url)
    check_current(engine)
    engine.dispose()


def test_cli_migrate(monkeypatch, empty_url):
    from worker.cli import main

    monkeypatch.setenv("PAGEDQ_DATABASE_URL", empty_url)
    assert main(["migrate"]) == 0
    assert tables(empty_url) >= TABLES
    assert main(["migrate", "--downgrade", "base"]) == 0
    assert tables(empty_url) == {"alembic_version"}


def test_migrations_build_the_schema_of_the_models(empty_url):
    run_alembic(empty_url)
    engine = make_engine(empty_url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


# The jobs table as revision 0001 made it; the models have moved on since.
JOBS_0001 = sa.table(
    "jobs", sa.column("id"), sa.column("status"), sa.column("queue"), sa.column("priority"),
    sa.column("params", sa.JSON()), sa.column("chat"), sa.column("attempts"),
    sa.column("cancel_requested"), sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
OUTPUTS_0001 = sa.table("outputs", sa.column("job_id"), sa.column("index"), sa.column("text"),
                        sa.column("token_ids", sa.JSON()))


def job_0001(status, created_at):
    return {"id": status, "status": status, "queue": "interactive", "priority": 0,
            "params": {}, "chat": False, "attempts": 0, "cancel_requested": False,
            "created_at": created_at, "updated_at": created_at}


def test_0002_stamps_queued_jobs_and_downgrades_without_losing_data(empty_url):
    run_alembic(empty_url, "0001")
    then = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    engine = make_engine(empty_url)
    with engine.begin() as db:
        db.execute(JOBS_0001.insert(), [job_0001("queued", then), job_0001("succeeded", then)])
        db.execute(OUTPUTS_0001.insert(),
                   [{"job_id": "succeeded", "index": 0, "text": "hi", "token_ids": [1]}])
    run_alembic(empty_url, "0002")
    with engine.connect() as db:
        published = dict(db.execute(select(Job.id, Job.published_at)).all())
    # Queued jobs went out when they were created; the finished history is left alone.
    assert published == {"queued": then, "succeeded": None}
    indexes = {index["name"] for index in inspect(engine).get_indexes("jobs")}
    assert "ix_jobs_status_published_at" in indexes
    run_alembic(empty_url, "0001", downgrade=True)
    assert "published_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with engine.connect() as db:  # a copy of jobs would have cascaded into outputs
        assert db.scalar(select(sa.func.count()).select_from(OUTPUTS_0001)) == 1
    engine.dispose()
