"""The streaming product's own chain as a SKAB row detector (``sensorwatch evaluate --chain pipeline``).

Per file: the rows become one asset's readings at 1 s a row; the pipeline's windower (``windows_from_frame``) cuts
the training rows' windows and ``train_group`` fits the model; then every window of the whole file goes through
``score_and_judge`` (the forward pass, the alert engine's ``judge`` and, with drift following, the followed offsets),
and a row is flagged when the window ending at it is ``is_anomaly``: the window's verdict (its level above the
threshold, or above the aftermath rule's raised bar), as stored with every score. The alert rule's k-of-n and
resolve settings shape alerts, not these verdicts (with drift following they decide which windows are quiet). Row
``t``'s flag depends on rows ``<= t`` only.

The group (``group_config``) maps the SKAB detector's recipe onto the product's YAML: window 20 rows, stride 1,
smoothing 30 rows, the detector's hyperparameters (code size 2), scale floors (step 0.5, level 0.002), threshold 3x the
99.9th percentile of the validation windows' scores, the default alert rule (critical at 3x); optionally the alert
rule's aftermath (relative 0.3, half-life 6 h) and drift following (span 150 s, the detector's baseline span). The
model's ``score_steps`` is the detector's (``DEFAULT_SCORE_STEPS``: the last 10 rows for dense, conv, sparse and
contractive, the last row for vae, the whole window for lstm) unless given (20: the whole window).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from models.sequence_detector import DEFAULT_HYPERPARAMETERS, DEFAULT_SCORE_STEPS
from pipeline.alerting import AlertEngine
from pipeline.config import GroupConfig, parse_config
from pipeline.drift import DriftTracker, score_and_judge
from pipeline.history import windows_from_frame
from pipeline.train import train_group
from pipeline.types import Window

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: row i of a file is read at T0 + i seconds


def group_config(sensors: Sequence[str], model: str, *, aftermath: bool, drift: bool,
                 epochs: int | None = None, score_steps: int | None = None) -> GroupConfig:
    """The one group a SKAB file becomes (see the module docstring); ``score_steps`` None: the recipe's."""
    if model not in DEFAULT_HYPERPARAMETERS:
        raise ValueError(f"unknown model type {model!r} (have: {', '.join(DEFAULT_HYPERPARAMETERS)})")
    if score_steps is None:
        score_steps = DEFAULT_SCORE_STEPS[model]
    alert: dict[str, Any] = {"k": 2, "n": 3, "clear_after": 3, "critical_multiplier": 3.0}
    if aftermath:
        alert["aftermath"] = {"relative": 0.3, "half_life_s": 21600}
    raw = {"groups": [{
        "name": "skab", "assets": ["file"], "sampling_period_s": 1,
        "sensors": [{"name": s} for s in sensors],
        "window": {"length": 20, "stride": 1, "max_gap": 0, "smooth": 30},
        "model": {"type": model, **DEFAULT_HYPERPARAMETERS[model], "epochs": epochs or 40, "batch_size": 32,
                  "patience": 6, "validation_fraction": 0.2, "scale_floor_step": 0.5, "scale_floor_level": 0.002,
                  "score_steps": score_steps},
        "threshold": {"method": "percentile", "percentile": 99.9, "multiplier": 3.0},
        "alert": alert,
        **({"drift": {"span_s": 150}} if drift else {}),
    }]}
    return parse_config(raw, env={}).groups[0]


def _windows(rows: np.ndarray, group: GroupConfig) -> list[Window]:
    index = pd.to_datetime(T0 + 1000 * np.arange(len(rows)), unit="ms", utc=True)
    frame = pd.DataFrame(rows, columns=group.sensor_names, index=index).rename_axis("ts").reset_index()
    return windows_from_frame(frame.assign(asset="file"), group)


class PipelineChain:
    """A ``pipeline.skab.RowDetector`` running the product's chain (see the module docstring)."""

    def __init__(self, model: str, *, aftermath: bool = True, drift: bool = True, epochs: int | None = None,
                 score_steps: int | None = None) -> None:
        self.model, self.aftermath, self.drift = model, aftermath, drift
        self.epochs, self.score_steps = epochs, score_steps
        self.group: GroupConfig | None = None
        self.detector: Any = None
        self.train_seconds = 0.0

    def describe(self) -> dict[str, Any]:
        """The group configuration (JSON-friendly), for the report's settings."""
        sensors = self.group.sensor_names if self.group is not None else ["s0"]
        group = self.group or self._group(sensors)
        described = group.model_dump(mode="json", exclude={"assets", "sensors", "name", "model"})
        m = group.model
        return {"chain": "pipeline", **described,
                "model": {"type": m.type, **m.hyperparameters(), "epochs": m.epochs, "batch_size": m.batch_size,
                          "scale_floor_step": m.scale_floor_step, "scale_floor_level": m.scale_floor_level,
                          "score_steps": m.score_steps}}

    def _group(self, sensors: Sequence[str]) -> GroupConfig:
        return group_config(sensors, self.model, aftermath=self.aftermath, drift=self.drift, epochs=self.epochs,
                            score_steps=self.score_steps)

    def fit(self, rows: np.ndarray) -> PipelineChain:
        """Train the group's model on ``rows`` ``[T, F]`` (sensors named s0, s1, ...)."""
        sensors = [f"s{i}" for i in range(rows.shape[1])]
        self.group = self._group(sensors)
        started = time.perf_counter()
        self.detector = train_group(_windows(rows, self.group), self.group, progress=False).detector
        self.train_seconds = time.perf_counter() - started
        return self

    def decide(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the level / threshold of the window ending at it (NaN before the first window) and its flag."""
        if self.group is None:
            raise RuntimeError("fit the chain first")
        group = self.group
        judged, _ = score_and_judge(_windows(rows, group), {group.name: self.detector}, AlertEngine([group]),
                                    DriftTracker([group]))
        ratios = np.full(len(rows), np.nan)
        flags = np.zeros(len(rows), dtype=bool)
        for score in judged:
            row = (score.end_ms - T0) // 1000 - 1  # a window's verdict belongs to its last row
            ratios[row] = score.level / score.threshold if score.threshold > 0 else np.inf
            flags[row] = score.is_anomaly
        return ratios, flags

    def flags(self, rows: np.ndarray) -> np.ndarray:
        """Per row: flagged or not."""
        return self.decide(rows)[1]
