"""Scoring: one forward pass per group; errors that overflow stay finite (storable, comparable) and maximal."""

from __future__ import annotations

import numpy as np

from models.autoencoders import build_model
from models.detector import Detector
from models.scaler import StandardScaler
from pipeline.scoring import MAX_ERROR, score_windows
from pipeline.types import Window


def _detector() -> Detector:
    scaler = StandardScaler(mean=np.zeros(2), std=np.full(2, 1e-3))
    model = build_model("dense", 4, 2, {"hidden": [4, 2]})
    return Detector("v1", "g", "dense", {"hidden": [4, 2]}, ["x", "y"], 4, scaler, 1.0, model)


def test_scores_carry_per_sensor_errors_and_version() -> None:
    windows = [Window("a", "g", 0, 4000, np.zeros((4, 2))), Window("b", "g", 0, 4000, np.ones((4, 2)))]
    scores = score_windows(windows, {"g": _detector()})
    assert [(s.asset, s.model_version, sorted(s.sensor_errors)) for s in scores] == [
        ("a", "v1", ["x", "y"]), ("b", "v1", ["x", "y"])]
    assert scores[1].score > scores[0].score


def test_overflowing_errors_are_capped_not_nan() -> None:
    for value in (1e15, 1e300):  # beyond MAX_ERROR, and beyond float32 (inf, then inf - inf = nan)
        (score,) = score_windows([Window("a", "g", 0, 4000, np.full((4, 2), value))], {"g": _detector()})
        assert score.score == MAX_ERROR and score.is_anomaly
        assert all(np.isfinite(list(score.sensor_errors.values())))
