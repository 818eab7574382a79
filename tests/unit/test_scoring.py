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


def test_small_per_sensor_errors_keep_their_precision() -> None:
    """Errors far below 1e-6 (a model that reconstructs a quiet sensor very well) are stored to 6 significant digits,
    not rounded to 0, so the alert's top sensors and their errors stay meaningful."""
    from pipeline.alerting import top_sensors
    from pipeline.scoring import score_of

    window = Window("a", "g", 0, 4000, np.zeros((4, 2)))
    score = score_of(window, _detector(), 3.5e-9, np.array([1.23456789e-9, 2.3e-9]))
    assert score.sensor_errors == {"x": 1.23457e-9, "y": 2.3e-9}
    top = top_sensors({"x": 1.23456789e-9, "y": 2.3e-9}, 2)
    assert [(t["sensor"], t["error"]) for t in top] == [("y", 2.3e-9), ("x", 1.23457e-9)]
    assert top[0]["share"] == round(2.3 / 3.53456789, 4)


def test_sensors_far_outside_their_training_data_are_named_with_their_distance() -> None:
    """A window whose mean on a sensor lies 4 or more training std from the training mean names that sensor, signed
    (a model can reconstruct such a shift and put the error elsewhere); a window like the training data names none,
    and an overflowing value stays finite."""
    scaler = StandardScaler(mean=np.array([10.0, 50.0, 0.0]), std=np.array([2.0, 5.0, 1.0]))
    model = build_model("dense", 4, 3, {"hidden": [4, 2]})
    detector = Detector("v1", "g", "dense", {"hidden": [4, 2]}, ["flow", "temp", "vib"], 4, scaler, 1.0, model)
    near = np.array([[11.0, 52.0, 1.0], [9.0, 47.0, -1.5], [10.5, 55.0, 3.9], [10.0, 50.0, 0.0]])
    far = near + np.array([-116.0, 0.0, 39.0])  # flow about 58 std below, vib 40 above, temp as in training
    edge = np.tile([10.0 + 4 * 2.0, 50.0, 0.0], (4, 1))  # exactly 4 std: named
    huge = np.tile([1e300, 50.0, 0.0], (4, 1))
    scores = score_windows([Window("a", "g", 0, 4000, w) for w in (near, far, edge, huge)], {"g": detector})
    assert [s.off_training for s in scores] == [
        {}, {"flow": -57.9, "vib": 39.9}, {"flow": 4.0}, {"flow": MAX_ERROR}]  # means -105.875 and 39.85


def test_off_training_covers_the_steps_the_score_covers() -> None:
    """A detector scoring each window's last steps measures the distance from training over those steps too: a shift
    in the last 2 of 4 steps is 8 std there (named), where the whole window's mean would be 4 std only at the edge,
    and a shift in the first steps alone, which the score does not see, is not named."""
    scaler = StandardScaler(mean=np.zeros(1), std=np.ones(1))
    model = build_model("dense", 4, 1, {"hidden": [4, 2]})
    detector = Detector("v1", "g", "dense", {"hidden": [4, 2]}, ["flow"], 4, scaler, 1.0, model,
                        metadata={"score_steps": 2})
    late_shift = np.array([[0.0], [0.0], [8.0], [8.0]])
    early_shift = late_shift[::-1].copy()
    scores = score_windows([Window("a", "g", 0, 4000, w) for w in (late_shift, early_shift)], {"g": detector})
    assert [s.off_training for s in scores] == [{"flow": 8.0}, {}]
