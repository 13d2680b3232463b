"""Alembic: up, down and up again on empty databases; concurrent upgrades do not race."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError, ProgrammingError

from worker.db import make_engine
from worker.migrate import SchemaOutOfDate, check_current, run_alembic

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
