"""A detector over one asset's row stream: causal smoothing -> drift-following baseline -> floored scaling -> sliding
windows -> autoencoder -> per-sensor normalised reconstruction errors -> (EWMA) -> threshold -> aftermath /
persistence decision.

Used by the SKAB harness (``pipeline.skab``) to run every model type under the same protocol. Every setting is fixed
before training (``SequenceSettings``), and everything fitted (scaler, network, per-sensor normaliser, threshold) is
fitted on the training rows only: the per-sensor normaliser and the threshold come from the training windows' errors
(``threshold_windows="all"``) or only from the last ``validation_fraction`` of them, which early stopping holds out
(``"validation"``). ``ratios``/``flags`` are causal: row ``t``'s output depends on rows ``<= t`` only, and a window's
score is assigned to its last row, as the streaming pipeline would see it.

Score: a window's per-sensor errors are its mean squared residuals over all its rows, or over its last ``score_steps``
rows only (less lag where a fault starts and ends, since rows before it or after it weigh less).

Drift: each sensor's level baseline starts at the training centre and follows the smoothed readings (EWMA of weight
``1 / baseline_span``) on rows that are not flagged; it is frozen while rows are flagged, so slow normal drift is
absorbed but an anomaly is not. Aftermath: a row is flagged when its ratio exceeds 1 and at least
``aftermath_relative`` x the running peak ratio (halving every ``aftermath_half_life`` rows, None: no decay), so the
plant settling into a slightly different state after a large excursion does not keep the alarm on, and the baseline
can follow it.

Trend (``trend_span``, None: level only): the baseline follows a linear trend as well (Holt's method): on rows that
are not flagged, level ``L <- (L + b) + w (x - (L + b))`` with ``w = 1 / baseline_span``, and trend
``b <- b + v ((L_new - L_old) - b)`` with ``v = 1 / trend_span``; both are frozen on flagged rows, and ``b`` starts at
0. A steady ramp (a thermocouple warming up) is then followed without the level-only baseline's lag of about
``slope x baseline_span``.

Release (``release_smooth``, None: off): a second, lightly smoothed view of the same rows (a causal rolling mean of
``release_smooth`` rows instead of ``smooth``) is scored by the same network, scaler, baseline shift and per-sensor
normaliser, against its own threshold fitted the same way on the training rows seen through that smoothing. A row the
detector flags stays flagged only while the release view's ratio exceeds ``release_ratio``: when a fault ends, the
lightly smoothed view drops back within ``release_smooth`` rows while the heavily smoothed one still remembers the
fault. The release is an output filter only: the baseline and the aftermath peak follow the detector's own decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from models.autoencoders import Autoencoder, build_model
from models.drift import (
    causal_rolling_mean,
    fit_floored_scaler,
    persistent_flags,
    sliding_windows,
)
from models.scaler import StandardScaler
from models.thresholds import ewma, fit_threshold
from models.training import NotEnoughData, fit, reconstruction_errors, seed_everything


@dataclass(frozen=True)
class SequenceSettings:
    """Everything that shapes a ``SequenceDetector``; chosen once, never from test labels."""

    model_type: str = "dense"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    window: int = 20
    smooth: int = 30
    level_floor: float = 0.002
    step_floor: float = 0.5
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 6
    validation_fraction: float = 0.2
    seed: int = 0
    score: Literal["mean", "max"] = "mean"
    score_steps: int | None = None
    threshold_windows: Literal["validation", "all"] = "all"
    threshold_method: str = "percentile"
    percentile: float = 99.9
    k: float = 4.0
    target_rate: float = 1e-3
    tail_quantile: float = 0.9
    multiplier: float = 3.0
    ewma_alpha: float | None = None
    baseline_span: int | None = 150
    trend_span: int | None = None
    release_smooth: int | None = None
    release_ratio: float = 0.5
    chunk: int = 10
    aftermath_relative: float = 0.3
    aftermath_half_life: float | None = None
    consecutive: int = 1

    def __post_init__(self) -> None:
        if self.score_steps is not None and not 1 <= self.score_steps <= self.window:
            raise ValueError(f"score_steps must be within 1..window ({self.window}), got {self.score_steps}")
        if self.trend_span is not None and (self.trend_span < 1 or not self.baseline_span):
            raise ValueError(f"trend_span needs a baseline_span and must be at least 1, got {self.trend_span}")
        if self.release_smooth is not None and not 1 <= self.release_smooth <= self.smooth:
            raise ValueError(f"release_smooth must be within 1..smooth ({self.smooth}), got {self.release_smooth}")

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form (for reports and metadata)."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class SequenceDetector:
    """Fit on normal rows ``[T, F]``; then score or flag any row stream of the same sensors."""

    def __init__(self, settings: SequenceSettings) -> None:
        self.settings = settings
        self.scaler: StandardScaler | None = None
        self.model: Autoencoder | None = None
        self.sensor_scale: np.ndarray | None = None
        self.threshold = float("nan")
        self.threshold_info: dict[str, Any] = {}
        self.release_threshold = float("nan")
        self.train_seconds = 0.0

    def _aggregate(self, per_sensor: np.ndarray) -> np.ndarray:
        assert self.sensor_scale is not None
        normalised = per_sensor / self.sensor_scale
        return normalised.max(axis=1) if self.settings.score == "max" else normalised.mean(axis=1)

    def fit(self, rows: np.ndarray, *, progress: bool = False) -> SequenceDetector:
        """Fit scaler, network, per-sensor normaliser and threshold on normal ``rows`` ``[T, F]``.

        NotEnoughData when the rows give too few complete windows.
        """
        s = self.settings
        started = time.perf_counter()
        rows = np.asarray(rows, dtype=np.float64)
        warm = s.smooth - 1  # rows whose smoothing average is still partial
        smoothed = causal_rolling_mean(rows, s.smooth)
        self.scaler = fit_floored_scaler(smoothed[warm:], raw_rows=rows, level_floor=s.level_floor,
                                         step_floor=s.step_floor)
        windows = sliding_windows(self.scaler.transform(smoothed[warm:]), s.window)
        if len(windows) < 32:
            raise NotEnoughData(f"need at least {32 + warm + s.window - 1} training rows, got {len(rows)}")
        self._fit_networks(windows, progress=progress)
        n_val = max(int(len(windows) * s.validation_fraction), 8)
        reference = windows if s.threshold_windows == "all" else windows[-n_val:]
        reference_errors = self._errors(reference)
        self.sensor_scale = np.maximum(reference_errors.mean(axis=0), 1e-8)
        self.threshold, self.threshold_info = fit_threshold(
            self._aggregate(reference_errors), s.threshold_method, percentile=s.percentile, k=s.k,
            multiplier=s.multiplier, target_rate=s.target_rate, tail_quantile=s.tail_quantile, ewma_alpha=s.ewma_alpha,
        )
        if s.release_smooth is not None:
            light = causal_rolling_mean(rows, s.release_smooth)[warm:]
            light_windows = sliding_windows(self.scaler.transform(light), s.window)
            light_reference = light_windows if s.threshold_windows == "all" else light_windows[-n_val:]
            self.release_threshold, _ = fit_threshold(
                self._aggregate(self._errors(light_reference)), s.threshold_method, percentile=s.percentile, k=s.k,
                multiplier=s.multiplier, target_rate=s.target_rate, tail_quantile=s.tail_quantile,
            )  # no EWMA: the release view's ratios are taken row by row
        self.train_seconds = time.perf_counter() - started
        return self

    def _fit_networks(self, windows: np.ndarray, *, progress: bool) -> None:
        """Train the network on the scaled training ``windows`` ``[N, W, F]`` (a hook for variants)."""
        s = self.settings
        seed_everything(s.seed)
        self.model = build_model(s.model_type, s.window, windows.shape[2], s.hyperparameters)
        fit(self.model, windows, epochs=s.epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
            validation_fraction=s.validation_fraction, patience=s.patience, seed=s.seed, progress=progress,
            description=f"training {s.model_type}")

    def _errors(self, windows: np.ndarray) -> np.ndarray:
        """Per-sensor reconstruction errors ``[N, F]`` of scaled ``windows`` (a hook for variants)."""
        return reconstruction_errors(self.model, windows, last_steps=self.settings.score_steps)[1]

    def _decider(self) -> Callable[[float], bool]:
        """A fresh per-row decision for one stream, fed each row's ratio in order: the aftermath rule (a hook for
        variants)."""
        s = self.settings
        decay = 0.5 ** (1.0 / s.aftermath_half_life) if s.aftermath_half_life else 1.0
        peak = 0.0

        def decide(ratio: float) -> bool:
            nonlocal peak
            peak = max(peak * decay, ratio)
            return ratio > 1.0 and ratio >= s.aftermath_relative * peak

        return decide

    def _stream(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score and decide row by row, in chunks of ``chunk`` rows (as a streaming consumer would).

        Returns per-row ratios ``score / threshold`` (NaN until the first window of fully smoothed rows) and the
        aftermath flags; windows are re-centred on the drift-following baseline (see the module docstring).
        """
        if self.model is None or self.scaler is None:
            raise RuntimeError("fit the detector first")
        s = self.settings
        rows = np.asarray(rows, dtype=np.float64)
        smoothed = causal_rolling_mean(rows, s.smooth)
        light = causal_rolling_mean(rows, s.release_smooth) if s.release_smooth is not None else None
        light_ratios: np.ndarray | None = None
        ratios = np.full(len(rows), np.nan)
        flags = np.zeros(len(rows), dtype=bool)
        baseline = self.scaler.mean.copy()
        weight = 1.0 / s.baseline_span if s.baseline_span else 0.0
        trend_weight = 1.0 / s.trend_span if s.trend_span else 0.0
        trend = np.zeros_like(baseline)
        decide = self._decider()
        smoothed_score = None
        first = s.smooth - 1 + s.window - 1
        for begin in range(first, len(rows), s.chunk):
            stop = min(begin + s.chunk, len(rows))
            scores = self._chunk_scores(smoothed, begin, stop, baseline)
            if light is not None:
                light_ratios = self._chunk_scores(light, begin, stop, baseline) / self.release_threshold
            if s.ewma_alpha is not None:
                scores = ewma(scores, s.ewma_alpha, smoothed_score)
                smoothed_score = float(scores[-1])
            for offset, score in enumerate(scores):
                t = begin + offset
                ratio = float(score / self.threshold)
                ratios[t] = ratio
                raised = decide(ratio)
                flags[t] = raised and (light_ratios is None or light_ratios[offset] > s.release_ratio)
                if not raised:
                    predicted = baseline + trend
                    level = predicted + weight * (smoothed[t] - predicted)
                    trend += trend_weight * ((level - baseline) - trend)
                    baseline = level
        return ratios, flags

    def _chunk_scores(self, smoothed: np.ndarray, begin: int, stop: int, baseline: np.ndarray) -> np.ndarray:
        """Scores of the windows ending at rows ``begin..stop-1`` of ``smoothed`` rows, re-centred on ``baseline``."""
        assert self.scaler is not None
        shifted = smoothed[begin - self.settings.window + 1 : stop] - (baseline - self.scaler.mean)
        return self._aggregate(self._errors(sliding_windows(self.scaler.transform(shifted), self.settings.window)))

    def decide(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, in one pass: the ``ratios`` and the ``flags``."""
        ratios, raw = self._stream(rows)
        return ratios, persistent_flags(raw, self.settings.consecutive)

    def ratios(self, rows: np.ndarray) -> np.ndarray:
        """Per row: score / threshold of the window ending at that row (NaN before the first window of fully
        smoothed rows)."""
        return self._stream(rows)[0]

    def flags(self, rows: np.ndarray) -> np.ndarray:
        """Per row: alarm or not (aftermath suppression, then the consecutive-rows rule)."""
        return self.decide(rows)[1]


def calibrate_multiplier(settings: SequenceSettings, segments: Sequence[np.ndarray], *, train_rows: int,
                         false_alarm_rate: float) -> tuple[float, dict[str, Any]]:
    """Threshold headroom from normal data only: the multiplier under which rows after ``train_rows`` of each normal
    ``segment`` exceed the threshold at ``false_alarm_rate``.

    Each segment is split like an evaluation file (first ``train_rows`` rows fit a detector with multiplier 1, the
    rest is scored); the multiplier is the ``1 - false_alarm_rate`` quantile of the pooled score/threshold ratios
    (at least 1). This measures how far normal operation drifts beyond what a short training stretch shows.
    """
    if not segments:
        raise ValueError("calibration needs at least one normal segment")
    base = replace(settings, multiplier=1.0)
    pooled: list[np.ndarray] = []
    for segment in segments:
        detector = SequenceDetector(base).fit(segment[:train_rows])
        ratios = detector.ratios(segment)[train_rows:]
        pooled.append(ratios[np.isfinite(ratios)])
    values = np.concatenate(pooled)
    if not values.size:
        raise ValueError(f"calibration needs a normal segment longer than the {train_rows} training rows (the longest "
                         f"has {max(len(s) for s in segments)}): nothing after them to measure")
    multiplier = max(float(np.quantile(values, 1.0 - false_alarm_rate)), 1.0)
    return multiplier, {"false_alarm_rate": false_alarm_rate, "segments": len(segments), "rows": int(values.size),
                        "multiplier": multiplier}


# Smoothed windows are nearly constant per sensor, so a code as wide as the number of sensors would pass level shifts
# straight through; a code of 2 forces the network to learn the usual joint operating point instead.
DEFAULT_HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "dense": {"hidden": [16, 2]},
    "lstm": {"lstm_hidden": 16, "lstm_layers": 1, "code_size": 2},
    "conv": {"conv_channels": [16, 2], "kernel_size": 7},
    "sparse": {"hidden": [16, 2], "sparsity_weight": 1e-3, "sparsity": "l1"},
    "contractive": {"hidden": [16, 2], "contractive_weight": 1e-3},
    "vae": {"hidden": [16, 2], "beta": 0.1},
}


# How many of a window's last rows its score covers (None: all 20), per model type: each picked on synthetic faults in
# normal data only, as the best synthetic F1 of 1, 5, 10 or 20 rows (benchmarks/skab_recent_rows.py, variant C).
DEFAULT_SCORE_STEPS: dict[str, int | None] = {
    "dense": 10, "lstm": None, "conv": 10, "sparse": 10, "contractive": 10, "vae": 1,
}


def default_settings(model_type: str, **overrides: Any) -> SequenceSettings:
    """The settings the SKAB harness uses for ``model_type`` (its default hyperparameters and score steps), with
    ``overrides``."""
    if model_type not in DEFAULT_HYPERPARAMETERS:
        raise ValueError(f"unknown model type {model_type!r} (have: {', '.join(DEFAULT_HYPERPARAMETERS)})")
    steps = DEFAULT_SCORE_STEPS[model_type]
    if steps is not None:  # a shorter window than the recipe's: all of it
        steps = min(steps, overrides.get("window", SequenceSettings.window))
    shipped = SequenceSettings(model_type=model_type, hyperparameters=DEFAULT_HYPERPARAMETERS[model_type],
                               score_steps=steps)
    return replace(shipped, **overrides)
