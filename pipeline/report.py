"""A self-contained HTML report of one asset over a time span: inline SVG plots, no scripts, no external files.

What it shows (raw readings are not stored in the database, so the signals come from the window scores):
- the window score against its threshold (and the exit level when hysteresis is configured) over time;
- each sensor's contribution to the error (``window_scores.sensor_errors``), one small plot per sensor;
- optionally each sensor's raw signal, from a CSV of readings (``ts``, optional ``asset``, one column per sensor);
- every alert in the span, shaded on every plot (colour by severity, labelled ``#id``) and listed with its top sensors
  and their share of the error; maintenance windows shaded grey.

``load_report_data`` reads the database (and the CSV); ``render_html`` is pure.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.orm import Session

from pipeline.alert_format import duration_text, off_training_text
from pipeline.alerting import in_maintenance
from pipeline.config import AlertConfig, GroupConfig
from pipeline.csv_format import separator, timestamps_ms
from pipeline.errors import ConfigError
from pipeline.store import repo
from pipeline.types import Score, datetime_to_ms, ms_to_datetime

WIDTH = 1000
MARGIN = (64, 16, 22, 28)  # left, right, top, bottom
_MAX_POINTS = 1600
_TIME_STEPS_S = (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800, 2592000)
_SEVERITY_COLOURS = ("#f2a900", "#e8681a", "#d62728", "#9b1d5a", "#5c0a3c")
_SENSOR_COLOUR = "#1f77b4"
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


@dataclass(frozen=True)
class ReportAlert:
    """An alert as the report shows it; ``end_ms`` is the close time, or the last window seen while open."""

    id: int
    severity: str
    status: str
    start_ms: int
    end_ms: int
    peak_score: float
    threshold: float
    window_count: int
    top_sensors: list[dict[str, Any]]
    acknowledged_by: str | None = None
    ack_comment: str | None = None
    off_training: dict[str, float] | None = None  # sensors far outside their training data (signed, training std)


@dataclass(frozen=True)
class ReportData:
    """Everything the report draws, for one asset and ``[start_ms, end_ms]``."""

    asset: str
    group: str
    sensors: list[str]
    tiers: list[str]
    exit_level: float
    start_ms: int
    end_ms: int
    scores: list[Score]
    alerts: list[ReportAlert]
    maintenance: list[tuple[int, int]] = field(default_factory=list)
    signals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # sensor -> (ts_ms, values)
    signal_source: str = ""


def read_signals(path: Path, asset: str, sensors: Sequence[str], start_ms: int, end_ms: int
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw readings of ``asset`` in ``[start_ms, end_ms]`` from a CSV (asset ids read as text; see
    ``frame_signals``). ConfigError if the file cannot be read or has no ``ts``."""
    try:
        frame = pd.read_csv(path, sep=separator(path), dtype={"asset": str})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read readings CSV {path}: {exc}") from None
    if "ts" not in frame.columns:
        raise ConfigError(f"readings CSV {path} needs a 'ts' column")
    return frame_signals(frame, asset, sensors, start_ms, end_ms)


def frame_signals(frame: pd.DataFrame, asset: str, sensors: Sequence[str], start_ms: int, end_ms: int
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw readings of ``asset`` in ``[start_ms, end_ms]`` from a table of readings with a ``ts`` column (ISO-8601 or
    epoch ms; rows without an ``asset`` column belong to every asset), for the sensors with at least one number
    there (empty when it has none in the range); rows whose ``ts`` cannot be read are left out, as training and
    backtests leave them out."""
    if "asset" in frame.columns:
        frame = frame[frame["asset"].astype(str) == asset]
    ts_ms = timestamps_ms(frame["ts"])
    keep = (ts_ms >= 0) & (ts_ms >= start_ms) & (ts_ms <= end_ms)
    order = np.argsort(ts_ms[keep], kind="stable")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sensor in sensors:
        if sensor in frame.columns:
            values = pd.to_numeric(frame[sensor], errors="coerce").to_numpy(dtype=float)[keep][order]
            if np.isfinite(values).any():
                out[sensor] = (ts_ms[keep][order], values)
    return out


def maintenance_runs(alert: AlertConfig, asset: str, scores: Sequence[Score]) -> list[tuple[int, int]]:
    """Spans covered by consecutive scored windows that overlap a maintenance window."""
    runs: list[tuple[int, int]] = []
    for s in scores:
        if in_maintenance(alert, asset, s.start_ms, s.end_ms):
            if runs and s.start_ms <= runs[-1][1]:
                runs[-1] = (runs[-1][0], s.end_ms)
            else:
                runs.append((s.start_ms, s.end_ms))
    return runs


def load_report_data(*, session: Session, group: GroupConfig | None, asset: str, start: datetime, end: datetime,
                     csv_path: Path | None = None, groups: Sequence[GroupConfig] = ()) -> ReportData:
    """Read the scores and alerts of ``asset`` in ``[start, end]`` (and its raw signals from ``csv_path``).

    ``group``: the asset's group in the configuration, or None for an asset taken out of it, reported with the
    group of its latest stored window in the span (none there: of its latest stored window): that group's settings
    where it is among ``groups`` (the configured ones), else the sensors of its windows in the span, the default
    alert tiers and no maintenance windows. ConfigError when such an asset has no stored window."""
    scores = [repo.score_of(row) for row in repo.scores_between(session=session, asset=asset, start=start, end=end)]
    if group is None:
        latest = scores[-1] if scores else repo.latest_score(session=session, asset=asset)
        if latest is None:
            raise ConfigError(f"asset {asset!r} is in no group of the configuration and has no stored window scores")
        name = latest.group
        group = next((g for g in groups if g.name == name), None)
        # every sensor with errors stored in the span, the latest window's first (a group changed: none left out)
        sensors = list(dict.fromkeys([*latest.sensor_errors, *(k for s in scores for k in s.sensor_errors)]))
        alert = AlertConfig()
    if group is not None:
        name, sensors, alert = group.name, group.sensor_names, group.alert
    rows = repo.list_alerts(session=session, asset=asset, since=start, until=end, limit=None)
    alerts = [
        ReportAlert(
            id=r.id, severity=r.severity, status=r.status, start_ms=datetime_to_ms(r.opened_at),
            end_ms=datetime_to_ms(r.closed_at or r.last_seen_at), peak_score=r.peak_score, threshold=r.threshold,
            window_count=r.window_count, top_sensors=list(r.top_sensors), acknowledged_by=r.acknowledged_by,
            ack_comment=r.ack_comment, off_training=dict(r.off_training or {}),
        )
        for r in sorted(rows, key=lambda r: (r.opened_at, r.id))
    ]
    start_ms, end_ms = datetime_to_ms(start), datetime_to_ms(end)
    signals = read_signals(csv_path, asset, sensors, start_ms, end_ms) if csv_path else {}
    return ReportData(
        asset=asset, group=name, sensors=sensors, tiers=[t.name for t in alert.tiers],
        exit_level=alert.exit_level, start_ms=start_ms, end_ms=end_ms, scores=scores, alerts=alerts,
        maintenance=maintenance_runs(alert, asset, scores), signals=signals,
        signal_source=csv_path.name if csv_path else "",
    )


# -- SVG ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One line of a plot: ``ys`` over ``xs`` (epoch ms, or any number with ``svg_plot``'s ``x_ticks``)."""

    name: str
    xs: np.ndarray
    ys: np.ndarray
    colour: str
    dash: str = ""
    width: float = 1.4


@dataclass(frozen=True)
class Shade:
    """A shaded span of a plot, ``[start_ms, end_ms]``, with a CSS class, an optional label and a tooltip."""

    start_ms: int
    end_ms: int
    colour: str
    css: str
    label: str
    tooltip: str
    attrs: dict[str, str] = field(default_factory=dict)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _iso(ms: int) -> str:
    return ms_to_datetime(ms).strftime("%Y-%m-%dT%H:%M:%SZ")


def _downsample(xs: np.ndarray, ys: np.ndarray, limit: int = _MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` points: per bucket its minimum and maximum, in time order (keeps spikes visible)."""
    if len(xs) <= limit:
        return xs, ys
    keep: list[int] = []
    for bucket in np.array_split(np.arange(len(xs)), limit // 2):
        values = ys[bucket]
        if np.all(np.isnan(values)):
            continue
        lo, hi = bucket[int(np.nanargmin(values))], bucket[int(np.nanargmax(values))]
        keep.extend(sorted({int(lo), int(hi)}))
    idx = np.array(keep, dtype=int)
    return xs[idx], ys[idx]


def _nice(value: float) -> float:
    exponent = math.floor(math.log10(value))
    fraction = value / 10**exponent
    return (1 if fraction <= 1 else 2 if fraction <= 2 else 5 if fraction <= 5 else 10) * 10**exponent


def _time_ticks(lo: int, hi: int) -> list[tuple[int, str]]:
    span_s = max((hi - lo) / 1000, 1)
    step_s = next((s for s in _TIME_STEPS_S if span_s / s <= 8), _TIME_STEPS_S[-1])
    step = step_s * 1000
    first = math.ceil(lo / step) * step
    fmt = "%H:%M" if span_s <= 86400 else "%m-%d %H:%M" if step_s < 86400 else "%Y-%m-%d"
    return [(t, ms_to_datetime(t).strftime(fmt)) for t in range(first, hi + 1, step)]


class _Axes:
    """Maps times and values to pixels for one plot."""

    def __init__(self, x_range: tuple[int, int], y_range: tuple[float, float], height: int, log: bool) -> None:
        self.lo, self.hi = x_range
        self.log = log
        ylo, yhi = y_range
        if log:
            ylo, yhi = math.log10(ylo), math.log10(yhi)
        self.ylo, self.yhi = ylo, yhi if yhi > ylo else ylo + 1
        self.left, self.right, self.top, self.bottom = MARGIN[0], WIDTH - MARGIN[1], MARGIN[2], height - MARGIN[3]

    def x(self, ms: float) -> float:
        return self.left + (ms - self.lo) / max(self.hi - self.lo, 1) * (self.right - self.left)

    def y(self, value: float) -> float:
        v = math.log10(max(value, 10**self.ylo)) if self.log else value
        v = min(max(v, self.ylo), self.yhi)
        return self.bottom - (v - self.ylo) / (self.yhi - self.ylo) * (self.bottom - self.top)

    def y_ticks(self) -> list[tuple[float, str]]:
        if self.log:
            return [(10.0**e, f"{10.0**e:g}") for e in range(math.ceil(self.ylo), math.floor(self.yhi) + 1)]
        step = _nice((self.yhi - self.ylo) / 4)
        first = math.ceil(self.ylo / step) * step
        return [(first + i * step, f"{first + i * step:.3g}") for i in range(int((self.yhi - first) / step) + 1)]


def _polylines(axes: _Axes, series: Series) -> list[str]:
    """The series as polylines, broken where the data has a gap (more than 3x the usual spacing)."""
    finite = np.isfinite(series.ys)
    xs, ys = _downsample(series.xs[finite], series.ys[finite])
    if len(xs) == 0:
        return []
    steps = np.diff(xs)
    gap = 3 * float(np.median(steps)) if len(steps) else math.inf
    pieces: list[list[str]] = [[]]
    for i, (t, v) in enumerate(zip(xs, ys, strict=True)):
        if i and t - xs[i - 1] > gap:
            pieces.append([])
        pieces[-1].append(f"{axes.x(float(t)):.1f},{axes.y(float(v)):.1f}")
    dash = f' stroke-dasharray="{series.dash}"' if series.dash else ""
    return [f'<polyline class="series" data-series="{_esc(series.name)}" fill="none" stroke="{series.colour}" '
            f'stroke-width="{series.width}"{dash} points="{" ".join(p)}"/>' for p in pieces if p]


def svg_plot(*, plot_id: str, title: str, x_range: tuple[int, int], series: Sequence[Series],
             shades: Sequence[Shade] = (), height: int = 130, log: bool = False, y_min: float | None = 0.0,
             x_ticks: Callable[[int, int], list[tuple[int, str]]] | None = None) -> str:
    """One time-series plot as an inline ``<svg>`` (``data-plot`` = ``plot_id``) with shaded spans. The x axis is
    epoch ms with time labels, unless ``x_ticks`` (``(lo, hi) -> [(x, label)]``) labels it otherwise."""
    values = np.concatenate([s.ys[np.isfinite(s.ys)] for s in series]) if series else np.array([])
    if log:
        positive = values[values > 0]
        y_range = (float(positive.min()), float(positive.max())) if len(positive) else (0.1, 1.0)
    else:
        top = float(values.max()) if len(values) else 1.0
        low = float(values.min()) if len(values) else 0.0
        if y_min is not None:
            low = min(low, y_min)
        pad = (top - low) * 0.05 or abs(top) * 0.05 or 1.0
        y_range = (low if y_min is not None else low - pad, top + pad)
    axes = _Axes(x_range, y_range, height, log)
    out = [f'<svg class="plot" data-plot="{_esc(plot_id)}" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
           f'height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{_esc(title)}">',
           f'<title>{_esc(title)}</title>',
           f'<rect x="{axes.left}" y="{axes.top}" width="{axes.right - axes.left}" height="{axes.bottom - axes.top}" '
           'fill="#fff" stroke="#bbb"/>']
    for shade in shades:
        if shade.end_ms < axes.lo or shade.start_ms > axes.hi:
            continue
        x0, x1 = axes.x(max(shade.start_ms, axes.lo)), axes.x(min(shade.end_ms, axes.hi))
        extra = "".join(f' {k}="{_esc(v)}"' for k, v in shade.attrs.items())
        out.append(f'<rect class="{shade.css}"{extra} data-start="{_iso(shade.start_ms)}" '
                   f'data-end="{_iso(shade.end_ms)}" x="{x0:.1f}" y="{axes.top}" width="{max(x1 - x0, 1.5):.1f}" '
                   f'height="{axes.bottom - axes.top}" fill="{shade.colour}" fill-opacity="0.22">'
                   f'<title>{_esc(shade.tooltip)}</title></rect>')
        if shade.label:
            out.append(f'<text class="shade-label" x="{x0 + 2:.1f}" y="{axes.top + 11}" font-size="10" fill="#333" '
                       f'stroke="#fff" stroke-width="3" paint-order="stroke">{_esc(shade.label)}</text>')
    for value, label in axes.y_ticks():
        y = axes.y(value)
        out.append(f'<line x1="{axes.left}" x2="{axes.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{axes.left - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{_esc(label)}</text>')
    for t, label in (x_ticks or _time_ticks)(*x_range):
        x = axes.x(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axes.bottom}" y2="{axes.bottom + 4}" stroke="#888"/>'
                   f'<text x="{x:.1f}" y="{axes.bottom + 15}" font-size="10" text-anchor="middle">{_esc(label)}</text>')
    for s in series:
        out.extend(_polylines(axes, s))
    out.append(f'<text x="{axes.left + 4}" y="{axes.top - 6}" font-size="12" font-weight="bold">{_esc(title)}</text>')
    out.append("</svg>")
    return "\n".join(out)


# -- the page -------------------------------------------------------------------------------------------------------
def _severity_colour(severity: str, tiers: Sequence[str]) -> str:
    if severity not in tiers:
        return _SEVERITY_COLOURS[-1]
    rank, last = tiers.index(severity), max(len(tiers) - 1, 1)
    return _SEVERITY_COLOURS[round(rank / last * 2)] if len(tiers) <= 3 else _SEVERITY_COLOURS[min(rank, 4)]


def _shades(data: ReportData, sensor: str | None = None) -> list[Shade]:
    shades = [Shade(a, b, "#888", "maintenance", "", "maintenance") for a, b in data.maintenance]
    for alert in data.alerts:
        share = next((float(t["share"]) for t in alert.top_sensors if t.get("sensor") == sensor), None)
        label = f"#{alert.id}" + (f" {share:.0%}" if share is not None else "")
        if sensor is not None and share is None:
            label = ""
        tip = (f"alert #{alert.id} {alert.severity} {alert.status}: {_iso(alert.start_ms)} to {_iso(alert.end_ms)}, "
               f"peak {alert.peak_score:.4g} ({alert.peak_score / alert.threshold:.1f}x threshold)")
        shades.append(Shade(alert.start_ms, alert.end_ms, _severity_colour(alert.severity, data.tiers),
                             f"alert-span severity-{alert.severity}", label, tip,
                             {"data-alert-id": str(alert.id), "data-severity": alert.severity}))
    return shades


def _alert_table(data: ReportData) -> str:
    if not data.alerts:
        return '<p class="none">No alerts in this span.</p>'
    rows = []
    for a in data.alerts:
        bars = "".join(
            f'<div class="bar"><span class="name">{_esc(t["sensor"])}</span><span class="track">'
            f'<span class="fill" style="width:{float(t["share"]) * 100:.1f}%"></span></span>'
            f'<span class="pct">{float(t["share"]):.0%}</span></div>'
            for t in a.top_sensors
        )
        if a.off_training:
            bars += f'<div class="far">far outside training: {_esc(off_training_text(a.off_training))}</div>'
        ack = f"{_esc(a.acknowledged_by)}: {_esc(a.ack_comment or '')}" if a.acknowledged_by else ""
        colour = _severity_colour(a.severity, data.tiers)
        rows.append(
            f'<tr id="alert-{a.id}" class="alert-row" data-alert-id="{a.id}"><td>#{a.id}</td>'
            f'<td><span class="badge" style="background:{colour}">{_esc(a.severity)}</span></td>'
            f"<td>{_esc(a.status)}</td><td>{_iso(a.start_ms)}</td><td>{_iso(a.end_ms)}</td>"
            f"<td>{duration_text((a.end_ms - a.start_ms) / 1000)}</td><td>{a.peak_score:.4g} "
            f"({a.peak_score / a.threshold:.1f}x)</td><td>{a.window_count}</td>"
            f'<td class="sensors">{bars}</td><td>{ack}</td></tr>'
        )
    head = ("<tr><th>alert</th><th>severity</th><th>status</th><th>opened (UTC)</th><th>closed / last seen</th>"
            "<th>duration</th><th>peak score</th><th>windows</th><th>top sensors (share of error)</th>"
            "<th>acknowledged</th></tr>")
    return f'<table class="alerts">{head}{"".join(rows)}</table>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1040px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px}svg.plot{display:block;margin:6px 0}
table.alerts{border-collapse:collapse;font-size:12px;width:100%}
table.alerts td,table.alerts th{border-bottom:1px solid #eee;padding:4px 6px;text-align:left;vertical-align:top}
.badge{color:#fff;border-radius:3px;padding:1px 6px}.bar{display:flex;align-items:center;gap:4px;margin:1px 0}
.bar .name{width:110px;overflow:hidden}.bar .track{width:120px;height:8px;background:#eee;display:inline-block}
.bar .fill{height:8px;background:#1f77b4;display:block}.legend span{margin-right:14px}.none{color:#777}
.far{color:#b35900;font-size:11px;margin-top:2px}
"""


def _drift_plot(data: ReportData, ts: np.ndarray, x_range: tuple[int, int]) -> str:
    """The followed drift offsets of the sensors that moved most (one line each, at most one per palette colour),
    with a legend naming them."""
    values = {sensor: np.array([(s.drift_offset or {}).get(sensor, np.nan) for s in data.scores], dtype=float)
              for sensor in data.sensors}
    size = {sensor: float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0 for sensor, v in values.items()}
    shown = sorted(data.sensors, key=lambda sensor: -size[sensor])[: len(_PALETTE)]
    series = [Series(sensor, ts, values[sensor], colour) for sensor, colour in zip(shown, _PALETTE, strict=False)]
    legend = "".join(f'<span><span class="badge" style="background:{line.colour}">{_esc(line.name)}</span> '
                     f"up to {size[line.name]:.2f}</span>" for line in series)
    more = len(data.sensors) - len(shown)
    note = f"<span>{more} sensor(s) with smaller offsets not drawn</span>" if more > 0 else ""
    return ('<h2 id="drift">Drift offsets</h2>\n'
            + svg_plot(plot_id="drift-offsets", title="followed residual offsets per sensor (standard deviations; "
                       "errors are taken relative to them)", x_range=x_range, series=series, shades=_shades(data),
                       y_min=None)
            + f'\n<p class="legend">{legend}{note}</p>')


def render_html(data: ReportData, *, generated_at: datetime | None = None) -> str:
    """The whole report as one HTML document (inline CSS and SVG only)."""
    x_range = (data.start_ms, data.end_ms)
    ts = np.array([s.end_ms for s in data.scores], dtype=np.int64)
    parts: list[str] = []
    if data.scores:
        scores = np.array([s.score for s in data.scores])
        thresholds = np.array([s.threshold for s in data.scores])
        ratio = float(np.nanmax(scores) / max(float(np.nanmin(thresholds)), 1e-12))
        series = [Series("score", ts, scores, "#222"), Series("threshold", ts, thresholds, "#d62728", "6,3")]
        if any(s.smoothed is not None for s in data.scores):  # the threshold applies to the smoothed score then
            smoothed = np.array([np.nan if s.smoothed is None else s.smoothed for s in data.scores])
            series.insert(1, Series("smoothed score (EWMA)", ts, smoothed, "#ff7f0e"))
        if any(s.aftermath_floor is not None for s in data.scores):  # a recent excursion raised the bar there
            floors = np.array([np.nan if s.aftermath_floor is None else s.aftermath_floor for s in data.scores])
            series.append(Series("aftermath floor", ts, floors, "#9467bd", "4,2"))
        if data.exit_level < 1:
            bars = np.array([s.bar for s in data.scores])  # the exit level applies to the raised bar, if any
            series.append(Series("exit level", ts, bars * data.exit_level, "#2ca02c", "2,3", 1.0))
        parts.append(svg_plot(plot_id="score", title="window score vs threshold (log scale)" if ratio > 30 else
                              "window score vs threshold", x_range=x_range, series=series, shades=_shades(data),
                              height=240, log=ratio > 30 and bool(np.all(scores[np.isfinite(scores)] > 0))))
        parts.append('<h2 id="sensor-errors">Per-sensor error contributions</h2>')
        for sensor in data.sensors:
            errors = np.array([s.sensor_errors.get(sensor, np.nan) for s in data.scores], dtype=float)
            parts.append(svg_plot(plot_id=f"sensor-error:{sensor}", title=f"{sensor}: error contribution",
                                  x_range=x_range, series=[Series(sensor, ts, errors, _SENSOR_COLOUR)],
                                  shades=_shades(data, sensor)))
        if any(s.drift_offset for s in data.scores):  # the group follows drift: what it has followed, per sensor
            parts.append(_drift_plot(data, ts, x_range))
    else:
        parts.append('<p class="none">No window scores in this span.</p>')
    if data.signals:
        parts.append(f'<h2 id="signals">Raw signals ({_esc(data.signal_source)})</h2>')
        for sensor, (xs, ys) in data.signals.items():
            parts.append(svg_plot(plot_id=f"signal:{sensor}", title=f"{sensor}: raw signal", x_range=x_range,
                                  series=[Series(sensor, xs, ys, "#555", width=1.0)], shades=_shades(data, sensor),
                                  y_min=None))
    above = sum(s.is_anomaly for s in data.scores)
    versions = sorted({s.model_version for s in data.scores})
    legend = "".join(f'<span><span class="badge" style="background:{_severity_colour(t, data.tiers)}">{_esc(t)}'
                     f"</span></span>" for t in data.tiers)
    stamp = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%SZ")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>sensorwatch report: {_esc(data.asset)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{_esc(data.asset)} <small>(group {_esc(data.group)})</small></h1>\n"
        f'<p class="meta">{_iso(data.start_ms)} to {_iso(data.end_ms)} (UTC) &middot; {len(data.scores)} windows '
        f"scored, {above} flagged &middot; {len(data.alerts)} alert(s) &middot; model(s) "
        f"{_esc(', '.join(versions) or 'none')} &middot; generated {stamp}</p>\n"
        f'<p class="legend">{legend}<span>grey: maintenance</span><span>dashed red: threshold</span>'
        "<span>scores are drawn at their window's end; an alert spans from the start of its first exceeding window"
        " to its close</span></p>\n"
        f'<h2 id="alerts">Alerts</h2>\n{_alert_table(data)}\n<h2 id="score">Score</h2>\n' + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(path: Path, data: ReportData) -> Path:
    """Render ``data`` to ``path`` (UTF-8); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path
