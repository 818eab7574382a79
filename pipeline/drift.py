"""Drift following (``GroupConfig.drift``): a per-asset offset of the model's residuals, and judging in rounds. Pure:
no I/O, no clocks.

A model trained on last week's data reconstructs last week's plant. When a sensor drifts slowly while the plant runs
normally, the model's residual for it (reading minus reconstruction, in the model's standardised units) takes on a
persistent offset, and the reconstruction error grows with it until it alarms. With drift following, each asset carries
one offset per sensor, starting at 0. A window's error for a sensor is the mean square of (residual - offset) over its
scored steps (all, or the last ``Detector.score_steps``). Once the window is judged, a quiet one (``AlertEngine.quiet``:
score and level at or below the bare threshold, no open alert, no exceeding window in the k-of-n history, outside
maintenance) moves the offsets ``GroupConfig.drift_weight`` of the way towards its mean residuals; any other leaves them
where they are. So a slow drift stops counting as error while a fault keeps counting for as long as it lasts (and a
state the aftermath rule holds back is not learnt), and what the model knows about operating states (a daily cycle, load
changes) is kept: only what it persistently fails to explain, in quiet times, is followed. With ``drift.max_offset``
each offset stays within that many standard deviations, which bounds how much of a slow fault can be absorbed. A new
model version starts again from 0.

The forward pass does not depend on the offsets (per sensor, the error is var(r) + (mean(r) - b)^2), so a batch still
has one forward pass per group. Only the verdicts are sequential: ``score_and_judge`` judges drift-following
assets in rounds, round ``r`` holding the ``r``-th window of each of them in the batch, and the result does not depend
on how the stream is batched. Each score carries the offsets after its window (``Score.drift_offset``); ``restore``
resumes from the latest stored one, so a restart continues exactly where the previous process stopped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from models.detector import Detector
from pipeline import scoring
from pipeline.alerting import AlertEngine
from pipeline.config import GroupConfig
from pipeline.scoring import by_group, finite, score_of, score_windows
from pipeline.types import AlertEvent, Score, Window, ms_to_datetime

_NEVER = -(2**62)
Moments = tuple[np.ndarray, np.ndarray]  # per sensor: variance and signed mean of a window's residuals


@dataclass
class _Offset:
    version: str  # the model version whose residuals it follows
    sensors: tuple[str, ...]
    values: np.ndarray  # per sensor, in the model's standardised units
    last_end_ms: int  # the latest window that could move it (a window at or before this is a replay)


class DriftTracker:
    """The residual offsets of every asset whose group follows drift."""

    def __init__(self, groups: Iterable[GroupConfig]) -> None:
        self._weights: dict[str, float] = {}
        self._limits: dict[str, float] = {}
        for group in groups:
            weight, limit = group.drift_weight, group.drift_limit
            if weight is not None:
                self._weights[group.name] = weight
            if limit is not None:
                self._limits[group.name] = limit
        self._state: dict[str, _Offset] = {}

    def follows(self, group: str) -> bool:
        """True when the group follows drift."""
        return group in self._weights

    # -- restart support (the runner restores and forgets an asset here together with the alert engine) -----------
    def restore(self, asset: str, last: Score | None) -> None:
        """Resume ``asset`` from its latest stored score (``last``; None when it has none): its offsets, model version
        and window end. A score without offsets (drift was off) starts again from 0. Offsets stored before
        ``max_offset`` was set or lowered are bounded by it."""
        self._state.pop(asset, None)
        if last is None:
            return
        offset = last.drift_offset or {}
        values = self._bounded(last.group, np.array(list(offset.values()), dtype=np.float64))
        self._state[asset] = _Offset(last.model_version if offset else "", tuple(offset), values, last.end_ms)

    def _bounded(self, group: str, values: np.ndarray) -> np.ndarray:
        return _clipped(values, self._limits.get(group))

    def forget(self, assets: Iterable[str]) -> None:
        """Drop the state of ``assets`` (partitions handed over, or a transaction that did not commit)."""
        for asset in assets:
            self._state.pop(asset, None)

    # -- the work --------------------------------------------------------------------------------------------------
    def _current(self, asset: str, detector: Detector) -> _Offset:
        state = self._state.get(asset)
        sensors = tuple(detector.sensors)
        if state is not None and state.sensors != sensors and set(state.sensors) == set(sensors):
            order = [state.sensors.index(s) for s in sensors]  # stored offsets' keys may come back reordered
            state = self._state[asset] = replace(state, sensors=sensors, values=state.values[order])
        if state is None or state.version != detector.version or state.sensors != sensors:
            last_end = _NEVER if state is None else state.last_end_ms
            state = self._state[asset] = _Offset(detector.version, sensors, np.zeros(len(sensors)), last_end)
        return state

    def moments(self, windows: Sequence[Window], detectors: Mapping[str, Detector]) -> dict[tuple[str, int], Moments]:
        """Per window (asset, end): its residual moments, one forward pass per group."""
        return self.forward(windows, detectors)[0]

    def forward(self, windows: Sequence[Window], detectors: Mapping[str, Detector]
                ) -> tuple[dict[tuple[str, int], Moments], dict[tuple[str, int], dict[str, float]]]:
        """Per window (asset, end): its residual moments, one forward pass per group, and its sensors far outside
        training (``scoring.off_training``, one vectorised step per group)."""
        out: dict[tuple[str, int], Moments] = {}
        far: dict[tuple[str, int], dict[str, float]] = {}
        for group, members in by_group(windows).items():
            values = np.stack([w.values for w in members])
            variances, means = detectors[group].residual_moments(values)
            out.update({(w.asset, w.end_ms): (v, m) for w, v, m in zip(members, variances, means, strict=True)})
            off = scoring.off_training(values, detectors[group])
            far.update({(w.asset, w.end_ms): o for w, o in zip(members, off, strict=True)})
        return out, far

    def score(self, window: Window, detector: Detector, moments: Moments,
              off: dict[str, float] | None = None) -> Score:
        """The score of ``window`` with the residuals taken relative to its asset's offsets; ``off``: its sensors
        far outside training when worked out for the batch already (``forward``)."""
        variances, means = moments
        state = self._current(window.asset, detector)
        errors = _relative_errors(variances, means, state.values)
        return score_of(window, detector, float(errors.mean()), errors, off)

    def follow(self, score: Score, moments: Moments, *, quiet: bool) -> Score:
        """After the window of ``score`` was judged (``moments``: its residual moments; ``quiet``: whether the alert
        engine found the asset quiet after it), move the asset's offsets if quiet and return the score with the
        offsets after it. ``score`` the window first."""
        state = self._state[score.asset]
        if score.end_ms > state.last_end_ms:
            if quiet:
                state.values = _moved(state.values, moments[1], self._weights[score.group],
                                      self._limits.get(score.group))
            state.last_end_ms = score.end_ms
        return replace(score, drift_offset={s: float(v) for s, v in zip(state.sensors, state.values, strict=True)})

    def rounds(self, windows: Sequence[Window]) -> list[list[Window]]:
        """Split the windows of drift-following assets into judging rounds: round ``r`` holds the ``r``-th window (in
        time order) of each asset."""
        out: list[list[Window]] = []
        count: dict[str, int] = defaultdict(int)
        for window in sorted(windows, key=lambda w: w.end_ms):  # stable: assets keep their order within a time
            r = count[window.asset]
            count[window.asset] += 1
            if r == len(out):
                out.append([])
            out[r].append(window)
        return out


def _relative_errors(variances: np.ndarray, means: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Per sensor, a window's error relative to ``offset`` (``finite``): the mean square of (residual - offset) is
    var(residual) + (mean(residual) - offset)^2."""
    return finite(variances + (means - offset) ** 2)


def _moved(offset: np.ndarray, means: np.ndarray, weight: float, limit: float | None) -> np.ndarray:
    """``offset`` moved ``weight`` of the way towards a quiet window's mean residuals, bounded by ``limit``."""
    return _clipped(offset + weight * (means - offset), limit)


def _clipped(values: np.ndarray, limit: float | None) -> np.ndarray:
    return values if limit is None else np.clip(values, -limit, limit)


def offsets_report(score: Score, limit: float | None) -> dict[str, object]:
    """What ``sensorwatch drift`` shows of an asset's latest stored score: its followed offsets, largest first, the
    largest size (None when it has no offsets yet) and ``limit`` (``drift.max_offset``; None: unbounded)."""
    offsets = dict(sorted((score.drift_offset or {}).items(), key=lambda kv: -abs(kv[1])))
    largest = max((abs(v) for v in offsets.values()), default=None)
    return {"asset": score.asset, "group": score.group, "window_end": ms_to_datetime(score.end_ms).isoformat(),
            "model_version": score.model_version, "offsets": offsets, "largest": largest, "max_offset": limit}


@dataclass(frozen=True)
class ForwardPass:
    """A batch's forward pass (one per group), which reads no engine state: the raw scores of the windows whose
    group does not follow drift, and the windows and residual moments of those whose group does. ``judge`` turns it
    into judged scores; a retried transaction judges the same forward pass again."""

    plain: list[Score]
    following: list[Window]
    moments: dict[tuple[str, int], Moments]
    off_training: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)  # of the following windows

    @property
    def assets(self) -> set[str]:
        """The assets it holds windows of."""
        return {s.asset for s in self.plain} | {w.asset for w in self.following}

    def without(self, dropped: Collection[str]) -> ForwardPass:
        """The same without the windows of the ``dropped`` assets."""
        return ForwardPass([s for s in self.plain if s.asset not in dropped],
                           [w for w in self.following if w.asset not in dropped],
                           {k: v for k, v in self.moments.items() if k[0] not in dropped},
                           {k: v for k, v in self.off_training.items() if k[0] not in dropped})


def forward_pass(windows: Sequence[Window], detectors: Mapping[str, Detector], drift: DriftTracker) -> ForwardPass:
    """Run ``windows`` through their groups' detectors (see ``ForwardPass``)."""
    following = [w for w in windows if drift.follows(w.group)]
    plain = score_windows([w for w in windows if not drift.follows(w.group)], detectors)
    moments, far = drift.forward(following, detectors) if following else ({}, {})
    return ForwardPass(plain, following, moments, far)


def judge(forward: ForwardPass, detectors: Mapping[str, Detector], alerts: AlertEngine, drift: DriftTracker
          ) -> tuple[list[Score], list[AlertEvent]]:
    """Smooth and judge a forward pass's scores (the alert engine), following drift round by round where the group
    does (see the module docstring). Returns the judged scores (each asset's in time order) and the alert events.
    Both engines' state moves on; on a failed transaction ``forget`` the assets in both."""
    alphas = {g: d.ewma_alpha for g, d in detectors.items()}
    scores: list[Score] = []
    events: list[AlertEvent] = []
    if forward.plain:
        scores, events = alerts.judge(alerts.smooth(forward.plain, alphas))
    moments = forward.moments
    for members in drift.rounds(forward.following):
        raw = [drift.score(w, detectors[w.group], moments[(w.asset, w.end_ms)], forward.off_training.get(
            (w.asset, w.end_ms))) for w in members]
        judged, happened = alerts.judge(alerts.smooth(raw, alphas))
        scores += [drift.follow(s, moments[(s.asset, s.end_ms)], quiet=alerts.quiet(s)) for s in judged]
        events += happened
    return scores, events


def score_and_judge(windows: Sequence[Window], detectors: Mapping[str, Detector], alerts: AlertEngine,
                    drift: DriftTracker) -> tuple[list[Score], list[AlertEvent]]:
    """``judge`` of the ``forward_pass`` of ``windows``."""
    return judge(forward_pass(windows, detectors, drift), detectors, alerts, drift)


def followed_levels(detector: Detector, windows: Sequence[Window], *, weight: float, limit: float | None,
                    streams: Sequence[Hashable] | None = None, steps: Sequence[int] | None = None) -> np.ndarray:
    """What drift following would have held to ``detector``'s threshold over ``windows`` (time-ordered per asset,
    one group), starting from zero offsets: per window, its score relative to its asset's offsets (smoothed with
    ``detector.ewma_alpha`` per stream key of ``streams``, default: per asset). A window whose score and level are at
    or below the threshold moves its asset's offsets ``weight`` of the way towards its mean residuals, bounded by
    ``limit``; any other leaves them. ``steps[i]`` (default 1): how many windows on the grid window ``i`` comes after
    its asset's previous one; the ``steps[i] - 1`` windows left out in between (a thinned read) count as quiet
    windows like the previous one (when it was quiet), so the offsets get as far as the whole stream's would.
    A simplification of the pipeline, the same for any model it measures: the alert engine's quiet rule is the
    window's own verdict (no k-of-n history, open alert, hysteresis or maintenance) and the aftermath bar is not
    applied. One forward pass."""
    levels = np.empty(len(windows))
    if not windows:
        return levels
    variances, means = detector.residual_moments(np.stack([w.values for w in windows]))
    keys = list(streams) if streams is not None else [w.asset for w in windows]
    offsets: dict[str, np.ndarray] = {}
    quiet_means: dict[str, np.ndarray] = {}  # per asset: its previous window's mean residuals, if it was quiet
    smoothed: dict[Hashable, float] = {}
    alpha, threshold = detector.ewma_alpha, detector.threshold
    for i, window in enumerate(windows):
        asset = window.asset
        offset = offsets.setdefault(asset, np.zeros(variances.shape[1]))
        skipped = 0 if steps is None else steps[i] - 1
        if skipped > 0 and asset in quiet_means:
            offset = offsets[asset] = _moved(offset, quiet_means[asset], 1.0 - (1.0 - weight) ** skipped, limit)
        score = float(_relative_errors(variances[i], means[i], offset).mean())
        level = score
        if alpha is not None:
            previous = smoothed.get(keys[i], score)
            level = smoothed[keys[i]] = alpha * score + (1.0 - alpha) * previous
        levels[i] = level
        quiet_means.pop(asset, None)
        if score <= threshold and level <= threshold:
            offsets[asset] = _moved(offset, means[i], weight, limit)
            quiet_means[asset] = means[i]
    return levels
