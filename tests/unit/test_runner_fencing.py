"""A consumer that lost its partition without noticing is fenced off: its results for it are dropped, not written.
SQLite and a stand-in detector: no broker, no model training."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from test_runner_alert_sinks import T0, _MeanDetector

from pipeline.config import parse_config
from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import ConsumerProgress


def _records(partition: int, asset: str, start_s: int, stop_s: int) -> list[RawRecord]:
    return [RawRecord("readings", partition, i, asset.encode(),
                      orjson.dumps({"asset": asset, "ts": T0 + i * 1000, "values": {"x": 0.1, "y": 0.1}}), T0)
            for i in range(start_s, stop_s)]


def test_fenced_partition_results_are_dropped_and_the_rest_is_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    cfg = parse_config({"database": {"url": url}, "groups": [{
        "name": "g", "assets": ["a", "b"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
        "window": {"length": 4, "stride": 2, "max_gap": 0}}]}, env={})
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    runner = Runner(cfg, sessions=sessions, detectors={"g": _MeanDetector()},  # type: ignore[dict-item]
                    producer=None, stop=threading.Event())  # type: ignore[arg-type]
    runner.process(_records(0, "a", 0, 10) + _records(1, "b", 0, 10), now_ms=T0)
    with sessions() as s:
        before_a, before_b = repo.count_scores(session=s, asset="a"), repo.count_scores(session=s, asset="b")
    assert before_a == before_b > 0
    with engine.begin() as conn:  # a rebalance gave partition 0 to another consumer, which claimed it
        conn.execute(text("update consumer_progress set owner = 'someone-else' where partition = 0"))

    offsets = runner.process(_records(0, "a", 10, 20) + _records(1, "b", 10, 20), now_ms=T0)

    with sessions() as s:
        assert repo.count_scores(session=s, asset="a") == before_a  # nothing written for the lost partition
        assert repo.count_scores(session=s, asset="b") > before_b  # the partition still owned goes on
        progress = repo.load_consumer_progress(session=s, consumer_group=cfg.kafka.group_id, topic=cfg.kafka.topic)
    assert set(offsets) == {1}  # no commit for the lost partition
    assert progress[1] == 20 and progress[0] == 10
    engine.dispose()


class _CountingDetector(_MeanDetector):
    def __init__(self) -> None:
        self.calls = 0

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return super().score(windows)


def test_a_retried_transaction_judges_the_same_forward_pass_again(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    cfg = parse_config({"database": {"url": url}, "groups": [{
        "name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
        "window": {"length": 4, "stride": 2, "max_gap": 0}}]}, env={})
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    detector = _CountingDetector()
    runner = Runner(cfg, sessions=sessions, detectors={"g": detector},  # type: ignore[dict-item]
                    producer=None, stop=threading.Event())  # type: ignore[arg-type]
    insert, failures = repo.insert_scores, [OperationalError("insert", {}, Exception("database is locked"))]

    def flaky_insert(**kwargs: object) -> None:
        if failures:
            raise failures.pop()
        insert(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "insert_scores", flaky_insert)
    runner.process(_records(0, "a", 0, 10), now_ms=T0)
    assert not failures  # the first transaction failed and was retried
    assert detector.calls == 1  # one forward pass for the batch, outside the transaction
    with sessions() as s:
        assert repo.count_scores(session=s, asset="a") == 4  # windows ending at 4, 6, 8, 10 s, stored once
    engine.dispose()


def test_a_group_without_a_usable_model_leaves_the_others_monitored_until_one_is_activated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Group h has no model yet (a new group): g is scored, h's windows are counted and dropped; once a model of h
    is active, the next reload picks it up and h is scored too, also when its bundle was missing at first."""
    from pipeline.registry import load_servable, register
    from pipeline.train import train_group
    from pipeline.types import Window

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    group = {"sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
             "window": {"length": 4, "stride": 2, "max_gap": 0}}
    cfg = parse_config({"database": {"url": url}, "model_dir": str(tmp_path / "models"),
                        "groups": [{"name": "g", "assets": ["a"], **group}, {"name": "h", "assets": ["c"], **group}]},
                       env={})
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        served, problems, broken = load_servable(session=s, config=cfg)
    assert served == {} and set(problems) == {"g", "h"} and "no active model" in problems["h"] and broken == set()
    runner = Runner(cfg, sessions=sessions, detectors={"g": _MeanDetector()},  # type: ignore[dict-item]
                    producer=None, stop=threading.Event())  # type: ignore[arg-type]
    runner.process(_records(0, "a", 0, 10) + _records(1, "c", 0, 10), now_ms=T0)
    with sessions() as s:
        assert repo.count_scores(session=s, asset="a") > 0 and repo.count_scores(session=s, asset="c") == 0
    assert runner.metrics.windows_unscored.labels(group="h")._value.get() == 4  # windows [0, 4) ... [6, 10)
    assert "group h has no usable model: 4 window(s) dropped unscored, 4 since the start" in caplog.text

    rng = np.random.default_rng(0)
    h = cfg.group("h")
    trained = train_group([Window("c", "h", i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2))) for i in range(64)],
                          h, progress=False)
    with sessions.begin() as s:
        row = register(session=s, detector=trained.detector, group=h, model_dir=cfg.model_dir, status="active",
                       data_range=None, windows_used=64, metrics={})
    bundle = Path(row.artifact_path)
    bundle.rename(tmp_path / "away")  # the volume is not there yet
    monkeypatch.setattr("pipeline.runner.REFUSED_RETRY_S", 0.0)
    assert runner.reload_models() == {}  # refused, for now
    (tmp_path / "away").rename(bundle)
    assert runner.reload_models() == {"h": trained.detector.version}  # tried again, not refused for good
    runner.process(_records(0, "a", 10, 20) + _records(1, "c", 10, 20), now_ms=T0)
    with sessions() as s:
        assert repo.count_scores(session=s, asset="c") > 0
    engine.dispose()


def test_run_does_not_start_while_an_active_models_bundle_is_missing_or_corrupt(tmp_path: Path) -> None:
    """Group g's model serves; h's active model has lost its bundle (an unmounted volume): run refuses to start, so
    none of h's readings are consumed unscored, and names h. A model trained for other sensors is not 'broken': it
    needs a retrain, and run goes on with the other groups (the degraded start)."""
    from models.bundle import WEIGHTS
    from pipeline.errors import ModelError
    from pipeline.registry import load_servable, register
    from pipeline.runner import run_pipeline
    from pipeline.train import train_group
    from pipeline.types import Window

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    group = {"sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
             "window": {"length": 4, "stride": 2, "max_gap": 0}}
    raw = {"kafka": {"bootstrap_servers": "127.0.0.1:9"}, "database": {"url": url},
           "model_dir": str(tmp_path / "models"), "metrics": {"enabled": False},
           "groups": [{"name": "g", "assets": ["a"], **group}, {"name": "h", "assets": ["c"], **group}]}
    cfg = parse_config(raw, env={})
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    rng = np.random.default_rng(0)
    bundles = {}
    for name, asset in (("g", "a"), ("h", "c")):
        trained = train_group([Window(asset, name, i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2)))
                               for i in range(64)], cfg.group(name), progress=False)
        with sessions.begin() as s:
            bundles[name] = Path(register(session=s, detector=trained.detector, group=cfg.group(name),
                                          model_dir=cfg.model_dir, status="active", data_range=None, windows_used=64,
                                          metrics={}).artifact_path)
    weights = bundles["h"] / WEIGHTS
    intact = weights.read_bytes()
    weights.write_bytes(b"not the weights")
    with pytest.raises(ModelError, match=r"group h: the active model cannot be loaded: .*Not starting"):
        run_pipeline(cfg, stop=threading.Event())
    other_sensors = parse_config({**raw, "groups": [raw["groups"][0], {**raw["groups"][1], "sensors": [
        {"name": "x"}, {"name": "z"}]}]}, env={})
    bundles["h"].rename(tmp_path / "away")
    with sessions() as s:
        served, problems, broken = load_servable(session=s, config=other_sensors)
    assert set(served) == {"g"} and broken == {"h"}  # missing: broken, whatever the configuration
    (tmp_path / "away").rename(bundles["h"])
    weights.write_bytes(intact)
    with sessions() as s:
        served, problems, broken = load_servable(session=s, config=other_sensors)
    assert set(served) == {"g"} and set(problems) == {"h"} and broken == set()  # sound, for other sensors
    engine.dispose()


def test_a_served_models_bundle_gone_or_damaged_on_disk_is_reported_and_its_return_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model keeps serving from memory, but a restart would refuse to start: the operator is told when its bundle
    goes (an unmounted volume), changes and fails verification (also between the load and the first look), or
    cannot be read (an I/O error, which never stops the pipeline), again each hour while it lasts, and when it is
    back; an unchanged bundle is not verified again."""
    from models.bundle import WEIGHTS
    from pipeline.registry import load_servable, register
    from pipeline.train import train_group
    from pipeline.types import Window

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    cfg = parse_config({"database": {"url": url}, "model_dir": str(tmp_path / "models"), "groups": [
        {"name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
         "window": {"length": 4, "stride": 2, "max_gap": 0}}]}, env={})
    sessions = make_sessionmaker(make_engine(url))
    rng = np.random.default_rng(0)
    trained = train_group([Window("a", "g", i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2))) for i in range(64)],
                          cfg.group("g"), progress=False)
    with sessions.begin() as s:
        bundle = Path(register(session=s, detector=trained.detector, group=cfg.group("g"), model_dir=cfg.model_dir,
                               status="active", data_range=None, windows_used=64, metrics={}).artifact_path)
    with sessions() as s:
        served, _, _ = load_servable(session=s, config=cfg)
    runner = Runner(cfg, sessions=sessions, detectors=served, producer=None, stop=threading.Event())  # type: ignore[arg-type]
    version = served["g"].version

    def reload() -> str:
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline.runner"):
            assert runner.reload_models() == {}  # the model in memory keeps serving throughout
        return caplog.text

    weights = bundle / WEIGHTS
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-8] + b"damaged!")  # after the load, before the first look
    assert "changed on disk and refused" in reload()
    weights.write_bytes(intact)
    assert "verifies again" in reload() and reload() == ""
    real_stat = Path.stat

    def failing_stat(self: Path, *args: object, **kwargs: object) -> object:
        if self.parent == bundle:
            raise OSError(5, "Input/output error")
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", failing_stat)
    assert "is unreadable (OSError: Input/output error)" in reload()
    monkeypatch.setattr(Path, "stat", real_stat)
    assert "verifies again" in reload()
    bundle.rename(tmp_path / "away")
    assert f"the bundle of model {version}, served from memory, is gone from" in reload()
    assert reload() == ""  # once an hour, not at every check
    runner._bundles_seen["g"].reported = time.monotonic() - 3601
    assert "is gone from" in reload()
    (tmp_path / "away").rename(bundle)
    assert "verifies again" in reload()
    weights.write_bytes(intact[:-8] + b"damaged!")
    assert "changed on disk and refused" in reload() and runner._detectors["g"].version == version


def test_the_periodic_status_line_says_what_the_loop_did_since_the_last_one() -> None:
    """Every few minutes the loop logs one line: readings, windows, alerts and rejects by reason since the last
    (a soak had 20,000 dead-lettered records and not one log line about them); nothing when nothing arrived."""
    from collections import Counter

    from pipeline.runner import RunStats

    stats = RunStats(readings=100, windows_scored=10, rejected=Counter(late=2))
    before = stats.snapshot()
    assert stats.since(before, 300) is None
    stats.readings += 12_345
    stats.windows_scored += 2_460
    stats.windows_skipped += 3
    stats.alerts_opened += 1
    stats.rejected.update({"malformed_json": 100, "late": 20})
    assert before.rejected == Counter(late=2)  # the snapshot does not move with the stats
    assert stats.since(before, 300.4) == ("last 300 s: 12,345 readings, 2,460 windows scored, 3 skipped, 1 alert(s) "
                                          "opened, 0 resolved, 120 rejected (malformed_json 100, late 20)")


def test_the_periodic_line_shows_a_replay_in_progress() -> None:
    """A new group_id re-reads the topic's history as replay: no reading, window or reject is new, and the 5-minute
    line said nothing for as long as the re-read lasted. It says how far the replay got."""
    from pipeline.runner import RunStats

    stats = RunStats()
    before = stats.snapshot()
    stats.replayed += 48_000
    assert stats.since(before, 300) == ("last 300 s: 0 readings, 0 windows scored, 0 skipped, 0 alert(s) opened, "
                                        "0 resolved, 0 rejected; 48,000 records replayed (processed before)")


def test_a_database_failure_reaches_healthz_with_the_password_scrubbed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    cfg = parse_config({"database": {"url": "postgresql+psycopg://sw:Secret-4711@db.plant:5432/sw"}, "groups": [{
        "name": "g", "assets": ["a"], "sensors": [{"name": "x"}]}]}, env={})
    stop = threading.Event()
    runner = Runner(cfg, sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},  # type: ignore[dict-item]
                    producer=None, stop=stop)  # type: ignore[arg-type]
    calls: list[int] = []

    def step() -> str:  # a driver that echoes the password, as some do
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("connect", {}, Exception('could not connect with password "Secret-4711"'))
        assert not runner.metrics.healthy()[0]
        reason = runner.metrics.healthy()[1]
        assert "Secret-4711" not in reason and "sw:***@db.plant:5432/sw" in reason and "password" in reason
        return "done"

    assert runner._retry(step) == "done" and len(calls) == 2
    assert runner.metrics.healthy() == (True, "ok")


def test_alerts_opened_escalated_and_resolved_are_logged_as_they_happen(caplog: pytest.LogCaptureFixture) -> None:
    """An operator watching `run` sees each alert when it opens, escalates or resolves (it used to wait for the
    5-minute summary); plain updates are not logged."""
    from dataclasses import replace

    from pipeline.runner import _log_alerts
    from pipeline.types import AlertEvent, AlertRecord

    opened = AlertRecord("pump-7", "pumps", 1767225600000, 1767225660000, None, 3.0, 1.0, "warning", "open", 2,
                         [{"sensor": "flow", "share": 0.7, "error": 2.1}, {"sensor": "temp", "share": 0.3,
                                                                          "error": 0.9}], "m1",
                         off_training={"vibration": 39.5})
    critical = replace(opened, severity="critical", peak_score=6.0, window_count=3)
    resolved = replace(critical, status="resolved", closed_ms=1767226500000, window_count=9)
    with caplog.at_level("INFO", logger="pipeline.runner"):
        _log_alerts([AlertEvent("opened", opened), AlertEvent("updated", replace(opened, window_count=3), "warning"),
                     AlertEvent("updated", critical, "warning"), AlertEvent("resolved", resolved)])
    assert caplog.messages == [
        "alert opened: pump-7 (group pumps) warning since 2026-01-01T00:00:00.000Z, peak 3 x threshold; top sensors "
        "flow 70%, temp 30%; far outside training: vibration +39.5 std",
        "alert escalated from warning: pump-7 (group pumps) critical since 2026-01-01T00:00:00.000Z, peak 6 x "
        "threshold; top sensors flow 70%, temp 30%; far outside training: vibration +39.5 std",
        "alert resolved: pump-7 (group pumps) after 15m00s, 9 windows"]


def _one_asset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[dict[str, Any], Engine, sessionmaker[Session], list[tuple[str, int]]]:
    """A configuration of one asset on a migrated SQLite database, its engine and sessions, and the (reason, offset)
    of every record sent to the dead-letter topic."""
    from pipeline import kafka_io

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    raw = {"database": {"url": url}, "groups": [{
        "name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
        "window": {"length": 4, "stride": 2, "max_gap": 0}}]}
    sent: list[tuple[str, int]] = []
    monkeypatch.setattr(kafka_io, "send_dead_letters",
                        lambda producer, topic, rejects: sent.extend((r.reason, r.offset) for r in rejects))
    engine = make_engine(url)
    return raw, engine, make_sessionmaker(engine), sent


def test_a_new_group_id_takes_up_where_the_old_group_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new group_id reads the topic from its start. What the old group processed against this database is replay:
    its readings for stored windows are not dead-lettered as late, its bad records not dead-lettered again, and no
    window is stored twice; the records after it are processed as usual."""
    raw, engine, sessions, sent = _one_asset(tmp_path, monkeypatch)
    history = [*_records(0, "a", 0, 20), RawRecord("readings", 0, 20, b"a", b"{not json", T0)]
    old = Runner(parse_config({**raw, "kafka": {"group_id": "old"}}, env={}), sessions=sessions,
                 detectors={"g": _MeanDetector()}, producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    old.process(history, now_ms=T0)
    assert sent == [("malformed_json", 20)]
    with sessions() as s:
        stored = repo.count_scores(session=s, asset="a")
    assert stored > 0

    new = Runner(parse_config({**raw, "kafka": {"group_id": "new"}}, env={}), sessions=sessions,
                 detectors={"g": _MeanDetector()}, producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    sent.clear()
    new.process(history, now_ms=T0)  # the whole topic again
    assert sent == [] and new.stats.rejected == {}
    assert new.stats.replayed > 0 and new.stats.readings == 0
    with sessions() as s:
        assert repo.count_scores(session=s, asset="a") == stored  # nothing twice
    new.process(_records(0, "a", 21, 30), now_ms=T0)
    with sessions() as s:
        assert repo.count_scores(session=s, asset="a") > stored  # and on it goes
        assert repo.load_consumer_progress(session=s, consumer_group="new", topic=new.config.kafka.topic)[0] == 30
    assert new.stats.readings == 9 and sent == []
    engine.dispose()


class _LogEnds:
    """A consumer's last fetched high watermarks (``KafkaConsumer.highwater``), per partition."""

    def __init__(self, ends: dict[int, int]) -> None:
        self.ends = ends

    def highwater(self, tp: object) -> int | None:
        return self.ends.get(tp.partition)  # type: ignore[attr-defined]


def test_progress_recorded_for_an_earlier_topic_of_the_same_name_is_forgotten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The topic deleted and re-created (its offsets start again at 0) under a new group_id: the progress the old
    group recorded lies past the new log's end, so it is not taken for this topic's (its bad records would not be
    dead-lettered, its readings not counted); it is forgotten in the database. A partition whose log reaches past
    the old progress is still taken up where the old group stopped."""
    from pipeline import kafka_io

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    raw = {"database": {"url": url}, "groups": [{
        "name": "g", "assets": ["a", "b"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
        "window": {"length": 4, "stride": 2, "max_gap": 0}}]}
    sent: list[tuple[str, int, int]] = []
    monkeypatch.setattr(kafka_io, "send_dead_letters", lambda producer, topic, rejects: sent.extend(
        (r.reason, r.partition, r.offset) for r in rejects))
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    old = Runner(parse_config({**raw, "kafka": {"group_id": "old"}}, env={}), sessions=sessions,
                 detectors={"g": _MeanDetector()}, producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    old.process([*_records(0, "a", 0, 60), *_records(1, "b", 0, 20)], now_ms=T0)
    assert sent == []

    new = Runner(parse_config({**raw, "kafka": {"group_id": "new"}}, env={}), sessions=sessions,
                 detectors={"g": _MeanDetector()}, producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    new._consumer = _LogEnds({0: 11, 1: 25})  # type: ignore[assignment]
    recreated = [RawRecord("readings", 0, i, b"a", orjson.dumps(
        {"asset": "a", "ts": T0 + (100 + i) * 1000, "values": {"x": 0.1, "y": 0.1}}), T0) for i in range(10)]
    new.process([*recreated, RawRecord("readings", 0, 10, b"a", b"{not json", T0), *_records(1, "b", 0, 25)],
                now_ms=T0)
    assert sent == [("malformed_json", 0, 10)]  # the new topic's bad record is dead-lettered
    assert new.stats.readings == 10 + 5  # the new topic's readings, and partition 1's after the old progress
    with sessions() as s:
        topic = new.config.kafka.topic
        assert repo.load_consumer_progress(session=s, consumer_group="old", topic=topic) == {0: -1, 1: 20}
        assert repo.load_consumer_progress(session=s, consumer_group="new", topic=topic) == {0: 11, 1: 25}
    engine.dispose()


def _consuming(raw: dict[str, Any], sessions: sessionmaker[Session], group: str, consumer: object) -> Runner:
    """A runner of consumer group ``group`` whose Kafka consumer is ``consumer`` (a stand-in)."""
    process = Runner(parse_config({**raw, "kafka": {"group_id": group}}, env={}), sessions=sessions,
                     detectors={"g": _MeanDetector()}, producer=None, stop=threading.Event())  # type: ignore[dict-item,arg-type]
    process._consumer = consumer  # type: ignore[assignment]
    return process


class _Topic(_LogEnds):
    """Fetched high watermarks and the brokers' id of the topic (kafka-python keeps it in its client's cluster
    metadata)."""

    def __init__(self, ends: dict[int, int], topic_id: str) -> None:
        super().__init__(ends)
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda topic: topic_id))


def test_recorded_progress_is_tied_to_the_topics_id_not_its_log_end(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the brokers' topic ids, progress belongs to the topic it was recorded for. A new group reading while a
    new partition leader's high watermark is still behind the recorded progress takes it up (by the log end alone it
    looked like an earlier topic's: its bad record was dead-lettered again and its readings counted as new). A topic
    re-created under the name whose log already reaches past the old progress is told apart by its new id (the log
    end could not tell: its first records were taken for replay)."""
    raw, engine, sessions, sent = _one_asset(tmp_path, monkeypatch)

    def runner(group: str, consumer: object) -> Runner:
        return _consuming(raw, sessions, group, consumer)

    bad = RawRecord("readings", 0, 20, b"a", b"{not json", T0)
    history = [*_records(0, "a", 0, 20), bad, *_records(0, "a", 21, 60)]
    runner("old", _Topic({0: 60}, "id-1")).process(history, now_ms=T0)
    assert sent == [("malformed_json", 20)]
    lagging = runner("new", _Topic({0: 30}, "id-1"))  # a new leader's high watermark, not caught up yet
    sent.clear()
    lagging.process(history[:30], now_ms=T0)
    assert sent == [] and lagging.stats.readings == 0 and lagging.stats.replayed == 30
    with sessions() as s:
        assert repo.load_consumer_progress(session=s, consumer_group="old", topic="sensor-readings") == {0: 60}

    recreated = runner("third", _Topic({0: 100}, "id-2"))  # deleted and re-created; 100 records in already
    fresh = [RawRecord("readings", 0, i, b"a", orjson.dumps(
        {"asset": "a", "ts": T0 + (1000 + i) * 1000, "values": {"x": 0.2, "y": 0.2}}), T0) for i in range(100)]
    fresh[20] = bad
    recreated.process(fresh, now_ms=T0 + 1_200_000)
    assert sent == [("malformed_json", 20)] and recreated.stats.readings == 99 and recreated.stats.replayed == 0
    with sessions() as s:
        assert repo.load_consumer_progress(session=s, consumer_group="old", topic="sensor-readings") == {0: -1}
        assert repo.load_consumer_progress(session=s, consumer_group="third", topic="sensor-readings") == {0: 100}
    engine.dispose()


def test_progress_recorded_before_topic_ids_is_judged_by_the_log_end_then_stamped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress written before migration 0013 (no topic id) is taken up when the log reaches past it, as before, and
    stamped with the topic's id; a later topic of the name is then told apart by its id."""
    raw, engine, sessions, sent = _one_asset(tmp_path, monkeypatch)

    def runner(group: str, consumer: object) -> Runner:
        return _consuming(raw, sessions, group, consumer)

    history = [*_records(0, "a", 0, 20), RawRecord("readings", 0, 20, b"a", b"{not json", T0)]
    runner("old", None).process(history, now_ms=T0)  # no consumer: no id, as before the migration
    with sessions() as s:
        assert {r.topic_id for r in s.scalars(select(ConsumerProgress))} == {None}
    sent.clear()
    upgraded = runner("new", _Topic({0: 21}, "id-1"))
    upgraded.process(history, now_ms=T0)
    assert sent == [] and upgraded.stats.replayed == 21  # the log reaches past it: this topic's progress
    with sessions() as s:
        assert {(r.consumer_group, r.topic_id) for r in s.scalars(select(ConsumerProgress))} == {
            ("old", "id-1"), ("new", "id-1")}
    engine.dispose()
