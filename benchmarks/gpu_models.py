"""Would a GPU help? Training and scoring times of the model family on the CPU and on a CUDA GPU, same machine.

    python benchmarks/gpu_models.py [--windows 50000] [--score-windows 200000] [--epochs 3] [--output gpu_models.json]

The product trains and scores on the CPU. This measures what the same code (``models.training.fit`` and
``reconstruction_errors``, which run wherever the model's weights are) takes on each device, with the product's
default shapes: windows of 30 steps x 7 sensors, batch 128 for training, 1,024 for scoring, and per type the default
hyperparameters of ``pipeline.config.ModelConfig`` (``DEFAULTS``, checked against it where the pipeline's
dependencies are installed; the GPU machine has torch but not pydantic). Data: smooth sinusoids with noise (timings
only). Training runs a fixed number of epochs (no early stop); scoring one pass over ``--score-windows`` windows. A
first call of each kind is warmed up and not timed, on either device.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.autoencoders import build_model
from models.training import fit, reconstruction_errors, seed_everything

TYPES = ("dense", "lstm", "conv", "vae")
WINDOW, SENSORS, BATCH, LEARNING_RATE = 30, 7, 128, 1e-3
_COMMON = {"noise_std": 0.0, "sparsity": "l1", "sparsity_target": 0.05}
DEFAULTS: dict[str, dict[str, Any]] = {  # ModelConfig(type=...).hyperparameters()
    "dense": {"hidden": [64, 16], **_COMMON},
    "lstm": {"lstm_hidden": 32, "lstm_layers": 1, "code_size": 16, **_COMMON},
    "conv": {"conv_channels": [32, 16], "kernel_size": 7, **_COMMON},
    "vae": {"hidden": [64, 16], "beta": 1.0, **_COMMON},
}


def _check_defaults() -> None:
    """DEFAULTS must be the product's defaults, where the product's config can be imported."""
    try:
        from pipeline.config import ModelConfig
    except ImportError:
        return
    for model_type, hyperparameters in DEFAULTS.items():
        config = ModelConfig(type=model_type)
        assert config.hyperparameters() == hyperparameters, model_type
        assert (config.batch_size, config.learning_rate) == (BATCH, LEARNING_RATE)


def windows(count: int, seed: int = 0) -> np.ndarray:
    """``count`` standardised-looking windows ``[count, 30, 7]``: phase-shifted sinusoids plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW)[None, :, None] + rng.uniform(0, 100, (count, 1, 1))
    return (np.sin(t / (3 + np.arange(SENSORS))) + 0.1 * rng.normal(size=(count, WINDOW, SENSORS))).astype(np.float32)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model_type: str, device: str, train: np.ndarray, score: np.ndarray, epochs: int) -> dict[str, Any]:
    """Seconds to train ``epochs`` epochs on ``train`` and to score ``score`` once, on ``device``."""
    hyperparameters = DEFAULTS[model_type]
    seed_everything(0)
    model = build_model(model_type, WINDOW, SENSORS, hyperparameters).to(device)
    # warm-up on either device (first-call costs: kernels, allocator, thread pools), not timed
    fit(build_model(model_type, WINDOW, SENSORS, hyperparameters).to(device), train[:2000], epochs=1,
        batch_size=BATCH, learning_rate=LEARNING_RATE, patience=2, progress=False)
    reconstruction_errors(model, score[:4096])
    _sync(device)
    started = time.perf_counter()
    fit(model, train, epochs=epochs, batch_size=BATCH, learning_rate=LEARNING_RATE, patience=epochs + 1,
        progress=False)
    _sync(device)
    trained = time.perf_counter() - started
    started = time.perf_counter()
    reconstruction_errors(model, score, batch_size=1024)
    _sync(device)
    scored = time.perf_counter() - started
    return {"type": model_type, "device": device, "train_s": round(trained, 2),
            "train_windows_per_s": round(epochs * len(train) / trained), "score_s": round(scored, 3),
            "score_windows_per_s": round(len(score) / scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=50_000, help="training windows")
    parser.add_argument("--score-windows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "gpu_models.json")
    args = parser.parse_args()
    _check_defaults()
    train, score = windows(args.windows), windows(args.score_windows, seed=1)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    doc: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
        "train_windows": args.windows, "score_windows": args.score_windows, "epochs": args.epochs, "rows": []}
    for model_type in args.types.split(","):
        for device in devices:
            row = measure(model_type, device, train, score, args.epochs)
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.output.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
