"""The runner with records that are usable in part: the usable values are windowed and scored, the record also goes
to the dead-letter topic once, marked partial (SQLite and a stand-in detector and producer: no broker)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson

from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from tests.unit.test_runner_alert_sinks import T0, _config, _MeanDetector


class _Producer:
    """Records what it is sent; every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, bytes]]] = []

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> _Producer:
        self.sent.append((topic, value or b"", dict(headers or [])))
        return self

    def get(self, timeout: float | None = None) -> None:
        return None

    def flush(self, timeout: float | None = None) -> None:
        return None


def _record(offset: int, step: int, values: dict[str, Any]) -> RawRecord:
    body = orjson.dumps({"asset": "a", "ts": T0 + step * 1000, "values": values})
    return RawRecord("readings", 0, offset, b"a", body, T0 + step * 1000)


def test_the_usable_values_of_a_record_are_scored_and_the_rest_dead_lettered_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    steps = [0, 1, 2, 3, 4, 5, 6, 7, 7, 8, 9, 10, 11]  # step 7 is sent twice (a producer's retry)
    records = [_record(offset, step, {"x": 0.1, "y": 0.1}) for offset, step in enumerate(steps)]
    records[3] = _record(3, 3, {"x": 0.1, "y": 0.1, "humidity": 40.0})  # an extra field: x and y used
    records[5] = _record(5, 5, {"x": 0.1, "y": 1e20})  # y is a glitch (beyond any magnitude): x used, y missing
    runner = Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                    producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    runner.process(records, T0 + 12_000)
    dead = [(headers["reason"], headers["partial"], value) for _, value, headers in producer.sent]
    assert dead == [(b"unknown_sensor", b"true", records[3].value), (b"out_of_range", b"true", records[5].value),
                    (b"duplicate", b"false", records[8].value)]
    assert runner.stats.readings == 12 and runner.stats.rejected == {"unknown_sensor": 1, "out_of_range": 1,
                                                                     "duplicate": 1}
    # windows of 4 steps, stride 2, no gap filling: the ones holding step 5 (y missing) are skipped, the rest scored
    assert runner.stats.windows_scored == 3 and runner.stats.windows_skipped == 2

    again = Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                   producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    again.process(records, T0 + 13_000)  # a restart replays the batch: nothing is dead-lettered twice
    assert len(producer.sent) == 3
    assert again.stats.replayed == len(records) and again.stats.readings == 0  # each record counted once


def test_a_reading_from_a_glitching_clock_is_dead_lettered_and_the_stream_goes_on(tmp_path: Path) -> None:
    """One reading stamped 190 s ahead (within ingest.max_future_s): held, its offset not committed past, until
    the next batch shows the asset's stream going on where it was; then it goes to the dead-letter topic as ts_jump
    with its original bytes, and no real reading is late."""
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    steps = [*range(11), 200, *range(11, 21)]
    records = [_record(offset, step, {"x": 0.1, "y": 0.1}) for offset, step in enumerate(steps)]
    runner = Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                    producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    commit = runner.process(records[:12], T0 + 12_000)
    assert commit[0] <= 11 and producer.sent == []
    runner.process(records[12:], T0 + 21_000)
    assert [(h["reason"], v) for _, v, h in producer.sent] == [(b"ts_jump", records[11].value)]
    assert runner.stats.rejected == {"ts_jump": 1} and runner.stats.readings == 21
    assert runner.stats.windows_scored == 9  # every window of steps 0..20


def test_a_reading_held_across_a_restart_is_still_decided_and_dead_lettered(tmp_path: Path) -> None:
    """The process stops while a reading is held (the commit stays at or below it): the new owner replays it, holds
    it again (judged against where the asset's windows stopped), and sends its ts_jump verdict, although its
    offset is below what the previous owner recorded as processed."""
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    steps = [*range(11), 200]
    records = [_record(offset, step, {"x": 0.1, "y": 0.1}) for offset, step in enumerate(steps)]

    def runner() -> Runner:
        return Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                      producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]

    commit = runner().process(records, T0 + 12_000)
    assert commit[0] <= 11
    after = runner()
    more = [_record(12 + i, step, {"x": 0.1, "y": 0.1}) for i, step in enumerate(range(11, 21))]
    after.process([r for r in records if r.offset >= commit[0]] + more, T0 + 21_000)
    assert [(h["reason"], v) for _, v, h in producer.sent] == [(b"ts_jump", records[11].value)]
    assert after.stats.rejected == {"ts_jump": 1}


def test_a_glitch_decided_before_a_restart_or_a_new_group_id_is_not_dead_lettered_again(tmp_path: Path) -> None:
    """A ts_jump the previous owner decided and sent is replayed when a restart re-reads it (the open windows' oldest
    reading came before it) or a new kafka.group_id reads the topic from its start: held again, decided again by a
    replayed reading, it is replay, not a second dead-letter record."""
    from pipeline.config import parse_config

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    steps = [*range(21), 300, *range(21, 26)]  # a glitch at offset 21, decided by the next reading
    records = [_record(offset, step, {"x": 0.1, "y": 0.1}) for offset, step in enumerate(steps)]
    raw = {"database": {"url": url}, "groups": [{
        "name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
        "window": {"length": 10, "stride": 2, "max_gap": 0}}]}

    def runner(group_id: str) -> Runner:
        return Runner(parse_config({**raw, "kafka": {"group_id": group_id}}, env={}),
                      sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                      producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]

    commit = runner("old").process(records, T0 + 26_000)
    assert [h["reason"] for _, _, h in producer.sent] == [b"ts_jump"]
    assert commit[0] <= 21  # open windows need readings from before the glitch: a restart re-reads it
    restarted = runner("old")
    restarted.process(records[commit[0]:], T0 + 30_000)
    new = runner("new")
    new.process(records, T0 + 30_000)  # the whole topic
    assert [h["reason"] for _, _, h in producer.sent] == [b"ts_jump"]
    assert restarted.stats.rejected == {} and new.stats.rejected == {}
    assert new.stats.replayed == len(records) and new.stats.readings == 0


def test_a_held_reading_decided_by_a_late_one_or_placed_as_a_partial_duplicate(tmp_path: Path) -> None:
    """Decided in a later batch than it arrived in: by a late reading (no crash, counted once), or confirmed and
    placed as a partial duplicate (its dead-letter record carries its original bytes)."""
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    runner = Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                    producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    runner.process([_record(i, i, {"x": 0.1, "y": 0.1}) for i in range(11)], T0 + 11_000)
    back = _record(11, 100, {"x": 0.1, "y": 0.1})  # back after an outage: held
    runner.process([back], T0 + 101_000)
    assert runner.stats.readings == 11  # not counted while held
    retry = RawRecord("readings", 0, 12, b"a", orjson.dumps({"asset": "a", "ts": T0 + 99_800, "values": {"x": 0.2}}),
                      T0 + 99_800)  # the same grid step, x only: joins the held instant
    runner.process([retry, _record(13, 101, {"x": 0.1, "y": 0.1})], T0 + 102_000)  # the next instant confirms
    # placed in time order: the retry's x first, so the held reading's x is the duplicate (y is used)
    assert [(h["reason"], h["partial"], v) for _, v, h in producer.sent] == [(b"duplicate", b"true", back.value)]
    assert runner.stats.readings == 14  # the held reading counts once placed (its y was used)

    late = _record(14, 1, {"x": 0.1, "y": 0.1})
    runner.process([_record(15, 400, {"x": 0.1, "y": 0.1})], T0 + 401_000)  # held
    runner.process([late], T0 + 402_000)  # a straggler: decides nothing, dead-lettered as late
    assert [h["reason"] for _, _, h in producer.sent][-1:] == [b"late"] and runner.stats.readings == 14


def test_epoch_seconds_are_said_once_and_the_duplicates_they_cause_name_their_time(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A gateway that sends epoch seconds where ms are documented: its readings crowd into the first grid steps of
    1970 and go as `duplicate`. The log says once what happened and what to change, and each duplicate's detail gives
    its time as a date (it gave the bare number, which hid the 1970)."""
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    producer = _Producer()
    seconds = T0 // 1000
    records = [RawRecord("readings", 0, i, b"a", orjson.dumps({"asset": "a", "ts": seconds + i,
                                                                 "values": {"x": 0.1, "y": 0.1}}), T0 + i * 1000)
               for i in range(5)]
    runner = Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                    producer=producer, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    with caplog.at_level("WARNING", logger="pipeline.decode"):
        runner.process(records, T0 + 5_000)
    said = [r.getMessage() for r in caplog.records if "epoch seconds" in r.getMessage()]
    assert len(said) == 1 and "a sends numeric ts 1772326800" in said[0] and "1970-01-21T" in said[0]
    details = [headers["detail"].decode() for _, _, headers in producer.sent if headers["reason"] == b"duplicate"]
    assert details and all(d.startswith("a at 1970-01-21T") and d.endswith("Z: sensor value already received for "
                                                                           "this grid step") for d in details)
