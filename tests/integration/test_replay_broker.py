"""`sensorwatch replay` against a real broker: every row arrives once, keyed by its asset, in time order per asset, in
the message format the pipeline decodes; a missing topic is named with how to create it."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml
from kafka import KafkaConsumer
from typer.testing import CliRunner

from pipeline import kafka_io
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.decode import Decoder


def test_replay_produces_every_row_keyed_by_asset_in_time_order(kafka_bootstrap_servers: str, topic_name: str,
                                                                 tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap_servers, "topic": topic_name},
        "database": {"url": f"sqlite:///{tmp_path / 'sw.db'}"},
        "groups": [{"name": "pumps", "assets": ["pump-1", "pump-2"], "sampling_period_s": 10,
                    "sensors": [{"name": s} for s in ("speed", "flow", "pressure", "current", "vibration",
                                                      "motor_temp", "bearing_temp")]}]}))
    runner = CliRunner()
    data = tmp_path / "sim"
    assert runner.invoke(app, ["simulate", "--out", str(data), "--hours", "1", "--assets", "pump-1,pump-2",
                               "--anomalies", "0"]).exit_code == 0
    missing = runner.invoke(app, ["replay", "-c", str(config), "--csv", str(data / "readings.csv")])
    assert missing.exit_code == 1 and f"kafka-topics.sh --create --topic {topic_name}" in missing.output
    cfg = load_config(config)
    kafka_io.ensure_topics(cfg.kafka, [topic_name], partitions=2)

    result = runner.invoke(app, ["replay", "-c", str(config), "--csv", str(data / "readings.csv")])
    assert result.exit_code == 0, result.output
    assert f"sent 720 readings of 2 asset(s) to {topic_name}" in result.output
    consumer = KafkaConsumer(topic_name, auto_offset_reset="earliest", consumer_timeout_ms=10_000,
                             **cfg.kafka.client_kwargs())
    records = list(consumer)
    consumer.close()
    assert len(records) == 720
    decoded, rejected = Decoder(cfg.groups, cfg.kafka.max_message_bytes, cfg.ingest).decode_batch(
        ((r.topic, r.partition, r.offset, r.key, r.value, r.timestamp) for r in records), now_ms=2**62)
    assert rejected == [] and len(decoded) == 720 and all(len(r.values) == 7 for r in decoded)
    for asset in ("pump-1", "pump-2"):
        mine = [r for r in records if r.key == asset.encode()]
        assert len({r.partition for r in mine}) == 1  # keyed: one partition per asset, so its order holds
        times = [orjson.loads(r.value)["ts"] for r in sorted(mine, key=lambda r: r.offset)]
        assert times == sorted(times) and len(times) == 360
