"""Windows to scores: one batched forward pass per asset group. Pure apart from torch."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from models.detector import Detector
from pipeline.types import Score, Window

MAX_ERROR = 1e30


def score_windows(windows: Sequence[Window], detectors: Mapping[str, Detector]) -> list[Score]:
    """Score every window with its group's detector. KeyError if a group has no detector.

    Each score carries per-sensor errors (mean squared standardised error over the window) and the model version.
    """
    by_group: dict[str, list[Window]] = defaultdict(list)
    for window in windows:
        by_group[window.group].append(window)
    scores: list[Score] = []
    for group, members in by_group.items():
        detector = detectors[group]
        totals, per_sensor = detector.score(np.stack([w.values for w in members]))
        # an overflowing error is still the clearest anomaly there is: keep it finite so it can be stored and compared
        totals = np.minimum(np.nan_to_num(totals, nan=MAX_ERROR, posinf=MAX_ERROR), MAX_ERROR)
        per_sensor = np.minimum(np.nan_to_num(per_sensor, nan=MAX_ERROR, posinf=MAX_ERROR), MAX_ERROR)
        for window, total, errors in zip(members, totals, per_sensor, strict=True):
            scores.append(
                Score(
                    asset=window.asset, group=group, start_ms=window.start_ms, end_ms=window.end_ms,
                    score=float(total), threshold=detector.threshold,
                    sensor_errors={s: round(float(e), 6) for s, e in zip(detector.sensors, errors, strict=True)},
                    model_version=detector.version,
                )
            )
    return scores
