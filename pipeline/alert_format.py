"""Shapes stored alerts and scores for people: plain dicts for JSON/CSV/tables, time parsing for the CLI. Pure."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.store.repo import score_of
from pipeline.store.tables import Alert, WindowScore
from pipeline.types import significant

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: str, now: datetime) -> datetime:
    """``now``, a span back from ``now`` (``90s``, ``30m``, ``24h``, ``7d``, ``2w``) or an ISO-8601 time (naive =
    UTC). ValueError otherwise."""
    text = value.strip()
    if text.lower() == "now":
        return now
    match = _RELATIVE.match(text.lower())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (use ISO-8601, 'now', or a span like 30m, 24h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _ts(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def duration_text(seconds: float) -> str:
    """``1h05m``, ``4m10s``, ``12s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def sensors_text(top: Sequence[dict[str, Any]]) -> str:
    """``bearing_temp 71%, vibration 18%``."""
    return ", ".join(f"{t['sensor']} {float(t['share']):.0%}" for t in top)


def off_training_text(off: dict[str, float] | None) -> str:
    """``flow -58 std, vibration +39 std``: the sensors far outside their training data, farthest first."""
    ranked = sorted((off or {}).items(), key=lambda item: -abs(item[1]))
    return ", ".join(f"{sensor} {distance:+.3g} std" for sensor, distance in ranked)


def alert_dict(row: Alert, *, flat: bool = False) -> dict[str, Any]:
    """One alert as a dict of plain values; ``flat`` turns the top sensors and the sensors far outside their
    training data into text (for CSV and tables)."""
    end = row.closed_at or row.last_seen_at
    return {
        "id": row.id, "asset": row.asset, "group": row.group_name, "status": row.status, "severity": row.severity,
        "opened_at": _ts(row.opened_at), "last_seen_at": _ts(row.last_seen_at), "closed_at": _ts(row.closed_at),
        "duration_s": round((end - row.opened_at).total_seconds(), 3),
        "peak_score": significant(row.peak_score), "threshold": significant(row.threshold),
        "peak_ratio": round(row.peak_score / row.threshold, 3) if row.threshold > 0 else None,
        "windows": row.window_count,
        "top_sensors": sensors_text(row.top_sensors) if flat else list(row.top_sensors),
        "off_training": off_training_text(row.off_training) if flat else dict(row.off_training or {}),
        "model_version": row.model_version,
        "acknowledged_by": row.acknowledged_by, "acknowledged_at": _ts(row.acknowledged_at),
        "ack_comment": row.ack_comment,
    }


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab or CR first: an
    acknowledgement comment is free text) gets a leading ``'``, which shows it as text; other values are unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def to_csv(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Records as CSV text with a header row (``columns`` in order); text that starts like a formula is quoted
    for spreadsheets (``_csv_cell``)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _csv_cell(value) for key, value in record.items()} for record in records)
    return buffer.getvalue()


def history_rows(scores: Sequence[WindowScore], alert: Alert) -> list[dict[str, Any]]:
    """The score history around an alert: per window its score, smoothed score (None unless the model smooths),
    threshold, aftermath floor (None unless a recent large incident raised the bar), ratio of the level held to the
    threshold (smoothed when present), whether it exceeded the bar (the threshold, or the floor when higher), whether
    it lies inside the alert, and its largest sensor contribution."""
    start, end = alert.opened_at, alert.closed_at or alert.last_seen_at
    rows = []
    for s in scores:
        total = sum(s.sensor_errors.values()) or 1.0
        top = max(s.sensor_errors.items(), key=lambda kv: kv[1], default=("", 0.0))
        judged = score_of(s)  # the level (smoothed when present) and the bar it was held to
        rows.append({
            "window_start": _ts(s.window_start), "window_end": _ts(s.window_end), "score": significant(s.score),
            "smoothed": None if s.smoothed_score is None else significant(s.smoothed_score),
            "threshold": significant(s.threshold),
            "aftermath_floor": None if s.aftermath_floor is None else significant(s.aftermath_floor),
            "ratio": round(judged.level / s.threshold, 3) if s.threshold > 0 else None, "above": judged.is_anomaly,
            "in_alert": bool(start <= s.window_start and s.window_end <= end),
            "top_sensor": top[0], "top_share": round(top[1] / total, 4),
        })
    return rows


def elide(rows: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any] | None]:
    """At most ``limit`` rows: the first and last halves, with ``None`` where rows were left out."""
    if len(rows) <= limit:
        return list(rows)
    head = limit // 2
    return [*rows[:head], None, *rows[len(rows) - (limit - head):]]
