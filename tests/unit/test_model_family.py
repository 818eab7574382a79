"""Contract test run against every registered model type: it learns, anomalies score higher, bundles round-trip
identically and refuse tampering; plus the regularisation options and the config <-> registry contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.autoencoders import MODEL_TYPES, build_model
from models.bundle import load_bundle, save_bundle
from models.detector import Detector
from models.scaler import StandardScaler
from models.thresholds import fit_threshold
from models.training import fit, reconstruction_errors, seed_everything
from pipeline.config import ModelConfig
from pipeline.errors import ModelError

W, F = 16, 3
SENSORS = ["a", "b", "c"]
SMALL: dict[str, dict[str, object]] = {  # small networks so the whole family trains in seconds on a CPU
    "dense": {"hidden": [24, 4]},
    "lstm": {"lstm_hidden": 16, "code_size": 4},
    "conv": {"conv_channels": [8, 4], "kernel_size": 5},
    "sparse": {"hidden": [24, 4], "sparsity_weight": 1e-3},
    "contractive": {"hidden": [24, 4], "contractive_weight": 1e-3},
    "vae": {"hidden": [24, 4], "beta": 0.01},
}


def _normal_windows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None, None] * 0.37 + np.arange(W)[None, :, None] * 0.2
    base = np.sin(t)
    return np.concatenate([base, 2 * base + 1, -base], axis=2) + rng.normal(0, 0.05, (n, W, F))


def test_registry_covers_the_family() -> None:
    assert set(SMALL) == set(MODEL_TYPES) == {"dense", "lstm", "conv", "sparse", "contractive", "vae"}


@pytest.fixture(scope="module", params=sorted(MODEL_TYPES))
def trained(request: pytest.FixtureRequest) -> tuple[Detector, list[float]]:
    model_type = request.param
    torch.set_num_threads(1)
    windows = _normal_windows(300)
    scaler = StandardScaler.fit(windows)
    seed_everything(0)
    model = build_model(model_type, W, F, SMALL[model_type])
    result = fit(model, scaler.transform(windows), epochs=25, batch_size=32, learning_rate=3e-3, progress=False)
    threshold, info = fit_threshold(result.val_scores, "percentile", percentile=99)
    detector = Detector("v1", "g", model_type, dict(SMALL[model_type]), SENSORS, W, scaler, threshold, model,
                        {"threshold_info": info})
    return detector, result.train_loss


def test_loss_decreases(trained: tuple[Detector, list[float]]) -> None:
    _, losses = trained
    assert losses[-1] < 0.5 * losses[0]


def test_normal_windows_reconstruct_better_than_anomalous(trained: tuple[Detector, list[float]]) -> None:
    detector, _ = trained
    normal = _normal_windows(60, seed=1)
    broken = normal.copy()
    broken[:, :, 1] += 3.0  # sensor b off by ~2 training std
    normal_scores, _ = detector.score(normal)
    broken_scores, per_sensor = detector.score(broken)
    assert np.median(broken_scores) > 5 * np.median(normal_scores)
    assert np.mean(broken_scores > np.quantile(normal_scores, 0.95)) > 0.9
    assert np.mean(per_sensor.argmax(axis=1) == 1) > 0.9  # attribution points at the broken sensor


def test_scores_are_deterministic(trained: tuple[Detector, list[float]]) -> None:
    detector, _ = trained
    windows = _normal_windows(10, seed=2)
    assert np.array_equal(detector.score(windows)[0], detector.score(windows)[0])


def test_bundle_round_trip_and_tamper(trained: tuple[Detector, list[float]], tmp_path: Path) -> None:
    detector, _ = trained
    checksum = save_bundle(detector, tmp_path / "v1")
    loaded = load_bundle(tmp_path / "v1", expected_sensors=SENSORS, expected_checksum=checksum)
    assert loaded.model_type == detector.model_type and type(loaded.model) is type(detector.model)
    windows = _normal_windows(20, seed=3)
    assert np.array_equal(loaded.score(windows)[0], detector.score(windows)[0])
    assert loaded.metadata["threshold_info"]["method"] == "percentile"
    weights = tmp_path / "v1" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ModelError, match="weights checksum"):
        load_bundle(tmp_path / "v1")


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_shapes_for_odd_windows_and_batch_inference(model_type: str) -> None:
    model = build_model(model_type, 13, 5, {})
    x = np.random.default_rng(0).normal(size=(7, 13, 5)).astype(np.float32)
    assert model(torch.from_numpy(x)).shape == (7, 13, 5)
    totals, per_sensor = reconstruction_errors(model, x, batch_size=3)
    assert totals.shape == (7,) and per_sensor.shape == (7, 5)


@pytest.mark.parametrize("options", [{"noise_std": 0.3}, {"sparsity": "kl", "sparsity_weight": 1e-2},
                                     {"contractive_weight": 1e-2, "noise_std": 0.1}])
def test_regularisation_options_train_on_other_architectures(options: dict[str, object]) -> None:
    windows = StandardScaler.fit(_normal_windows(120)).transform(_normal_windows(120))
    for model_type in ("lstm", "conv"):
        seed_everything(0)
        model = build_model(model_type, W, F, {**SMALL[model_type], **options})
        losses = fit(model, windows, epochs=6, batch_size=32, learning_rate=3e-3, progress=False).train_loss
        assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_denoising_corrupts_only_while_training() -> None:
    model = build_model("dense", W, F, {"hidden": [8, 2], "noise_std": 1.0})
    x = torch.zeros(4, W, F)
    model.train()
    assert not torch.equal(model.corrupt(x), x)
    model.eval()
    assert torch.equal(model.corrupt(x), x)


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model type"):
        build_model("transformer", W, F, {})
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_model("lstm", W, F, {"hidden": [8]})
    with pytest.raises(ValueError, match="odd"):
        build_model("conv", W, F, {"kernel_size": 4})


@pytest.mark.parametrize("model_type", sorted(MODEL_TYPES))
def test_model_config_hyperparameters_build_every_type(model_type: str) -> None:
    config = ModelConfig(type=model_type, noise_std=0.1)
    hyperparameters = config.hyperparameters()
    model = build_model(model_type, W, F, hyperparameters)
    assert model.noise_std == 0.1
    assert isinstance(model, MODEL_TYPES[model_type])


def test_old_dense_bundle_hyperparameters_still_build() -> None:
    model = build_model("dense", W, F, {"hidden": [64, 16]})  # what bundles of the first version store
    assert [k for k in model.state_dict() if k.endswith("weight")] == [
        "encoder.0.weight", "encoder.2.weight", "decoder.0.weight", "decoder.2.weight"]
