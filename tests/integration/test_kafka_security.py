"""Kafka security against a real broker that speaks it (``LocalKafka(secure=True)``): every Kafka client of the
product (the pipeline's consumer group and offset commits, the dead-letter producer, the alert sink's producer,
retraining's reader, ``check``'s admin client) works over mutual TLS and over SASL_SSL with SCRAM; a password taken
from the environment is never logged; a wrong password, a missing client certificate or an untrusted CA makes
``check`` fail with the broker's reason."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import NewTopic
from sqlalchemy import select
from typer.testing import CliRunner

from pipeline import kafka_io
from pipeline.cli import app
from pipeline.config import Config, parse_config
from pipeline.errors import TransientError
from pipeline.localinfra import LocalKafka
from pipeline.localinfra._util import free_port
from pipeline.localinfra.kafka import SASL_USER
from pipeline.localinfra.tls import KEY_PASSWORD
from pipeline.runner import RunStats, run_pipeline
from pipeline.simulate import inject, simulate_normal, to_messages
from pipeline.sinks import KafkaAlertSink, OutboxDeliverer
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker
from pipeline.store.tables import Alert
from tests.integration.acls import add_acls, lift_write_denial
from tests.integration.pump_stream import PERIOD, START, deploy_pumps, probe, produce, pump_group, run_until

pytestmark = pytest.mark.integration

ASSETS = ["pump-1", "pump-2"]


def _security(broker: LocalKafka, setup: str, *, password: str = "${KAFKA_PASSWORD}", ca: Path | None = None,
              listener: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(bootstrap address, kafka.security)`` for one of the broker's secured listeners (``listener``: another one's
    address, a mismatch)."""
    pki = broker.pki
    assert pki is not None
    cafile = str(ca or pki.ca)
    if setup == "mtls":
        return broker.secure_listeners["SSL"], {"protocol": "SSL", "ssl_cafile": cafile, "ssl_certfile":
                                                str(pki.client_cert), "ssl_keyfile": str(pki.client_key)}
    if setup == "mtls-encrypted-key":
        return broker.secure_listeners["SSL"], {
            "protocol": "SSL", "ssl_cafile": cafile, "ssl_certfile": str(pki.client_cert),
            "ssl_keyfile": str(pki.client_key_encrypted), "ssl_key_password": "${KAFKA_KEY_PASSWORD}"}
    if setup == "mtls-no-client-cert":
        return broker.secure_listeners["SSL"], {"protocol": "SSL", "ssl_cafile": cafile}
    protocol, mechanism = setup.split("/")
    security = {"protocol": protocol, "sasl_mechanism": mechanism, "sasl_username": SASL_USER,
                "sasl_password": password}
    return (broker.secure_listeners[listener or protocol],
            security | ({"ssl_cafile": cafile} if protocol == "SASL_SSL" else {}))


def _config(broker: LocalKafka, setup: str, topic: str, db_url: str, model_dir: Path,
            metrics: dict[str, Any] | None = None) -> Config:
    bootstrap, security = _security(broker, setup)
    return parse_config({
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dead_letter_topic": f"{topic}-dlq",
                  "group_id": f"g-{topic}", "max_poll_records": 500, "poll_timeout_ms": 500, "security": security},
        "sinks": {"kafka": {"topic": f"{topic}-alerts"}},
        "database": {"url": db_url}, "model_dir": str(model_dir), "metrics": metrics or {"enabled": False},
        "groups": [pump_group(ASSETS)],
    }, env={"KAFKA_PASSWORD": broker.sasl_password})


def _read_all(cfg: Config, topic: str) -> list[Any]:
    consumer = KafkaConsumer(topic, auto_offset_reset="earliest", consumer_timeout_ms=10_000,
                             **cfg.kafka.client_kwargs())
    try:
        return list(consumer)
    finally:
        consumer.close()


@pytest.mark.parametrize("setup", ["SASL_SSL/SCRAM-SHA-512", "mtls"])
def test_every_kafka_client_works_over_tls_and_sasl_and_the_password_is_never_logged(
        secure_kafka: LocalKafka, setup: str, topic_name: str, pg_database_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(secure_kafka, setup, topic_name, pg_database_url, tmp_path / "models")
    deploy_pumps(cfg, pg_database_url, ASSETS, 2160)
    engine = make_engine(pg_database_url)
    sessions = make_sessionmaker(engine)

    caplog.set_level("DEBUG")  # every client's log, the libraries' included, is searched for the password at the end
    caplog.set_level("DEBUG", logger="kafka")  # a CLI test earlier in the session may have set it to ERROR

    live_start = START + pd.Timedelta(hours=26)
    frames = {a: simulate_normal(a, live_start, 720, PERIOD, seed=9) for a in ASSETS}
    frames["pump-1"], _ = inject(frames["pump-1"], "pump-1", "drift", live_start + pd.Timedelta(minutes=55),
                                 pd.Timedelta(minutes=12), seed=1, sensors=["bearing_temp"])
    messages = to_messages(frames)
    kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=3)
    produce(cfg, messages, (b"pump-2", b'{"asset": "pump-2", "ts": oops}'))

    stats = run_until(cfg, until_readings=len(messages), until_rejected=1)
    assert stats.readings == len(messages) and dict(stats.rejected) == {"malformed_json": 1}
    assert stats.windows_scored > 0

    # the offsets were committed through the secured connection
    consumer = KafkaConsumer(group_id=cfg.kafka.group_id, enable_auto_commit=False, **cfg.kafka.client_kwargs())
    partitions = [TopicPartition(cfg.kafka.topic, p) for p in consumer.partitions_for_topic(cfg.kafka.topic)]
    ends = consumer.end_offsets(partitions)
    committed = {tp: consumer.committed(tp) for tp in partitions}
    consumer.close()
    assert all(committed[tp] for tp in partitions if ends[tp] > 0)

    # the dead-letter producer wrote the malformed record, with its reason
    dead = _read_all(cfg, cfg.kafka.dead_letter_topic)
    assert [dict(d.headers)["reason"] for d in dead] == [b"malformed_json"]

    # the alert sink publishes the drift's alert events on the same cluster
    with sessions() as s:
        alerted = {a.asset for a in s.scalars(select(Alert))}
    assert alerted == {"pump-1"}
    sink = KafkaAlertSink(cfg.kafka, cfg.sinks.kafka)
    deliverer = OutboxDeliverer(sink, sessions, start=False)
    while deliverer.deliver_once():
        pass
    sink.shutdown()
    with sessions() as s:
        counts = repo.count_outbox(session=s)
    events = [orjson.loads(m.value) for m in _read_all(cfg, f"{topic_name}-alerts")]
    assert events and counts == {("kafka", "delivered"): len(events)}
    assert {e["alert"]["asset"] for e in events} == alerted

    # retraining's reader gets the readings back from the topic
    read = sum(len(batch) for batch in kafka_io.read_since(cfg.kafka, 0, timeout_s=60))
    assert read == len(messages) + 1
    engine.dispose()
    assert "Starting KafkaAdminClient with configuration" in caplog.text  # the admin client's dump was searched too
    assert secure_kafka.sasl_password not in caplog.text


def _check(broker: LocalKafka, setup: str, tmp_path: Path, **security: Any
           ) -> tuple[int, dict[str, dict[str, Any]], str]:
    bootstrap, found = _security(broker, setup, **security)
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "security": found},
        "database": {"url": f"sqlite:///{tmp_path / 'sw.db'}"},
        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    result = CliRunner(env={"KAFKA_PASSWORD": broker.sasl_password, "KAFKA_KEY_PASSWORD": KEY_PASSWORD}).invoke(
        app, ["check", "--config", str(path), "--kafka-timeout-s", "4", "--format", "json"])
    return result.exit_code, {c["name"]: c for c in json.loads(result.stdout)}, result.output


@pytest.mark.parametrize("setup", ["SASL_PLAINTEXT/PLAIN", "SASL_PLAINTEXT/SCRAM-SHA-256", "SASL_SSL/SCRAM-SHA-512",
                                   "SASL_SSL/PLAIN", "mtls", "mtls-encrypted-key"])
def test_check_reaches_a_broker_with_each_supported_security_setup(
        secure_kafka: LocalKafka, setup: str, tmp_path: Path) -> None:
    _, checks, _ = _check(secure_kafka, setup, tmp_path)
    assert checks["kafka"]["status"] == "ok", checks["kafka"]["detail"]
    in_clear = setup == "SASL_PLAINTEXT/PLAIN"  # the password crosses the network as it is
    assert ("kafka security" in checks) == in_clear
    assert not in_clear or checks["kafka security"]["status"] == "warn"


@pytest.mark.parametrize(("setup", "security", "reason"), [
    ("SASL_SSL/SCRAM-SHA-512", {"password": "not-the-password"}, "invalid credentials with SASL mechanism"),
    ("SASL_PLAINTEXT/PLAIN", {"password": "not-the-password"}, "Invalid username or password"),
    ("mtls-no-client-cert", {}, "bad certificate"),
    ("SASL_SSL/SCRAM-SHA-512", {"ca": "other"}, "certificate verify failed"),
    ("SASL_SSL/SCRAM-SHA-512", {"ca": "missing"}, "kafka.security.ssl_cafile: cannot read"),
])
def test_check_names_the_brokers_reason_when_the_security_settings_are_wrong(
        secure_kafka: LocalKafka, setup: str, security: dict[str, str], reason: str, tmp_path: Path) -> None:
    assert secure_kafka.pki is not None
    if "ca" in security:
        security = {"ca": secure_kafka.pki.other_ca if security["ca"] == "other" else Path("/nonexistent/ca.pem")}
    code, checks, output = _check(secure_kafka, setup, tmp_path, **security)
    kafka = checks["kafka"]
    assert code == 1 and kafka["status"] == "fail"
    refused_credentials = "a broker that refuses the SASL credentials closes the connection"  # kafka-python's race
    assert reason in kafka["detail"] or (setup.startswith("SASL") and refused_credentials in kafka["detail"]), (
        kafka["detail"])
    assert "not-the-password" not in output and secure_kafka.sasl_password not in output


def test_a_plaintext_protocol_against_a_tls_listener_is_named(secure_kafka: LocalKafka, tmp_path: Path) -> None:
    _, checks, _ = _check(secure_kafka, "SASL_PLAINTEXT/SCRAM-SHA-512", tmp_path, listener="SASL_SSL")
    detail = checks["kafka"]["detail"]
    assert checks["kafka"]["status"] == "fail"
    assert ("the broker answered in TLS: set kafka.security.protocol to SSL or SASL_SSL" in detail
            or "and so does a TLS listener: check kafka.security's protocol" in detail), detail


def test_retraining_says_why_it_could_not_read_the_topic_back(secure_kafka: LocalKafka, topic_name: str) -> None:
    bootstrap, security = _security(secure_kafka, "SASL_SSL/SCRAM-SHA-512", password="not-the-password")
    cfg = parse_config({"kafka": {"bootstrap_servers": bootstrap, "topic": topic_name, "security": security},
                        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
    with pytest.raises(TransientError, match=f"cannot read {topic_name} back: .*last connection error: ") as caught:
        next(kafka_io.read_since(cfg.kafka, 0, timeout_s=10))
    refused_credentials = "a broker that refuses the SASL credentials closes the connection"  # kafka-python's race
    assert "invalid credentials with SASL mechanism" in str(caught.value) or refused_credentials in str(caught.value)


def test_check_names_the_permissions_the_principal_lacks(secure_kafka: LocalKafka, topic_name: str,
                                                         tmp_path: Path) -> None:
    dlq, alerts, group = f"{topic_name}-dlq", f"{topic_name}-alerts", f"g-{topic_name}"
    bootstrap, security = _security(secure_kafka, "SASL_SSL/SCRAM-SHA-512")
    path = tmp_path / "plant.yaml"
    path.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "security": security, "topic": topic_name,
                  "dead_letter_topic": dlq, "group_id": group},
        "sinks": {"kafka": {"topic": alerts}}, "database": {"url": f"sqlite:///{tmp_path / 'sw.db'}"},
        "groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}))
    admin = KafkaAdminClient(bootstrap_servers=secure_kafka.bootstrap_servers)  # the broker's PLAINTEXT super user
    admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in (topic_name, dlq, alerts)])

    def permissions() -> dict[str, Any]:
        result = CliRunner(env={"KAFKA_PASSWORD": secure_kafka.sasl_password}).invoke(
            app, ["check", "--config", str(path), "--kafka-timeout-s", "10", "--format", "json"])
        return {c["name"]: c for c in json.loads(result.stdout)}["kafka permissions"]

    topics = f"READ on topic {topic_name}, WRITE on topic {dlq}, WRITE on topic {alerts}"
    assert permissions() == {"name": "kafka permissions", "status": "ok", "detail": (
        f"allowed: {topics}; not reported: READ on group {group} (not known to the brokers yet: it shows at the "
        "first start)")}
    consumer = KafkaConsumer(topic_name, bootstrap_servers=secure_kafka.bootstrap_servers, group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    consumer.poll(timeout_ms=3000)
    consumer.commit({TopicPartition(topic_name, 0): OffsetAndMetadata(0, "", -1)})  # the group exists from now on
    consumer.close()
    assert permissions()["detail"] == f"allowed: {topics}, READ on group {group}"

    # no WRITE on the dead letters; on the group DESCRIBE only, which is not READ
    add_acls(admin, ("WRITE", "DENY", "TOPIC", dlq), ("DESCRIBE", "ALLOW", "GROUP", group))
    admin.close()
    refused = permissions()
    assert refused["status"] == "fail"
    assert refused["detail"] == (
        f"not allowed: WRITE on topic {dlq}, READ on group {group} (the first rejected reading stalls the pipeline "
        "(nothing is committed past it); the pipeline cannot join its consumer group or commit offsets); grant them "
        "to the principal of kafka.security on the cluster (kafka-acls.sh --add)")


def test_a_refused_dead_letter_write_stalls_with_its_reason_and_the_lag_keeps_counting(
        secure_kafka: LocalKafka, topic_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing is committed past a reject that cannot be dead-lettered; meanwhile /healthz says why and the lag gauge
    follows the log end as readings keep arriving (it used to stay at its value before the stall, 0 on a caught-up
    pipeline), counting the batch the pipeline holds. Once the ACL is lifted, everything goes on and nothing is
    lost."""
    port = free_port()
    cfg = _config(secure_kafka, "SASL_SSL/SCRAM-SHA-512", topic_name, f"sqlite:///{tmp_path / 'sw.db'}",
                  tmp_path / "models", metrics={"host": "127.0.0.1", "port": port})
    normal = deploy_pumps(cfg, f"sqlite:///{tmp_path / 'sw.db'}", ASSETS, 720)
    messages = to_messages({a: f.iloc[:240] for a, f in normal.items()})
    later = to_messages({a: f.iloc[240:480] for a, f in normal.items()})  # what arrives while the pipeline waits
    admin = KafkaAdminClient(bootstrap_servers=secure_kafka.bootstrap_servers)  # the broker's PLAINTEXT super user
    admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1)
                         for t in (cfg.kafka.topic, cfg.kafka.dead_letter_topic)])
    add_acls(admin, ("WRITE", "DENY", "TOPIC", cfg.kafka.dead_letter_topic))
    producer = kafka_io.make_producer(cfg.kafka)
    producer.send(cfg.kafka.topic, key=b"pump-1", value=b'{"asset": "pump-1", "ts": oops}')
    for asset, payload in messages:
        producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
    producer.flush()

    def get(path: str) -> tuple[int, str]:
        return probe(port, path)

    result: list[RunStats] = []
    stop = threading.Event()
    pipeline = threading.Thread(target=lambda: result.append(run_pipeline(
        cfg, stop=stop, idle_stop_s=10, serve_metrics=True)), daemon=True)
    with caplog.at_level("INFO", logger="pipeline.runner"):
        pipeline.start()
        until = time.monotonic() + 60
        while get("/healthz")[0] != 503 and time.monotonic() < until:
            time.sleep(0.5)
        status, reason = get("/healthz")
        assert status == 503 and f"not allowed to write the dead-letter topic {cfg.kafka.dead_letter_topic}" in reason
        assert get("/readyz") == (status, reason) and get("/livez") == (200, "ok")  # waiting, not hung: no restart
        for asset, payload in later:
            producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
        producer.flush()
        producer.close()
        until = time.monotonic() + 45
        lag = 0.0
        while lag == 0 and time.monotonic() < until:  # refreshed at each retry: within the first few seconds
            time.sleep(1)
            lag = sum(float(line.rsplit(" ", 1)[1]) for line in get("/metrics")[1].splitlines()
                      if line.startswith("sensorwatch_consumer_lag{"))
        # none of what arrived since is read while the reject waits, and the batch it holds is not processed either
        assert lag == len(messages) + 1 + len(later)

        lift_write_denial(admin, cfg.kafka.dead_letter_topic)
        admin.close()
        pipeline.join(timeout=120)
        stop.set()
    assert result and result[0].readings == len(messages) + len(later)
    assert dict(result[0].rejected) == {"malformed_json": 1}
    assert "dependency available again after" in caplog.text
    assert [dict(d.headers)["reason"] for d in _read_all(cfg, cfg.kafka.dead_letter_topic)] == [b"malformed_json"]


def test_the_lag_while_waiting_leaves_out_partitions_whose_position_is_not_known_yet(
        secure_kafka: LocalKafka, topic_name: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=secure_kafka.bootstrap_servers)
    admin.create_topics([NewTopic(topic_name, num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=secure_kafka.bootstrap_servers)
    for i in range(10):
        producer.send(topic_name, value=b"x", partition=i % 2)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=secure_kafka.bootstrap_servers, group_id=f"g-{topic_name}",
                             enable_auto_commit=False)
    first, second = TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)
    consumer.assign([first, second])  # no committed offsets, nothing polled: positions unknown
    assert kafka_io.lag_to_end(consumer) == {}
    consumer.seek(first, 2)
    assert kafka_io.lag_to_end(consumer) == {0: 3}  # the known one is counted, the other left out
    consumer.close()
