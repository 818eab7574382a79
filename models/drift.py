"""Coping with slow drift and quantised sensors: causal smoothing, floored scaling, windows, persistence.

All functions are pure and causal: an output at row ``t`` depends on rows ``<= t`` only.

Why: fitted on a short stretch of normal data, a per-sensor standard deviation can be tiny (a slowly drifting
thermocouple, a flow meter that toggles between two integer readings), so ordinary drift or one quantisation step
looks like many standard deviations. ``fit_floored_scaler`` puts floors under each sensor's scale: a fraction of the
sensor's operating level (a change of a fraction of a percent of the level is not an anomaly) and a fraction of its
quantisation step. ``causal_rolling_mean`` averages out sensor noise before windows are cut, so a level shift shows as
a shift rather than as extra noise. (The drift-following baseline and the aftermath rule, which need the detector's
own decisions, live in ``models.sequence_detector``.)
"""

from __future__ import annotations

import numpy as np

from models.scaler import StandardScaler


def causal_rolling_mean(rows: np.ndarray, span: int) -> np.ndarray:
    """Mean of each sensor over the last ``span`` rows (fewer at the start), for ``rows`` ``[T, F]``."""
    if span < 1:
        raise ValueError("span must be >= 1")
    values = np.asarray(rows, dtype=np.float64)
    if span == 1 or len(values) == 0:
        return values.copy()
    csum = np.cumsum(np.vstack([np.zeros((1, values.shape[1])), values]), axis=0)
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - span, 0)
    return (csum[ends] - csum[starts]) / (ends - starts)[:, None]


def quantisation_step(rows: np.ndarray, max_levels_fraction: float = 0.1) -> np.ndarray:
    """Per sensor: the median gap between distinct values when the sensor takes few distinct values (at most
    ``max_levels_fraction`` of the rows), else 0 (a continuous sensor)."""
    values = np.asarray(rows, dtype=np.float64)
    steps = np.zeros(values.shape[1])
    for j in range(values.shape[1]):
        levels = np.unique(values[:, j])
        if 1 < len(levels) <= max(max_levels_fraction * len(values), 2):
            steps[j] = float(np.median(np.diff(levels)))
    return steps


def scale_floors(rows: np.ndarray, *, level_floor: float = 0.0, step_floor: float = 0.0) -> np.ndarray:
    """Per sensor of ``rows`` ``[T, F]``: the least scale a scaler should use, the larger of ``level_floor`` x
    |median level| and ``step_floor`` x the quantisation step (0 where both are 0)."""
    values = np.asarray(rows, dtype=np.float64)
    floor = level_floor * np.abs(np.median(values, axis=0)) if level_floor else np.zeros(values.shape[1])
    return np.maximum(floor, step_floor * quantisation_step(values)) if step_floor else floor


def fit_floored_scaler(rows: np.ndarray, *, raw_rows: np.ndarray | None = None, level_floor: float = 0.0,
                       step_floor: float = 0.0, min_std: float = 1e-6) -> StandardScaler:
    """A StandardScaler (median centre) whose per-sensor scale is at least ``level_floor`` x |median level| and
    ``step_floor`` x the quantisation step (``scale_floors``).

    ``rows`` ``[T, F]`` are the values the scaler will transform (e.g. smoothed); ``raw_rows`` (default ``rows``)
    are the unsmoothed readings, from which levels and quantisation steps are measured.
    """
    values = np.asarray(rows, dtype=np.float64)
    raw = values if raw_rows is None else np.asarray(raw_rows, dtype=np.float64)
    centre = np.median(values, axis=0)
    scale = np.maximum(values.std(axis=0), scale_floors(raw, level_floor=level_floor, step_floor=step_floor))
    return StandardScaler(mean=centre, std=np.where(scale < min_std, 1.0, scale))


def sliding_windows(rows: np.ndarray, window: int) -> np.ndarray:
    """All windows of ``window`` consecutive rows, stride 1: ``[T - window + 1, window, F]`` (a new array)."""
    values = np.asarray(rows)
    if len(values) < window:
        return np.empty((0, window, values.shape[1]), dtype=values.dtype)
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)  # [N, F, W]
    return view.transpose(0, 2, 1).copy()


def persistent_flags(flags: np.ndarray, consecutive: int) -> np.ndarray:
    """Flag a row only when it and the ``consecutive - 1`` rows before it are all flagged."""
    if consecutive < 1:
        raise ValueError("consecutive must be >= 1")
    f = np.asarray(flags, dtype=bool)
    if consecutive == 1:
        return f.copy()
    run = np.zeros(len(f), dtype=np.int64)
    count = 0
    for i, v in enumerate(f):
        count = count + 1 if v else 0
        run[i] = count
    return run >= consecutive
