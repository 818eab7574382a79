"""Windows to scores: one batched forward pass per asset group. Pure apart from torch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from models.detector import Detector
from pipeline.types import Score, Window, significant

MAX_ERROR = 1e30
OFF_TRAINING_SIGMAS = 4.0  # a window mean this many training std from the training mean: far outside training


def score_windows(windows: Sequence[Window], detectors: Mapping[str, Detector]) -> list[Score]:
    """Score every window with its group's detector. KeyError if a group has no detector.

    Each score carries per-sensor errors (mean squared standardised error over the window, or over its last
    ``Detector.score_steps`` steps) and the model version.
    """
    scores: list[Score] = []
    for group, members in by_group(windows).items():
        detector = detectors[group]
        values = np.stack([w.values for w in members])
        totals, per_sensor = detector.score(values)
        totals, per_sensor = finite(totals), finite(per_sensor)
        far = off_training(values, detector)
        scores += [score_of(window, detector, total, errors, off)
                   for window, total, errors, off in zip(members, totals, per_sensor, far, strict=True)]
    return scores


def by_group(windows: Sequence[Window]) -> dict[str, list[Window]]:
    """``windows`` per asset group, each group's in their given order (one forward pass each)."""
    groups: dict[str, list[Window]] = defaultdict(list)
    for window in windows:
        groups[window.group].append(window)
    return groups


def finite(errors: np.ndarray) -> np.ndarray:
    """``errors`` with NaN and overflow replaced by ``MAX_ERROR``: an overflowing error is still the clearest anomaly
    there is, kept finite so that it can be stored and compared."""
    return np.minimum(np.nan_to_num(errors, nan=MAX_ERROR, posinf=MAX_ERROR), MAX_ERROR)


def score_of(window: Window, detector: Detector, total: float, errors: np.ndarray,
             off: dict[str, float] | None = None) -> Score:
    """The Score of ``window`` from its (``finite``) total and per-sensor errors, in ``detector.sensors`` order;
    per-sensor errors are rounded to 6 significant digits. ``off``: its sensors far outside training, when
    ``off_training`` gave them for a whole batch already (else worked out for this window)."""
    return Score(
        asset=window.asset, group=window.group, start_ms=window.start_ms, end_ms=window.end_ms, score=float(total),
        threshold=detector.threshold,
        sensor_errors={s: significant(float(e)) for s, e in zip(detector.sensors, errors, strict=True)},
        model_version=detector.version,
        off_training=off if off is not None else off_training(window.values[np.newaxis], detector)[0],
    )


def off_training(values: np.ndarray, detector: Detector) -> list[dict[str, float]]:
    """Per window of ``values`` [N, W, F] (``detector.sensors`` order), the sensors whose mean over the steps its
    score covers (the last ``detector.score_steps``, else the whole window) lies at least ``OFF_TRAINING_SIGMAS``
    training standard deviations from their training mean (the detector's scaler): sensor -> that distance, signed,
    to 3 significant digits. Empty for a window like the training data."""
    scaler = detector.scaler
    covered = values[:, -detector.score_steps:] if detector.score_steps else values
    with np.errstate(over="ignore", invalid="ignore"):
        distance = (covered.astype(np.float64).mean(axis=1) - scaler.mean) / scaler.std
    distance = np.clip(np.nan_to_num(distance, nan=0.0), -MAX_ERROR, MAX_ERROR)
    out: list[dict[str, float]] = [{} for _ in range(len(values))]
    for i, j in zip(*np.nonzero(np.abs(distance) >= OFF_TRAINING_SIGMAS), strict=True):
        out[i][detector.sensors[j]] = significant(float(distance[i, j]), 3)
    return out
