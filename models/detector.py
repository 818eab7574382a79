"""A trained detector: network + scaler + threshold + the metadata that ties it to a configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from models.scaler import StandardScaler
from models.training import reconstruction_errors, residual_moments


def scored_steps_text(score_steps: int | None) -> str:
    """What a score covers, in words (``Detector.score_steps``)."""
    return "the whole window" if score_steps is None else f"the last {score_steps} steps of each window"


@dataclass
class Detector:
    """Scores raw windows ``[N, W, F]`` (sensors in ``sensors`` order) by reconstruction error."""

    version: str
    group: str
    model_type: str
    hyperparameters: dict[str, Any]
    sensors: list[str]
    window: int
    scaler: StandardScaler
    threshold: float
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)

    def _check(self, windows: np.ndarray) -> None:
        if windows.ndim != 3 or windows.shape[1:] != (self.window, len(self.sensors)):
            raise ValueError(
                f"expected windows [N, {self.window}, {len(self.sensors)}], got {list(windows.shape)}"
            )

    @property
    def ewma_alpha(self) -> float | None:
        """The score smoothing its threshold was fitted for (``threshold_info.ewma_alpha``), None for raw scores."""
        alpha = self.metadata.get("threshold_info", {}).get("ewma_alpha")
        return None if alpha is None else float(alpha)

    @property
    def score_steps(self) -> int | None:
        """How many of each window's last steps its score covers (``metadata.score_steps``); None: all of them."""
        steps = self.metadata.get("score_steps")
        return None if steps is None else int(steps)

    def score(self, windows: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Per-window scores ``[N]`` and per-sensor errors ``[N, F]`` (over the last ``score_steps`` steps when set),
        one batched forward pass (chunked)."""
        self._check(windows)
        return reconstruction_errors(self.model, self.scaler.transform(windows), batch_size,
                                     last_steps=self.score_steps)

    def residual_moments(self, windows: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Per window and sensor, of the standardised residual ``x - reconstruction`` over the steps ``score``
        covers: its variance around its own mean ``[N, F]`` and that signed mean ``[N, F]`` (variance + mean^2 is
        what ``score`` reports per sensor); one batched pass."""
        self._check(windows)
        return residual_moments(self.model, self.scaler.transform(windows), batch_size, last_steps=self.score_steps)
