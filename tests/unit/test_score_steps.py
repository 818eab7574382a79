"""Scoring a window by its last steps (``model.score_steps``): the errors it covers, the threshold fitted on the same
score, bundles keeping it, and alerts clearing sooner after a fault ends."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.autoencoders import build_model
from models.bundle import load_bundle, save_bundle
from models.thresholds import fit_threshold
from models.training import reconstruction_errors, residual_moments, seed_everything
from pipeline.config import GroupConfig, load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.skab_chain import _windows
from pipeline.train import train_group

W, F = 12, 3


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] * 0.05
    return np.concatenate([np.sin(t), np.cos(t), np.sin(2 * t)], axis=1) + rng.normal(0, 0.1, (n, F))


def test_errors_cover_only_the_last_steps_and_agree_with_the_moments() -> None:
    seed_everything(0)
    model = build_model("dense", W, F, {"hidden": [8, 2]})
    windows = np.random.default_rng(1).normal(size=(40, W, F))
    x = torch.from_numpy(windows.astype(np.float32))
    with torch.inference_mode():
        residual = (x - model(x)).numpy().astype(np.float64)
    for steps in (1, 4, W):
        scores, per_sensor = reconstruction_errors(model, windows, batch_size=7, last_steps=steps)
        expected = (residual[:, W - steps:] ** 2).mean(axis=1)
        np.testing.assert_allclose(per_sensor, expected, rtol=1e-5)
        np.testing.assert_allclose(scores, expected.mean(axis=1), rtol=1e-5)
        variances, means = residual_moments(model, windows, last_steps=steps)
        np.testing.assert_allclose(variances + means**2, per_sensor, rtol=1e-5)
        np.testing.assert_allclose(means, residual[:, W - steps:].mean(axis=1), rtol=1e-4, atol=1e-6)
    whole = reconstruction_errors(model, windows)[1]
    np.testing.assert_array_equal(reconstruction_errors(model, windows, last_steps=W)[1], whole)
    assert not np.allclose(reconstruction_errors(model, windows, last_steps=1)[1], whole)
    for bad in (0, W + 1):
        with pytest.raises(ValueError, match=r"last_steps must be within 1\.\.12"):
            reconstruction_errors(model, windows, last_steps=bad)


def test_score_steps_must_lie_between_the_stride_and_the_window_length() -> None:
    raw = {"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}], "window": {"length": 10},
                       "model": {"score_steps": 11}}]}
    with pytest.raises(ConfigError, match=r"model.score_steps \(11\) must not exceed window.length \(10\)"):
        parse_config(raw, env={})
    raw["groups"][0]["model"]["score_steps"] = 0
    with pytest.raises(ConfigError, match="score_steps"):
        parse_config(raw, env={})
    raw["groups"][0]["window"]["stride"] = 4  # the readings between two windows' last 3 steps would never count
    raw["groups"][0]["model"]["score_steps"] = 3
    with pytest.raises(ConfigError, match=r"model.score_steps \(3\) must be at least window.stride \(4\)"):
        parse_config(raw, env={})
    raw["groups"][0]["model"]["score_steps"] = 4
    assert parse_config(raw, env={}).groups[0].model.score_steps == 4


def _group(score_steps: int | None) -> GroupConfig:
    raw = {"groups": [{
        "name": "g", "assets": ["file"], "sampling_period_s": 1, "sensors": [{"name": f"s{i}"} for i in range(F)],
        "window": {"length": 20, "stride": 1, "max_gap": 0, "smooth": 5},
        "model": {"type": "dense", "hidden": [16, 2], "epochs": 15, "batch_size": 32, "score_steps": score_steps},
        "threshold": {"method": "percentile", "percentile": 99.9, "multiplier": 3.0},
    }]}
    return parse_config(raw, env={}).groups[0]


@pytest.fixture(scope="module")
def trained() -> dict[int | None, object]:
    """One group (window 20, smoothing 5) trained on the same normal rows: whole-window and last-2-steps scores."""
    rows = _rows(900, seed=0)
    return {steps: (group, train_group(_windows(rows, group), group, progress=False).detector)
            for steps, group in ((steps, _group(steps)) for steps in (None, 2))}


def test_the_threshold_is_fitted_on_the_score_the_detector_reports(trained: dict, tmp_path: Path) -> None:
    group, detector = trained[2]
    assert detector.score_steps == 2 and detector.metadata["score_steps"] == 2
    windows = sorted(_windows(_rows(900, seed=0), group), key=lambda w: w.start_ms)
    # without ewma_alpha the threshold's windows are the validation windows, the last ones in time
    validation = np.stack([w.values for w in windows[-detector.metadata["threshold_info"]["windows"]:]])
    expected, _ = fit_threshold(detector.score(validation)[0], "percentile", percentile=99.9, multiplier=3.0)
    assert group.window.smooth == 5
    assert detector.threshold == pytest.approx(expected, rel=1e-6)
    whole_window, _ = fit_threshold(reconstruction_errors(detector.model, detector.scaler.transform(validation))[0],
                                    "percentile", percentile=99.9, multiplier=3.0)
    assert detector.threshold != pytest.approx(whole_window, rel=1e-3)
    variances, means = detector.residual_moments(validation)  # what drift following scores with
    np.testing.assert_allclose(variances + means**2, detector.score(validation)[1], rtol=1e-5)
    save_bundle(detector, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded.score_steps == 2
    np.testing.assert_array_equal(loaded.score(validation)[1], detector.score(validation)[1])
    assert trained[None][1].score_steps is None


def test_scoring_the_last_steps_clears_sooner_after_a_fault_ends(trained: dict) -> None:
    rows = _rows(1300, seed=5)
    start, stop = 1000, 1150
    rows[start:stop, 1] += 1.5  # a step on one sensor (about 2 std), then back to normal
    over = {}
    for steps, (group, detector) in trained.items():
        windows = _windows(rows, group)
        scores, _ = detector.score(np.stack([w.values for w in windows]))
        last_rows = np.array([(w.end_ms - windows[0].end_ms) // 1000 for w in windows]) + 19
        over[steps] = last_rows[scores > detector.threshold]
    for steps in over:  # both find the fault
        assert ((over[steps] >= start) & (over[steps] < stop)).sum() > 100
    tail = {steps: int((over[steps] >= stop).sum()) for steps in over}
    # windows still over the threshold after the fault ended (here 18 whole-window, 12 by the last 2 steps)
    assert tail[2] <= 0.75 * tail[None], tail
    assert over[2][over[2] >= start].min() <= over[None][over[None] >= start].min()  # and no later at its start


def test_the_model_hash_changes_only_when_score_steps_is_set() -> None:
    group = load_config(Path(__file__).resolve().parents[2] / "config" / "example.yaml", env={}).groups[0]
    relevant = group.model_dump(include={"sensors", "sampling_period_s", "window", "model", "threshold"})
    del relevant["model"]["score_steps"]  # the hash of the same configuration before the option existed
    assert group.model_hash() == hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]
    hashes = {_group(steps).model_hash() for steps in (None, 2, 3)}
    assert len(hashes) == 3
