"""Synthetic scored windows and alerts for the alert query, view, CLI and report tests (no model needed).

Scores are fed through the real AlertEngine and written with the real repository functions, batch by batch in one
transaction each, as the runner does.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.alerting import AlertEngine
from pipeline.config import Config, parse_config
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker
from pipeline.types import AlertEvent, Score, datetime_to_ms

SENSORS = ["speed", "vibration", "bearing_temp"]
T0 = datetime_to_ms(datetime(2026, 3, 1, tzinfo=UTC))
PERIOD_S = 10
STRIDE_MS = 5 * PERIOD_S * 1000  # window length 30 steps, stride 5 steps
LENGTH_MS = 30 * PERIOD_S * 1000
THRESHOLD = 1.0


def config_dict(db_url: str, **alert: Any) -> dict[str, Any]:
    """A one-group configuration (assets pump-1..3) in YAML form."""
    return {
        "database": {"url": db_url},
        "groups": [{
            "name": "pumps", "assets": ["pump-1", "pump-2", "pump-3"], "sampling_period_s": PERIOD_S,
            "sensors": [{"name": s} for s in SENSORS], "window": {"length": 30, "stride": 5},
            "alert": {"k": 2, "n": 3, "clear_after": 3, "top_sensors": 2, **alert},
        }],
    }


def make_config(db_url: str, **alert: Any) -> Config:
    """``config_dict`` validated."""
    return parse_config(config_dict(db_url, **alert), env={})


def scores(asset: str, count: int, bumps: Sequence[tuple[int, int, float, str]], seed: int = 0) -> list[Score]:
    """``count`` windows from T0; each bump ``(first, last, peak, sensor)`` lifts windows first..last (inclusive) to
    about ``peak`` x threshold, mostly through ``sensor``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        errors = {s: float(rng.uniform(0.05, 0.2)) for s in SENSORS}
        for first, last, peak, sensor in bumps:
            if first <= i <= last:
                errors[sensor] += peak * THRESHOLD
        total = round(sum(errors.values()), 6)
        start = T0 + i * STRIDE_MS
        out.append(Score(asset, "pumps", start, start + LENGTH_MS, total, THRESHOLD,
                         {k: round(v, 6) for k, v in errors.items()}, "pumps-v1"))
    return out


def populate(db_url: str, config: Config, stream: Sequence[Score], batch: int = 40) -> list[AlertEvent]:
    """Run ``stream`` through the alert engine (its aftermath rule, then the alert rules) and store scores and
    alerts (one transaction per batch)."""
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    alerts = AlertEngine(config.groups)
    events: list[AlertEvent] = []
    for i in range(0, len(stream), batch):
        with sessions.begin() as session:
            chunk, new = alerts.judge(stream[i:i + batch])
            repo.insert_scores(session=session, scores=chunk)
            repo.upsert_alerts(session=session, alerts=[e.alert for e in new])
        events += new
    engine.dispose()
    return events


def fleet(db_url: str, config: Config) -> list[AlertEvent]:
    """Three assets over ~4 hours: pump-1 a warning then a critical incident (vibration, then bearing_temp);
    pump-2 one warning on speed that is still open at the end; pump-3 nothing."""
    stream = (
        scores("pump-1", 300, [(40, 60, 1.5, "vibration"), (150, 190, 5.0, "bearing_temp")], seed=1)
        + scores("pump-2", 300, [(280, 299, 1.6, "speed")], seed=2)
        + scores("pump-3", 300, [], seed=3)
    )
    return populate(db_url, config, sorted(stream, key=lambda s: s.end_ms))


def write_config(path: Path, db_url: str, **alert: Any) -> Path:
    """Write ``config_dict`` as YAML to ``path``."""
    import yaml

    path.write_text(yaml.safe_dump(config_dict(db_url, **alert)))
    return path
