"""Engine construction and migrations. One URL (from the configuration) feeds both the app and Alembic."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def migrations_dir() -> Path:
    """The Alembic scripts: in a source checkout the ``migrations/`` beside this code (whatever else is installed),
    otherwise the installed ``sensorwatch_migrations`` package (a wheel install). RuntimeError when neither is there.
    """
    tree = Path(__file__).resolve().parents[2]
    candidates = [str(tree / "migrations")] if (tree / "pyproject.toml").is_file() else []
    spec = importlib.util.find_spec("sensorwatch_migrations")
    candidates += list(spec.submodule_search_locations or []) if spec else []
    for candidate in candidates:
        if (Path(candidate) / "env.py").is_file():
            return Path(candidate)
    raise RuntimeError("sensorwatch's migrations are not installed (no sensorwatch_migrations package)")


# SQLite's write-ahead log is cut back to this after a checkpoint: it grows while readers hold old snapshots (a
# prune deleting rows as the pipeline writes grew it to 200 MB) and would otherwise keep that size on disk
SQLITE_WAL_LIMIT_BYTES = 64 * 1024 * 1024


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL mode and a busy timeout so a reader and the pipeline can share it, and
    a bound on the log's size at rest (``SQLITE_WAL_LIMIT_BYTES``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA journal_size_limit={int(SQLITE_WAL_LIMIT_BYTES)}")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    """Sessions that do not expire objects on commit (rows are read after the transaction ends)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, write: bool = False) -> Iterator[Session]:
    """One session on a fresh engine for ``url`` (for one-shot commands), disposed on exit. With ``write`` the
    session is a transaction, committed on a normal exit and rolled back on an exception."""
    engine = make_engine(url)
    try:
        sessions = make_sessionmaker(engine)
        with sessions.begin() if write else sessions() as session:
            yield session
    finally:
        engine.dispose()


def alembic_config(url: str) -> AlembicConfig:
    """Alembic configuration pointing at ``migrations/`` with ``url`` (passed in memory, never written or logged)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Run migrations up to ``revision``, all in one transaction: a failure leaves the database as it was.

    SchemaError when the database is at a revision these migrations do not know (a newer sensorwatch upgraded it),
    or already past ``revision`` (this command never goes back: that is ``alembic downgrade``)."""
    cfg = alembic_config(url)
    script = ScriptDirectory.from_config(cfg)
    if re.fullmatch(r"(\w+)?\+\d+", revision):  # relative (+N, REV+N): Alembic only goes up from there
        try:
            command.upgrade(cfg, revision)
        except CommandError as exc:
            raise SchemaError(f"revision {revision!r}: {exc}") from None
        return
    target = script.get_current_head() if revision == "head" else revision
    try:
        found = script.get_revision(target)
    except CommandError:
        found = None
    if found is None:
        known = ", ".join(r.revision for r in reversed(list(script.walk_revisions())))
        raise SchemaError(f"unknown revision {revision!r} (known: {known}, or head)")
    engine = make_engine(url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    if current is not None:
        _known(script, current)
        if current != target and target in {r.revision for r in script.iterate_revisions(current, "base")}:
            raise SchemaError(f"the database is at revision {current}, past {target}: 'db upgrade' never goes back "
                              "(a downgrade is 'alembic downgrade', see the README)")
    command.upgrade(cfg, revision)


class SchemaError(Exception):
    """The database's schema revision cannot be used or reached by this version of sensorwatch."""


#: What every command says when the database is behind the newest migration.
SCHEMA_BEHIND = "database schema is not up to date: run 'sensorwatch db upgrade --config FILE'"


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None: no schema yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _known(script: ScriptDirectory, revision: str) -> None:
    try:
        script.get_revision(revision)
    except CommandError:
        raise SchemaError(f"the database schema is at revision {revision}, which this version of sensorwatch does "
                          f"not know (its newest is {script.get_current_head()}): a newer sensorwatch upgraded it; "
                          "run that version, or downgrade the schema with it first") from None


def schema_problem(engine: Engine) -> str | None:
    """Why the pipeline cannot use this database's schema (``SCHEMA_BEHIND``, or a revision newer than this code
    knows), or None when it is at the newest migration."""
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    current = current_revision(engine)
    if current == script.get_current_head():
        return None
    if current is not None:
        try:
            _known(script, current)
        except SchemaError as exc:
            return str(exc)
    return SCHEMA_BEHIND


def pending_migrations(engine: Engine) -> bool:
    """True when the database is not at the newest migration (``schema_problem`` says why)."""
    return schema_problem(engine) is not None


def missing_sqlite_file(url: str) -> str | None:
    """For a SQLite URL whose database file does not exist: what to say (connecting would create an empty file, and a
    relative path is read from the current directory); None for every other URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    if path.exists():
        return None
    relative = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
    return f"database file {path.resolve()} does not exist{relative}: run 'sensorwatch db upgrade --config FILE'"


def describe_error(exc: BaseException, url: str) -> str:
    """One line for a database error on ``url``: the URL with its password masked and the driver's first line, the
    password (as given or URL-encoded) scrubbed from it where a driver echoes it (a password under 4 characters is
    left: it would match anywhere, and masks nothing worth masking)."""
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    from pipeline.config import DatabaseConfig

    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    text = reason[0] if reason else type(exc).__name__
    password = make_url(url).password
    if password and len(str(password)) >= 4:
        for form in {str(password), quote(str(password), safe="")}:
            text = text.replace(form, "***")
    return f"{DatabaseConfig(url=url).safe_url}: {text}"
