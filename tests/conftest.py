"""Shared fixtures: a real Kafka broker and a real PostgreSQL server for integration and fault tests.

Where each service comes from, first match wins:
  1. KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL from the environment (a PostgreSQL URL; the driver is forced
     to +psycopg; a non-PostgreSQL DATABASE_URL is ignored here, with a warning);
  2. testcontainers, when a Docker engine answers;
  3. pipeline.localinfra.LocalKafka / LocalPostgres (local processes: java + cached jars, initdb + pg_ctl).
When none works the requesting test is skipped with the reasons, or FAILS when CI=true.
Services start lazily: a run of unit tests alone starts nothing.

Fixtures:
  kafka_bootstrap_servers  session   "host:port" of a broker with topic auto-creation on
  postgres_url             session   postgresql+psycopg://... of a database that tests may share
  topic_name               function  a fresh unique topic name (not created: create it or rely on
                                     auto-creation, 3 partitions on the local broker)
  pg_database_url          function  URL of a new empty database, dropped (WITH FORCE) after the test
  local_postgres           function  a dedicated LocalPostgres cluster (stop_server()/start_server())
  local_kafka              function  a dedicated LocalKafka broker (stop_broker()/start_broker())
  secure_kafka             module    a dedicated LocalKafka broker with TLS and SASL listeners
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from pipeline.localinfra import LocalKafka, LocalPostgres

_KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
_PG_ENV = "DATABASE_URL"


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with importlib.resources' legacy API: ~100 warnings a
    # test that say nothing about this project.
    config.addinivalue_line(
        "filterwarnings", r"ignore:(read_text|open_text) is deprecated\. Use files\(\) instead:DeprecationWarning"
    )


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when CI=true: CI must never pass by skipping the real services."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _docker_problem() -> str | None:
    """None when a Docker engine answers a ping within a few seconds, else why not."""
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine for testcontainers ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _pg_problem(url: str) -> str | None:
    """None when PostgreSQL at url answers `select 1`, else why not."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        engine.dispose()
    return None


def _psycopg_url(raw: str) -> str | None:
    """raw with its driver set to +psycopg, or None when raw is not a PostgreSQL URL."""
    from sqlalchemy.engine import make_url

    url = make_url(raw)
    if url.get_backend_name() not in {"postgresql", "postgres"}:
        return None
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def kafka_bootstrap_servers() -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker for the whole session."""
    from pipeline.localinfra.kafka import kafka_error

    from_env = os.environ.get(_KAFKA_ENV, "").strip()
    if from_env:
        until = time.monotonic() + 30
        while (error := kafka_error(from_env, timeout=5)) is not None and time.monotonic() < until:
            time.sleep(1)
        if error is not None:
            _unavailable(f"{_KAFKA_ENV}={from_env} does not answer: {error}")
        yield from_env
        return

    reasons: list[str] = []
    with contextlib.ExitStack() as stack:
        servers: str | None = None
        docker_problem = _docker_problem()
        if docker_problem is None:
            try:
                from testcontainers.community.kafka import KafkaContainer

                container = KafkaContainer().with_kraft()
                stack.callback(container.stop)
                container.start()
                servers = container.get_bootstrap_server()
            except Exception as exc:
                reasons.append(f"testcontainers Kafka failed: {type(exc).__name__}: {exc}")
        else:
            reasons.append(docker_problem)
        if servers is None:
            try:
                from pipeline.localinfra import LocalKafka

                broker = LocalKafka()
                stack.callback(broker.stop)
                broker.start()
                servers = broker.bootstrap_servers
            except Exception as exc:
                reasons.append(f"local Kafka broker failed: {type(exc).__name__}: {exc}")
        if servers is None:
            _unavailable("no Kafka broker: " + "; ".join(reasons))
        yield servers


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL (postgresql+psycopg) of a real PostgreSQL database for the whole session."""
    from_env = os.environ.get(_PG_ENV, "").strip()
    if from_env:
        url = _psycopg_url(from_env)
        if url is None:
            warnings.warn(f"{_PG_ENV} is not a PostgreSQL URL; PostgreSQL tests use another server", stacklevel=2)
        else:
            if (error := _pg_problem(url)) is not None:
                _unavailable(f"{_PG_ENV} does not answer: {error}")
            yield url
            return

    reasons: list[str] = []
    with contextlib.ExitStack() as stack:
        found: str | None = None
        docker_problem = _docker_problem()
        if docker_problem is None:
            try:
                from testcontainers.community.postgres import PostgresContainer

                container = PostgresContainer("postgres:16-alpine", driver="psycopg")
                stack.callback(container.stop)
                container.start()
                found = container.get_connection_url()
            except Exception as exc:
                reasons.append(f"testcontainers PostgreSQL failed: {type(exc).__name__}: {exc}")
        else:
            reasons.append(docker_problem)
        if found is None:
            try:
                from pipeline.localinfra import LocalPostgres

                server = LocalPostgres()
                stack.callback(server.stop)
                server.start()
                found = server.url
            except Exception as exc:
                reasons.append(f"local PostgreSQL failed: {type(exc).__name__}: {exc}")
        if found is None:
            _unavailable("no PostgreSQL: " + "; ".join(reasons))
        yield found


@pytest.fixture
def topic_name() -> str:
    """A topic name no other test uses (the topic itself is not created)."""
    return f"t-{uuid.uuid4().hex}"


@pytest.fixture
def pg_database_url(postgres_url: str) -> Iterator[str]:
    """URL of a brand-new empty database on the session server; dropped WITH (FORCE) afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"test_{uuid.uuid4().hex[:20]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        _unavailable(f"cannot create a test database on the session PostgreSQL: {type(exc).__name__}: {exc}")
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def local_postgres() -> Iterator[LocalPostgres]:
    """A dedicated throwaway PostgreSQL cluster (pipeline.localinfra.LocalPostgres) that the test may
    stop and start; removed afterwards. Always local processes, never Docker or DATABASE_URL."""
    from pipeline.localinfra import LocalPostgres

    server = LocalPostgres()
    try:
        server.start()
    except Exception as exc:
        _unavailable(f"local PostgreSQL failed: {type(exc).__name__}: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def local_kafka() -> Iterator[LocalKafka]:
    """A dedicated single-node Kafka broker (pipeline.localinfra.LocalKafka) that the test may stop and
    start; removed afterwards. Always a local process, never Docker or KAFKA_BOOTSTRAP_SERVERS."""
    from pipeline.localinfra import LocalKafka

    broker = LocalKafka()
    try:
        broker.start()
    except Exception as exc:
        _unavailable(f"local Kafka broker failed: {type(exc).__name__}: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def secure_kafka() -> Iterator[LocalKafka]:
    """A local broker that also listens with TLS and SASL (``LocalKafka(secure=True)``: mutual-TLS SSL,
    SASL_PLAINTEXT and SASL_SSL with PLAIN and SCRAM, a throwaway CA), shared by one test module."""
    from pipeline.localinfra import LocalKafka

    broker = LocalKafka(secure=True)
    try:
        broker.start()
    except Exception as exc:
        _unavailable(f"local Kafka broker with TLS and SASL failed: {type(exc).__name__}: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


class WebhookReceiver:
    """A local HTTP endpoint for alert webhooks: answers 503 while ``down`` is set (counting ``refused``), else 200,
    keeping each accepted JSON body in arrival order (``accepted``)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import orjson

        self.down = threading.Event()
        self.accepted: list[dict[str, object]] = []
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                down = outer.down.is_set()
                if down:
                    outer.refused += 1
                else:
                    outer.accepted.append(body)
                self.send_response(503 if down else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A ``WebhookReceiver`` (up), shut down afterwards."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.httpd.shutdown()
    receiver.httpd.server_close()
