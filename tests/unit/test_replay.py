"""Replay: a CSV of readings becomes time-ordered messages of configured assets and sensors (pure), produced keyed by
asset, paced when asked; the real broker round trip is in tests/integration/test_replay_broker.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import IngestConfig, parse_config
from pipeline.errors import ConfigError, TransientError
from pipeline.history import read_readings_csv
from pipeline.replay import csv_messages, ingest_notes, messages_of, plan, send
from pipeline.report import read_signals

CONFIG = parse_config({"groups": [
    {"name": "pumps", "assets": ["p1", "p2"], "sensors": [{"name": "flow"}, {"name": "temp"}]},
    {"name": "fans", "assets": ["f1"], "sensors": [{"name": "speed"}]}]}, env={})


def test_rows_become_time_ordered_messages_of_configured_assets_and_sensors() -> None:
    frame = pd.DataFrame({
        "ts": ["2026-01-01T00:00:10Z", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "garbage",
               "2026-01-01T00:00:20Z", "2026-01-01T00:00:30Z"],
        "asset": ["p1", "p2", "p1", "p1", "x9", "f1"],
        "flow": [1.0, 2.0, "n/a", 4.0, 5.0, 6.0],
        "temp": [10.0, None, None, 40.0, 50.0, 60.0],
        "speed": [None, None, None, None, None, 700.0],
        "note": ["a", "b", "c", "d", "e", "f"],
    })
    prepared = csv_messages(frame, CONFIG)
    t0 = 1767225600000
    assert prepared.messages == [
        ("p2", {"asset": "p2", "ts": t0, "values": {"flow": 2.0}}),  # ties by asset; p1's row had no number
        ("p1", {"asset": "p1", "ts": t0 + 10_000, "values": {"flow": 1.0, "temp": 10.0}}),
        ("f1", {"asset": "f1", "ts": t0 + 30_000, "values": {"speed": 700.0}}),  # only its group's sensors
    ]
    assert prepared.notes == [
        "1 row(s) with an unreadable ts left out (first: row 3)",
        "1 row(s) of asset(s) not in the configuration left out: x9",
        "column(s) that are no configured sensor left out: note",
        "1 value(s) that are not numbers left out",
    ]


def test_rows_with_an_empty_asset_cell_are_left_out_with_a_note() -> None:
    frame = pd.DataFrame({"ts": [1767225600000, 1767225601000, 1767225602000], "asset": ["f1", None, "x9"],
                          "speed": [1.0, 2.0, 3.0]})
    prepared = csv_messages(frame, CONFIG)
    assert [(a, p["ts"]) for a, p in prepared.messages] == [("f1", 1767225600000)]
    assert prepared.notes == ["1 row(s) without an asset left out (first: row 1)",
                              "1 row(s) of asset(s) not in the configuration left out: x9"]


def test_asset_ids_that_look_like_numbers_are_read_as_written(tmp_path: Path) -> None:
    """``007`` is an asset id, not the number 7 (nor 7.0 in a column with an empty cell)."""
    config = parse_config({"groups": [{"name": "g", "assets": ["007", "12"], "sensors": [{"name": "flow"}]}]},
                          env={})
    path = tmp_path / "r.csv"
    path.write_text("ts,asset,flow\n2026-01-01T00:00:00Z,007,1.5\n2026-01-01T00:00:10Z,12,2.5\n"
                    "2026-01-01T00:00:20Z,,3.5\n")
    frame = read_readings_csv(path)
    assert [a for a, _ in csv_messages(frame, config).messages] == ["007", "12"]
    signals = read_signals(path, "007", ["flow"], 0, 2**62)
    assert signals["flow"][1].tolist() == [1.5]


def test_an_unreadable_file_is_named_as_replay_data(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("groups: [{name: g, assets: [a], sensors: [{name: flow}]}]\n")
    result = CliRunner().invoke(app, ["replay", "-c", str(config), "--csv", str(tmp_path / "none.csv")])
    assert result.exit_code == 2 and "cannot read replay data" in result.output


def test_rows_without_an_asset_column_need_a_group_when_there_are_several() -> None:
    frame = pd.DataFrame({"ts": [1767225600000, 1767225601000], "speed": [1.0, 2.0]})
    with pytest.raises(ConfigError, match="no 'asset' column: give --group"):
        csv_messages(frame, CONFIG)
    prepared = csv_messages(frame, CONFIG, CONFIG.group("fans"))
    assert [(a, p["ts"]) for a, p in prepared.messages] == [("f1", 1767225600000), ("f1", 1767225601000)]
    with pytest.raises(ConfigError, match="needs a 'ts' column"):
        csv_messages(frame.drop(columns="ts"), CONFIG)
    with pytest.raises(ConfigError, match="no row with a readable ts"):
        csv_messages(frame.assign(ts="never"), CONFIG, CONFIG.group("fans"))


def test_readings_the_pipelines_input_checks_will_reject_are_noted() -> None:
    """A record is stamped when it is produced: with ingest.max_age_s, history older than that is rejected as
    ts_too_old; readings ahead of the clock by more than max_future_s as ts_in_future (paced: at their send time)."""
    now = 1767225600000
    ts = np.array([now + s * 1000 for s in (-7200, -60, 0, 600)])  # the readings' ts, as sent
    assert ingest_notes(ts, IngestConfig(), now) == [
        "1 of 4 reading(s) are more than ingest.max_future_s (300 s) ahead of the clock when published: the pipeline "
        "rejects them as ts_in_future"]
    assert ingest_notes(ts, IngestConfig(max_age_s=3600), now - 7200_000, speed=1) == []  # paced from then
    assert ingest_notes(ts, IngestConfig(max_age_s=3600), now) == [
        "1 of 4 reading(s) are older than ingest.max_age_s (3600 s) when published: the pipeline rejects them as "
        "ts_too_old",
        "1 of 4 reading(s) are more than ingest.max_future_s (300 s) ahead of the clock when published: the pipeline "
        "rejects them as ts_in_future"]
    assert ingest_notes([], IngestConfig(max_age_s=1), now) == []


def test_a_csv_in_time_order_is_sent_as_it_is_read_and_one_out_of_order_is_sorted_whole() -> None:
    """``plan`` reads the pieces once (counting what is left out, keeping only the times) and ``messages_of`` yields
    the messages piece by piece: for a file in time order, the messages and notes of sorting it whole. A file that
    goes back in time from one piece to the next is planned as out of order (the command then sorts it whole)."""
    frame = pd.DataFrame({"ts": [f"2026-01-01T00:00:{i // 3:02d}Z" for i in range(30)],
                          "asset": ["p1", "p2", "f1"] * 10, "flow": 1.0, "temp": 2.0, "speed": 3.0})
    frame.loc[4, "asset"] = "x9"
    frame.loc[7, "ts"] = "garbage"
    frame.loc[[16, 29], "asset"] = None
    whole = csv_messages(frame, CONFIG)
    for rows in (1, 4, 30):
        pieces = [frame.iloc[i:i + rows] for i in range(0, len(frame), rows)]
        planned = plan(pieces, CONFIG)
        assert planned.in_order and planned.omitted.notes() == whole.notes == [
            "1 row(s) with an unreadable ts left out (first: row 7)",
            "2 row(s) without an asset left out (first: row 16)",
            "1 row(s) of asset(s) not in the configuration left out: x9"]
        sent = list(messages_of(pieces, CONFIG))
        assert sorted(sent, key=lambda m: (m[1]["ts"], m[0])) == whole.messages
        assert [p["ts"] for _, p in sent] == sorted(p["ts"] for _, p in sent)  # in time order
        assert planned.ts.tolist() == [p["ts"] for _, p in whole.messages]
        assert planned.assets == {"p1", "p2", "f1"}
    backwards = [frame.iloc[15:], frame.iloc[:15]]
    assert not plan(backwards, CONFIG).in_order and plan(frame.iloc[::-1].pipe(lambda f: [f]), CONFIG).in_order
    with pytest.raises(ConfigError, match="no row with a readable ts"):
        plan([frame.iloc[:0], frame.assign(asset="x9")], CONFIG)


class _Producer:
    def __init__(self, fail_at: int | None = None) -> None:
        self.sent: list[tuple[str, bytes, float]] = []
        self.fail_at, self.flushed = fail_at, False
        self.now = 0.0

    def send(self, topic: str, key: bytes, value: bytes) -> Any:
        self.sent.append((topic, key, self.now))
        failing = len(self.sent) == self.fail_at

        class Future:
            def add_errback(self, errback: Any) -> None:
                if failing:
                    errback(RuntimeError("NotLeaderForPartition"))
        return Future()

    def flush(self) -> None:
        self.flushed = True


def test_send_paces_by_the_readings_time_and_names_unacknowledged_records() -> None:
    messages = [(a, {"asset": a, "ts": 1767225600000 + s * 1000, "values": {"flow": 1.0}})
                for a, s in (("p1", 0), ("p2", 0), ("p1", 60), ("p1", 120))]
    producer = _Producer()

    def sleep(seconds: float) -> None:
        producer.now += seconds

    progress: list[int] = []
    assert send(producer, "t", messages, speed=60, advance=progress.append,  # type: ignore[arg-type]
                clock=lambda: producer.now, sleep=sleep) == 4
    assert [(k, round(at, 3)) for _, k, at in producer.sent] == [(b"p1", 0), (b"p2", 0), (b"p1", 1), (b"p1", 2)]
    assert producer.flushed and sum(progress) == 4
    fast = _Producer()
    assert send(fast, "t", messages, clock=lambda: 0.0, sleep=sleep) == 4  # type: ignore[arg-type]
    with pytest.raises(TransientError, match="1 of 4 record"):
        send(_Producer(fail_at=3), "t", messages)  # type: ignore[arg-type]


def test_pacing_starts_with_the_first_message_not_before_its_piece_is_read() -> None:
    """Messages read as they are sent (``messages_of``) come after their piece is read: the time that takes before
    the first message is not replay time, so the first readings are not sent in a burst to catch up with it."""
    messages = [(a, {"asset": a, "ts": 1767225600000 + s * 1000, "values": {"flow": 1.0}})
                for a, s in (("p1", 0), ("p2", 0), ("p1", 60), ("p1", 120))]
    producer = _Producer()

    def sleep(seconds: float) -> None:
        producer.now += seconds

    def read() -> Any:
        producer.now += 2.0  # reading the first piece
        yield from messages

    assert send(producer, "t", read(), speed=60, clock=lambda: producer.now, sleep=sleep) == 4  # type: ignore[arg-type]
    assert [(k, round(at, 3)) for _, k, at in producer.sent] == [(b"p1", 2), (b"p2", 2), (b"p1", 3), (b"p1", 4)]


def test_replay_to_a_missing_topic_says_how_to_create_it_on_the_brokers(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The suggested kafka-topics.sh command names the brokers (since Kafka 3 it needs --bootstrap-server)."""
    from pipeline import kafka_io

    config = tmp_path / "c.yaml"
    config.write_text("kafka: {bootstrap_servers: 'b1:9092,b2:9092', topic: plant-readings}\n"
                      "groups: [{name: pumps, assets: [p1], sensors: [{name: flow}]}]\n")
    csv = tmp_path / "r.csv"
    csv.write_text("ts,asset,flow\n2026-01-01T00:00:00Z,p1,1.0\n")
    monkeypatch.setattr(kafka_io, "topic_partitions", lambda cfg, topics, timeout_s: dict.fromkeys(topics, 0))
    result = CliRunner().invoke(app, ["replay", "-c", str(config), "--csv", str(csv)])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "kafka-topics.sh --create --topic plant-readings --partitions 3 --bootstrap-server b1:9092" in said
