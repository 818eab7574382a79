"""Replay recorded readings into the readings topic (``sensorwatch replay``): a CSV like ``train``'s becomes one Kafka
record per row in the documented message format (``{"asset", "ts" (epoch ms), "values"}``), keyed by the asset, in
time order, as fast as the producer goes or paced at a multiple of real time. For trials, demos and backfilling
history through the pipeline.

``csv_messages`` is pure (a frame and the configuration in, messages and notes out); ``send`` is the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from kafka import KafkaProducer

from pipeline import kafka_io
from pipeline.config import Config, GroupConfig, IngestConfig
from pipeline.csv_format import timestamps_ms
from pipeline.errors import ConfigError, TransientError

Message = tuple[str, dict[str, Any]]  # (asset, payload)
PACE_STEP_S = 0.05  # at most this long between progress updates while pacing


@dataclass
class Prepared:
    """The messages of a CSV, in time order, and what was left out of them (one line each)."""

    messages: list[Message]
    notes: list[str] = field(default_factory=list)


def csv_messages(frame: pd.DataFrame, config: Config, group: GroupConfig | None = None) -> Prepared:
    """The readings of ``frame`` (``ts``, optional ``asset``, one column per sensor) as messages sorted by time then
    asset: per row the values of its asset's group's sensors that are numbers (a missing or non-numeric cell is left
    out of its row, a row with none is left out). Rows without an ``asset`` column are ``group``'s first asset (the
    only group's when None); rows of assets the configuration does not know, or with an empty asset cell, are left
    out. ConfigError for a frame without ``ts`` or without a single usable row."""
    if "ts" not in frame.columns:
        raise ConfigError("replay data needs a 'ts' column (ISO-8601 or epoch ms)")
    if "asset" not in frame.columns and group is None:
        if len(config.groups) > 1:
            raise ConfigError(f"replay data has no 'asset' column: give --group (the config has {len(config.groups)} "
                              "groups)")
        group = config.groups[0]
    notes: list[str] = []
    if "asset" in frame.columns:
        present = frame["asset"].notna().to_numpy()
        assets = np.where(present, frame["asset"].astype(str).to_numpy(dtype=object), "")
    else:
        present = np.ones(len(frame), dtype=bool)
        assets = np.full(len(frame), group.assets[0] if group is not None else "", dtype=object)
    ts = timestamps_ms(frame["ts"])
    if (ts < 0).any():
        notes.append(f"{int((ts < 0).sum())} row(s) with an unreadable ts left out (first: row "
                     f"{int(np.flatnonzero(ts < 0)[0])})")
    if not present.all():
        notes.append(f"{int((~present).sum())} row(s) without an asset left out (first: row "
                     f"{int(np.flatnonzero(~present)[0])})")
    groups = config.asset_groups()
    unknown = sorted(set(assets[present]) - set(groups))
    if unknown:
        notes.append(f"{int(np.isin(assets, unknown).sum())} row(s) of asset(s) not in the configuration left out: "
                     + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    sensors = sorted({s for g in groups.values() for s in g.sensor_names if s in frame.columns})
    extra = [str(c) for c in frame.columns if c not in ("ts", "asset", *sensors)]
    if extra:
        notes.append("column(s) that are no configured sensor left out: " + ", ".join(extra[:8])
                     + (" ..." if len(extra) > 8 else ""))
    values = frame[sensors].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float) if sensors else None
    if values is not None:
        bad = int((frame[sensors].notna().to_numpy() & np.isnan(values)).sum())
        if bad:
            notes.append(f"{bad} value(s) that are not numbers left out")
    rows: list[tuple[int, str, dict[str, Any]]] = []
    for i in np.flatnonzero((ts >= 0) & present & ~np.isin(assets, unknown)):
        asset = str(assets[i])
        mine = groups[asset].sensor_names
        row = {} if values is None else {s: float(v) for s, v in zip(sensors, values[i], strict=True)
                                         if s in mine and np.isfinite(v)}
        if row:
            rows.append((int(ts[i]), asset, row))
    if not rows:
        raise ConfigError("replay data has no row with a readable ts, a configured asset and a sensor value")
    rows.sort(key=lambda r: (r[0], r[1]))
    return Prepared([(a, {"asset": a, "ts": t, "values": v}) for t, a, v in rows], notes)


def ingest_notes(messages: Sequence[Message], ingest: IngestConfig, now_ms: int, speed: float | None = None
                 ) -> list[str]:
    """What the pipeline's input checks (``ingest``) will reject of ``messages`` (time-ordered) when ``send`` starts
    at ``now_ms`` (paced at ``speed``): readings older than ``max_age_s`` when published (``ts_too_old``: a record
    is stamped when it is produced, not with its reading's time) and further ahead of the clock than ``max_future_s``
    (``ts_in_future``), one note each; none when nothing is."""
    if not messages:
        return []
    ts = np.array([payload["ts"] for _, payload in messages], dtype=np.int64)
    published = now_ms + ((ts - ts[0]) / speed if speed is not None else 0)
    notes = []
    if ingest.max_age_s is not None:
        old = int((ts < published - ingest.max_age_s * 1000).sum())
        if old:
            notes.append(f"{old} of {len(ts)} reading(s) are older than ingest.max_age_s ({ingest.max_age_s:g} s) "
                         "when published: the pipeline rejects them as ts_too_old")
    ahead = int((ts > published + ingest.max_future_s * 1000).sum())
    if ahead:
        notes.append(f"{ahead} of {len(ts)} reading(s) are more than ingest.max_future_s ({ingest.max_future_s:g} "
                     "s) ahead of the clock when published: the pipeline rejects them as ts_in_future")
    return notes


def send(producer: KafkaProducer, topic: str, messages: Sequence[Message], *, speed: float | None = None,
         advance: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Produce ``messages`` (in their order) to ``topic`` keyed by asset and wait until the brokers acknowledged all
    of them; returns how many. ``speed``: pace them at that multiple of the time their ``ts`` span (1: real time),
    else as fast as the producer goes. ``advance(n)`` reports progress. TransientError naming the first failure when
    any record was not acknowledged (the others were)."""
    failures: list[BaseException] = []
    started, first_ms = clock(), messages[0][1]["ts"] if messages else 0
    sent = 0
    for asset, payload in messages:
        if speed is not None:
            due = started + (payload["ts"] - first_ms) / 1000 / speed
            while (wait := due - clock()) > 0:
                sleep(min(wait, PACE_STEP_S))
        producer.send(topic, key=asset.encode(), value=kafka_io.encode_reading(payload)).add_errback(failures.append)
        sent += 1
        if advance is not None and (sent % 1000 == 0 or speed is not None):
            advance(1000 if speed is None else 1)
    producer.flush()
    if advance is not None and speed is None:
        advance(sent % 1000)
    if failures:
        raise TransientError(f"{len(failures)} of {sent} record(s) were not acknowledged by the brokers; first: "
                             f"{failures[0]}")
    return sent
