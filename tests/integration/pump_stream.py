"""What the end-to-end tests share: the simulated pumps' group and a pipeline run that stops once it has seen enough."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson
import pandas as pd

from pipeline import kafka_io
from pipeline.config import Config
from pipeline.history import windows_from_frame
from pipeline.runner import RunStats, run_pipeline
from pipeline.simulate import DEFAULT_SENSORS, simulate_fleet
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.train import register_trained, train_group

PERIOD = 10.0
START = pd.Timestamp("2026-03-01T00:00:00Z")


def pump_group(assets: list[str]) -> dict[str, Any]:
    """The ``groups`` entry of simulated pumps (``pipeline.simulate``'s sensors) with a small dense model."""
    return {
        "name": "pumps", "assets": assets, "sampling_period_s": PERIOD,
        "sensors": [{"name": s.name, "unit": s.unit, "valid_range": [s.low, s.high]} for s in DEFAULT_SENSORS],
        "window": {"length": 30, "stride": 5, "max_gap": 3},
        "model": {"type": "dense", "hidden": [48, 12], "epochs": 25, "batch_size": 64, "seed": 0},
        "threshold": {"method": "percentile", "percentile": 99.5, "multiplier": 1.5},
        "alert": {"k": 2, "n": 3, "clear_after": 3},
    }


def probe(port: int, path: str) -> tuple[int, str]:
    """The status and body ``http://127.0.0.1:port/path`` answers (a health probe, metrics); (0, "") when nothing
    listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()
    except OSError:
        return 0, ""


def run_until(cfg: Config, *, until_readings: int, until_rejected: int, timeout_s: float = 180,
              idle_stop_s: float = 8.0, serve_metrics: bool = False) -> RunStats:
    """Run the pipeline until it counted ``until_readings`` readings and ``until_rejected`` rejects, went idle for
    ``idle_stop_s``, or ``timeout_s`` passed (with its metrics and health endpoint when ``serve_metrics``)."""
    stop = threading.Event()
    timer = threading.Timer(timeout_s, stop.set)
    timer.start()

    def on_batch(stats: RunStats) -> None:
        if stats.readings >= until_readings and sum(stats.rejected.values()) >= until_rejected:
            stop.set()

    try:
        return run_pipeline(cfg, stop=stop, idle_stop_s=idle_stop_s, on_batch=on_batch, serve_metrics=serve_metrics)
    finally:
        timer.cancel()


def produce(cfg: Config, messages: Sequence[tuple[str, dict[str, Any]]], *raw: tuple[bytes, bytes]) -> None:
    """Send ``messages`` (asset, payload) to the readings topic keyed by asset, then the ``raw`` (key, value)
    records (a bad record, say), and wait until the brokers have them all."""
    producer = kafka_io.make_producer(cfg.kafka)
    for asset, payload in messages:
        producer.send(cfg.kafka.topic, key=asset.encode(), value=orjson.dumps(payload))
    for key, value in raw:
        producer.send(cfg.kafka.topic, key=key, value=value)
    producer.flush()
    producer.close()


def deploy_pumps(cfg: Config, db_url: str, assets: list[str], periods: int) -> dict[str, pd.DataFrame]:
    """Migrate ``db_url``, train ``cfg``'s first group on ``periods`` normal readings of each asset from ``START``
    and activate the model; returns those readings by asset."""
    group = cfg.groups[0]
    upgrade(db_url)
    normal, _ = simulate_fleet(assets, START, periods, PERIOD, seed=3, anomalous_assets=[])
    table = pd.concat([f.assign(asset=a) for a, f in normal.items()]).reset_index()
    trained = train_group(windows_from_frame(table, group), group, progress=False)
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as s:
            register_trained(session=s, trained=trained, group=group, model_dir=cfg.model_dir)
    finally:
        engine.dispose()
    return normal
