"""A live fleet: what one poll costs as the number of assets grows.

    python benchmarks/fleet_polls.py [--assets 1000 5000]

Drives ``Runner.process`` directly (SQLite, a small trained dense model, no broker: the broker's cost does not
depend on the fleet's size) with assets that each report every 10 s, spread over the seconds. After 400 simulated
seconds of warm-up, it times 100 polls of one simulated second each (a tenth of the fleet reports), then 30 polls of
a single reading and 30 empty polls. Prints one JSON line per fleet size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import orjson
import pandas as pd

from pipeline.config import Config, parse_config
from pipeline.history import windows_from_frame
from pipeline.kafka_io import RawRecord
from pipeline.registry import load_active
from pipeline.runner import Runner
from pipeline.simulate import DEFAULT_SENSORS, simulate_normal
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.train import register_trained, train_group

PERIOD_S = 10
T0 = int(pd.Timestamp("2026-06-01T00:00:00Z").value // 1_000_000)


def _config(url: str, assets: list[str], model_dir: Path) -> Config:
    return parse_config({"database": {"url": url}, "model_dir": str(model_dir), "metrics": {"enabled": False},
                         "groups": [{"name": "fleet", "assets": assets, "sampling_period_s": PERIOD_S,
                                     "sensors": [{"name": s.name, "valid_range": [s.low, s.high]}
                                                 for s in DEFAULT_SENSORS],
                                     "window": {"length": 30, "stride": 5}, "model": {"type": "dense", "epochs": 2}}]},
                        env={})


class _Fleet:
    """Asset i reports at seconds i mod 10, 10, 20, ...; values from one simulated normal series."""

    def __init__(self, assets: list[str], partitions: int = 3) -> None:
        self.assets = assets
        self.partition = {a: i % partitions for i, a in enumerate(assets)}
        self.offsets = [0] * partitions
        start = pd.Timestamp(T0, unit="ms", tz="UTC")
        self.values = simulate_normal(assets[0], start, 2000, PERIOD_S, seed=2).to_dict("records")

    def second(self, s: int, only: int | None = None) -> list[RawRecord]:
        out = []
        for i, asset in enumerate(self.assets):
            if (s - i) % PERIOD_S or (only is not None and i != only):
                continue
            p, ts = self.partition[asset], T0 + (s - i % PERIOD_S) * 1000
            doc = {"asset": asset, "ts": ts, "values": self.values[(s // PERIOD_S) % len(self.values)]}
            out.append(RawRecord("t", p, self.offsets[p], asset.encode(), orjson.dumps(doc), ts))
            self.offsets[p] += 1
        return sorted(out, key=lambda r: (r.partition, r.offset))


def measure(n_assets: int) -> dict[str, float]:
    assets = [f"asset-{i:05d}" for i in range(n_assets)]
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/sw.db"
        upgrade(url)
        config = _config(url, assets, Path(tmp) / "models")
        group = config.groups[0]
        history = simulate_normal(assets[0], pd.Timestamp(T0, unit="ms", tz="UTC") - pd.Timedelta(days=1), 3000,
                                  PERIOD_S, seed=1).reset_index()
        trained = train_group(windows_from_frame(history, group), group, progress=False)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            register_trained(session=session, trained=trained, group=group, model_dir=config.model_dir)
        with sessions() as session:
            detectors = load_active(session=session, config=config)
        runner = Runner(config, sessions=sessions, detectors=detectors, producer=None, stop=threading.Event())
        fleet = _Fleet(assets)
        for s in range(400):
            runner.process(fleet.second(s), T0 + s * 1000 + 500, set())
        readings, started = 0, time.perf_counter()
        for s in range(400, 500):
            records = fleet.second(s)
            readings += len(records)
            runner.process(records, T0 + s * 1000 + 500, set())
        steady = time.perf_counter() - started
        one, empty, s = [], [], 500
        for _ in range(30):
            records = fleet.second(s, only=s % PERIOD_S)
            t = time.perf_counter()
            runner.process(records, T0 + s * 1000 + 500, set())
            one.append(time.perf_counter() - t)
            s += PERIOD_S
        for _ in range(30):
            t = time.perf_counter()
            runner.process([], T0 + s * 1000, set())
            empty.append(time.perf_counter() - t)
        engine.dispose()
    return {"assets": n_assets, "steady_us_per_reading": round(steady / readings * 1e6, 1),
            "one_reading_poll_ms": round(statistics.median(one) * 1000, 2),
            "empty_poll_ms": round(statistics.median(empty) * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=int, nargs="+", default=[1000, 5000])
    for n in parser.parse_args().assets:
        print(json.dumps(measure(n)), flush=True)


if __name__ == "__main__":
    main()
