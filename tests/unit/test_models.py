"""Model contract: training learns, anomalies score higher, bundles round-trip and refuse tampering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.autoencoders import build_model
from models.bundle import load_bundle, save_bundle
from models.detector import Detector
from models.scaler import StandardScaler
from models.thresholds import fit_threshold
from models.training import NotEnoughData, fit, seed_everything
from pipeline.config import GroupConfig
from pipeline.errors import ModelError

W, F = 16, 3


def _normal_windows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None, None] * 0.37 + np.arange(W)[None, :, None] * 0.2
    base = np.sin(t)
    return np.concatenate([base, 2 * base + 1, -base], axis=2) + rng.normal(0, 0.05, (n, W, F))


@pytest.fixture(scope="module")
def detector() -> Detector:
    windows = _normal_windows(400)
    scaler = StandardScaler.fit(windows)
    model = build_model("dense", W, F, {"hidden": [32, 6]})
    result = fit(model, scaler.transform(windows), epochs=30, batch_size=32, learning_rate=3e-3, progress=False)
    assert result.train_loss[-1] < result.train_loss[0] / 3  # the loss decreases
    threshold, _ = fit_threshold(result.val_scores, "percentile", percentile=99)
    return Detector("v1", "g", "dense", {"hidden": [32, 6]}, ["a", "b", "c"], W, scaler, threshold, model,
                    {"note": "test"})


def test_anomalous_windows_score_higher_and_errors_point_at_the_broken_sensor(detector: Detector) -> None:
    normal = _normal_windows(50, seed=1)
    broken = normal.copy()
    broken[:, :, 1] += 3.0  # sensor b is off by ~2 std
    normal_scores, _ = detector.score(normal)
    broken_scores, per_sensor = detector.score(broken)
    assert broken_scores.min() > normal_scores.max()
    assert (per_sensor.argmax(axis=1) == 1).all()
    assert (normal_scores <= detector.threshold * 2).mean() > 0.9


def test_residual_moments_agree_with_the_score_and_show_the_sign_of_a_shift(detector: Detector) -> None:
    normal = _normal_windows(50, seed=1)
    shifted = normal.copy()
    shifted[:, :, 1] += 3.0  # sensor b reads higher than the model expects
    _, per_sensor = detector.score(shifted)
    variances, means = detector.residual_moments(shifted)
    assert variances.shape == means.shape == (50, F) and (variances >= 0).all()
    np.testing.assert_allclose(variances + means**2, per_sensor, rtol=1e-5)  # the score's per-sensor error
    assert (means[:, 1] > 0.5).all()  # signed: sensor b reads above what the model reconstructs
    with pytest.raises(ValueError, match="expected windows"):
        detector.residual_moments(shifted[:, :, :2])


def test_training_is_reproducible_with_a_seed() -> None:
    windows = StandardScaler.fit(_normal_windows(100)).transform(_normal_windows(100))
    losses = []
    for _ in range(2):
        seed_everything(5)
        model = build_model("dense", W, F, {"hidden": [8, 4]})
        losses.append(fit(model, windows, epochs=3, batch_size=16, learning_rate=1e-3, seed=5, progress=False)
                      .train_loss)
    assert losses[0] == losses[1]


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(NotEnoughData, match="at least"):
        fit(build_model("dense", W, F, {"hidden": [4]}), np.zeros((5, W, F), np.float32), epochs=1, batch_size=4,
            learning_rate=1e-3, progress=False)


def test_bundle_round_trip_gives_identical_scores(detector: Detector, tmp_path: Path) -> None:
    checksum = save_bundle(detector, tmp_path / "v1")
    loaded = load_bundle(tmp_path / "v1", expected_sensors=["a", "b", "c"], expected_checksum=checksum)
    windows = _normal_windows(20, seed=3)
    assert np.array_equal(loaded.score(windows)[0], detector.score(windows)[0])
    assert loaded.threshold == detector.threshold and loaded.metadata["note"] == "test"
    with pytest.raises(ModelError, match="refusing to overwrite"):
        save_bundle(detector, tmp_path / "v1")


def test_a_bundle_gets_the_umask_permissions_and_leaves_no_staging(detector: Detector, tmp_path: Path) -> None:
    """Saved through mkdtemp, bundles were 0700 whatever the umask: a pipeline running as another user than
    ``train`` could not read them and refused the model."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_bundle(detector, tmp_path / "v1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "v1").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "v1" / "metadata.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_tampered_or_mismatched_bundles_are_refused(detector: Detector, tmp_path: Path) -> None:
    checksum = save_bundle(detector, tmp_path / "v1")
    with pytest.raises(ModelError, match="sensors"):
        load_bundle(tmp_path / "v1", expected_sensors=["a", "c", "b"])
    weights = tmp_path / "v1" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match="weights checksum"):
        load_bundle(tmp_path / "v1")
    meta = tmp_path / "v1" / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["threshold"] = 1e9
    meta.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="metadata checksum"):
        load_bundle(tmp_path / "v1", expected_checksum=checksum)
    with pytest.raises(ModelError, match="not a model bundle"):
        load_bundle(tmp_path / "nothing")


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("version"), "'version' is missing or not a string"),
    (lambda d: d.update(group=None), "'group' is missing"),
    (lambda d: d.update(window=True), "'window' is missing or not a whole number"),
    (lambda d: d.update(sensors=["a", "a", "b"]), "distinct names"),
    (lambda d: d.update(threshold=float("nan")), "threshold must be a finite number > 0"),
    (lambda d: d.update(threshold=-1.0), "threshold must be a finite number > 0"),
    (lambda d: d.update(threshold=0), "threshold must be a finite number > 0"),
    (lambda d: d["scaler"].update(mean=[0.0]), "scaler mean must hold one finite number per sensor \\(3\\)"),
    (lambda d: d["scaler"].update(mean=[0.0, float("nan"), 0.0]), "scaler mean"),
    (lambda d: d["scaler"].update(std=[1.0, 0.0, 1.0]), "scaler std must be positive"),
    (lambda d: d.update(score_steps=99), "score_steps must be within 1..window"),
    (lambda d: d.update(score_steps="x"), "score_steps must be within 1..window"),
    (lambda d: d.update(threshold_info=[]), "threshold_info must be a JSON object"),
    (lambda d: d.update(threshold_info={"ewma_alpha": 0}), "ewma_alpha must be in \\(0, 1\\]"),
    (lambda d: d.update(window_smooth=0), "window_smooth must be a whole number >= 1"),
    (lambda d: d.update(sampling_period_s="10"), "sampling_period_s must be a positive number"),
])
def test_metadata_that_makes_no_sense_is_refused_even_with_matching_hashes(
        detector: Detector, tmp_path: Path, change: Any, message: str) -> None:
    """Metadata whose checksum is right (written by a broken tool, or loaded without a registry checksum) but whose
    content would crash scoring later, or alarm on every window, is refused on load with the key named."""
    save_bundle(detector, tmp_path / "v1")
    meta = tmp_path / "v1" / "metadata.json"
    doc = json.loads(meta.read_text())
    change(doc)
    meta.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=message):
        load_bundle(tmp_path / "v1")


def test_metadata_that_is_not_an_object_is_refused(detector: Detector, tmp_path: Path) -> None:
    save_bundle(detector, tmp_path / "v1")
    for doc in ("[]", "null", "3"):
        (tmp_path / "v1" / "metadata.json").write_text(doc)
        with pytest.raises(ModelError, match="metadata is not a JSON object"):
            load_bundle(tmp_path / "v1")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_payload_is_not_executed(detector: Detector, tmp_path: Path) -> None:
    import hashlib
    import pickle

    save_bundle(detector, tmp_path / "v1")

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    weights = tmp_path / "v1" / "weights.pt"
    weights.write_bytes(pickle.dumps(Evil()))
    meta = tmp_path / "v1" / "metadata.json"
    doc = json.loads(meta.read_text())
    doc["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # attacker also fixes the hash
    meta.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="cannot rebuild"):
        load_bundle(tmp_path / "v1")
    assert not (tmp_path / "pwned").exists()


def test_thresholds() -> None:
    errors = np.arange(1, 101, dtype=float)
    assert fit_threshold(errors, "percentile", percentile=99)[0] == pytest.approx(99.01)
    value, info = fit_threshold(errors, "mean_std", k=2, multiplier=2)
    assert value == pytest.approx(2 * (errors.mean() + 2 * errors.std()))
    assert info["method"] == "mean_std"
    with pytest.raises(ValueError, match="finite"):
        fit_threshold(np.array([np.nan]), "percentile")


def test_scale_floors_keep_a_steady_or_quantised_sensor_from_turning_jitter_into_an_alarm() -> None:
    from pipeline.config import parse_config
    from pipeline.train import train_group
    from pipeline.types import Window

    def group(**model: object) -> GroupConfig:
        return parse_config({"groups": [{
            "name": "g", "assets": ["a"], "sampling_period_s": 1,
            "sensors": [{"name": "flow"}, {"name": "pressure_pa"}, {"name": "speed"}],
            "window": {"length": 8, "stride": 4, "max_gap": 0},
            "threshold": {"method": "percentile", "percentile": 99.5, "multiplier": 1.5},
            "model": {"type": "dense", "hidden": [8, 2], "epochs": 30, "batch_size": 32, **model}}]}, env={}).groups[0]

    rng = np.random.default_rng(0)
    n = 4000  # a flow meter toggling between 32 and 33 L/min, a pressure that did not move, a noisy speed
    rows = np.c_[np.where(rng.random(n) < 0.05, 33.0, 32.0), np.full(n, 100_000.0), 2950 + rng.normal(0, 20, n)]
    windows = [Window("a", "g", i * 1000, (i + 8) * 1000, rows[i : i + 8]) for i in range(0, n - 7, 4)]
    jitter = rows[:8].copy()
    jitter[:, 1] += 100.0  # 0.1% of the pressure: ordinary jitter the training day happened not to show

    default = train_group(windows, group(), progress=False).detector  # the step floor only
    np.testing.assert_allclose(default.scaler.std[:2], [0.5, 1.0])  # half the 1 L/min step; never moved: 1 Pa
    assert abs(default.scaler.std[2] - 20.0) < 1.0  # a sensor whose own spread is larger keeps it
    assert default.metadata["scale_floors"]["values"][0] == 0.5

    levelled = train_group(windows, group(scale_floor_level=0.002), progress=False).detector
    assert levelled.scaler.std[1] == 200.0  # 0.2% of 100 kPa
    assert levelled.score(jitter[None])[0][0] < levelled.threshold

    bare = train_group(windows, group(scale_floor_level=0, scale_floor_step=0), progress=False).detector
    assert bare.scaler.std[1] == 1.0 and bare.scaler.std[0] < 0.25  # 1 Pa, and a fifth of the meter's step
    assert bare.score(jitter[None])[0][0] > 100 * bare.threshold


def test_a_floor_never_makes_a_sensor_that_never_moved_more_sensitive() -> None:
    rows = np.c_[np.full(50, 5.0), np.full(50, 100_000.0), np.linspace(0, 1, 50)]
    scaler = StandardScaler.fit(rows, floor=np.array([0.01, 200.0, 0.0]))
    np.testing.assert_allclose(scaler.std, [1.0, 200.0, rows[:, 2].std()])  # 1 unless the floor is larger
