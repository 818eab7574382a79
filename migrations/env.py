"""Alembic environment: the URL comes from the caller (``sensorwatch db upgrade``) or ``DATABASE_URL``."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Engine, create_engine, event, pool

from pipeline.store.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass --config to 'sensorwatch db upgrade' or set DATABASE_URL")
    return url


def run_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade --sql``)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _transactional_sqlite_ddl(engine: Engine) -> None:
    """Make SQLite run the whole upgrade in one transaction, DDL included. pysqlite commits before each DDL statement
    of its own accord, so a migration failing half way (a constraint old rows break) would leave its first tables
    behind with the revision unchanged, and every later upgrade would stop at "table already exists"; with the
    driver's own transaction handling off, a failed upgrade rolls back whole, as on PostgreSQL."""

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN")


def run_online() -> None:
    """Run migrations against a live database, all of them in one transaction (on SQLite too)."""
    engine = create_engine(_url(), poolclass=pool.NullPool)
    sqlite = engine.dialect.name == "sqlite"
    if sqlite:
        _transactional_sqlite_ddl(engine)
    with engine.connect() as connection:
        # Alembic takes SQLite for a database without transactional DDL and commits after each migration unless told
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          **({"transactional_ddl": True} if sqlite else {}))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
