"""Training loop and batched inference for the autoencoders (CPU-friendly, reproducible with a seed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

MIN_WINDOWS = 32


class NotEnoughData(ValueError):
    """Too few windows to train and validate a model."""


class TrainingDiverged(ValueError):
    """The training or validation loss stopped being a finite number."""


@dataclass
class TrainResult:
    """What training produced: the best model (restored), loss history and validation errors."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    val_scores: np.ndarray = field(default_factory=lambda: np.empty(0))


def seed_everything(seed: int) -> None:
    """Fix torch and numpy seeds so a CPU training run is reproducible."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights are: inputs go there (the CPU unless a caller moved the model)."""
    return next(model.parameters()).device


def _residuals(model: nn.Module, windows: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """``x - reconstruction`` of standardised ``windows`` ``[N, W, F]``, ``batch_size`` windows at a time, in
    ``torch.inference_mode``, on the model's device; returned on the CPU."""
    model.eval()
    device = _device(model)
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch_size], dtype=np.float32)).to(device)
            yield (x - model(x)).cpu()


def _scored_steps(windows: np.ndarray, last_steps: int | None) -> slice:
    """The steps of each window a score covers: all, or the last ``last_steps`` (1..window length)."""
    if last_steps is None:
        return slice(None)
    if not 1 <= last_steps <= windows.shape[1]:
        raise ValueError(f"last_steps must be within 1..{windows.shape[1]} (the window length), got {last_steps}")
    return slice(windows.shape[1] - last_steps, None)


def reconstruction_errors(model: nn.Module, windows: np.ndarray, batch_size: int = 1024, *,
                          last_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-window score ``[N]`` and per-sensor errors ``[N, F]``: the mean squared error over the window's steps, or
    over its last ``last_steps`` steps only (the network still sees the whole window).

    ``windows`` are standardised ``[N, W, F]``. Runs in ``torch.inference_mode`` in batches.
    """
    if len(windows) == 0:
        return np.empty(0), np.empty((0, windows.shape[-1]))
    steps = _scored_steps(windows, last_steps)
    per_sensor = [r[:, steps].pow(2).mean(dim=1).numpy() for r in _residuals(model, windows, batch_size)]
    sensors = np.concatenate(per_sensor).astype(np.float64)
    return sensors.mean(axis=1), sensors


def residual_moments(model: nn.Module, windows: np.ndarray, batch_size: int = 1024, *,
                     last_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per window and sensor, of the residual ``x - reconstruction`` over the window's steps (or its last
    ``last_steps``, as ``reconstruction_errors``): its variance around its own mean ``[N, F]`` and that signed mean
    ``[N, F]`` (variance + mean^2 is the reconstruction error; kept apart so that the error relative to an offset b,
    variance + (mean - b)^2, stays precise however large b is).

    ``windows`` are standardised ``[N, W, F]``. Runs in ``torch.inference_mode`` in batches.
    """
    if len(windows) == 0:
        return np.empty((0, windows.shape[-1])), np.empty((0, windows.shape[-1]))
    steps = _scored_steps(windows, last_steps)
    variances: list[np.ndarray] = []
    means: list[np.ndarray] = []
    for full in _residuals(model, windows, batch_size):
        residual = full[:, steps]
        mean = residual.mean(dim=1, keepdim=True)
        variances.append((residual - mean).pow(2).mean(dim=1).numpy())
        means.append(mean.squeeze(1).numpy())
    return np.concatenate(variances).astype(np.float64), np.concatenate(means).astype(np.float64)


def fit(model: nn.Module, windows: np.ndarray, *, epochs: int, batch_size: int, learning_rate: float,
        weight_decay: float = 0.0, validation_fraction: float = 0.2, patience: int = 6, seed: int = 0,
        progress: bool = True, description: str = "training") -> TrainResult:
    """Train ``model`` to reconstruct standardised windows ``[N, W, F]``.

    The objective is ``model.training_loss(batch)`` when the model defines one (every ``models.autoencoders`` type
    does: reconstruction plus its regularisation, denoising corruption included) and plain MSE otherwise; the
    validation loss is always the plain reconstruction error of the deterministic forward pass.
    Trains where the model's weights are (the CPU unless the caller moved the model). The last
    ``validation_fraction`` of windows (time order) is held out; training stops early after ``patience``
    epochs without validation improvement, and the best weights are restored. Learning rate halves on plateaus;
    gradients are clipped to norm 1. Raises NotEnoughData when fewer than MIN_WINDOWS windows are given, and
    TrainingDiverged as soon as an epoch's training or validation loss is not finite.
    """
    if len(windows) < MIN_WINDOWS:
        raise NotEnoughData(f"need at least {MIN_WINDOWS} complete windows to train, got {len(windows)}")
    seed_everything(seed)
    started = time.perf_counter()
    n_val = max(int(len(windows) * validation_fraction), 8)
    train = torch.from_numpy(np.ascontiguousarray(windows[:-n_val], dtype=np.float32)).to(_device(model))
    val = np.ascontiguousarray(windows[-n_val:], dtype=np.float32)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.5, patience=max(patience // 2, 1))
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    best = float("inf")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("epoch {task.completed}/{task.total}"),
               TextColumn("val {task.fields[val]:.4f}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=epochs, val=float("nan"))
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(train), generator=generator).to(train.device)
            total = 0.0
            for i in range(0, len(train), batch_size):
                x = train[order[i : i + batch_size]]
                loss = model.training_loss(x) if hasattr(model, "training_loss") else (model(x) - x).pow(2).mean()
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                total += loss.item() * len(x)
            val_scores, _ = reconstruction_errors(model, val)
            val_loss = float(val_scores.mean())
            if not (np.isfinite(total) and np.isfinite(val_loss)):
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch + 1} (training loss {total / len(train):g}, validation loss "
                    f"{val_loss:g}): lower model.learning_rate, or check the input corruption (noise_std) and the "
                    "penalty weights (sparsity_weight, contractive_weight, beta)")
            result.train_loss.append(total / len(train))
            result.val_loss.append(val_loss)
            schedule.step(val_loss)
            bar.update(task, advance=1, val=val_loss)
            if val_loss < best - 1e-7:
                best, result.best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - result.best_epoch >= patience:
                bar.update(task, total=epoch + 1)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.val_scores, _ = reconstruction_errors(model, val)
    result.seconds = time.perf_counter() - started
    return result
