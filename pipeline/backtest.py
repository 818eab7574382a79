"""Backtest: what a model and the configured alert rules would have raised on recorded history, before deploying
them (``sensorwatch backtest``). Pure apart from torch: a history's pieces (or windows) in, judged scores and alerts
out; nothing is written to the database or Kafka.

The history goes through the streaming pipeline's own steps: the windower (``history.FrameWindower``), the forward
pass, score smoothing, drift following and the alert engine (``drift.score_and_judge``), in time order, starting from
no alert state. ``backtest_history`` reads it piece by piece, so its length is bounded by time, not memory. Known
incidents (``read_incidents``) turn the alerts into event-level recall and precision (``evaluation.score_events``: an
incident is caught when an alert of its asset overlaps it); incidents of other assets or outside the history's span
are left out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.detector import Detector
from pipeline.alerting import AlertEngine
from pipeline.config import Config, GroupConfig
from pipeline.csv_format import separator
from pipeline.decode import parse_timestamp
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.errors import ConfigError, InvalidReading
from pipeline.evaluation import EventScores, Span, score_events
from pipeline.history import FrameWindower
from pipeline.report import ReportAlert, ReportData, frame_signals, maintenance_runs
from pipeline.types import AlertRecord, Score, Window

CHUNK = 2000  # windows per forward pass (bounds the pass's memory)
DAY_MS = 86_400_000


@dataclass(frozen=True)
class AssetSummary:
    """One asset's backtest in numbers: its span (from its first window's start to its last window's end), windows,
    windows judged anomalous, alerts by severity, and alerts per day of that span."""

    asset: str
    first_ms: int
    last_ms: int
    windows: int
    anomalous: int
    alerts: dict[str, int]
    alerts_per_day: float


@dataclass(frozen=True)
class Backtest:
    """Every alert in its final state (still ``open`` when the history ended first), in opening order; per asset
    its summary; and the judged scores (per asset in time order) when they were kept."""

    group: str
    model_version: str
    threshold: float
    scores: list[Score]
    alerts: list[AlertRecord]
    assets: list[AssetSummary]


@dataclass
class LeftOut:
    """The rows of a history (counted over its pieces) that a group's backtest left out, and the group's assets
    that had rows."""

    others: Counter[str] = field(default_factory=Counter)  # rows per asset of another group
    unknown: Counter[str] = field(default_factory=Counter)  # rows per asset the configuration does not know
    no_asset: int = 0  # rows without an asset
    seen: set[str] = field(default_factory=set)  # the group's assets with rows

    def notes(self, config: Config) -> list[str]:
        """One line per kind of row left out, naming (some of) the assets: their own group's model judges other
        groups' assets, the pipeline rejects assets the configuration does not know."""
        owners = config.asset_groups()
        notes = []
        if self.others:
            notes.append(f"{sum(self.others.values())} row(s) of other groups' assets left out: "
                         + _listed(sorted(self.others), lambda a: f"{a} ({owners[a].name})"))
        if self.unknown:
            notes.append(f"{sum(self.unknown.values())} row(s) of assets not in the configuration left out: "
                         + _listed(sorted(self.unknown)))
        if self.no_asset:
            notes.append(f"{self.no_asset} row(s) without an asset left out")
        return notes

    def check(self, group: GroupConfig) -> None:
        """ConfigError when no row of ``group``'s assets was in the history."""
        if not self.seen:
            other = sorted({*self.others, *self.unknown})
            raise ConfigError(f"no row of group {group.name!r}'s assets ({_listed(group.assets)}) in the data"
                              + (f", only of {_listed(other)}" if other else ""))


def _listed(names: Sequence[str], what: Callable[[str], str] = str) -> str:
    return ", ".join(map(what, names[:5])) + (" ..." if len(names) > 5 else "")


def group_rows(frame: pd.DataFrame, config: Config, group: GroupConfig, left: LeftOut) -> pd.DataFrame:
    """The rows of ``frame`` (a piece of a history) that the pipeline would judge with ``group``'s model: those of
    its assets, by the ``asset`` column (a frame without one is all the group's first asset's), index kept; the
    others are counted in ``left``."""
    if "asset" not in frame.columns:
        if len(frame):
            left.seen.add(group.assets[0])
        return frame
    present = frame["asset"].notna().to_numpy()
    assets = frame["asset"].astype(str)
    mine = present & assets.isin(group.assets).to_numpy()
    owners = config.asset_groups()
    for asset, n in assets[~mine & present].value_counts().items():
        (left.others if asset in owners else left.unknown)[str(asset)] += int(n)
    left.no_asset += int((~present).sum())
    left.seen.update(assets[mine].unique())
    return frame[mine]


class BacktestRun:
    """A backtest fed windows as a history is read: ``group``'s alert rule, drift following and smoothing judge
    them with ``detector`` as the pipeline does, from no alert state, ``CHUNK`` windows per forward pass. Each
    ``feed`` takes the windows that a piece of the history closed; an asset's windows must come in time order across
    feeds (``FrameWindower`` cuts them so). Between feeds only the alerts, one summary per asset and (with
    ``keep_scores``) the scores are held; ``on_scores`` gets each chunk's judged scores in time order (to write them
    out)."""

    def __init__(self, detector: Detector, group: GroupConfig, *, keep_scores: bool = True,
                 on_scores: Callable[[list[Score]], None] | None = None) -> None:
        self.detector, self.group, self.keep_scores, self.on_scores = detector, group, keep_scores, on_scores
        self._engine, self._drift = AlertEngine([group]), DriftTracker([group])
        self._scores: list[Score] = []
        self._alerts: dict[tuple[str, int], AlertRecord] = {}
        self._tally: dict[str, list[int]] = {}  # per asset: first start, last end, windows, anomalous

    def feed(self, windows: Sequence[Window], advance: Callable[[int], None] | None = None) -> None:
        """Judge ``windows`` (any order among assets) in time order; ``advance(n)`` after each chunk."""
        ordered = sorted(windows, key=lambda w: (w.end_ms, w.asset))
        for start in range(0, len(ordered), CHUNK):
            chunk = ordered[start:start + CHUNK]
            judged, events = score_and_judge(chunk, {self.group.name: self.detector}, self._engine, self._drift)
            for score in judged:
                tally = self._tally.setdefault(score.asset, [score.start_ms, score.end_ms, 0, 0])
                tally[1] = max(tally[1], score.end_ms)
                tally[2] += 1
                tally[3] += score.is_anomaly
            for event in events:
                self._alerts[(event.alert.asset, event.alert.opened_ms)] = event.alert
            if self.keep_scores:
                self._scores += judged
            if self.on_scores is not None:  # judge gives each asset's in turn: written in time order
                self.on_scores(sorted(judged, key=lambda s: (s.end_ms, s.asset)))
            if advance is not None:
                advance(len(chunk))

    def result(self) -> Backtest:
        """The backtest so far."""
        alerts = sorted(self._alerts.values(), key=lambda a: (a.opened_ms, a.asset))
        severities: dict[str, Counter[str]] = {}
        for alert in alerts:
            severities.setdefault(alert.asset, Counter())[alert.severity] += 1
        summaries = []
        for asset, (first, last, windows, anomalous) in sorted(self._tally.items()):
            counted = severities.get(asset, Counter())
            summaries.append(AssetSummary(asset, first, last, windows, anomalous, dict(sorted(counted.items())),
                                          sum(counted.values()) / ((last - first) / DAY_MS)))
        return Backtest(group=self.group.name, model_version=self.detector.version,
                        threshold=self.detector.threshold,
                        scores=sorted(self._scores, key=lambda s: (s.asset, s.end_ms)), alerts=alerts,
                        assets=summaries)


def run_backtest(windows: Sequence[Window], detector: Detector, group: GroupConfig, *,
                 advance: Callable[[int], None] | None = None) -> Backtest:
    """``BacktestRun`` over ``windows`` (one group's, any order) at once, scores kept."""
    run = BacktestRun(detector, group)
    run.feed(windows, advance)
    return run.result()


@dataclass(frozen=True)
class History:
    """The backtest of a history read in pieces; notes (one line each) on what was left out of it; and per asset
    its raw signals (``report.frame_signals``), when asked for."""

    result: Backtest
    notes: list[str]
    signals: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]


def backtest_history(pieces: Iterable[pd.DataFrame], config: Config, group: GroupConfig, detector: Detector, *,
                     keep_scores: bool = False, signals: bool = False,
                     on_scores: Callable[[list[Score]], None] | None = None,
                     advance: Callable[[int], None] | None = None) -> History:
    """Backtest ``group`` on a history of readings (``history.read_readings_pieces``: ``ts``, optional ``asset``, one
    column per sensor), piece by piece: its rows of the group's assets (``group_rows``) through the pipeline's
    windower (``FrameWindower``, closing the last windows as the pipeline does once the assets fall silent) into a
    ``BacktestRun``. Memory: the pieces one at a time, the windows still open, the alerts, the scores only with
    ``keep_scores``, and with ``signals`` the raw values of the group's sensors (16 bytes a value). ``advance(n)``
    after each piece of ``n`` rows. ConfigError when no row is of the group's assets or the data is unusable
    (``FrameWindower``), OutOfOrder when an asset's rows go back in time from one piece to the next."""
    left = LeftOut()
    windower = FrameWindower(group, what="backtest data", to_the_end=True)
    run = BacktestRun(detector, group, keep_scores=keep_scores, on_scores=on_scores)
    parts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {}
    for piece in pieces:
        rows = group_rows(piece, config, group, left)
        run.feed(windower.add(rows))
        if signals:
            by_asset = (rows.groupby(rows["asset"].astype(str), sort=False) if "asset" in rows.columns
                        else [(group.assets[0], rows)])
            for asset, part in by_asset:
                for sensor, series in frame_signals(part, str(asset), group.sensor_names, 0, 2**62).items():
                    parts.setdefault(str(asset), {}).setdefault(sensor, []).append(series)
        if advance is not None:
            advance(len(piece))
    left.check(group)
    run.feed(windower.close())
    result = run.result()
    notes = left.notes(config)
    windowless = sorted(left.seen - {a.asset for a in result.assets})
    if windowless and result.assets:  # with none, there is no backtest to speak of
        notes.append(f"{len(windowless)} asset(s) with rows but no complete window (too few readings, or gaps longer "
                     f"than window.max_gap): {_listed(windowless)}")
    joined = {asset: {sensor: (np.concatenate([ts for ts, _ in series]), np.concatenate([v for _, v in series]))
                      for sensor, series in sensors.items()} for asset, sensors in parts.items()}
    return History(result, notes, joined)


def alert_spans(alerts: Sequence[AlertRecord]) -> list[Span]:
    """Each alert as the span it covered: from its opening to its close (or last window, while open)."""
    return [Span(a.asset, a.opened_ms, a.closed_ms if a.closed_ms is not None else a.last_seen_ms, a.severity)
            for a in alerts]


def covered_incidents(result: Backtest, incidents: Sequence[Span]) -> list[Span]:
    """The incidents the backtest could have caught: of its assets, overlapping the span of that asset's windows
    (an incident outside the history is none of its misses)."""
    spans = {s.asset: (s.first_ms, s.last_ms) for s in result.assets}
    return [i for i in incidents
            if i.asset in spans and i.start_ms < spans[i.asset][1] and spans[i.asset][0] < i.end_ms]


def score_incidents(result: Backtest, incidents: Sequence[Span]) -> EventScores:
    """Recall over the ``covered_incidents`` and precision over the backtest's alerts (``score_events``)."""
    return score_events(covered_incidents(result, incidents), alert_spans(result.alerts))


def _ms(value: Any, where: str) -> int:
    """An incident's time, read as the message format's ``ts`` (``decode.parse_timestamp``: ISO-8601, UTC unless it
    gives an offset, or epoch ms), epoch ms also as digits (a CSV cell)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: a time is ISO-8601 text or epoch ms, not {value!r}")
    try:
        return parse_timestamp(value)
    except InvalidReading as exc:
        raise ConfigError(f"{where}: unreadable time {value!r} ({exc.detail})") from None


def read_incidents(path: Path) -> list[Span]:
    """Known incidents: a JSON list of objects, or a CSV (separator sniffed, as for readings), with ``asset``,
    ``start`` and ``end`` (ISO-8601, UTC unless an offset is given, or epoch ms; ``end`` exclusive) and an optional
    ``label`` or ``kind`` (``sensorwatch simulate``'s ground truth is such a file). ConfigError naming the entry (or
    the CSV's columns) and the problem for anything else."""
    columns: list[str] | None = None  # a CSV's
    rows: Any
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, sep=separator(path), dtype=str, keep_default_na=False)
            columns, rows = list(map(str, frame.columns)), frame.to_dict("records")
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read incidents {path}: {exc}") from None
    absent = [k for k in ("asset", "start", "end") if k not in columns] if columns is not None else []
    if absent:
        raise ConfigError(f"incidents {path} has no column {', '.join(absent)} (its columns: "
                          f"{', '.join(columns[:8])})")
    if not isinstance(rows, list):
        raise ConfigError(f"incidents {path}: expected a list of objects with asset, start and end")
    spans = []
    for i, row in enumerate(rows):
        where = f"incidents {path.name}[{i}]"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected an object with asset, start and end")
        missing = [k for k in ("asset", "start", "end") if row.get(k) is None or row[k] == ""]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(row["asset"], str):
            raise ConfigError(f"{where}: asset is a name (text), not {row['asset']!r}")
        start, end = _ms(row["start"], where), _ms(row["end"], where)
        if end <= start:
            raise ConfigError(f"{where}: end {row['end']} is not after start {row['start']}")
        label = row.get("label") or row.get("kind") or ""
        spans.append(Span(row["asset"], start, end, label if isinstance(label, str) else str(label)))
    return spans


def reports(result: Backtest, group: GroupConfig, signals: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
            source: str = "") -> Iterator[ReportData]:
    """The HTML report (``report.render_html``) of each asset of a backtest with its scores kept: its scores and
    alerts (numbered in opening order across the backtest) over its span, with its raw signals from ``signals``
    (``History.signals``; none when empty) clipped to that span, named ``source``."""
    numbered: dict[str, list[ReportAlert]] = {}
    for i, a in enumerate(result.alerts, start=1):
        numbered.setdefault(a.asset, []).append(ReportAlert(
            id=i, severity=a.severity, status=a.status, start_ms=a.opened_ms,
            end_ms=a.closed_ms if a.closed_ms is not None else a.last_seen_ms, peak_score=a.peak_score,
            threshold=a.threshold, window_count=a.window_count, top_sensors=list(a.top_sensors),
            off_training=dict(a.off_training or {})))
    for asset, grouped in groupby(result.scores, key=lambda s: s.asset):
        scores = list(grouped)
        start_ms, end_ms = scores[0].start_ms, scores[-1].end_ms
        clipped = {}
        for sensor, (ts, values) in signals.get(asset, {}).items():
            keep = (ts >= start_ms) & (ts <= end_ms)
            if np.isfinite(values[keep]).any():
                clipped[sensor] = (ts[keep], values[keep])
        yield ReportData(asset=asset, group=group.name, sensors=group.sensor_names,
                         tiers=[t.name for t in group.alert.tiers], exit_level=group.alert.exit_level,
                         start_ms=start_ms, end_ms=end_ms, scores=scores, alerts=numbered.get(asset, []),
                         maintenance=maintenance_runs(group.alert, asset, scores), signals=clipped,
                         signal_source=source if signals else "")
