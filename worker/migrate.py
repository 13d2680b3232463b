"""Schema upgrades that many processes may start at once without racing."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from worker.db import make_engine

ROOT = Path(__file__).resolve().parent.parent
# Any constant works as long as every pagedq process uses the same one.
ADVISORY_LOCK_KEY = 0x70616765647100  # "pagedq"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the newest migration."""


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return config


@contextmanager
def _migration_lock(connection: Connection, sqlite_path: Path | None) -> Iterator[None]:
    """Alembic has no lock of its own: two upgrades could both create the same table."""
    if connection.dialect.name == "postgresql":
        # A session-level advisory lock outlives the commits Alembic makes.
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
            connection.commit()
    elif sqlite_path is not None:
        # flock on the database file itself: SQLite's own locks are fcntl
        # byte-range locks, which flock does not touch on Linux.
        with sqlite_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield


def _sqlite_file(engine: Engine) -> Path | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def run_alembic(url: str, revision: str = "head", downgrade: bool = False) -> None:
    """Upgrade (or downgrade) the database at `url` to `revision`, holding the lock."""
    engine = make_engine(url)
    sqlite_path = _sqlite_file(engine)
    if sqlite_path is not None:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    config = alembic_config()
    try:
        with engine.connect() as connection, _migration_lock(connection, sqlite_path):
            config.attributes["connection"] = connection
            if downgrade:
                command.downgrade(config, revision)
            else:
                command.upgrade(config, revision)
    finally:
        engine.dispose()


def check_current(engine: Engine) -> None:
    """Fail early, with the fix in the message, when migrations have not been run."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, expected {head}: "
            "run `pagedq migrate` first"
        )
