"""Retraining on a real Kafka broker and real PostgreSQL.

- drifted normal data: the candidate is promoted, a running pipeline switches to it mid-stream and back after
  ``models activate`` (the rollback), and every window is scored exactly once, by one version at a time;
- mostly anomalous data: the candidate is rejected with the reason and the active model keeps serving;
- two retrains at once: one runs, the other is refused; a failing training run is recorded and changes nothing;
- the scheduler fires the job on its trigger, keeps the job in the SQL job store across a restart, stops on SIGTERM.

Run with ``pytest -s`` to see the figures (windows used, thresholds, false-alarm rates of candidate and active).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
import yaml
from apscheduler.triggers.cron import CronTrigger
from apscheduler.util import utc_timestamp_to_datetime
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from models.detector import Detector
from pipeline import kafka_io
from pipeline.cli import app
from pipeline.config import Config, load_config, parse_config
from pipeline.decode import Decoder
from pipeline.errors import ModelError
from pipeline.history import windows_from_frame
from pipeline.registry import load_version, register
from pipeline.retrain import RetrainResult, Span, near_alerts, read_recent_windows, retrain_group
from pipeline.runner import run_pipeline
from pipeline.scheduler import JOB_FUNC, JOB_ID, JOBS_TABLE, build_scheduler, stop_when_running
from pipeline.simulate import DEFAULT_SENSORS, inject, simulate_normal, to_messages
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert, ModelVersion, RetrainLock, RetrainRun, WindowScore, scheduler_jobs
from pipeline.train import train_group
from pipeline.types import datetime_to_ms
from pipeline.windowing import Windower

pytestmark = pytest.mark.integration

ASSETS = ["pump-a", "pump-b", "pump-c"]
PERIOD = 60.0  # one reading a minute: two days of three assets is 8640 messages, about 1400 windows
DAY = int(86400 / PERIOD)
TRAIN_START = pd.Timestamp("2026-06-01T00:00:00Z")
LIVE_START = TRAIN_START + pd.Timedelta(days=10)
SENSORWATCH = Path(sys.executable).with_name("sensorwatch")


def _raw_config(bootstrap: str, topic: str, db_url: str, model_dir: Path) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dead_letter_topic": f"{topic}-dlq",
                  "group_id": f"g-{topic}", "max_poll_records": 2000, "poll_timeout_ms": 300},
        "database": {"url": db_url},
        "metrics": {"enabled": False},
        "model_dir": str(model_dir),
        "groups": [{
            "name": "fleet", "assets": ASSETS, "sampling_period_s": PERIOD,
            "sensors": [{"name": s.name, "unit": s.unit, "valid_range": [s.low, s.high]} for s in DEFAULT_SENSORS],
            "window": {"length": 12, "stride": 6, "max_gap": 2, "idle_close_s": 3600},
            "model": {"type": "dense", "hidden": [16, 4], "epochs": 10, "batch_size": 128, "seed": 0},
            "threshold": {"method": "percentile", "percentile": 99.5, "multiplier": 1.5},
            "alert": {"k": 2, "n": 3, "clear_after": 3},
        }],
        "retrain": {"lookback_days": 1, "min_windows": 200, "alert_margin_s": 600, "holdout_fraction": 0.25,
                    "tolerance": 0.02, "max_anomalous_fraction": 0.5, "warm_start": True, "epochs": 10,
                    "reload_interval_s": 0.5, "read_timeout_s": 60, "lock_ttl_s": 600},
    }


def _frames(start: pd.Timestamp, rows: int, seed: int) -> dict[str, pd.DataFrame]:
    return {a: simulate_normal(a, start, rows, PERIOD, seed=seed) for a in ASSETS}


@pytest.fixture(scope="module")
def first_model() -> Detector:
    """The model that serves first: trained once on two days of normal data of every asset."""
    group = parse_config(_raw_config("localhost:9092", "t", "sqlite://", Path("m")), env={}).groups[0]
    table = pd.concat([f.assign(asset=a) for a, f in _frames(TRAIN_START, 2 * DAY, seed=1).items()]).reset_index()
    return train_group(windows_from_frame(table, group), group, progress=False).detector


@dataclass
class Deployment:
    """A config file, a migrated database whose active model is ``first_model``, and the readings topic."""

    config: Config
    path: Path
    engine: Engine
    sessions: sessionmaker[Session]
    first: str

    def scores(self) -> list[tuple[str, int, str]]:
        """``(asset, window end ms, model version)`` of every stored score, by asset and window end."""
        with self.sessions() as s:
            rows = s.execute(select(WindowScore.asset, WindowScore.window_end, WindowScore.model_version)
                             .order_by(WindowScore.asset, WindowScore.window_end, WindowScore.id))
            return [(a, datetime_to_ms(end), v) for a, end, v in rows]

    def count(self, model: type[Any]) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(model)) or 0)

    def versions(self) -> dict[str, str]:
        """``version -> status`` of every registered model."""
        with self.sessions() as s:
            return {r.version: r.status for r in repo.list_model_versions(session=s)}

    def runs(self) -> list[RetrainRun]:
        with self.sessions() as s:
            return repo.list_retrain_runs(session=s, limit=None)


@pytest.fixture
def deployment(kafka_bootstrap_servers: str, topic_name: str, pg_database_url: str, tmp_path: Path,
               first_model: Detector, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The deployment; an indirect parameter (a dict) is merged into the group's configuration."""
    raw = _raw_config(kafka_bootstrap_servers, topic_name, pg_database_url, tmp_path / "models")
    raw["groups"][0].update(getattr(request, "param", {}))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, env={})
    upgrade(pg_database_url)
    engine = make_engine(pg_database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        register(session=s, detector=first_model, group=config.groups[0], model_dir=config.model_dir,
                 status="candidate", data_range=None, windows_used=0, metrics={})
        repo.activate_model_version(session=s, version=first_model.version)
    kafka_io.ensure_topics(config.kafka, [config.kafka.topic, config.kafka.dead_letter_topic], partitions=3)
    yield Deployment(config, path, engine, sessions, first_model.version)
    engine.dispose()


class Stream:
    """Readings of every asset in time order, sent to the topic in steps; knows which windows they close."""

    def __init__(self, config: Config, frames: dict[str, pd.DataFrame]) -> None:
        self.config = config
        self.messages = [(asset, orjson.dumps(payload)) for asset, payload in to_messages(frames)]
        self.sent = 0
        self._producer = kafka_io.make_producer(config.kafka, linger_ms=5)

    def send(self, count: int | None = None) -> None:
        """Send the next ``count`` messages (all that are left by default) and wait until the broker has them."""
        stop = len(self.messages) if count is None else min(self.sent + count, len(self.messages))
        for asset, value in self.messages[self.sent:stop]:
            self._producer.send(self.config.kafka.topic, key=asset.encode(), value=value)
        self._producer.flush()
        self.sent = stop

    def paced(self, per_s: int, stop: threading.Event) -> threading.Thread:
        """Keep sending about ``per_s`` messages a second from a thread until ``stop`` is set."""

        def run() -> None:
            while not stop.is_set() and self.sent < len(self.messages):
                self.send(max(per_s // 10, 1))
                time.sleep(0.1)

        thread = threading.Thread(target=run, name="paced-stream", daemon=True)
        thread.start()
        return thread

    def expected(self) -> set[tuple[str, int]]:
        """``(asset, window end ms)`` of every window the messages sent so far close."""
        decoder = Decoder(self.config.groups, self.config.kafka.max_message_bytes)
        readings = [decoder.decode(value) for _, value in self.messages[: self.sent]]
        return {(w.asset, w.end_ms) for w in Windower(self.config.groups).add(readings).windows}

    def close(self) -> None:
        self._producer.close(timeout=10)


class Pipeline:
    """``run_pipeline`` in a thread, as ``sensorwatch run`` runs it."""

    def __init__(self, config: Config) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                run_pipeline(config, stop=self.stop)
            except BaseException as exc:  # reported by close()
                self.error = exc

        self.thread = threading.Thread(target=run, name="pipeline", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "pipeline did not stop"
        if self.error is not None:
            raise self.error


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, pipeline: Pipeline | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if pipeline is not None and pipeline.error is not None:
            raise AssertionError(f"pipeline failed while waiting for {what}") from pipeline.error
        if time.monotonic() > deadline:
            alive = pipeline.thread.is_alive() if pipeline is not None else None
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (pipeline alive: {alive})")
        time.sleep(0.2)


def _send_and_score(d: Deployment, stream: Stream, pipeline: Pipeline, timeout_s: float, what: str,
                    count: int | None = None) -> set:
    """Send ``count`` more records of ``stream`` (default: the rest) and wait until every window sent so far is
    scored; returns the expected ``(asset, window end)`` pairs."""
    stream.send(count)
    expected = stream.expected()
    _wait(lambda: d.count(WindowScore) >= len(expected), timeout_s, what, pipeline)
    return expected


def _figures(label: str, result: RetrainResult) -> None:
    m = result.metrics
    print(f"\n[{label}] {result.summary()}")
    print(f"[{label}] windows read {m.get('windows_total')}, used for training {m.get('windows_train')}, held out "
          f"{m.get('windows_holdout')}, alert windows {m.get('windows_alert')}, flagged {m.get('windows_flagged')}, "
          f"near alerts {m.get('windows_near_alert')}, anomalous fraction {m.get('anomalous_fraction')}")
    print(f"[{label}] threshold candidate {m.get('threshold_candidate')} vs active {m.get('threshold_active')}; "
          f"FAR candidate {m.get('far_candidate')} vs active {m.get('far_active')}; alert-window recall candidate "
          f"{m.get('recall_candidate')} vs active {m.get('recall_active')}; held-out p99 score/threshold candidate "
          f"{m.get('p99_ratio_candidate')} vs active {m.get('p99_ratio_active')}; train {m.get('train_seconds')} s, "
          f"{m.get('epochs_run')} epochs, warm start from {m.get('warm_start_from')}")


def _drifted(rows: int, seed: int = 6, per_day: float = 1.6) -> dict[str, pd.DataFrame]:
    """Normal operation whose thermal sensors drift up by ``per_day`` degrees a day (a season, a fouling cooler)."""
    frames = _frames(LIVE_START, rows, seed)
    ramp = np.arange(rows) * per_day / DAY
    for frame in frames.values():
        frame["motor_temp"] += ramp
        frame["bearing_temp"] += ramp
    return frames


def _mostly_anomalous(rows: int, seed: int = 6) -> dict[str, pd.DataFrame]:
    """Two days in which every asset spends about 60% of the time in noise bursts (3.3 h in every 5.2 h)."""
    frames = _frames(LIVE_START, rows, seed)
    for i, asset in enumerate(ASSETS):
        frame = frames[asset]
        for k in range(9):
            frame, _ = inject(frame, asset, "noise_burst", LIVE_START + pd.Timedelta(hours=1 + k * 5.2),
                              pd.Timedelta(hours=3.3), seed=seed * 10 + i * 7 + k)
        frames[asset] = frame
    return frames


def test_retrain_promotes_on_drift_and_the_pipeline_switches_mid_stream_then_follows_a_rollback(
        deployment: Deployment) -> None:
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _drifted(3 * DAY))
    pipeline = Pipeline(cfg)
    paced_stop = threading.Event()
    try:
        # two days of drifting readings: what the nightly run looks back on
        _send_and_score(d, stream, pipeline, 120, "the first two days to be scored", 2 * DAY * len(ASSETS))

        paced = stream.paced(300, paced_stop)  # readings keep arriving while the candidate trains
        result = retrain_group(cfg, "fleet", sessions=d.sessions)
        _figures("drift", result)
        assert result.outcome == "promoted", result.reason
        second = result.candidate_version
        assert second is not None and second != d.first
        _wait(lambda: {a for a, _, v in d.scores() if v == second} == set(ASSETS), 30,
              "every asset to be scored by the promoted model", pipeline)
        paced_stop.set()
        paced.join(timeout=10)

        rollback = CliRunner().invoke(app, ["models", "activate", "--config", str(d.path), d.first])
        assert rollback.exit_code == 0, rollback.output
        time.sleep(3 * cfg.retrain.reload_interval_s + 0.5)  # the pipeline checks every reload interval
        expected = _send_and_score(d, stream, pipeline, 60, "every window to be scored", 360 * len(ASSETS))
        time.sleep(1.0)  # anything extra would land now
    finally:
        paced_stop.set()
        pipeline.close()
        stream.close()

    scores = d.scores()
    keys = [(a, end) for a, end, _ in scores]
    assert len(keys) == len(set(keys)), "a window was scored twice"
    assert set(keys) == expected, "windows lost or invented"
    for asset, rows in itertools.groupby(scores, key=lambda r: r[0]):
        runs = [version for version, _ in itertools.groupby(v for _, _, v in rows)]
        assert runs == [d.first, second, d.first], f"{asset}: scored by {runs}"
    per_version = {v: sum(1 for *_, x in scores if x == v) for v in (d.first, second)}
    print(f"[drift] {len(scores)} windows scored exactly once: {per_version} (first model, promoted model; "
          f"the first again after the rollback); {d.count(Alert)} alerts")
    assert d.versions() == {d.first: "active", second: "retired"}
    run = d.runs()[0]
    assert (run.outcome, run.candidate_version, run.active_version) == ("promoted", second, d.first)
    assert run.metrics["far_candidate"] <= run.metrics["far_active"] + cfg.retrain.tolerance
    assert run.windows_used == result.metrics["windows_train"] >= cfg.retrain.min_windows
    shown = CliRunner().invoke(app, ["models", "show", "--config", str(d.path), second, "--format", "json"])
    assert shown.exit_code == 0, shown.output
    doc = orjson.loads(shown.stdout)
    assert doc["status"] == "retired" and doc["retrain_run"]["outcome"] == "promoted"
    assert doc["metrics"]["far_candidate"] == run.metrics["far_candidate"] and doc["checksum"]


@pytest.mark.parametrize("deployment", [{"drift": {"span_s": 3600}}], indirect=True)
def test_a_drift_following_group_retrains_on_the_drift_it_followed(deployment: Deployment) -> None:
    """With drift following, the pipeline does not flag the drift; the retrain counts windows as the pipeline judged
    them, not by the active model's bare levels (which would flag the drift and leave it out of training), and its
    gate measures both models as they would run, following drift."""
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _drifted(2 * DAY, per_day=10.0))
    pipeline = Pipeline(cfg)
    try:
        _send_and_score(d, stream, pipeline, 120, "the two days to be scored")
    finally:
        pipeline.close()
        stream.close()
    with d.sessions() as s:
        stored_flags = len(repo.flagged_windows(session=s, group="fleet", assets=cfg.group("fleet").assets,
                                                start=datetime(2000, 1, 1, tzinfo=UTC),
                                                end=datetime(2100, 1, 1, tzinfo=UTC)))
        offsets = list(s.scalars(select(WindowScore.drift_offset).order_by(WindowScore.window_end.desc()).limit(1)))
    result = retrain_group(cfg, "fleet", sessions=d.sessions)
    _figures("drift-following", result)
    far_active, far_bare = result.metrics["far_active"], result.metrics["far_active_bare"]
    print(f"[drift-following] stored flags {stored_flags}, windows flagged for the split "
          f"{result.metrics['windows_flagged']}, far_active {far_active} (bare levels {far_bare}), last offsets "
          f"{offsets[0]}")
    assert offsets[0] and max(offsets[0]["motor_temp"], offsets[0]["bearing_temp"]) > 0.5  # the drift was followed
    assert far_bare > 0.2  # the active model's bare levels flag much of the drifted holdout...
    assert far_active < 0.05  # ...following the drift, as the pipeline does, it flags almost none
    assert f"the active model without its offsets {far_bare:.2%}" in result.summary()
    assert result.metrics["windows_flagged"] <= stored_flags  # ...but the split counts the pipeline's verdicts
    assert result.outcome == "promoted", result.reason
    assert result.metrics["windows_train"] >= cfg.retrain.min_windows
    assert result.metrics["far_candidate"] < 0.05  # trained on the drifted level (27.8% when it was left out)


def test_retrain_on_mostly_anomalous_data_is_rejected_and_the_active_model_keeps_serving(
        deployment: Deployment) -> None:
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _mostly_anomalous(2 * DAY + 360))
    pipeline = Pipeline(cfg)
    try:
        _send_and_score(d, stream, pipeline, 120, "the two days to be scored", 2 * DAY * len(ASSETS))
        assert d.count(Alert) > 0

        result = retrain_group(cfg, "fleet", sessions=d.sessions)
        _figures("anomalous", result)
        assert result.outcome == "rejected", result.reason
        assert "of the alert windows" in result.reason
        time.sleep(3 * cfg.retrain.reload_interval_s + 0.5)
        expected = _send_and_score(d, stream, pipeline, 60, "every window to be scored")
    finally:
        pipeline.close()
        stream.close()

    scores = d.scores()
    assert {v for *_, v in scores} == {d.first}, "only the active model may score"
    assert {(a, e) for a, e, _ in scores} == expected and len(scores) == len(expected)
    candidate = result.candidate_version
    assert d.versions() == {d.first: "active", candidate: "rejected"}
    with d.sessions() as s:
        row = repo.get_model_version(session=s, version=candidate)
        assert row is not None and row.reason and "alert windows" in row.reason
    run = d.runs()[0]
    assert (run.outcome, run.candidate_version) == ("rejected", candidate)
    assert run.metrics["recall_candidate"] < run.metrics["recall_active"] - cfg.retrain.tolerance
    print(f"[anomalous] {d.count(Alert)} alerts in the lookback; {len(scores)} windows, all scored by {d.first}")


def test_one_firing_of_the_schedule_runs_once_however_many_schedulers_fire_it(deployment: Deployment) -> None:
    """Two `sensorwatch scheduler` processes on one database both fire the nightly job: the second run of the same
    firing is skipped, whether the first still runs (it held the lock: this was refused) or has finished (this ran
    again: the group was trained twice in one night). The next firing runs."""
    d, cfg = deployment, deployment.config
    firing = datetime.now(UTC).replace(microsecond=0)
    first = retrain_group(cfg, "fleet", sessions=d.sessions, trigger="schedule", firing=firing)
    assert first.outcome == "skipped" and "no complete windows" in first.reason  # ran: nothing streamed yet
    again = retrain_group(cfg, "fleet", sessions=d.sessions, trigger="schedule", firing=firing)
    assert again.outcome == "skipped" and "was already started by" in again.reason
    assert f"(run {first.run_id})" in again.reason and d.count(RetrainLock) == 0
    with d.sessions.begin() as s:  # the first one still running: the second is skipped too, not refused
        assert repo.acquire_retrain_lock(session=s, group="fleet", holder="other", now=datetime.now(UTC), ttl_s=60)
    assert retrain_group(cfg, "fleet", sessions=d.sessions, trigger="schedule", firing=firing).outcome == "skipped"
    with d.sessions.begin() as s:
        repo.release_retrain_lock(session=s, group="fleet", holder="other")
    later = datetime.now(UTC) + timedelta(seconds=1)
    time.sleep(1.1)
    nxt = retrain_group(cfg, "fleet", sessions=d.sessions, trigger="schedule", firing=later)
    assert nxt.outcome == "skipped" and "no complete windows" in nxt.reason  # the next firing ran
    manual = retrain_group(cfg, "fleet", sessions=d.sessions)  # a manual run is never a firing's
    assert "no complete windows" in manual.reason


def test_two_retrains_started_at_once_one_runs_the_other_is_refused(deployment: Deployment) -> None:
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _drifted(DAY))
    stream.send()
    stream.close()
    start = threading.Barrier(2)
    results: list[RetrainResult] = []

    def retrain() -> None:
        engine = make_engine(cfg.database.url)  # its own connections, as another process would have
        try:
            start.wait(timeout=30)
            results.append(retrain_group(cfg, "fleet", sessions=make_sessionmaker(engine)))
        finally:
            engine.dispose()

    threads = [threading.Thread(target=retrain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 2
    refused = [r for r in results if r.outcome == "refused"]
    ran = [r for r in results if r.outcome != "refused"]
    assert len(refused) == 1 and len(ran) == 1, [r.summary() for r in results]
    _figures("concurrent", ran[0])
    print(f"[concurrent] {refused[0].summary()}")
    assert ran[0].outcome in ("promoted", "rejected")
    assert "holds the lock" in refused[0].reason
    assert sorted(r.outcome for r in d.runs()) == sorted(r.outcome for r in results)
    assert d.count(RetrainLock) == 0  # released
    listed = CliRunner().invoke(app, ["models", "runs", "--config", str(d.path)])
    assert listed.exit_code == 0 and "refused" in listed.stdout and ran[0].outcome in listed.stdout


def test_a_failing_training_run_is_recorded_and_the_active_model_keeps_serving(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _drifted(DAY))
    stream.send()
    stream.close()

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("simulated crash while training")

    monkeypatch.setattr("pipeline.retrain.train_group", crash)
    outcome = CliRunner().invoke(app, ["retrain", "--config", str(d.path), "--group", "fleet"])
    print(f"\n[failure] {outcome.output.strip()}")
    assert outcome.exit_code == 1, outcome.output
    assert d.versions() == {d.first: "active"}
    [run] = d.runs()
    assert (run.outcome, run.trigger) == ("failed", "manual") and run.finished_at is not None
    assert "RuntimeError: simulated crash while training" in (run.reason or "")
    assert d.count(RetrainLock) == 0


def test_a_retrain_replaces_an_active_model_the_configuration_no_longer_fits(deployment: Deployment) -> None:
    """The window length changed: the pipeline refuses the active model, so the nightly retrain must not give up on
    it as before ("the active model keeps serving": none did). It trains a new model from the recent data alone and
    promotes it, saying why nothing was compared."""
    d = deployment
    stream = Stream(d.config, _frames(LIVE_START, DAY, seed=3))
    stream.send()
    stream.close()
    raw = yaml.safe_load(d.path.read_text())
    raw["groups"][0]["window"]["length"] = 10
    changed = parse_config(raw, env={})
    with d.sessions() as s:
        first_row = repo.get_model_version(session=s, version=d.first)
        assert first_row is not None
        with pytest.raises(ModelError, match="window"):
            load_version(first_row, changed.groups[0], changed.model_dir)
    result = retrain_group(changed, "fleet", sessions=d.sessions)
    _figures("config change", result)
    assert result.outcome == "promoted", result.reason
    assert f"the active model {d.first} cannot serve this configuration" in result.reason
    assert result.active_version == d.first and d.versions() == {d.first: "retired", result.candidate_version: "active"}
    with d.sessions() as s:
        row = repo.get_model_version(session=s, version=result.candidate_version or "")
        assert row is not None
        assert load_version(row, changed.groups[0], changed.model_dir).version == result.candidate_version


def test_a_long_lookback_is_thinned_to_max_windows_keeping_the_windows_near_alerts(deployment: Deployment) -> None:
    d, cfg = deployment, deployment.config
    stream = Stream(cfg, _frames(LIVE_START, 3 * DAY, seed=4))
    stream.send()
    stream.close()
    opened = LIVE_START + pd.Timedelta(hours=30)
    with d.sessions.begin() as s:  # a past incident of pump-a: its windows must survive thinning
        s.add(Alert(asset="pump-a", group_name="fleet", opened_at=opened.to_pydatetime(),
                    last_seen_at=(opened + pd.Timedelta(minutes=30)).to_pydatetime(),
                    closed_at=(opened + pd.Timedelta(minutes=30)).to_pydatetime(), peak_score=3.0, threshold=1.5,
                    severity="warning", status="resolved", window_count=5, top_sensors=[], model_version=d.first,
                    updated_at=datetime.now(UTC)))
    group = cfg.groups[0]
    near = near_alerts([Span("pump-a", datetime_to_ms(opened.to_pydatetime()),
                             datetime_to_ms((opened + pd.Timedelta(minutes=30)).to_pydatetime()))],
                       round(cfg.retrain.alert_margin_s * 1000))
    full = read_recent_windows(cfg, group, since_ms=0).windows
    data = read_recent_windows(cfg, group, since_ms=0, max_windows=1000, keep=near)
    assert data.thinning is not None and data.thinning.keep_every == 4  # 2,157 windows: every 2nd is still > 1,000
    expected = {(w.asset, w.start_ms) for w in full if data.thinning.keeps(w) or near(w)}
    assert {(w.asset, w.start_ms) for w in data.windows} == expected and len(data.windows) <= 1000
    kept_near = [w for w in data.windows if near(w)]
    assert len(kept_near) == sum(near(w) for w in full) >= 10  # every window near the alert stayed
    values = {(w.asset, w.start_ms): w.values for w in full}
    assert all(np.array_equal(w.values, values[(w.asset, w.start_ms)]) for w in data.windows)

    bounded = cfg.model_copy(update={"retrain": cfg.retrain.model_copy(update={"max_windows": 1000})})
    result = retrain_group(bounded, "fleet", sessions=d.sessions)
    _figures("thinned", result)
    assert result.outcome in ("promoted", "rejected"), result.reason
    assert result.metrics["window_thinning"] == 4  # the counts stand for the lookback: the sample, not the extras
    assert result.metrics["windows_total"] == sum(data.thinning.keeps(w) for w in data.windows) < len(data.windows)
    inside = near_alerts([Span("pump-a", datetime_to_ms(opened.to_pydatetime()),
                               datetime_to_ms((opened + pd.Timedelta(minutes=30)).to_pydatetime()))], 0)
    assert result.metrics["windows_alert"] == sum(inside(w) for w in full) > 0  # the gate saw all of them
    with d.sessions() as s:
        row = repo.get_model_version(session=s, version=result.candidate_version)
        assert row is not None and row.metrics["window_thinning"] == 4
    assert load_version(row, group, cfg.model_dir).metadata["window_thinning"] == 4  # the bundle records it too
    print(f"[thinned] {len(full)} windows in the lookback, {len(data.windows)} kept (every 4th, and all "
          f"{len(kept_near)} near the alert)")


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_migration_0003_upgrades_and_downgrades(dialect: str, tmp_path: Path, request: pytest.FixtureRequest
                                                ) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from pipeline.store.db import alembic_config

    url = f"sqlite:///{tmp_path / 'sw.db'}" if dialect == "sqlite" else request.getfixturevalue("pg_database_url")
    upgrade(url)
    engine = make_engine(url)
    new = {"retrain_runs", "retrain_locks", JOBS_TABLE}
    assert new <= set(inspect(engine).get_table_names())
    indexes = {i["name"]: i for i in inspect(engine).get_indexes("model_versions")}
    assert indexes["uq_model_versions_one_active"]["unique"]
    sessions = make_sessionmaker(engine)

    def add(version: str, status: str) -> None:
        with sessions.begin() as s:
            s.add(ModelVersion(version=version, group_name="g", model_type="dense", status=status,
                               created_at=datetime.now(UTC), artifact_path="/nowhere", checksum="0" * 64,
                               config_hash="0", threshold=1.0, threshold_method="percentile", windows_used=0,
                               metrics={}))

    add("v1", "active")
    add("v0", "retired")
    with pytest.raises(IntegrityError):
        add("v2", "active")  # at most one active version per group
    command.downgrade(alembic_config(url), "0002")
    assert not new & set(inspect(engine).get_table_names())
    upgrade(url)
    assert new <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_the_scheduler_fires_on_its_trigger_and_keeps_its_job_across_a_restart(deployment: Deployment) -> None:
    d, cfg = deployment, deployment.config

    def scheduled_runs() -> int:
        return sum(1 for r in d.runs() if r.trigger == "schedule")

    def serve(trigger: CronTrigger) -> threading.Thread:
        scheduler = build_scheduler(cfg, d.path, engine=d.engine, trigger=trigger)
        thread = threading.Thread(target=scheduler.start, name="scheduler", daemon=True)
        thread.start()
        serve.scheduler = scheduler  # type: ignore[attr-defined]
        return thread

    every_second = CronTrigger(second="*", timezone=UTC)  # a test-only trigger; the configured one is nightly
    thread = serve(every_second)
    _wait(lambda: scheduled_runs() >= 1, 30, "the scheduler to fire")
    job = serve.scheduler.get_job(JOB_ID)  # type: ignore[attr-defined]
    assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True,
                                                                        cfg.retrain.misfire_grace_time_s)
    stop_when_running(serve.scheduler)  # type: ignore[attr-defined]
    thread.join(timeout=30)
    assert not thread.is_alive()
    fired = scheduled_runs()

    stored = _stored_job(d.engine, JOB_ID)
    assert stored is not None, "the job must stay in the SQL job store"
    assert stored[0] == {"func": JOB_FUNC, "args": [str(d.path.resolve())], "trigger": repr(every_second)}

    restarted = build_scheduler(cfg, d.path, engine=d.engine, trigger=CronTrigger(second="*", timezone=UTC))
    assert restarted.get_job(JOB_ID).next_run_time == stored[1]  # the stored schedule is kept
    thread = threading.Thread(target=restarted.start, name="scheduler", daemon=True)
    thread.start()
    _wait(lambda: scheduled_runs() > fired, 30, "the restarted scheduler to fire")
    stop_when_running(restarted)
    thread.join(timeout=30)
    runs = [r for r in d.runs() if r.trigger == "schedule"]
    assert {r.outcome for r in runs} == {"skipped"} and "no complete windows" in (runs[0].reason or "")
    pids = {int(r.holder.rsplit("-", 2)[1]) for r in runs}  # holders are host-pid-suffix
    assert os.getpid() not in pids and len(pids) == len(runs)  # each firing trained in a process of its own
    print(f"\n[scheduler] fired {len(runs)} times across a restart; job {job.id} kept with {stored[0]['trigger']}")

    # `sensorwatch scheduler` writes the configured nightly schedule over the test trigger and stops on SIGTERM
    log = (d.path.parent / "scheduler.log").open("wb")
    proc = subprocess.Popen([str(SENSORWATCH), "scheduler", "--config", str(d.path)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    try:
        _wait(lambda: "hour='2'" in str((_stored_job(d.engine, JOB_ID) or ({}, None))[0].get("trigger")), 30,
              "sensorwatch scheduler to write the nightly schedule")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "scheduler stopped" in (d.path.parent / "scheduler.log").read_text()
    assert _stored_job(d.engine, JOB_ID) is not None


def _stored_job(engine: Engine, job_id: str) -> tuple[dict[str, Any], datetime | None] | None:
    """The stored job's fingerprint and next run time, read as JSON (what the scheduler writes: never a pickle)."""
    with engine.begin() as conn:
        row = conn.execute(select(scheduler_jobs.c.job_state, scheduler_jobs.c.next_run_time)
                           .where(scheduler_jobs.c.id == job_id)).first()
    if row is None:
        return None
    fingerprint = json.loads(json.loads(row.job_state)["fingerprint"])
    return fingerprint, utc_timestamp_to_datetime(row.next_run_time)


def test_a_long_run_keeps_its_lock_and_a_run_that_lost_it_does_not_promote(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    d = deployment
    cfg = d.config.model_copy(update={"retrain": d.config.retrain.model_copy(update={"lock_ttl_s": 1.5})})
    stream = Stream(cfg, _drifted(DAY))
    stream.send()
    stream.close()
    real_train = train_group
    steals: list[bool] = []

    def slow_train(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3.0)  # twice the lock's time to live: without renewal it would have expired by now
        with d.sessions.begin() as s:
            steals.append(repo.acquire_retrain_lock(session=s, group="fleet", holder="intruder",
                                                    now=datetime.now(UTC), ttl_s=60))
        return real_train(*args, **kwargs)

    monkeypatch.setattr("pipeline.retrain.train_group", slow_train)
    kept = retrain_group(cfg, "fleet", sessions=d.sessions)
    assert steals == [False]  # renewed in the background: still held after 2x its time to live
    assert kept.outcome in ("promoted", "rejected") and "lost the retrain lock" not in kept.reason, kept.summary()
    assert d.count(RetrainLock) == 0
    active_before = {v for v, status in d.versions().items() if status == "active"}

    def train_then_lose_the_lock(*args: Any, **kwargs: Any) -> Any:
        trained = real_train(*args, **kwargs)
        with d.sessions.begin() as s:  # as if this run had stalled past its expiry and another run took over
            s.execute(RetrainLock.__table__.update().values(holder="intruder"))
        return trained

    monkeypatch.setattr("pipeline.retrain.train_group", train_then_lose_the_lock)
    lost = retrain_group(d.config, "fleet", sessions=d.sessions)  # a 6 h lock: caught by the promoting transaction
    print(f"\n[lock] long run: {kept.summary()}\n[lock] lost lock: {lost.summary()}")
    assert lost.outcome == "rejected" and "lost the retrain lock" in lost.reason
    assert {v for v, status in d.versions().items() if status == "active"} == active_before
    assert d.versions()[lost.candidate_version] == "rejected"
    with d.sessions() as s:
        assert [lock.holder for lock in s.scalars(select(RetrainLock))] == ["intruder"]  # not ours to release
