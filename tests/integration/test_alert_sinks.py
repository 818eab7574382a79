"""The Kafka alert sink against a real broker: events come back as JSON, keyed by asset, in order per asset; an
unreachable broker costs the caller nothing."""

from __future__ import annotations

import socket
import time

import orjson
import pytest
from kafka import KafkaConsumer

from pipeline.config import KafkaConfig, KafkaSinkConfig
from pipeline.sinks import AlertSinks, KafkaAlertSink
from pipeline.types import AlertEvent, AlertRecord

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


@pytest.mark.integration
def test_kafka_sink_events_are_read_back_from_the_broker(kafka_bootstrap_servers: str, topic_name: str) -> None:
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap_servers)
    sink = KafkaAlertSink(kafka, KafkaSinkConfig(topic=topic_name, timeout_s=20))
    sinks = AlertSinks([sink])
    started = time.monotonic()
    sinks.publish(_events("pump-1") + _events("pump-2"))
    assert time.monotonic() - started < 0.1  # queued, not sent, on the caller's thread
    sinks.close(timeout_s=60)
    assert (sink.stats.delivered, sink.stats.failed, sink.stats.dropped) == (8, 0, 0)

    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap_servers, auto_offset_reset="earliest",
                             consumer_timeout_ms=10000)
    records = list(consumer)
    consumer.close()
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


def test_kafka_sink_with_an_unreachable_broker_never_blocks_or_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}")
    sink = KafkaAlertSink(kafka, KafkaSinkConfig(topic="alerts", timeout_s=1, events=["opened", "resolved"]))
    sinks = AlertSinks([sink])
    started = time.monotonic()
    sinks.publish(_events("pump-1"))
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    sinks.close(timeout_s=3)
    assert time.monotonic() - started < 3 + 2 + 1  # the deadline, then 2 s for the thread to notice
    s = sink.stats
    assert s.queued == 2 and s.delivered == 0 and s.failed + s.dropped + s.in_flight == 2
