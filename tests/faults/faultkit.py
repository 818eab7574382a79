"""Shared set-up for fault tests: a configured deployment, a stream producer, pipeline subprocesses, and the check.

The pipeline under test runs as real ``sensorwatch run`` processes (so SIGKILL and SIGTERM are real); the stream is
produced at a steady rate from a background thread so faults land mid-stream.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import pandas as pd
import yaml
from sqlalchemy import func, select, text

from models.detector import Detector
from pipeline import kafka_io
from pipeline.alerting import AlertEngine
from pipeline.config import Config, load_config
from pipeline.decode import Decoder
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.history import windows_from_frame
from pipeline.simulate import DEFAULT_SENSORS, simulate_normal
from pipeline.sinks import event_document, selected
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import Alert, AlertOutbox, WindowScore
from pipeline.train import register_trained, train_group
from pipeline.types import Window, ms_to_datetime
from pipeline.windowing import Windower

PERIOD = 10.0
START = pd.Timestamp("2026-05-01T00:00:00Z")
SENSORWATCH = Path(sys.executable).with_name("sensorwatch")
Junk = Callable[[str, bytes], tuple[bytes | None, bytes | None]]


def event_identity(doc: dict[str, object]) -> str:
    """What tells one alert event from another at a receiver (the docs' advice): incident, event, last seen, and
    the alert's state."""
    alert = doc["alert"]
    assert isinstance(alert, dict)
    return f"{doc['incident']}|{doc['event']}|{alert['last_seen_at']}|{alert['window_count']}|{alert['severity']}"


@dataclass
class Deployment:
    """A config file, a migrated database with an active model, and the stream to send."""

    config_path: Path
    config: Config
    messages: list[tuple[str, bytes]]
    expected: set[tuple[str, int]]
    logs: Path
    windows: list[Window] = field(default_factory=list)  # every window the stream closes, as one windower cuts them
    detectors: dict[str, Detector] = field(default_factory=dict)  # the registered model
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    # -- the stream ------------------------------------------------------------------------------------------------
    def produce(self, rate_per_s: float, extra: list[Junk] | None = None) -> threading.Thread:
        """Send the stream at about ``rate_per_s`` in a thread; ``extra`` records are spread through it, each made
        from the valid record just sent (so a duplicate or late reading can refer to it)."""
        cfg = self.config.kafka
        kafka_io.ensure_topics(cfg, [cfg.topic, cfg.dead_letter_topic], partitions=3)

        def send() -> None:
            producer = kafka_io.make_producer(cfg, linger_ms=10)
            chunk = max(int(rate_per_s / 10), 1)
            junk = list(extra or [])
            every = max(len(self.messages) // (len(junk) + 1), 1)
            for i, (asset, value) in enumerate(self.messages):
                producer.send(cfg.topic, key=asset.encode(), value=value)
                if junk and i % every == every - 1:
                    key, raw = junk.pop()(asset, value)
                    producer.send(cfg.topic, key=key, value=raw)
                if i % chunk == chunk - 1:
                    producer.flush()
                    time.sleep(0.1)
            for make in junk:
                key, raw = make(*self.messages[-1])
                producer.send(cfg.topic, key=key, value=raw)
            producer.flush()
            producer.close()

        thread = threading.Thread(target=send, name="stream", daemon=True)
        thread.start()
        return thread

    # -- pipeline processes ----------------------------------------------------------------------------------------
    def start_consumer(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``sensorwatch run --config ...`` as a child process, logging to ``logs/``."""
        log = (self.logs / f"consumer-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen([str(SENSORWATCH), "run", "--config", str(self.config_path)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "COLUMNS": "200"})
        self.procs.append(proc)
        return proc

    def wait_for_log(self, index: int, text: str, timeout_s: float) -> None:
        """Wait until the log of the ``index``-th consumer started holds ``text``; AssertionError (with the log tails)
        after ``timeout_s``. For steps that must follow an event, not a guess of how long it takes under load."""
        path = self.logs / f"consumer-{index}.log"
        deadline = time.monotonic() + timeout_s
        while text not in (path.read_text(errors="replace") if path.exists() else ""):
            if time.monotonic() > deadline:
                raise AssertionError(f"consumer {index} did not log {text!r} within {timeout_s:.0f}s\n"
                                     f"{self.log_tail()}")
            time.sleep(0.2)

    def stop_all(self) -> None:
        """SIGTERM every consumer still running and wait for it."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- the check -------------------------------------------------------------------------------------------------
    def stored(self) -> tuple[int, int]:
        """(rows in window_scores, distinct (asset, window_end) among them)."""
        engine = make_engine(self.config.database.url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(func.count()).select_from(WindowScore)).scalar_one()
                distinct = conn.execute(text(
                    "select count(*) from (select distinct asset, window_end from window_scores) d")).scalar_one()
        finally:
            engine.dispose()
        return int(rows), int(distinct)

    def wait_complete(self, timeout_s: float) -> tuple[int, int]:
        """Wait until every expected window has a score (or the timeout); returns ``stored()``."""
        deadline = time.monotonic() + timeout_s
        counts = (0, 0)
        while time.monotonic() < deadline:
            try:
                counts = self.stored()
            except Exception:  # database briefly down in outage tests
                counts = (0, 0)
            if counts[1] >= len(self.expected):
                time.sleep(1.0)  # let anything extra land before the final count
                return self.stored()
            time.sleep(0.5)
        return counts

    def wait_progress(self, timeout_s: float) -> None:
        """Wait until the number of stored windows grows (a consumer is working)."""
        before = self.stored()[0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.stored()[0] == before:
            time.sleep(0.2)

    def stored_keys(self) -> set[tuple[str, int]]:
        """The (asset, window end ms) of every stored score."""
        engine = make_engine(self.config.database.url)
        try:
            with make_sessionmaker(engine)() as s:
                return {(r.asset, int(r.window_end.timestamp() * 1000)) for r in s.scalars(select(WindowScore))}
        finally:
            engine.dispose()

    def smoothing_breaks(self, alpha: float) -> list[str]:
        """Windows whose stored smoothed score is not the EWMA (``alpha``) of the asset's stored scores up to it, in
        window order: where a restart or a replay broke the smoothed stream (empty when it is continuous)."""
        engine = make_engine(self.config.database.url)
        try:
            with make_sessionmaker(engine)() as s:
                rows = s.execute(select(WindowScore.asset, WindowScore.window_end, WindowScore.score,
                                        WindowScore.smoothed_score)
                                 .order_by(WindowScore.asset, WindowScore.window_end)).all()
        finally:
            engine.dispose()
        breaks: list[str] = []
        state: dict[str, float] = {}
        for asset, end, score, smoothed in rows:
            expected = score if asset not in state else alpha * score + (1 - alpha) * state[asset]
            state[asset] = expected
            if smoothed is None or abs(smoothed - expected) > 1e-9 * max(1.0, abs(expected)):
                breaks.append(f"{asset} {end}: stored {smoothed}, expected {expected}")
        return breaks

    def judged_breaks(self) -> tuple[list[str], int]:
        """Windows whose stored aftermath floor or anomaly flag, and alerts whose stored state (times, windows,
        severity, peak, top sensors and every sensor's unrounded error sum), differ from what one
        unbroken alert engine decides from the same stored scores in window order (no restarts, no batches); and how
        many stored windows have a floor (so the check is not vacuous)."""
        engine = make_engine(self.config.database.url)
        try:
            with make_sessionmaker(engine)() as s:
                rows = list(s.scalars(select(WindowScore).order_by(WindowScore.asset, WindowScore.window_end)))
                alerts = sorted((a.asset, a.opened_at, a.last_seen_at, a.closed_at, a.window_count, a.severity,
                                 a.peak_score, a.top_sensors, a.sensor_error_sums) for a in s.scalars(select(Alert)))
        finally:
            engine.dispose()
        scores = [replace(repo.score_of(r), aftermath_floor=None) for r in rows]  # as scored, before judging
        judged, events = AlertEngine(self.config.groups).judge(scores)
        breaks = [f"{r.asset} {r.window_end}: stored floor {r.aftermath_floor} anomaly {r.is_anomaly}, unbroken "
                  f"{j.aftermath_floor} {j.is_anomaly}" for r, j in zip(rows, judged, strict=True)
                  if (r.aftermath_floor, r.is_anomaly) != (j.aftermath_floor, j.is_anomaly)]
        final = {(e.alert.asset, e.alert.opened_ms): e.alert for e in events}
        expected = sorted((a.asset, ms_to_datetime(a.opened_ms), ms_to_datetime(a.last_seen_ms),
                           None if a.closed_ms is None else ms_to_datetime(a.closed_ms), a.window_count, a.severity,
                           a.peak_score, a.top_sensors, a.error_sums) for a in final.values())
        if alerts != expected:
            breaks.append(f"alerts stored {alerts[:3]}..., unbroken {expected[:3]}... ({len(alerts)} vs "
                          f"{len(expected)})")
        return breaks, sum(r.aftermath_floor is not None for r in rows)

    def outbox_breaks(self, received_bodies: list[dict[str, object]], timeout_s: float
                      ) -> tuple[list[str], int, int]:
        """Wait until the webhook outbox is delivered (or the timeout); then what differs between the events one
        unbroken alert engine raises from the stored scores, the events queued, and the events the receiver got
        (``received_bodies``: each at least once, one incident's in order). Returns (breaks, events, duplicates
        received)."""
        engine = make_engine(self.config.database.url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with make_sessionmaker(engine)() as s:
                    counts = repo.count_outbox(session=s)
                    queued = [r.document for r in s.scalars(select(AlertOutbox).order_by(AlertOutbox.id))]
                    rows = list(s.scalars(select(WindowScore).order_by(WindowScore.asset, WindowScore.window_end)))
                if set(counts) <= {("webhook", "delivered")} or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            engine.dispose()
        scores = [replace(repo.score_of(r), aftermath_floor=None) for r in rows]
        _, events = AlertEngine(self.config.groups).judge(scores)
        kinds = self.config.sinks.webhook.events if self.config.sinks.webhook else []
        unbroken = sorted(event_identity(event_document(e)) for e in events if selected(kinds, e))
        breaks = [] if set(counts) <= {("webhook", "delivered")} else [f"outbox not delivered: {counts}"]
        in_outbox = sorted(event_identity(d) for d in queued)
        if in_outbox != unbroken:
            breaks.append(f"{len(in_outbox)} events queued, {len(unbroken)} from an unbroken run; only queued "
                          f"{sorted(set(in_outbox) - set(unbroken))[:3]}, only unbroken "
                          f"{sorted(set(unbroken) - set(in_outbox))[:3]}")
        received = [event_identity(d) for d in received_bodies]
        if set(received) != set(in_outbox):
            breaks.append(f"received {len(set(received))} distinct events of {len(in_outbox)} queued")
        first_seen = list(dict.fromkeys(received))
        order = {identity: i for i, identity in enumerate(event_identity(d) for d in queued)}
        for incident in {d["incident"] for d in queued}:
            mine = [i for i in first_seen if i.startswith(f"{incident}|")]
            if mine != sorted(mine, key=lambda i: order.get(i, -1)):
                breaks.append(f"incident {incident}: received out of order {mine[:4]}")
        return breaks, len(in_outbox), len(received) - len(set(received))

    def scoring_breaks(self) -> tuple[list[str], int]:
        """Stored windows whose score, smoothed score, drift offsets, aftermath floor or anomaly flag differ from what
        one unbroken chain (``score_and_judge`` over every window at once: no restarts, no batches) computes; and how
        many stored windows have offsets that moved off 0 (so the check is not vacuous). Scores and offsets agree to
        1e-6 (relative, or absolute near 0: a forward pass's last float32 bits may depend on what else is in its
        batch, and offsets add that up); flags exactly."""
        engine = make_engine(self.config.database.url)
        try:
            with make_sessionmaker(engine)() as s:
                rows = [repo.score_of(r) for r in
                        s.scalars(select(WindowScore).order_by(WindowScore.asset, WindowScore.window_end))]
        finally:
            engine.dispose()
        groups = self.config.groups
        unbroken, _ = score_and_judge(self.windows, self.detectors, AlertEngine(groups), DriftTracker(groups))
        unbroken.sort(key=lambda x: (x.asset, x.end_ms))

        def close(a: float | None, b: float | None) -> bool:
            return (a is None) == (b is None) and (
                a is None or b is None or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6))

        breaks = []
        for r, u in zip(rows, unbroken, strict=True):
            same = ((r.asset, r.end_ms, r.is_anomaly) == (u.asset, u.end_ms, u.is_anomaly)
                    and all(close(getattr(r, f), getattr(u, f)) for f in ("score", "smoothed", "aftermath_floor"))
                    and (r.drift_offset or {}).keys() == (u.drift_offset or {}).keys()
                    and all(close(v, (u.drift_offset or {})[k]) for k, v in (r.drift_offset or {}).items()))
            if not same:
                breaks.append(f"{r.asset} {r.end_ms}: stored (score, smoothed, floor, anomaly, offsets) "
                              f"{(r.score, r.smoothed, r.aftermath_floor, r.is_anomaly, r.drift_offset)}, unbroken "
                              f"{(u.score, u.smoothed, u.aftermath_floor, u.is_anomaly, u.drift_offset)}")
        return breaks, sum(any((r.drift_offset or {}).values()) for r in rows)

    def debug_state(self) -> str:
        """Skipped windows, asset and consumer progress, for a failing assertion."""
        engine = make_engine(self.config.database.url)
        try:
            with engine.connect() as conn:
                parts = []
                for table in ("skipped_windows", "asset_progress", "consumer_progress"):
                    rows = conn.execute(text(f"select * from {table}")).fetchall()
                    parts.append(f"{table}: " + "\n  ".join(map(str, rows)))
        finally:
            engine.dispose()
        return "\n".join(parts)

    def log_tail(self, lines: int = 30) -> str:
        """The end of every consumer log, for assertion messages."""
        out = []
        for path in sorted(self.logs.glob("consumer-*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)


def deploy(tmp_path: Path, *, bootstrap: str, topic: str, db_url: str, assets: int, rows_per_asset: int,
           session_timeout_ms: int = 6000, ingest: dict[str, object] | None = None,
           idle_close_s: float = 3600, ewma_alpha: float | None = None,
           aftermath: dict[str, float] | None = None, drift: dict[str, float] | None = None,
           webhook: str | None = None) -> Deployment:
    """Write a config, migrate the database, register a quickly trained model, and prepare the stream (alert events
    to the ``webhook`` URL when given)."""
    names = [f"asset-{i:02d}" for i in range(assets)]
    raw = {
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dead_letter_topic": f"{topic}-dlq",
                  "group_id": f"g-{topic}", "max_poll_records": 2000, "poll_timeout_ms": 300,
                  "session_timeout_ms": session_timeout_ms},
        "database": {"url": db_url},
        "metrics": {"port": 0},
        "ingest": ingest or {},
        "sinks": {"webhook": {"url": webhook, "events": ["opened", "updated", "resolved"]}} if webhook else {},
        "model_dir": str(tmp_path / "models"),
        "groups": [{
            "name": "fleet", "assets": names, "sampling_period_s": PERIOD,
            "sensors": [{"name": s.name, "unit": s.unit, "valid_range": [s.low, s.high]} for s in DEFAULT_SENSORS],
            "window": {"length": 12, "stride": 6, "max_gap": 2, "idle_close_s": idle_close_s},
            "model": {"type": "dense", "hidden": [16, 4], "epochs": 2, "batch_size": 256},
            "threshold": {"ewma_alpha": ewma_alpha},
            "alert": {"aftermath": aftermath},
            "drift": drift,
        }],
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path, env={})
    group = cfg.groups[0]
    upgrade(db_url)
    train = simulate_normal(names[0], START - pd.Timedelta(hours=6), 2000, PERIOD, seed=1).reset_index()
    trained = train_group(windows_from_frame(train, group), group, progress=False)
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as s:
        register_trained(session=s, trained=trained, group=group, model_dir=cfg.model_dir)
    engine.dispose()
    frames = {a: simulate_normal(a, START, rows_per_asset, PERIOD, seed=2) for a in names}
    ts = (frames[names[0]].index.astype("int64") // 1_000_000).tolist()
    messages: list[tuple[str, bytes]] = []
    columns = group.sensor_names
    for asset in names:
        values = frames[asset][columns].to_numpy()
        messages += [(asset, orjson.dumps({"asset": asset, "ts": t, "values": dict(zip(columns, map(float, v),
                                                                                          strict=True))}))
                     for t, v in zip(ts, values, strict=True)]
    messages.sort(key=lambda m: orjson.loads(m[1])["ts"])
    decoder = Decoder(cfg.groups, cfg.kafka.max_message_bytes, cfg.ingest)
    readings = [decoder.decode(value) for _, value in messages]
    windower = Windower(cfg.groups)
    closed = windower.add(readings).windows
    if idle_close_s < 600:  # the test waits for the stream's last windows to close on wall-clock time too
        closed += windower.close_idle(now_ms=2**62).windows
    expected = {(w.asset, w.end_ms) for w in closed}
    logs = tmp_path / "logs"
    logs.mkdir()
    return Deployment(config_path, cfg, messages, expected, logs, closed, {group.name: trained.detector})
