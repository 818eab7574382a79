"""Drift-following baselines (``GroupConfig.drift``), and scoring in rounds. Pure: no I/O, no clocks.

Per asset of a group that follows drift, the baseline starts at the model's training centre (its scaler's per-sensor
centre). Each window is shifted by ``baseline - centre`` before it is scored, so the model sees the asset's readings
relative to the level it has settled at. Once the window is judged, a window that is not anomalous
(``Score.is_anomaly`` false) moves the baseline ``GroupConfig.drift_weight`` of the way towards its last row (the
readings as the model sees them, smoothed when the window is); an anomalous one leaves it where it is. A new model
version starts again from its own centre.

Because each window's input depends on the verdict on the one before it, ``score_and_judge`` scores in rounds: round
``r`` holds the ``r``-th window of every drift-following asset in the batch (and round 0 every window of the other
assets), one forward pass per group and round. The result does not depend on how the stream is batched. Each score
carries the baseline after its window (``Score.baseline``); ``restore`` resumes from the latest stored one, so a
restart continues exactly where the previous process stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from models.detector import Detector
from pipeline.alerting import AlertEngine
from pipeline.config import GroupConfig
from pipeline.scoring import score_windows
from pipeline.types import AlertEvent, Score, Window

_NEVER = -(2**62)


@dataclass
class _Baseline:
    version: str  # the model version whose centre it started from
    sensors: tuple[str, ...]
    values: np.ndarray
    last_end_ms: int  # the latest window that could move it (a window at or before this is a replay)


class DriftTracker:
    """The drift baseline of every asset whose group follows drift."""

    def __init__(self, groups: Iterable[GroupConfig]) -> None:
        self._weights: dict[str, float] = {}
        for group in groups:
            weight = group.drift_weight
            if weight is not None:
                self._weights[group.name] = weight
        self._state: dict[str, _Baseline] = {}
        self._restored: set[str] = set()

    def follows(self, group: str) -> bool:
        """True when the group follows drift."""
        return group in self._weights

    # -- restart support -------------------------------------------------------------------------------------------
    def unrestored(self, assets: Iterable[str]) -> list[str]:
        """Assets not restored since this tracker was created or last told to ``forget`` them."""
        return [a for a in assets if a not in self._restored]

    def restore(self, asset: str, last: Score | None) -> None:
        """Resume ``asset`` from its latest stored score (``last``; None when it has none): its baseline, model version
        and window end. A score without a baseline (drift was off) starts again from the model's centre."""
        self._restored.add(asset)
        self._state.pop(asset, None)
        if last is None:
            return
        if last.baseline is None:
            values, sensors = np.zeros(0), ()
        else:
            sensors = tuple(last.baseline)
            values = np.array([last.baseline[s] for s in sensors], dtype=np.float64)
        self._state[asset] = _Baseline(last.model_version if sensors else "", sensors, values, last.end_ms)

    def forget(self, assets: Iterable[str]) -> None:
        """Drop the state of ``assets`` (partitions handed over, or a transaction that did not commit)."""
        for asset in assets:
            self._state.pop(asset, None)
            self._restored.discard(asset)

    # -- the work --------------------------------------------------------------------------------------------------
    def _current(self, asset: str, detector: Detector) -> _Baseline:
        state = self._state.get(asset)
        sensors = tuple(detector.sensors)
        if state is not None and state.sensors != sensors and set(state.sensors) == set(sensors):
            order = [state.sensors.index(s) for s in sensors]  # a stored baseline's keys may come back reordered
            state = self._state[asset] = replace(state, sensors=sensors, values=state.values[order])
        if state is None or state.version != detector.version or state.sensors != sensors:
            last_end = _NEVER if state is None else state.last_end_ms
            state = _Baseline(detector.version, tuple(detector.sensors),
                              np.asarray(detector.scaler.mean, dtype=np.float64).copy(), last_end)
            self._state[asset] = state
        return state

    def shifted(self, window: Window, detector: Detector) -> Window:
        """``window`` as the model should see it: shifted by the asset's ``baseline - centre`` (unchanged when its
        group does not follow drift)."""
        if window.group not in self._weights:
            return window
        shift = self._current(window.asset, detector).values - detector.scaler.mean
        return replace(window, values=window.values - shift)

    def follow(self, window: Window, score: Score) -> Score:
        """Move the asset's baseline after ``window`` was judged (``score``, its verdict), and return the score with
        the baseline after it. Call ``shifted`` for the window first."""
        if window.group not in self._weights:
            return score
        state = self._state[window.asset]
        if score.end_ms > state.last_end_ms:
            if not score.is_anomaly:
                state.values = state.values + self._weights[window.group] * (window.values[-1] - state.values)
            state.last_end_ms = score.end_ms
        return replace(score, baseline={s: float(v) for s, v in zip(state.sensors, state.values, strict=True)})

    def rounds(self, windows: Sequence[Window]) -> list[list[Window]]:
        """Split ``windows`` into scoring rounds: round ``r`` holds the ``r``-th window (in time order) of each
        drift-following asset; the windows of other assets all go in round 0."""
        out: list[list[Window]] = [[]]
        count: dict[str, int] = defaultdict(int)
        for window in sorted(windows, key=lambda w: w.end_ms):  # stable: assets keep their order within a time
            if window.group not in self._weights:
                out[0].append(window)
                continue
            r = count[window.asset]
            count[window.asset] += 1
            if r == len(out):
                out.append([])
            out[r].append(window)
        return out


def score_and_judge(windows: Sequence[Window], detectors: Mapping[str, Detector], alerts: AlertEngine,
                    drift: DriftTracker) -> tuple[list[Score], list[AlertEvent]]:
    """Score ``windows`` (``score_windows``), smooth and judge them (the alert engine), with drift baselines followed
    round by round (see the module docstring). Returns the judged scores (each asset's in time order) and the alert
    events. Both engines' state moves on; on a failed transaction ``forget`` the assets in both."""
    alphas = {g: d.ewma_alpha for g, d in detectors.items()}
    scores: list[Score] = []
    events: list[AlertEvent] = []
    for members in drift.rounds(windows):
        if not members:
            continue
        shifted = [drift.shifted(w, detectors[w.group]) for w in members]
        judged, happened = alerts.judge(alerts.smooth(score_windows(shifted, detectors), alphas))
        by_key = {(w.asset, w.end_ms): w for w in members}
        scores += [drift.follow(by_key[(s.asset, s.end_ms)], s) for s in judged]
        events += happened
    return scores, events
