"""End to end on a real Kafka broker and real PostgreSQL: readings in; scores, alerts, offsets, dead letters out."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition
from sqlalchemy import select

from pipeline import kafka_io
from pipeline.config import Config, parse_config
from pipeline.decode import Decoder
from pipeline.localinfra._util import free_port
from pipeline.runner import RunStats, run_pipeline
from pipeline.simulate import inject, to_messages
from pipeline.sinks import OutboxDeliverer, WebhookAlertSink
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker
from pipeline.store.tables import Alert, AlertOutbox, ConsumerProgress, WindowScore
from pipeline.types import datetime_to_ms, ms_to_datetime
from pipeline.windowing import Windower
from tests.integration.pump_stream import PERIOD, START, deploy_pumps, probe, produce, pump_group, run_until

pytestmark = pytest.mark.integration

ASSETS = ["pump-1", "pump-2", "pump-3"]


def _config(bootstrap: str, topic: str, db_url: str, model_dir: Path, webhook: str | None = None,
            metrics_port: int = 0) -> Config:
    sinks = {"webhook": {"url": webhook, "retries": 0, "events": ["opened", "updated", "resolved"]}} if webhook else {}
    return parse_config({
        "sinks": sinks,
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dead_letter_topic": f"{topic}-dlq",
                  "group_id": f"g-{topic}", "max_poll_records": 500, "poll_timeout_ms": 500},
        "database": {"url": db_url},
        "model_dir": str(model_dir),
        "groups": [pump_group(ASSETS)],
    }, env={})


def test_stream_with_injected_anomaly(kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str,
                                      tmp_path: Path, webhook_receiver) -> None:  # type: ignore[no-untyped-def]
    webhook = webhook_receiver
    webhook.down.set()  # the receiver is down while the stream is scored: its events wait in the outbox
    cfg = _config(kafka_bootstrap_servers, topic_name, pg_database_url, tmp_path / "models", webhook.url)
    deploy_pumps(cfg, pg_database_url, ASSETS, 2160)  # six hours of normal data of every asset
    engine = make_engine(pg_database_url)
    sessions = make_sessionmaker(engine)

    # two hours of live data; pump-1 gets a drift on its bearing temperature in the middle
    live_start = START + pd.Timedelta(hours=26)  # same hours of the day as the training data, next day
    frames = {a: simulate_normal_frame(a, live_start) for a in ASSETS}
    frames["pump-1"], truth = inject(frames["pump-1"], "pump-1", "drift", live_start + pd.Timedelta(minutes=55),
                                     pd.Timedelta(minutes=12), seed=1, sensors=["bearing_temp"])
    messages = to_messages(frames)
    kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=3)
    producer = kafka_io.make_producer(cfg.kafka)
    for asset, payload in messages[: len(messages) // 2]:
        producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
    producer.send(cfg.kafka.topic, key=b"pump-2", value=b'{"asset": "pump-2", "ts": oops}')
    for asset, payload in messages[len(messages) // 2 :]:
        producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
    producer.flush()
    producer.close()

    stats = run_until(cfg, until_readings=len(messages), until_rejected=1)
    assert stats.readings == len(messages)
    assert dict(stats.rejected) == {"malformed_json": 1}

    # every window the stream closes has exactly one score row, and nothing else is there
    decoder = Decoder(cfg.groups, cfg.kafka.max_message_bytes)
    readings = [decoder.decode(orjson.dumps(p)) for _, p in messages]
    expected = {(w.asset, w.end_ms) for w in Windower(cfg.groups).add(readings).windows}
    with sessions() as s:
        stored = [(r.asset, datetime_to_ms(r.window_end)) for r in s.scalars(select(WindowScore))]
        alerts = list(s.scalars(select(Alert)))
    assert len(stored) == len(set(stored))
    assert set(stored) == expected
    assert stats.windows_scored == len(expected)

    # the anomalous asset gets an alert overlapping the injected span; the clean ones get none
    assert {a.asset for a in alerts} == {"pump-1"}
    span = (truth.start.to_pydatetime(), truth.end.to_pydatetime())
    assert any(a.opened_at < span[1] and a.last_seen_at > span[0] for a in alerts)
    assert all(a.top_sensors[0]["sensor"] == "bearing_temp" for a in alerts)

    # offsets are committed: at most up to the oldest reading an open window still needs, never beyond the end
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap_servers, group_id=cfg.kafka.group_id,
                             enable_auto_commit=False)
    partitions = [TopicPartition(cfg.kafka.topic, p) for p in consumer.partitions_for_topic(cfg.kafka.topic)]
    ends = consumer.end_offsets(partitions)
    committed = {tp: consumer.committed(tp) for tp in partitions}
    topic_id = kafka_io.topic_id(consumer, cfg.kafka.topic)
    consumer.close()
    for tp in partitions:
        if ends[tp] > 0:
            assert committed[tp] is not None and 0 < committed[tp] <= ends[tp]
    assert sum(ends[tp] - committed[tp] for tp in partitions if ends[tp]) < 3 * (30 + 3) + 3
    with sessions() as s:  # the progress recorded is tied to the topic's id as the brokers give it
        assert topic_id is not None and set(s.scalars(select(ConsumerProgress.topic_id))) == {topic_id}

    # every alert change is queued for the webhook, which has refused every try so far
    with sessions() as s:
        queued = [(r.status, r.document["event"], r.document["incident"]) for r in
                  s.scalars(select(AlertOutbox).order_by(AlertOutbox.id))]
    assert webhook.refused >= 1 and webhook.accepted == []
    assert {status for status, _, _ in queued} == {"pending"}
    assert [event for _, event, _ in queued].count("opened") == len(alerts)
    assert [event for _, event, _ in queued].count("resolved") == sum(a.status == "resolved" for a in alerts)

    # a restart replays from the committed offsets and adds no duplicates (nor queues any event again)
    webhook.down.clear()
    again = run_until(cfg, until_readings=10**9, until_rejected=10**9, timeout_s=30)
    assert again.readings == 0 and again.replayed > 0  # it re-reads the open windows' readings, counts none again
    with sessions() as s:
        assert repo.count_scores(session=s) == len(expected)
        assert len(list(s.scalars(select(Alert)))) == len(alerts)
        assert sum(repo.count_outbox(session=s).values()) == len(queued)

    # the receiver is back: the queued events reach it once each, in order (the restarted pipeline delivers those
    # due within its run; a deliverer past the backoff delivers the rest)
    deliverer = OutboxDeliverer(WebhookAlertSink(cfg.sinks.webhook), sessions, start=False,
                                clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    while deliverer.deliver_once():
        pass
    assert [(d["event"], d["incident"]) for d in webhook.accepted] == [(e, i) for _, e, i in queued]
    with sessions() as s:
        assert repo.count_outbox(session=s) == {("webhook", "delivered"): len(queued)}

    # the malformed message is in the dead-letter topic with its reason and source
    dlq = KafkaConsumer(cfg.kafka.dead_letter_topic, bootstrap_servers=kafka_bootstrap_servers,
                        auto_offset_reset="earliest", consumer_timeout_ms=10000)
    dead = [m for m in dlq]
    dlq.close()
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["reason"] == b"malformed_json"
    assert headers["source"].startswith(cfg.kafka.topic.encode())
    assert dead[0].value == b'{"asset": "pump-2", "ts": oops}'
    engine.dispose()


def simulate_normal_frame(asset: str, start: pd.Timestamp) -> pd.DataFrame:
    """Two hours of normal readings of one asset."""
    from pipeline.simulate import simulate_normal

    return simulate_normal(asset, start, 720, PERIOD, seed=9)


def test_ms_round_trip() -> None:
    assert datetime_to_ms(ms_to_datetime(1767225610123)) == 1767225610123


def _deploy_small(cfg: Config, db_url: str) -> list[tuple[str, dict[str, object]]]:
    """Migrate, train and activate a model on two hours of normal data; returns 40 minutes of readings to send."""
    normal = deploy_pumps(cfg, db_url, ASSETS, 720)
    return to_messages({a: f.iloc[:240] for a, f in normal.items()})


def _send(cfg: Config, messages: list[tuple[str, dict[str, object]]]) -> None:
    kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=3)
    producer = kafka_io.make_producer(cfg.kafka)
    for asset, payload in messages:
        producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
    producer.flush()
    producer.close()


def test_a_pipeline_started_before_its_topic_exists_consumes_once_it_does(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """It waits for the topic's partitions before joining its group; joining first would be assigned nothing, and
    kafka-python 3.0 could then lose the assignment of the rebalance that follows (an idle consumer). Meanwhile it
    is alive but not ready (a readiness probe holds traffic back, a liveness probe does not restart it); ready once
    it polls."""
    port = free_port()
    cfg = _config(kafka_bootstrap_servers, topic_name, pg_database_url, tmp_path / "models", metrics_port=port)
    messages = _deploy_small(cfg, pg_database_url)
    result: list[RunStats] = []
    pipeline = threading.Thread(target=lambda: result.append(run_until(
        cfg, until_readings=len(messages), until_rejected=0, timeout_s=90, idle_stop_s=60, serve_metrics=True)),
        daemon=True)
    with caplog.at_level("WARNING", logger="pipeline.kafka_io"):
        pipeline.start()
        deadline = time.monotonic() + 30
        while "has no partitions yet" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "has no partitions yet" in caplog.text  # it noticed, and waits
        assert probe(port, "/livez") == (200, "starting")
        waiting = (503, f"starting: waiting for topic {topic_name} to exist (the broker reports no partitions of it)")
        deadline = time.monotonic() + 5  # the warning is logged just before the probe's reason changes
        while probe(port, "/readyz") != waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe(port, "/readyz") == waiting  # says what it waits for
        assert probe(port, "/healthz") == (200, "ok")
        with make_sessionmaker(make_engine(pg_database_url))() as session:
            (process,) = repo.list_instances(session=session)  # what `models serving` and `check` read
            active = repo.active_model_versions(session=session)["pumps"].version
        assert process.serving == {"pumps": active} and process.consumer_group == cfg.kafka.group_id
        _send(cfg, messages)
        deadline = time.monotonic() + 60
        answers = {probe(port, "/readyz")}
        while (200, "ok") not in answers and pipeline.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            answers.add(probe(port, "/readyz"))
        pipeline.join(timeout=120)
    assert (200, "ok") in answers  # ready once it polls
    with make_sessionmaker(make_engine(pg_database_url))() as session:
        assert repo.list_instances(session=session) == []  # a clean stop removes its row
    assert result and result[0].readings == len(messages)  # all of them, well before the 90 s stop
    assert result[0].windows_scored > 0


def test_the_idle_stop_covers_waiting_for_a_topic_that_never_comes(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(kafka_bootstrap_servers, topic_name, pg_database_url, tmp_path / "models")
    _deploy_small(cfg, pg_database_url)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="pipeline.runner"):
        stats = run_pipeline(cfg, stop=threading.Event(), idle_stop_s=3.0)
    assert stats.readings == 0 and time.monotonic() - started < 30  # it stops instead of waiting for ever
    assert f"topic {topic_name} had no partitions within the idle stop (3s): stopping" in caplog.text


def test_polls_that_time_out_during_every_rebalance_still_end_up_consuming(
        kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path) -> None:
    """Polls of 1 ms time out in the middle of the group join. kafka-python 3.0 then can lose the assignment of a
    rejoin (``kafka_io.recover_lost_assignment``); the pipeline must consume everything regardless."""
    cfg = _config(kafka_bootstrap_servers, topic_name, pg_database_url, tmp_path / "models")
    cfg = cfg.model_copy(update={"kafka": cfg.kafka.model_copy(update={"poll_timeout_ms": 1})})
    messages = _deploy_small(cfg, pg_database_url)
    _send(cfg, messages)
    stats = run_until(cfg, until_readings=len(messages), until_rejected=0, timeout_s=60)
    assert stats.readings == len(messages)


def test_a_topic_deleted_and_re_created_is_processed_as_new(kafka_bootstrap_servers: str, topic_name: str,
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The readings topic deleted and re-created under its name while the pipeline is stopped, with more records
    than the old one held by then: the brokers give it a new id, so the pipeline forgets the old topic's progress
    (by the log end alone it looked like this topic's, and the new topic's first records were dropped as replay)
    and processes every record of the new topic, its bad record dead-lettered."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    cfg = _config(kafka_bootstrap_servers, topic_name, f"sqlite:///{tmp_path / 'sw.db'}", tmp_path / "models")
    deploy_pumps(cfg, f"sqlite:///{tmp_path / 'sw.db'}", ASSETS, 720)

    def send(frames: dict[str, pd.DataFrame]) -> int:
        messages = to_messages(frames)
        produce(cfg, messages, (b"pump-1", b"{not json"))
        return len(messages)

    kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=1)
    first = send({a: simulate_normal_frame(a, START + pd.Timedelta(hours=26)).iloc[:120] for a in ASSETS})
    before = run_until(cfg, until_readings=first, until_rejected=1)
    assert before.readings == first and dict(before.rejected) == {"malformed_json": 1}

    admin = KafkaAdminClient(**cfg.kafka.client_kwargs())
    admin.delete_topics([cfg.kafka.topic])
    deadline = time.monotonic() + 60
    while True:  # the deletion completes in the background
        try:
            kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic], partitions=1)
            if cfg.kafka.topic in admin.list_topics():
                break
        except KafkaError:
            pass
        assert time.monotonic() < deadline, "the topic was not re-created within 60 s"
        time.sleep(1)
    admin.close()
    later = send({a: simulate_normal_frame(a, START + pd.Timedelta(hours=30)) for a in ASSETS})
    assert later > first + 1  # the new log reaches past the old progress
    with caplog.at_level("WARNING", logger="pipeline.runner"):
        after = run_until(cfg, until_readings=later, until_rejected=1)
    assert after.readings == later and dict(after.rejected) == {"malformed_json": 1} and after.replayed == 0
    assert "was deleted and re-created" in caplog.text


def test_the_pipelines_consumer_does_not_create_its_topic_again(kafka_bootstrap_servers: str, topic_name: str,
                                                                tmp_path: Path) -> None:
    """sensorwatch creates no topic: the readings topic deleted while the pipeline's consumer is subscribed stays
    deleted, even on brokers that create topics on first use (as the local one does), so that the operator can
    create it again with the partitions they choose (the consumer's metadata requests re-created it at once, with the
    brokers' defaults, and the operator's create failed: "already exists")."""
    from kafka import KafkaAdminClient

    cfg = _config(kafka_bootstrap_servers, topic_name, f"sqlite:///{tmp_path / 'sw.db'}", tmp_path / "models")
    kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic], partitions=1)
    consumer = kafka_io.make_consumer(cfg.kafka)
    admin = KafkaAdminClient(**cfg.kafka.client_kwargs())
    try:
        consumer.poll(timeout_ms=2000)
        admin.delete_topics([cfg.kafka.topic])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the consumer asks for the topic's metadata meanwhile
            consumer.poll(timeout_ms=500)
            consumer._client.cluster.request_update()
        assert cfg.kafka.topic not in admin.list_topics()
    finally:
        consumer.close(autocommit=False)
        admin.close()
