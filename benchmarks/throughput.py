"""Pipeline throughput: readings/s and batch latency through a real broker into SQLite or PostgreSQL.

    python benchmarks/throughput.py [--assets 20] [--rows 5000] [--database sqlite|postgres] [--smooth N]
                                    [--ewma-alpha A] [--drift-span-s S] [--security plaintext|sasl_ssl|mtls]

Starts a local Kafka broker (or uses KAFKA_BOOTSTRAP_SERVERS; with --security, the local broker's TLS or SASL_SSL
listener) and, for ``postgres``, a throwaway PostgreSQL cluster (or DATABASE_URL); trains a small dense model,
produces the stream first, then times the pipeline consuming it. Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from _infra import database, kafka

from pipeline import kafka_io
from pipeline.config import Config, parse_config
from pipeline.history import windows_from_frame
from pipeline.runner import RunStats, run_pipeline
from pipeline.simulate import DEFAULT_SENSORS, simulate_normal
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.train import register_trained, train_group


def _config(bootstrap: str, db_url: str, assets: list[str], model_dir: Path, *, smooth: int = 1,
            ewma_alpha: float | None = None, drift_span_s: float | None = None,
            security: dict[str, Any] | None = None) -> Config:
    return parse_config({
        "kafka": {"bootstrap_servers": bootstrap, "topic": f"bench-{time.time_ns()}", "group_id": "bench",
                  "max_poll_records": 5000, "security": security or {}},
        "database": {"url": db_url}, "model_dir": str(model_dir), "metrics": {"enabled": False},
        "groups": [{"name": "fleet", "assets": assets, "sampling_period_s": 10,
                    "sensors": [{"name": s.name, "valid_range": [s.low, s.high]} for s in DEFAULT_SENSORS],
                    "window": {"length": 30, "stride": 5, "smooth": smooth}, "model": {"type": "dense", "epochs": 3},
                    "threshold": {"ewma_alpha": ewma_alpha},
                    **({"drift": {"span_s": drift_span_s}} if drift_span_s else {})}],
    }, env={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=20)
    parser.add_argument("--rows", type=int, default=5000, help="readings per asset")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--smooth", type=int, default=1, help="window.smooth (rolling mean over this many steps)")
    parser.add_argument("--ewma-alpha", type=float, default=None, help="threshold.ewma_alpha (smoothed scores)")
    parser.add_argument("--drift-span-s", type=float, default=None, help="drift.span_s (drift following)")
    parser.add_argument("--security", choices=("plaintext", "sasl_ssl", "mtls"), default="plaintext",
                        help="Kafka listener: plaintext, SASL_SSL with SCRAM-SHA-512, or mutual TLS")
    args = parser.parse_args()
    assets = [f"asset-{i:03d}" for i in range(args.assets)]
    start = pd.Timestamp("2026-06-01T00:00:00Z")
    with (tempfile.TemporaryDirectory() as tmp, kafka(args.security) as (bootstrap, security),
          database(args.database, Path(tmp)) as db_url):
        cfg = _config(bootstrap, db_url, assets, Path(tmp) / "models", smooth=args.smooth, ewma_alpha=args.ewma_alpha,
                      drift_span_s=args.drift_span_s, security=security)
        group = cfg.groups[0]
        upgrade(db_url)
        train = simulate_normal(assets[0], start - pd.Timedelta(days=1), 4000, 10, seed=1).reset_index()
        trained = train_group(windows_from_frame(train, group), group, progress=False)
        engine = make_engine(db_url)
        with make_sessionmaker(engine).begin() as s:
            register_trained(session=s, trained=trained, group=group, model_dir=cfg.model_dir)
        engine.dispose()
        kafka_io.ensure_topics(cfg.kafka, [cfg.kafka.topic, cfg.kafka.dead_letter_topic], partitions=3)
        producer = kafka_io.make_producer(cfg.kafka, linger_ms=20, batch_size=512 * 1024)
        total = 0
        for asset in assets:
            frame = simulate_normal(asset, start, args.rows, 10, seed=2)
            ts = (frame.index.astype("int64") // 1_000_000).tolist()
            for t, values in zip(ts, frame.to_dict("records"), strict=True):
                producer.send(cfg.kafka.topic, key=asset.encode(),
                              value=orjson.dumps({"asset": asset, "ts": t, "values": values}))
                total += 1
        producer.flush()
        producer.close()

        stop = threading.Event()
        latencies: list[float] = []
        first: list[float] = []
        done: list[float] = []

        def on_batch(stats: RunStats) -> None:
            if not first:  # when the first batch started processing (after group join and first fetch)
                first.append(time.perf_counter() - stats.last_batch_s)
            latencies.append(stats.last_batch_s)
            if stats.readings >= total:
                done.append(time.perf_counter())
                stop.set()

        started = time.perf_counter()
        stats = run_pipeline(cfg, stop=stop, idle_stop_s=30, on_batch=on_batch)
        elapsed = (done[0] if done else time.perf_counter()) - (first[0] if first else started)
        print(json.dumps({
            "database": args.database, "security": args.security, "smooth": args.smooth, "ewma_alpha": args.ewma_alpha,
            "drift_span_s": args.drift_span_s, "assets": args.assets,
            "readings": stats.readings,
            "windows_scored": stats.windows_scored, "batches": stats.batches,
            "seconds_processing": round(elapsed, 2),
            "readings_per_s": round(stats.readings / elapsed), "windows_per_s": round(stats.windows_scored / elapsed),
            "batch_latency_p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
            "batch_latency_p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1),
            "records_per_batch": round(stats.readings / max(stats.batches, 1)),
        }))


if __name__ == "__main__":
    main()
