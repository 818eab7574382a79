"""The alert outbox against the real parts: the Kafka sink delivers queued events to a real broker (JSON, keyed by
asset, in order per asset) from SQLite and from PostgreSQL; a broker that is down keeps them queued, and once it is
back they go out; an event the broker refuses for good (larger than the topic allows) fails at once and the events
after it go on, as does every event for a topic name Kafka does not accept; on PostgreSQL two pipelines delivering
the same outbox at once send each event exactly once."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic

from pipeline.config import KafkaConfig, KafkaSinkConfig
from pipeline.localinfra import LocalKafka
from pipeline.localinfra.kafka import SASL_USER
from pipeline.sinks import (
    AlertSinks,
    Item,
    KafkaAlertSink,
    OutboxDeliverer,
    Outcome,
    RoundControl,
    Sink,
    event_document,
    event_key,
)
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.types import AlertEvent, AlertRecord
from tests.integration.acls import add_acls, lift_write_denial

T0 = 1772326800000  # 2026-03-01T01:00:00Z


def _record(asset: str, status: str = "open", severity: str = "warning", windows: int = 2) -> AlertRecord:
    return AlertRecord(asset, "pumps", T0, T0 + windows * 50_000, T0 + 400_000 if status == "resolved" else None,
                       4.2, 1.0, severity, status, windows, [{"sensor": "bearing_temp", "share": 0.9, "error": 8.1}],
                       "pumps-v1")


def _events(asset: str) -> list[AlertEvent]:
    return [
        AlertEvent("opened", _record(asset)),
        AlertEvent("updated", _record(asset, severity="critical", windows=3), previous_severity="warning"),
        AlertEvent("updated", _record(asset, severity="critical", windows=4), previous_severity="critical"),
        AlertEvent("resolved", _record(asset, "resolved", "critical", windows=4)),
    ]


def _enqueue(url: str, sinks: AlertSinks, events: list[AlertEvent]) -> None:
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as session:
        repo.enqueue_outbox(session=session, rows=sinks.outbox_rows(events), now=datetime.now(UTC))
    engine.dispose()


def _outbox(url: str) -> dict[tuple[str, str], int]:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        counts = repo.count_outbox(session=session)
    engine.dispose()
    return counts


def _read_back(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10000)
    records = list(consumer)
    consumer.close()
    return records


@pytest.mark.integration
def test_kafka_sink_delivers_the_outbox_to_the_broker(kafka_bootstrap_servers: str, topic_name: str, db_url: str
                                                      ) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    sink = KafkaAlertSink(KafkaConfig(bootstrap_servers=kafka_bootstrap_servers),
                          KafkaSinkConfig(topic=topic_name, timeout_s=20))
    sinks = AlertSinks([OutboxDeliverer(sink, make_sessionmaker(engine))])
    _enqueue(db_url, sinks, _events("pump-1") + _events("pump-2"))
    sinks.notify()
    sinks.close(timeout_s=60)
    engine.dispose()
    assert _outbox(db_url) == {("kafka", "delivered"): 8}
    assert (sinks.deliverers[0].stats.delivered, sinks.deliverers[0].stats.failed) == (8, 0)

    records = _read_back(kafka_bootstrap_servers, topic_name)
    assert len(records) == 8
    by_asset: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        doc = orjson.loads(r.value)
        assert r.key.decode() == doc["alert"]["asset"]
        by_asset.setdefault(r.key.decode(), []).append(doc)
    for asset, docs in by_asset.items():  # one asset's events share a partition, so they keep their order
        assert [d["event"] for d in docs] == ["opened", "updated", "updated", "resolved"]
        assert [d["escalated"] for d in docs] == [False, True, False, False]
        assert {d["incident"] for d in docs} == {f"{asset}@2026-03-01T01:00:00Z"}
        assert docs[-1]["alert"]["closed_at"] == "2026-03-01T01:06:40Z"
        assert docs[1]["alert"]["severity"] == "critical" and docs[1]["previous_severity"] == "warning"
    assert set(by_asset) == {"pump-1", "pump-2"}


@pytest.mark.integration
def test_events_wait_in_the_outbox_while_the_broker_is_down(kafka_bootstrap_servers: str, topic_name: str,
                                                            tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = make_engine(url)
    down = KafkaAlertSink(KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}"),
                          KafkaSinkConfig(topic=topic_name, timeout_s=1, events=["opened", "resolved"]))
    first = AlertSinks([OutboxDeliverer(down, make_sessionmaker(engine))])
    _enqueue(url, first, _events("pump-1"))
    first.notify()
    first.close(timeout_s=3)  # a process that stops while its broker is unreachable: nothing is lost
    assert _outbox(url) == {("kafka", "pending"): 2}

    up = KafkaAlertSink(KafkaConfig(bootstrap_servers=kafka_bootstrap_servers),
                        KafkaSinkConfig(topic=topic_name, timeout_s=20, events=["opened", "resolved"]))
    second = AlertSinks([OutboxDeliverer(up, make_sessionmaker(engine))])  # the next start, the broker reachable
    deadline = time.monotonic() + 60  # the failed try's backoff (RETRY_BASE_S) first
    while _outbox(url) != {("kafka", "delivered"): 2} and time.monotonic() < deadline:
        time.sleep(0.2)
    second.close(timeout_s=10)
    engine.dispose()
    assert _outbox(url) == {("kafka", "delivered"): 2}
    assert [orjson.loads(r.value)["event"] for r in _read_back(kafka_bootstrap_servers, topic_name)] == [
        "opened", "resolved"]


def _identity(doc: dict) -> str:
    return f"{doc['incident']}|{doc['event']}|{doc['alert']['window_count']}"


def _delivered_rounds(deliverer: OutboxDeliverer, most: int = 10) -> int:
    """Rounds until nothing is due right away (the rounds a refusal adds run at once, without backoff)."""
    for n in range(1, most + 1):
        if not deliverer.deliver_once():
            return n
    raise AssertionError(f"still due after {most} rounds")


@pytest.mark.integration
def test_an_event_larger_than_the_topic_allows_fails_at_once_and_the_next_ones_go_on(
        kafka_bootstrap_servers: str, topic_name: str, tmp_path) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap_servers)
    try:  # one partition, so every event goes in one producer batch (16 kB), which the broker refuses as a whole
        admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1,
                                      topic_configs={"max.message.bytes": "8192"})])
    finally:
        admin.close()
    big = dataclasses.replace(_record("pump-2"), top_sensors=[  # ~13 kB of JSON
        {"sensor": f"sensor_{i}", "share": 0.001, "error": 1.5} for i in range(250)])
    events = [*_events("pump-1"), AlertEvent("opened", big),
              AlertEvent("updated", _record("pump-2", severity="critical", windows=3), previous_severity="warning"),
              *_events("pump-3")]
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    sink = KafkaAlertSink(KafkaConfig(bootstrap_servers=kafka_bootstrap_servers),
                          KafkaSinkConfig(topic=topic_name, timeout_s=20))
    deliverer = OutboxDeliverer(sink, make_sessionmaker(engine), start=False)
    _enqueue(url, AlertSinks([deliverer]), events)
    rounds = _delivered_rounds(deliverer)
    sink.shutdown()
    with make_sessionmaker(engine)() as session:
        failed = [(e.document, e.last_error) for e in repo.outbox_events(session=session, status="failed")]
    engine.dispose()

    assert _outbox(url) == {("kafka", "delivered"): 9, ("kafka", "failed"): 1}
    assert (deliverer.stats.delivered, deliverer.stats.failed, deliverer.stats.retried) == (9, 1, 0)
    assert rounds <= 4  # no retry backoff in between
    [(doc, error)] = failed
    assert _identity(doc) == "pump-2@2026-03-01T01:00:00Z|opened|2"
    assert error.startswith("MessageSizeTooLargeError: The server has a configurable maximum message size") and (
        "bytes)" in error)  # the library's description: the broker sent no message (kafka-python's str says None)

    records = sorted(_read_back(kafka_bootstrap_servers, topic_name), key=lambda r: r.offset)
    sent = [_identity(orjson.loads(r.value)) for r in records]
    expected = [_identity(event_document(e)) for e in events if e.alert is not big]
    assert list(dict.fromkeys(sent)) == expected  # all but the big one; first copies in the order queued
    assert all(r.key.decode() == orjson.loads(r.value)["alert"]["asset"] for r in records)


@pytest.mark.integration
def test_events_to_a_topic_the_sink_may_not_write_wait_until_it_may(secure_kafka: LocalKafka, topic_name: str,
                                                                    tmp_path) -> None:
    """No authorization for the topic is fixed on the cluster, not by the event: the events wait in order (the
    backlog is not failed in a second) and go once an operator lifts the ACL."""
    admin = KafkaAdminClient(bootstrap_servers=secure_kafka.bootstrap_servers)  # the broker's PLAINTEXT super user
    admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1)])
    add_acls(admin, ("WRITE", "DENY", "TOPIC", topic_name))
    kafka = KafkaConfig.model_validate({
        "bootstrap_servers": secure_kafka.secure_listeners["SASL_PLAINTEXT"],
        "security": {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": SASL_USER,
                     "sasl_password": secure_kafka.sasl_password}})
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    sink = KafkaAlertSink(kafka, KafkaSinkConfig(topic=topic_name, timeout_s=10))
    events = _events("pump-1") + _events("pump-2")
    deliverer = OutboxDeliverer(sink, make_sessionmaker(engine), start=False)
    _enqueue(url, AlertSinks([deliverer]), events)
    assert not deliverer.deliver_once()  # a retry: nothing is due again before the backoff
    with make_sessionmaker(engine)() as session:
        errors = {e.last_error for e in repo.outbox_events(session=session, status="pending") if e.last_error}
    assert _outbox(url) == {("kafka", "pending"): 8}
    assert (deliverer.stats.failed, deliverer.stats.retried) == (0, 1)
    assert len(errors) == 1 and errors.pop().startswith("TopicAuthorizationFailedError")

    lift_write_denial(admin, topic_name)
    admin.close()
    later = OutboxDeliverer(sink, make_sessionmaker(engine), start=False,  # past the backoff and the first's lease
                            clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    until = time.monotonic() + 60
    while _outbox(url) != {("kafka", "delivered"): 8} and time.monotonic() < until:
        later.deliver_once()  # the ACL's removal reaches the broker's authorizer within moments
    sink.shutdown()
    engine.dispose()
    assert _outbox(url) == {("kafka", "delivered"): 8}
    sent = [_identity(orjson.loads(r.value)) for r in _read_back(secure_kafka.bootstrap_servers, topic_name)]
    assert list(dict.fromkeys(sent)) == [_identity(event_document(e)) for e in events]


@pytest.mark.integration
class _SlowRecordingSink(Sink):
    """Keeps what it is sent, slowly enough that two deliverers overlap."""

    name, label, kinds = "webhook", "webhook:test", ("opened", "updated", "resolved")
    max_age_s, worst_item_s = 3600.0, 1.0

    def __init__(self, sent: list[str], lock: threading.Lock) -> None:
        self._sent, self._lock = sent, lock

    def send(self, items: list[Item], control: RoundControl) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for _, doc in items:
            if not control.go_on(first=not outcomes):
                break
            control.aborted.wait(0.002)
            with self._lock:
                self._sent.append(f"{doc['incident']}|{doc['event']}|{doc['alert']['window_count']}")
            outcomes.append(("delivered", None))
        return outcomes


@pytest.mark.integration
def test_two_pipelines_deliver_each_event_once_on_postgresql(pg_database_url: str) -> None:
    upgrade(pg_database_url)
    sent: list[str] = []
    lock = threading.Lock()
    engines = [make_engine(pg_database_url) for _ in range(2)]
    deliverers = [OutboxDeliverer(_SlowRecordingSink(sent, lock), make_sessionmaker(e), holder=f"p{i}",
                                  start=False) for i, e in enumerate(engines)]
    events = [e for i in range(150) for e in _events(f"pump-{i}")]  # 600 events, three batches' worth
    _enqueue(pg_database_url, AlertSinks(deliverers), events)
    barrier = threading.Barrier(2)

    def deliver(d: OutboxDeliverer) -> None:
        barrier.wait()
        for _ in range(20):
            d.deliver_once()

    threads = [threading.Thread(target=deliver, args=(d,)) for d in deliverers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for e in engines:
        e.dispose()
    assert len(sent) == 600 and len(set(sent)) == 600  # every event, once
    assert _outbox(pg_database_url) == {("webhook", "delivered"): 600}
    assert sent[:4] == [f"pump-0@2026-03-01T01:00:00Z|{k}|{w}" for k, w in
                        (("opened", 2), ("updated", 3), ("updated", 4), ("resolved", 4))]  # in the order queued


def test_a_catch_up_batch_of_many_events_is_queued_in_one_transaction(db_url: str) -> None:
    """More rows than PostgreSQL's 65,535 bound parameters allow in one INSERT (8 per row)."""
    upgrade(db_url)
    events = [AlertEvent("updated", _record("pump-1", windows=w)) for w in range(2, 10_002)]
    rows = [{"sink": "webhook", "event_key": event_key(e), "asset": "pump-1", "document": event_document(e)}
            for e in events]
    engine = make_engine(db_url)
    for batch in (rows, rows[:5]):  # the second: a replay, which queues nothing twice
        with make_sessionmaker(engine).begin() as session:
            repo.enqueue_outbox(session=session, rows=batch, now=datetime.now(UTC))
    engine.dispose()
    assert _outbox(db_url) == {("webhook", "pending"): 10_000}
