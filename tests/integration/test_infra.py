"""The test infrastructure itself: a real broker round trip, a real PostgreSQL, and an outage that keeps data."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from pipeline.localinfra import LocalKafka, LocalPostgres

pytestmark = pytest.mark.integration


def _produce(bootstrap_servers: str, topic: str, key: bytes, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        metadata = producer.send(topic, key=key, value=value).get(timeout=30)
        producer.flush(timeout=30)
    finally:
        producer.close()
    assert metadata.topic == topic


def _consume_all(bootstrap_servers: str, topic: str, expected: int) -> list[tuple[bytes | None, bytes | None]]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[tuple[bytes | None, bytes | None]] = []
    try:
        until = time.monotonic() + 60
        while len(received) < expected and time.monotonic() < until:
            for records in consumer.poll(timeout_ms=1000).values():
                received.extend((record.key, record.value) for record in records)
    finally:
        consumer.close()
    return received


def test_kafka_message_round_trip(kafka_bootstrap_servers: str, topic_name: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
    try:
        admin.create_topics([NewTopic(name=topic_name, num_partitions=1, replication_factor=1)])
    finally:
        admin.close()

    payload = f"hello {uuid.uuid4()}".encode()
    _produce(kafka_bootstrap_servers, topic_name, b"asset-1", payload)
    assert _consume_all(kafka_bootstrap_servers, topic_name, expected=1) == [(b"asset-1", payload)]


def test_topics_are_auto_created(kafka_bootstrap_servers: str, topic_name: str) -> None:
    from kafka import KafkaConsumer

    _produce(kafka_bootstrap_servers, topic_name, b"k", b"v")
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap_servers)
    try:
        partitions = consumer.partitions_for_topic(topic_name)
    finally:
        consumer.close()
    assert partitions


def test_local_kafka_stop_start_keeps_messages(local_kafka: LocalKafka, topic_name: str) -> None:
    servers = local_kafka.bootstrap_servers
    _produce(servers, topic_name, b"before", b"1")

    local_kafka.stop_broker(kill=True)  # a crash, not a clean shutdown
    assert not local_kafka.is_running()
    local_kafka.start_broker()
    assert local_kafka.is_running()
    assert local_kafka.bootstrap_servers == servers

    _produce(servers, topic_name, b"after", b"2")
    assert sorted(_consume_all(servers, topic_name, expected=2)) == [(b"after", b"2"), (b"before", b"1")]


def test_postgres_is_real_postgresql(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    try:
        assert engine.dialect.name == "postgresql"
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            version = conn.execute(sa.text("select version()")).scalar_one()
            server_version_num = int(conn.execute(sa.text("show server_version_num")).scalar_one())
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL ")
    assert server_version_num >= 130000  # DROP DATABASE ... WITH (FORCE) needs 13+


def test_pg_database_url_is_a_fresh_empty_database(postgres_url: str, pg_database_url: str) -> None:
    assert pg_database_url != postgres_url
    engine = sa.create_engine(pg_database_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            assert sa.inspect(conn).get_table_names() == []
            conn.execute(sa.text("create table probe (id int primary key)"))
            name = conn.execute(sa.text("select current_database()")).scalar_one()
    finally:
        engine.dispose()
    assert pg_database_url.endswith(f"/{name}")


def test_local_postgres_stop_start_keeps_data(local_postgres: LocalPostgres) -> None:
    url = local_postgres.url
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("create table readings (id int primary key, value float not null)"))
            conn.execute(sa.text("insert into readings values (1, 0.5), (2, 1.5)"))

        local_postgres.stop_server()
        assert not local_postgres.is_running()
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass

        local_postgres.start_server()
        assert local_postgres.is_running()
        assert local_postgres.url == url
        with engine.connect() as conn:
            rows = conn.execute(sa.text("select id, value from readings order by id")).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [(1, 0.5), (2, 1.5)]


def test_local_postgres_needs_its_password_over_tcp(local_postgres: LocalPostgres) -> None:
    """With trust, any local user could connect as superuser over TCP and run programs as the server's user."""
    pg = local_postgres
    anyone = f"postgresql+psycopg://{pg.user}@127.0.0.1:{pg.port}/{pg.dbname}"
    engine = sa.create_engine(anyone, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with pytest.raises(sa.exc.OperationalError, match="password"), engine.connect():
            pass
    finally:
        engine.dispose()
    assert not (local_postgres.directory / "pwfile").exists()  # type: ignore[operator]


def test_partitions_added_to_the_topic_are_consumed_within_a_minute(kafka_bootstrap_servers: str,
                                                                     topic_name: str) -> None:
    """An operator adds partitions to scale out: the pipeline's consumer is assigned the new ones at its next
    metadata refresh (30 s, not kafka-python's 5 minutes), so the assets keyed onto them do not look silent."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewPartitions

    from pipeline.config import KafkaConfig
    from pipeline.kafka_io import ensure_topics, make_consumer

    cfg = KafkaConfig(bootstrap_servers=kafka_bootstrap_servers, topic=topic_name, group_id=f"g-{uuid.uuid4()}")
    ensure_topics(cfg, [topic_name], partitions=1)
    consumer = make_consumer(cfg)
    try:
        until = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < until:
            consumer.poll(timeout_ms=500)
        assert {tp.partition for tp in consumer.assignment()} == {0}
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
        try:
            admin.create_partitions({topic_name: NewPartitions(total_count=2)})
        finally:
            admin.close()
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap_servers)
        try:
            producer.send(topic_name, key=b"pump-9", value=b"on the new partition", partition=1).get(timeout=30)
        finally:
            producer.close()
        added, got = time.monotonic(), []
        while not got and time.monotonic() < added + 75:
            got = [r.value for records in consumer.poll(timeout_ms=500).values() for r in records]
        assert got == [b"on the new partition"], f"nothing from the new partition in {time.monotonic() - added:.0f}s"
    finally:
        consumer.close(autocommit=False)
