"""Alembic environment: the URL comes from pagedq's settings, never from alembic.ini.

`pagedq migrate` hands in an open connection (holding the migration lock)
through `config.attributes["connection"]`; a plain `alembic upgrade head`
connects to PAGEDQ_DATABASE_URL itself.
"""

from alembic import context
from sqlalchemy import Connection

from worker.db import make_engine
from worker.models import Base
from worker.settings import load_settings

target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=load_settings().database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
elif (given := context.config.attributes.get("connection")) is not None:
    run(given)
else:
    engine = make_engine(load_settings().database_url)
    try:
        with engine.connect() as connection:
            run(connection)
    finally:
        engine.dispose()
