"""Replay recorded readings into the readings topic (``sensorwatch replay``): a CSV like ``train``'s becomes one Kafka
record per row in the documented message format (``{"asset", "ts" (epoch ms), "values"}``), keyed by the asset, in
time order, as fast as the producer goes or paced at a multiple of real time. For trials, demos and backfilling
history through the pipeline.

A CSV in time order is sent as it is read, piece by piece (``plan`` reads it once to count what is left out and what
the pipeline will reject, ``messages_of`` a second time to send it), so its length is not bounded by memory; one that
is not is sorted whole (``csv_messages``). Those are pure (frames and the configuration in, messages and counts out);
``send`` is the I/O.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
class Omitted:
    """What of a CSV (counted over its pieces) is left out of the messages."""

    unreadable_ts: int = 0
    unreadable_first: int | None = None  # the first such row (data row, from 0)
    no_asset: int = 0
    no_asset_first: int | None = None
    unknown: Counter[str] = field(default_factory=Counter)  # rows per asset the configuration does not know
    extra: list[str] = field(default_factory=list)  # columns that are no configured sensor
    not_numbers: int = 0  # cells

    def notes(self) -> list[str]:
        """One line per kind of thing left out."""
        notes = []
        if self.unreadable_ts:
            notes.append(f"{self.unreadable_ts} row(s) with an unreadable ts left out (first: row "
                         f"{self.unreadable_first})")
        if self.no_asset:
            notes.append(f"{self.no_asset} row(s) without an asset left out (first: row {self.no_asset_first})")
        if self.unknown:
            names = sorted(self.unknown)
            notes.append(f"{sum(self.unknown.values())} row(s) of asset(s) not in the configuration left out: "
                         + ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""))
        if self.extra:
            notes.append("column(s) that are no configured sensor left out: " + ", ".join(self.extra[:8])
                         + (" ..." if len(self.extra) > 8 else ""))
        if self.not_numbers:
            notes.append(f"{self.not_numbers} value(s) that are not numbers left out")
        return notes


@dataclass
class Prepared:
    """The messages of a CSV, in time order, and what was left out of them (one line each)."""

    messages: list[Message]
    notes: list[str] = field(default_factory=list)


def csv_messages(frame: pd.DataFrame, config: Config, group: GroupConfig | None = None) -> Prepared:
    """The readings of ``frame`` (``ts``, optional ``asset``, one column per sensor) as messages sorted by time then
    asset (``piece_messages``). ConfigError for a frame without ``ts`` or without a single usable row."""
    omitted = Omitted()
    messages = piece_messages(frame, config, group, omitted)
    if not messages:
        raise ConfigError(NOTHING_TO_SEND)
    return Prepared(messages, omitted.notes())


NOTHING_TO_SEND = "replay data has no row with a readable ts, a configured asset and a sensor value"


def piece_messages(frame: pd.DataFrame, config: Config, group: GroupConfig | None, omitted: Omitted
                   ) -> list[Message]:
    """The readings of ``frame`` (a CSV or a piece of one: ``ts``, optional ``asset``, one column per sensor) as
    messages sorted by time then asset: per row the values of its asset's group's sensors that are numbers (a
    missing or non-numeric cell is left out of its row, a row with none is left out). Rows without an ``asset``
    column are ``group``'s first asset (the only group's when None); rows of assets the configuration does not know,
    or with an empty asset cell, are left out. What is left out is counted in ``omitted``. ConfigError for a frame
    without ``ts``, or without ``asset`` when the configuration has several groups and ``group`` is None."""
    rows = _sendable(frame, config, group, omitted)
    groups = config.asset_groups()
    columns: dict[str, list[int]] = {}  # per asset: the columns of its group's sensors
    out: list[Message] = []
    for start in range(0, len(rows.order), 10_000):  # as Python lists a slice at a time (a whole file's are large)
        chosen = rows.order[start:start + 10_000]
        values = rows.values[chosen]
        for ts, asset, row, ok in zip(rows.ts[chosen].tolist(), map(str, rows.assets[chosen]), values.tolist(),
                                      np.isfinite(values).tolist(), strict=True):
            mine = columns.get(asset)
            if mine is None:
                mine = columns[asset] = [j for j, s in enumerate(rows.sensors) if s in groups[asset].sensor_names]
            out.append((asset, {"asset": asset, "ts": ts,
                                "values": {rows.sensors[j]: row[j] for j in mine if ok[j]}}))
    return out


@dataclass(frozen=True)
class _Sendable:
    """A frame's rows as arrays: ts (epoch ms), asset, the sensor columns' values (NaN: none), and the positions of
    the rows to send in sending order (by time then asset)."""

    ts: np.ndarray
    assets: np.ndarray
    sensors: list[str]
    values: np.ndarray
    order: np.ndarray


def _sendable(frame: pd.DataFrame, config: Config, group: GroupConfig | None, omitted: Omitted) -> _Sendable:
    """``piece_messages`` without building the messages (vectorised: ``plan`` needs only their times)."""
    if "ts" not in frame.columns:
        raise ConfigError("replay data needs a 'ts' column (ISO-8601 or epoch ms)")
    if "asset" not in frame.columns and group is None:
        if len(config.groups) > 1:
            raise ConfigError(f"replay data has no 'asset' column: give --group (the config has {len(config.groups)} "
                              "groups)")
        group = config.groups[0]
    if "asset" in frame.columns:
        present = frame["asset"].notna().to_numpy()
        assets = np.where(present, frame["asset"].astype(str).to_numpy(dtype=object), "")
    else:
        present = np.ones(len(frame), dtype=bool)
        assets = np.full(len(frame), group.assets[0] if group is not None else "", dtype=object)
    ts = timestamps_ms(frame["ts"])
    if (ts < 0).any():
        if omitted.unreadable_first is None:
            omitted.unreadable_first = _row(frame, int(np.flatnonzero(ts < 0)[0]))
        omitted.unreadable_ts += int((ts < 0).sum())
    if not present.all():
        if omitted.no_asset_first is None:
            omitted.no_asset_first = _row(frame, int(np.flatnonzero(~present)[0]))
        omitted.no_asset += int((~present).sum())
    groups = config.asset_groups()
    counts = pd.Series(assets[present]).value_counts()
    unknown = sorted(str(a) for a in counts.index if a not in groups)
    omitted.unknown.update({a: int(counts[a]) for a in unknown})
    sensors = sorted({s for g in groups.values() for s in g.sensor_names if s in frame.columns})
    omitted.extra = [str(c) for c in frame.columns if c not in ("ts", "asset", *sensors)]
    values = (frame[sensors].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float) if sensors
              else np.empty((len(frame), 0)))
    omitted.not_numbers += int((frame[sensors].notna().to_numpy() & np.isnan(values)).sum()) if sensors else 0
    candidate = (ts >= 0) & present & ~np.isin(assets, unknown)
    usable = np.zeros(len(frame), dtype=bool)  # a row needs a number of one of its group's sensors
    finite = np.isfinite(values)
    group_of = pd.Series(assets).map({a: g.name for a, g in groups.items()}).to_numpy()
    for g in config.groups:  # per group, not per asset: a fleet has many assets
        rows = candidate & (group_of == g.name)
        mine = [i for i, s in enumerate(sensors) if s in g.sensor_names]
        usable[rows] = finite[rows][:, mine].any(axis=1)
    keep = np.flatnonzero(usable)
    order = keep[np.lexsort((assets[keep].astype(str), ts[keep]))]
    return _Sendable(ts, assets, sensors, values, order)


def _row(frame: pd.DataFrame, position: int) -> int:
    """The data row (from 0) of the frame's row at ``position``: its index label (a piece of a CSV keeps counting
    the file's rows), or the position when the index is not the rows'."""
    label = frame.index[position]
    return int(label) if isinstance(label, int | np.integer) else position


@dataclass(frozen=True)
class Plan:
    """What replaying a CSV piece by piece would send: every message's ts in sending order (each piece sorted),
    the assets, what is left out, and whether the pieces are in time order (each no older than the pieces before
    it), so that sending them piece by piece sends the whole file in time order; if not, it must be sorted whole."""

    ts: np.ndarray
    assets: frozenset[str]
    omitted: Omitted
    in_order: bool


def plan(pieces: Iterable[pd.DataFrame], config: Config, group: GroupConfig | None = None) -> Plan:
    """Read ``pieces`` (``history.read_readings_pieces``) once without keeping their messages: the ``Plan``.
    ConfigError as ``piece_messages``, and when no row at all can be sent."""
    omitted, times, assets, newest, in_order = Omitted(), [], set(), None, True
    for piece in pieces:
        rows = _sendable(piece, config, group, omitted)
        if not len(rows.order):
            continue
        ts = rows.ts[rows.order]
        in_order = in_order and (newest is None or ts[0] >= newest)
        newest = int(ts[-1]) if newest is None else max(newest, int(ts[-1]))
        times.append(ts)
        assets.update(map(str, rows.assets[rows.order]))
    if not times:
        raise ConfigError(NOTHING_TO_SEND)
    return Plan(np.concatenate(times), frozenset(assets), omitted, in_order)


def messages_of(pieces: Iterable[pd.DataFrame], config: Config, group: GroupConfig | None = None
                ) -> Iterator[Message]:
    """The messages of ``pieces``, piece by piece (each sorted by time then asset), as they are read: in time order
    when their ``plan`` is ``in_order``."""
    omitted = Omitted()
    for piece in pieces:
        yield from piece_messages(piece, config, group, omitted)


def ingest_notes(ts: np.ndarray, ingest: IngestConfig, now_ms: int, speed: float | None = None) -> list[str]:
    """What the pipeline's input checks (``ingest``) will reject of the readings at ``ts`` (time-ordered, as sent)
    when ``send`` starts at ``now_ms`` (paced at ``speed``): readings older than ``max_age_s`` when published
    (``ts_too_old``: a record is stamped when it is produced, not with its reading's time) and further ahead of the
    clock than ``max_future_s`` (``ts_in_future``), one note each; none when nothing is."""
    if not len(ts):
        return []
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


def send(producer: KafkaProducer, topic: str, messages: Iterable[Message], *, speed: float | None = None,
         advance: Callable[[int], None] | None = None, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Produce ``messages`` (in their order, read as they are sent: ``messages_of``) to ``topic`` keyed by asset and
    wait until the brokers acknowledged all of them; returns how many. ``speed``: pace them at that multiple of the
    time their ``ts`` span from the first (1: real time), else as fast as the producer goes. ``advance(n)`` reports
    progress. TransientError naming the first failure when any record was not acknowledged (the others were)."""
    failures: list[BaseException] = []
    started, first_ms = 0.0, None
    sent = 0
    for asset, payload in messages:
        if first_ms is None:  # pacing starts with the first message (read after its piece is)
            started, first_ms = clock(), payload["ts"]
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
