"""What the benchmarks run against: a Kafka broker and a database, local throwaway ones unless the environment names
them (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def kafka() -> Iterator[str]:
    """Bootstrap servers: KAFKA_BOOTSTRAP_SERVERS, or a local KRaft broker for the duration."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from pipeline.localinfra import LocalKafka

    with LocalKafka() as broker:
        yield broker.bootstrap_servers


@contextlib.contextmanager
def database(kind: str, workdir: Path) -> Iterator[str]:
    """A database URL: a SQLite file in ``workdir`` for ``sqlite``; for ``postgres`` DATABASE_URL, or a throwaway
    PostgreSQL cluster for the duration."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'bench.db'}"
    elif os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    else:
        from pipeline.localinfra import LocalPostgres

        with LocalPostgres() as pg:
            yield pg.url
