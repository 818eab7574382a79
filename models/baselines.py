"""Reference detectors for side-by-side evaluation, with the same ``fit(rows)`` / ``flags(rows)`` interface as
``SequenceDetector``: the trivial flag-everything detector and river's HalfSpaceTrees (optional extra ``baselines``)."""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np


class FlagEverything:
    """Flags every row: recall 1, false-alarm rate 1; on SKAB its F1 is already about 0.7."""

    name = "flag-everything"
    train_seconds = 0.0

    def fit(self, rows: np.ndarray) -> FlagEverything:
        """Nothing to learn."""
        return self

    def flags(self, rows: np.ndarray) -> np.ndarray:
        """All True."""
        return np.ones(len(rows), dtype=bool)


def river_available() -> str | None:
    """None when river can be imported, else why not (the note to print when skipping the baseline)."""
    try:
        import river.anomaly  # noqa: F401
    except ImportError as exc:
        return f"river is not installed ({exc}); pip install 'sensorwatch[baselines]'"
    return None


class HalfSpaceTreesDetector:
    """river's streaming HalfSpaceTrees on the raw rows, min-max scaled with the training range.

    Learns the training rows, then scores each later row before learning it (river's online protocol, causal). The
    threshold is the ``quantile`` of the scores of the last ``validation_fraction`` of training rows, scored before
    being learnt. Every ``flags`` call starts from the fitted state, so calls are independent.
    """

    name = "river-halfspacetrees"

    def __init__(self, *, n_trees: int = 25, height: int = 8, window_size: int = 250, quantile: float = 0.99,
                 validation_fraction: float = 0.2, seed: int = 0) -> None:
        from river.anomaly import HalfSpaceTrees

        self._model: Any = HalfSpaceTrees(n_trees=n_trees, height=height, window_size=window_size, seed=seed)
        self.quantile, self.validation_fraction = quantile, validation_fraction
        self.low = self.span = np.empty(0)
        self.threshold = float("nan")
        self.train_seconds = 0.0
        self._fitted_rows = 0

    def _features(self, row: np.ndarray) -> dict[int, float]:
        return dict(enumerate(np.clip((row - self.low) / self.span, 0.0, 1.0).tolist()))

    def fit(self, rows: np.ndarray) -> HalfSpaceTreesDetector:
        """Learn the training rows and set the threshold from the scores of their last part."""
        started = time.perf_counter()
        rows = np.asarray(rows, dtype=np.float64)
        low, high = rows.min(axis=0), rows.max(axis=0)
        margin = 0.1 * (high - low)
        self.low, self.span = low - margin, np.where(high > low, (high - low) + 2 * margin, 1.0)
        n_val = max(int(len(rows) * self.validation_fraction), 1)
        scores = []
        for i, row in enumerate(rows):
            x = self._features(row)
            if i >= len(rows) - n_val:
                scores.append(self._model.score_one(x))
            self._model.learn_one(x)
        self.threshold = float(np.quantile(scores, self.quantile))
        self._fitted_rows = len(rows)
        self.train_seconds = time.perf_counter() - started
        return self

    def flags(self, rows: np.ndarray) -> np.ndarray:
        """Rows after the training rows are scored online (score, then learn); training rows are not flagged."""
        model = copy.deepcopy(self._model)
        out = np.zeros(len(rows), dtype=bool)
        for i in range(self._fitted_rows, len(rows)):
            x = self._features(np.asarray(rows[i], dtype=np.float64))
            out[i] = model.score_one(x) > self.threshold
            model.learn_one(x)
        return out
