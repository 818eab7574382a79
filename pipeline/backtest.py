"""Backtest: what a model and the configured alert rules would have raised on recorded history, before deploying
them (``sensorwatch backtest``). Pure apart from torch: windows in, judged scores and alerts out; nothing is written
to the database or Kafka.

The history goes through the streaming pipeline's own steps: the windower (``train.windows_from_frame``), the
forward pass, score smoothing, drift following and the alert engine (``drift.score_and_judge``), in time order,
starting from no alert state. Known incidents (``read_incidents``) turn the alerts into event-level recall and
precision (``evaluation.score_events``: an incident is caught when an alert of its asset overlaps it); incidents of
other assets or outside the history's span are left out.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from models.detector import Detector
from pipeline.alerting import AlertEngine
from pipeline.config import Config, GroupConfig
from pipeline.csv_format import separator
from pipeline.decode import parse_timestamp
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.errors import ConfigError, InvalidReading
from pipeline.evaluation import EventScores, Span, score_events
from pipeline.report import ReportAlert, ReportData, frame_signals, maintenance_runs
from pipeline.types import AlertRecord, Score, Window

CHUNK = 2000  # windows per forward pass (bounds the pass's memory; the history's windows and scores are all held)
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Backtest:
    """The judged scores (per asset in time order) and every alert in its final state (still ``open`` when the
    history ended first), in opening order."""

    group: str
    model_version: str
    threshold: float
    scores: list[Score]
    alerts: list[AlertRecord]


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


def group_rows(frame: pd.DataFrame, config: Config, group: GroupConfig) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``frame`` that the pipeline would judge with ``group``'s model (those of its assets, by the
    ``asset`` column; a frame without one is all the group's first asset's), index kept, and a note (one line) per
    kind of row left out: assets of other groups (their own group's model judges them), assets the configuration
    does not know (the pipeline rejects them) and rows without an asset. ConfigError when no row is left."""
    if "asset" not in frame.columns:
        return frame, []
    present = frame["asset"].notna().to_numpy()
    assets = frame["asset"].astype(str)
    mine = present & assets.isin(group.assets).to_numpy()
    owners = config.asset_groups()
    counts = assets[~mine & present].value_counts()
    others = sorted(a for a in counts.index if a in owners)
    unknown = sorted(a for a in counts.index if a not in owners)

    def listed(names: list[str], what: Callable[[str], str] = str) -> str:
        return ", ".join(map(what, names[:5])) + (" ..." if len(names) > 5 else "")

    notes = []
    if others:
        notes.append(f"{int(counts[others].sum())} row(s) of other groups' assets left out: "
                     + listed(others, lambda a: f"{a} ({owners[a].name})"))
    if unknown:
        notes.append(f"{int(counts[unknown].sum())} row(s) of assets not in the configuration left out: "
                     + listed(unknown))
    if not present.all():
        notes.append(f"{int((~present).sum())} row(s) without an asset left out")
    if not mine.any():
        raise ConfigError(f"no row of group {group.name!r}'s assets ({listed(group.assets)}) in the data"
                          + (f", only of {listed(sorted(counts.index))}" if len(counts) else ""))
    return frame[mine], notes


def run_backtest(windows: Sequence[Window], detector: Detector, group: GroupConfig, *,
                 advance: Callable[[int], None] | None = None) -> Backtest:
    """Judge ``windows`` (one group's, any order) with ``detector`` and ``group``'s alert rule, drift following and
    smoothing as the pipeline does, from no alert state, ``CHUNK`` windows per forward pass in time order;
    ``advance(n)`` is called after each chunk (a progress bar). An alert's final state is its last event's."""
    ordered = sorted(windows, key=lambda w: (w.end_ms, w.asset))
    engine, drift = AlertEngine([group]), DriftTracker([group])
    scores: list[Score] = []
    alerts: dict[tuple[str, int], AlertRecord] = {}
    for start in range(0, len(ordered), CHUNK):
        chunk = ordered[start:start + CHUNK]
        judged, events = score_and_judge(chunk, {group.name: detector}, engine, drift)
        scores += judged
        for event in events:
            alerts[(event.alert.asset, event.alert.opened_ms)] = event.alert
        if advance is not None:
            advance(len(chunk))
    scores.sort(key=lambda s: (s.asset, s.end_ms))
    return Backtest(group=group.name, model_version=detector.version, threshold=detector.threshold, scores=scores,
                    alerts=sorted(alerts.values(), key=lambda a: (a.opened_ms, a.asset)))


def summarize(result: Backtest) -> list[AssetSummary]:
    """Per asset (by name): windows, anomalous windows, alerts by severity and alerts per day of its span."""
    spans: dict[str, list[Score]] = {}
    for score in result.scores:
        spans.setdefault(score.asset, []).append(score)
    out = []
    for asset, scores in sorted(spans.items()):
        first, last = scores[0].start_ms, scores[-1].end_ms
        severities = Counter(a.severity for a in result.alerts if a.asset == asset)
        days = (last - first) / DAY_MS
        out.append(AssetSummary(asset, first, last, len(scores), sum(s.is_anomaly for s in scores),
                                dict(sorted(severities.items())),
                                sum(severities.values()) / days))
    return out


def alert_spans(alerts: Sequence[AlertRecord]) -> list[Span]:
    """Each alert as the span it covered: from its opening to its close (or last window, while open)."""
    return [Span(a.asset, a.opened_ms, a.closed_ms if a.closed_ms is not None else a.last_seen_ms, a.severity)
            for a in alerts]


def covered_incidents(result: Backtest, incidents: Sequence[Span]) -> list[Span]:
    """The incidents the backtest could have caught: of its assets, overlapping the span of that asset's windows
    (an incident outside the history is none of its misses)."""
    spans = {s.asset: (s.first_ms, s.last_ms) for s in summarize(result)}
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


def report_data(result: Backtest, group: GroupConfig, asset: str, readings: pd.DataFrame | None = None,
                source: str = "") -> ReportData:
    """The HTML report of one asset's backtest (``report.render_html``): its scores and alerts (numbered in opening
    order across the backtest) over its span, with its raw signals from ``readings`` (the backtested table, read
    once for every asset's report; ``report.frame_signals``), named ``source``."""
    scores = [s for s in result.scores if s.asset == asset]
    if not scores:
        raise ValueError(f"the backtest has no windows of asset {asset!r}")
    numbered = [(i, a) for i, a in enumerate(result.alerts, start=1) if a.asset == asset]
    alerts = [ReportAlert(id=i, severity=a.severity, status=a.status, start_ms=a.opened_ms,
                          end_ms=a.closed_ms if a.closed_ms is not None else a.last_seen_ms, peak_score=a.peak_score,
                          threshold=a.threshold, window_count=a.window_count, top_sensors=list(a.top_sensors),
                          off_training=dict(a.off_training or {})) for i, a in numbered]
    start_ms, end_ms = scores[0].start_ms, scores[-1].end_ms
    signals = frame_signals(readings, asset, group.sensor_names, start_ms, end_ms) if readings is not None else {}
    return ReportData(asset=asset, group=group.name, sensors=group.sensor_names,
                      tiers=[t.name for t in group.alert.tiers], exit_level=group.alert.exit_level,
                      start_ms=start_ms, end_ms=end_ms, scores=scores, alerts=alerts,
                      maintenance=maintenance_runs(group.alert, asset, scores), signals=signals,
                      signal_source=source if readings is not None else "")
