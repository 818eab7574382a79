"""The runner queues alert events for the sinks in the transaction that stores their alerts (the outbox), wakes the
deliverers only after it has committed, and queues nothing when it did not commit. SQLite and a stand-in detector:
no broker, no model training."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pytest
from sqlalchemy import func, select, text

from models.scaler import StandardScaler
from pipeline.config import Config, parse_config
from pipeline.errors import TransientError
from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.sinks import AlertSinks, Item, OutboxDeliverer, Outcome, RoundControl, Sink
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert, AlertOutbox

T0 = 1772326800000  # 2026-03-01T01:00:00Z


class _MeanDetector:
    """Scores a window by the mean of each sensor (a stand-in for a trained autoencoder)."""

    version, group, sensors, threshold, window, ewma_alpha, score_steps = "fake-1", "g", ["x", "y"], 1.0, 4, None, None
    scaler = StandardScaler(mean=np.zeros(2), std=np.full(2, 1e12))  # its training data: no window far outside it

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_sensor = np.abs(windows).mean(axis=1)
        return per_sensor.sum(axis=1), per_sensor


class _RecordingSink(Sink):
    """A sink that keeps what it is sent."""

    name, label, kinds = "webhook", "webhook:test", ("opened", "updated", "resolved")
    max_age_s, worst_item_s = 3600.0, 1.0

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, items: Sequence[Item], control: RoundControl) -> list[Outcome]:
        self.sent += [doc for _, doc in items]
        return [("delivered", None)] * len(items)


class _CheckingSinks(AlertSinks):
    """Counts wake-ups, and checks through a separate connection that the alerts and their outbox rows are already
    stored when it is woken."""

    def __init__(self, url: str) -> None:
        self.sink = _RecordingSink()
        self.engine = make_engine(url)
        super().__init__([OutboxDeliverer(self.sink, make_sessionmaker(self.engine), start=False)])
        self.woken = 0

    def notify(self) -> None:
        with self.engine.connect() as conn:
            alerts = conn.execute(select(func.count()).select_from(Alert)).scalar_one()
            queued = conn.execute(select(func.count()).select_from(AlertOutbox)).scalar_one()
        assert alerts > 0 and queued > 0  # committed before the deliverers are woken
        self.woken += 1

    def queued(self) -> list[str]:
        with self.engine.connect() as conn:
            return [row.document["event"] for row in conn.execute(select(AlertOutbox).order_by(AlertOutbox.id))]


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


def test_events_are_queued_with_their_alerts_and_the_sinks_woken_after_the_commit(tmp_path: Path) -> None:
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
        assert sinks.queued()[:1] == ["opened"] and sinks.woken == 1
        runner.process(_records(30, 60, hot), T0 + 60_000)
    finally:
        guard.cancel()
    kinds = sinks.queued()
    assert kinds[0] == "opened" and kinds[-1] == "resolved" and set(kinds[1:-1]) <= {"updated"}
    assert runner.stats.alerts_opened == 1 and runner.stats.alerts_resolved == 1
    sinks.deliverers[0].deliver_once()
    assert [doc["event"] for doc in sinks.sink.sent] == kinds  # delivered from the outbox, in order
    _runner(url, sinks, stop).process(_records(0, 60, hot), T0 + 61_000)  # a restart's replay queues nothing again
    assert sinks.queued() == kinds
    sinks.engine.dispose()


def test_nothing_is_queued_when_the_transaction_fails(tmp_path: Path) -> None:
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
    assert sinks.queued() == [] and sinks.woken == 0
    sinks.engine.dispose()


def test_an_alert_resolved_by_hand_is_not_reopened_or_sent_again_and_a_new_incident_opens(tmp_path: Path) -> None:
    """A pipeline still on a configuration that keeps asset a while the operator resolved its open alert by hand
    (`alerts resolve`): the upsert leaves the row resolved, the runner queues no event for it, and the asset's
    alert state is read again, so the fault that is still there opens a new incident."""
    from pipeline.store import repo

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    sinks = _CheckingSinks(url)
    runner = _runner(url, sinks, threading.Event())
    hot = range(20, 80)
    runner.process(_records(0, 30, hot), T0 + 30_000)
    before = sinks.queued()
    assert before[0] == "opened" and set(before[1:]) <= {"updated"}
    sessions = make_sessionmaker(sinks.engine)
    with sessions.begin() as s:
        [alert] = s.scalars(select(Alert)).all()
        repo.resolve_alert_by_hand(session=s, alert_id=alert.id, by="op", comment="asset replaced")
    runner.process(_records(30, 50, hot), T0 + 50_000)  # judged as the open incident: refused, state dropped
    runner.process(_records(50, 60, hot), T0 + 60_000)  # judged from the database's state
    with sessions() as s:
        rows = [(a.status, a.acknowledged_by) for a in s.scalars(select(Alert).order_by(Alert.opened_at))]
    assert rows[0] == ("resolved", "op")  # not reopened
    assert len(rows) == 2 and rows[1] == ("open", None)  # the fault goes on: a new incident, after the cooldown
    after = sinks.queued()[len(before):]
    assert after[0] == "opened" and set(after[1:]) <= {"updated"}  # nothing about the resolved one
    sinks.engine.dispose()
