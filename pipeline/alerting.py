"""The alert state machine: scores in, alert events out. Pure: no I/O, no clocks.

Per asset: an alert opens when ``k`` of the last ``n`` windows exceed the threshold, is updated while it lasts (last
seen, peak score, window count, severity, top sensors by their share of the error), and resolves after ``clear_after``
consecutive windows below the threshold. The state can be rebuilt from the database (open alert + recent scores),
so a restarted consumer carries on where the last one stopped; windows at or before the last one processed are ignored,
which makes replays harmless.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from pipeline.config import AlertConfig, GroupConfig
from pipeline.types import AlertEvent, AlertRecord, Score


@dataclass
class _Open:
    record: AlertRecord
    error_sums: dict[str, float]
    below: int = 0


@dataclass
class _AssetAlerts:
    recent: deque[Score]
    last_end_ms: int = -(2**62)
    current: _Open | None = None
    restored: bool = False


def severity_of(peak: float, threshold: float, rule: AlertConfig) -> str:
    """``critical`` once the peak reaches ``critical_multiplier`` x threshold, else ``warning``."""
    return "critical" if peak >= rule.critical_multiplier * threshold else "warning"


def top_sensors(error_sums: Mapping[str, float], count: int) -> list[dict[str, float | str]]:
    """The ``count`` sensors with the largest share of the accumulated error: name, share (0..1), summed error."""
    total = sum(error_sums.values()) or 1.0
    ranked = sorted(error_sums.items(), key=lambda kv: kv[1], reverse=True)[:count]
    return [{"sensor": name, "share": round(value / total, 4), "error": round(value, 6)} for name, value in ranked]


@dataclass
class AlertEngine:
    """Holds the alert state of every asset seen so far."""

    groups: Iterable[GroupConfig]
    _rules: dict[str, AlertConfig] = field(init=False)
    _assets: dict[str, _AssetAlerts] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._rules = {g.name: g.alert for g in self.groups}

    def unrestored(self, assets: Iterable[str]) -> list[str]:
        """Assets whose state has not been loaded from the database yet in this process."""
        return sorted({a for a in assets if a not in self._assets or not self._assets[a].restored})

    def restore(self, asset: str, group: str, *, open_alert: AlertRecord | None, recent: Sequence[Score]) -> None:
        """Rebuild an asset's state from its stored open alert and its latest scores (oldest first)."""
        rule = self._rules[group]
        state = _AssetAlerts(recent=deque(maxlen=rule.n), restored=True)
        for score in recent:
            state.recent.append(score)
            state.last_end_ms = max(state.last_end_ms, score.end_ms)
        if open_alert is not None:
            sums = {str(s["sensor"]): float(s["error"]) for s in open_alert.top_sensors}  # type: ignore[arg-type]
            below = 0
            for score in reversed(recent):
                if score.is_anomaly or score.end_ms <= open_alert.last_seen_ms:
                    break
                below += 1
            state.current = _Open(open_alert, sums, below)
        self._assets[asset] = state

    def forget(self, assets: Iterable[str]) -> None:
        """Drop in-memory state (e.g. after a partition moved away); it is restored from the database if needed."""
        for asset in assets:
            self._assets.pop(asset, None)

    def process(self, scores: Iterable[Score]) -> list[AlertEvent]:
        """Feed scores (any order across assets; sorted by window end per asset here) and return alert events."""
        events: list[AlertEvent] = []
        for score in sorted(scores, key=lambda s: (s.asset, s.end_ms)):
            rule = self._rules[score.group]
            state = self._assets.setdefault(score.asset, _AssetAlerts(recent=deque(maxlen=rule.n)))
            if score.end_ms <= state.last_end_ms:
                continue
            state.last_end_ms = score.end_ms
            state.recent.append(score)
            event = self._step(state, score, rule)
            if event is not None:
                events.append(event)
        return events

    @staticmethod
    def _step(state: _AssetAlerts, score: Score, rule: AlertConfig) -> AlertEvent | None:
        current = state.current
        if current is None:
            flagged = [s for s in state.recent if s.is_anomaly]
            if not score.is_anomaly or len(flagged) < rule.k:
                return None
            sums: dict[str, float] = {}
            for s in flagged:
                for sensor, err in s.sensor_errors.items():
                    sums[sensor] = sums.get(sensor, 0.0) + err
            peak = max(s.score for s in flagged)
            record = AlertRecord(
                asset=score.asset, group=score.group, opened_ms=flagged[0].start_ms, last_seen_ms=score.end_ms,
                closed_ms=None, peak_score=peak, threshold=score.threshold,
                severity=severity_of(peak, score.threshold, rule), status="open", window_count=len(flagged),
                top_sensors=top_sensors(sums, rule.top_sensors), model_version=score.model_version,
            )
            state.current = _Open(record, sums)
            return AlertEvent("opened", record)
        record = current.record
        if score.is_anomaly:
            current.below = 0
            for sensor, err in score.sensor_errors.items():
                current.error_sums[sensor] = current.error_sums.get(sensor, 0.0) + err
            peak = max(record.peak_score, score.score)
            record = replace(
                record, last_seen_ms=score.end_ms, peak_score=peak, window_count=record.window_count + 1,
                severity=severity_of(peak, record.threshold, rule),
                top_sensors=top_sensors(current.error_sums, rule.top_sensors), model_version=score.model_version,
            )
            current.record = record
            return AlertEvent("updated", record)
        current.below += 1
        if current.below < rule.clear_after:
            return None
        record = replace(record, closed_ms=score.end_ms, status="resolved")
        state.current = None
        state.recent.clear()
        return AlertEvent("resolved", record)
