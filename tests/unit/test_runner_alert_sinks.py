"""The runner hands alert events to the sinks only after the transaction holding them has committed, and never
when it did not commit. SQLite and a stand-in detector: no broker, no model training."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest
from sqlalchemy import select, text

from pipeline.config import Config, parse_config
from pipeline.errors import TransientError
from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.sinks import AlertSinks
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert
from pipeline.types import AlertEvent, datetime_to_ms, ms_to_datetime

T0 = 1772326800000  # 2026-03-01T01:00:00Z


class _MeanDetector:
    """Scores a window by the mean of each sensor (a stand-in for a trained autoencoder)."""

    version, group, sensors, threshold, window, ewma_alpha = "fake-1", "g", ["x", "y"], 1.0, 4, None

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_sensor = np.abs(windows).mean(axis=1)
        return per_sensor.sum(axis=1), per_sensor


class _CheckingSinks(AlertSinks):
    """Records what it is given, and checks through a separate connection that the alerts are already stored."""

    def __init__(self, url: str) -> None:
        super().__init__([])
        self.engine = make_engine(url)
        self.published: list[AlertEvent] = []

    def publish(self, events: Sequence[AlertEvent]) -> None:
        with self.engine.connect() as conn:
            stored = {(r.asset, r.opened_at): r for r in conn.execute(select(Alert))}
        for event in events:
            row = stored[(event.alert.asset, ms_to_datetime(event.alert.opened_ms))]
            assert datetime_to_ms(row.last_seen_at) >= event.alert.last_seen_ms  # committed before publish
        self.published += events


def _config(url: str) -> Config:
    return parse_config({
        "database": {"url": url},
        "groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
                    "window": {"length": 4, "stride": 2, "max_gap": 0},
                    "alert": {"k": 2, "n": 3, "clear_after": 2}}],
    }, env={})


def _records(start_s: int, stop_s: int, hot: range) -> list[RawRecord]:
    out = []
    for i in range(start_s, stop_s):
        value = 10.0 if i in hot else 0.1
        payload = {"asset": "a", "ts": T0 + i * 1000, "values": {"x": value, "y": 0.1}}
        out.append(RawRecord("readings", 0, i, b"a", orjson.dumps(payload), T0 + i * 1000))
    return out


def _runner(url: str, sinks: AlertSinks, stop: threading.Event) -> Runner:
    return Runner(_config(url), sessions=make_sessionmaker(make_engine(url)), detectors={"g": _MeanDetector()},
                  producer=None, stop=stop, sinks=sinks)  # type: ignore[dict-item,arg-type]


def test_events_reach_the_sinks_after_their_transaction_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    sinks = _CheckingSinks(url)
    stop = threading.Event()
    guard = threading.Timer(60, stop.set)  # a database error makes the runner retry until stopped: fail, not hang
    guard.start()
    try:
        runner = _runner(url, sinks, stop)
        hot = range(20, 34)
        runner.process(_records(0, 30, hot), T0 + 30_000)
        assert [e.kind for e in sinks.published][:1] == ["opened"]
        runner.process(_records(30, 60, hot), T0 + 60_000)
    finally:
        guard.cancel()
    kinds = [e.kind for e in sinks.published]
    assert kinds[0] == "opened" and kinds[-1] == "resolved" and set(kinds[1:-1]) <= {"updated"}
    assert runner.stats.alerts_opened == 1 and runner.stats.alerts_resolved == 1
    sinks.engine.dispose()


def test_nothing_reaches_the_sinks_when_the_transaction_fails(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    sinks = _CheckingSinks(url)
    stop = threading.Event()
    runner = _runner(url, sinks, stop)
    runner.process(_records(0, 22, range(20, 40)), T0 + 22_000)  # resume state stored; no alert yet
    with sinks.engine.begin() as conn:
        conn.execute(text("ALTER TABLE alerts RENAME TO alerts_away"))  # the next write fails
    stop.set()  # so the runner gives up instead of retrying
    with pytest.raises(TransientError):
        runner.process(_records(22, 40, range(20, 40)), T0 + 40_000)
    assert sinks.published == []
    sinks.engine.dispose()
