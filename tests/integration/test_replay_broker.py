"""`sensorwatch replay` against a real broker: every row arrives once, keyed by its asset, in time order per asset, in
the message format the pipeline decodes, whether the file is sent as it is read or sorted whole; a missing topic is
named with how to create it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pandas as pd
import pytest
import yaml
from kafka import KafkaConsumer
from typer.testing import CliRunner

from pipeline import kafka_io
from pipeline.cli import app
from pipeline.config import load_config
from pipeline.decode import Decoder


def _pumps(bootstrap_servers: str, topic: str, tmp_path: Path) -> tuple[Path, Path]:
    """A configuration of two pumps reading ``topic``, and a directory with an hour of their simulated readings."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap_servers, "topic": topic},
        "database": {"url": f"sqlite:///{tmp_path / 'sw.db'}"},
        "groups": [{"name": "pumps", "assets": ["pump-1", "pump-2"], "sampling_period_s": 10,
                    "sensors": [{"name": s} for s in ("speed", "flow", "pressure", "current", "vibration",
                                                      "motor_temp", "bearing_temp")]}]}))
    data = tmp_path / "sim"
    assert CliRunner().invoke(app, ["simulate", "--out", str(data), "--hours", "1", "--assets", "pump-1,pump-2",
                                    "--anomalies", "0"]).exit_code == 0
    return config, data


def test_replay_produces_every_row_keyed_by_asset_in_time_order(kafka_bootstrap_servers: str, topic_name: str,
                                                                 tmp_path: Path) -> None:
    config, data = _pumps(kafka_bootstrap_servers, topic_name, tmp_path)
    runner = CliRunner()
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


def test_a_long_history_is_sent_as_it_is_read_and_one_out_of_order_sorted_whole(
        kafka_bootstrap_servers: str, topic_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CSV in time order is read in pieces (``history.PIECE_ROWS`` rows) and sent piece by piece; a shuffled one is
    sorted whole, with a note. Either way every row arrives once and each asset's readings in time order."""
    import pipeline.history

    config, data = _pumps(kafka_bootstrap_servers, topic_name, tmp_path)
    runner = CliRunner()
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(data / "readings.csv").sample(frac=1.0, random_state=3).to_csv(shuffled, index=False)
    cfg = load_config(config)
    kafka_io.ensure_topics(cfg.kafka, [topic_name], partitions=2)
    monkeypatch.setattr(pipeline.history, "PIECE_ROWS", 100)
    sent = runner.invoke(app, ["replay", "-c", str(config), "--csv", str(data / "readings.csv")])
    assert sent.exit_code == 0, sent.output
    assert "not in time order" not in sent.output and f"sent 720 readings of 2 asset(s) to {topic_name}" in sent.output
    sorted_whole = runner.invoke(app, ["replay", "-c", str(config), "--csv", str(shuffled)])
    assert sorted_whole.exit_code == 0, sorted_whole.output
    assert "the file is not in time order, so it is sorted whole" in " ".join(sorted_whole.output.split())
    consumer = KafkaConsumer(topic_name, auto_offset_reset="earliest", consumer_timeout_ms=10_000,
                             **cfg.kafka.client_kwargs())
    records = list(consumer)
    consumer.close()
    assert len(records) == 1440
    for asset in ("pump-1", "pump-2"):
        mine = sorted((r for r in records if r.key == asset.encode()), key=lambda r: r.offset)
        times = [orjson.loads(r.value)["ts"] for r in mine]
        assert times[:360] == sorted(times[:360]) and times[360:] == times[:360]  # each replay in time order
