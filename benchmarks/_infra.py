"""What the benchmarks run against: a Kafka broker and a database, local throwaway ones unless the environment names
them (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def kafka(security: str = "plaintext") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(bootstrap servers, kafka.security)``: KAFKA_BOOTSTRAP_SERVERS (plaintext only), or a local KRaft broker for
    the duration; ``sasl_ssl`` (SCRAM-SHA-512 over TLS) and ``mtls`` (mutual TLS) use its secured listeners."""
    if security == "plaintext" and os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"], {}
        return
    from pipeline.localinfra import LocalKafka
    from pipeline.localinfra.kafka import SASL_USER

    with LocalKafka(secure=security != "plaintext") as broker:
        if broker.pki is None:
            yield broker.bootstrap_servers, {}
        elif security == "sasl_ssl":
            yield broker.secure_listeners["SASL_SSL"], {
                "protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": SASL_USER,
                "sasl_password": broker.sasl_password, "ssl_cafile": str(broker.pki.ca)}
        else:
            yield broker.secure_listeners["SSL"], {
                "protocol": "SSL", "ssl_cafile": str(broker.pki.ca), "ssl_certfile": str(broker.pki.client_cert),
                "ssl_keyfile": str(broker.pki.client_key)}


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
