"""Retention: how fast ``sensorwatch db prune`` deletes, and how long one batch holds the database.

    python benchmarks/retention.py [--assets 50] [--windows 10000] [--database sqlite|postgres] [--batch-rows 5000]

Fills ``window_scores`` with ``assets x windows`` rows (one window a minute, the last one an hour ago; a
throwaway PostgreSQL cluster for ``postgres``, or DATABASE_URL), then prunes with a retention that keeps the newest
30% and times it: rows deleted per second, and the longest single batch (one transaction: what a pipeline writing at
the same time may wait for). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _infra import database

from pipeline.config import parse_config
from pipeline.retention import PrunePlan, prune, prune_assets
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.types import Score, datetime_to_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=int, default=50)
    parser.add_argument("--windows", type=int, default=10_000, help="windows per asset, one a minute")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--batch-rows", type=int, default=5000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, database(args.database, Path(tmp)) as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        assets = [f"pump-{i}" for i in range(args.assets)]
        now = datetime.now(UTC)
        first = now - timedelta(hours=1) - timedelta(minutes=args.windows - 1)
        started = time.monotonic()
        for asset in assets:
            rows = [Score(asset, "pumps", datetime_to_ms(first + timedelta(minutes=i)) - 300_000,
                          datetime_to_ms(first + timedelta(minutes=i)), 0.5, 1.0,
                          {"speed": 0.2, "flow": 0.1, "pressure": 0.2}, "pumps-v1") for i in range(args.windows)]
            with sessions.begin() as session:
                repo.insert_scores(session=session, scores=rows)
                repo.save_asset_progress(session=session, progress={asset: ("pumps", datetime_to_ms(now))})
        filled_s = time.monotonic() - started

        keep_days = args.windows * 0.3 / 1440  # the newest 30% of each asset's windows
        config = parse_config({
            "database": {"url": url}, "retrain": {"lookback_days": keep_days / 2},
            "retention": {"scores_days": keep_days, "batch_rows": args.batch_rows},
            "groups": [{"name": "pumps", "assets": assets, "sensors": [{"name": "speed"}, {"name": "flow"},
                                                                         {"name": "pressure"}]}],
        }, env={})
        batches: list[float] = []

        class TimedSessions:
            """The sessionmaker, with each ``begin()`` transaction (one batch, its commit included) timed."""

            def __call__(self) -> Any:
                return sessions()

            @contextlib.contextmanager
            def begin(self) -> Iterator[Any]:
                t = time.monotonic()
                with sessions.begin() as session:
                    yield session
                batches.append(time.monotonic() - t)

        with sessions() as session:
            visit = prune_assets(session, config)
        result = prune(TimedSessions(), PrunePlan.of(config, now), assets=visit)  # type: ignore[arg-type]
        with sessions() as session:
            left = repo.count_scores(session=session)
        engine.dispose()
    print(json.dumps({
        "database": args.database, "assets": args.assets, "rows": args.assets * args.windows,
        "fill_s": round(filled_s, 1), "deleted": result.scores, "left": left, "prune_s": round(result.seconds, 2),
        "rows_per_s": round(result.scores / result.seconds), "batch_rows": args.batch_rows,
        "batches": len(batches), "longest_batch_ms": round(max(batches) * 1000, 1),
        "median_batch_ms": round(sorted(batches)[len(batches) // 2] * 1000, 1),
    }))


if __name__ == "__main__":
    main()
