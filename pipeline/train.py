"""Training a group's detector on windows of historical readings (``pipeline.history`` cuts them as the pipeline
cuts them), and registering it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from models.autoencoders import build_model
from models.detector import Detector
from models.drift import scale_floors
from models.scaler import MIN_STD, StandardScaler
from models.thresholds import ewma_by_key, exceed_rate, fit_threshold
from models.training import NotEnoughData, fit, reconstruction_errors, seed_everything
from pipeline.config import GroupConfig
from pipeline.registry import new_version_name, register
from pipeline.store import repo
from pipeline.store.tables import ModelVersion
from pipeline.thinning import Thinning
from pipeline.types import Window, ms_to_datetime

log = logging.getLogger(__name__)

#: Fewer validation windows than this with a settled smoothed score: the threshold is fitted on all of them.
MIN_SETTLED = 50


@dataclass
class TrainedModel:
    """A trained detector and what it was trained on."""

    detector: Detector
    windows_used: int
    data_start_ms: int
    data_end_ms: int
    metrics: dict[str, Any]


def warm_start_compatible(detector: Detector, group: GroupConfig) -> bool:
    """True when ``detector``'s weights fit the network ``group`` configures (same type, shape and sensors)."""
    return (detector.model_type == group.model.type and detector.hyperparameters == group.model.hyperparameters()
            and detector.sensors == group.sensor_names and detector.window == group.window.length)


def train_group(windows: list[Window], group: GroupConfig, *, progress: bool = True,
                warm_start: Detector | None = None, epochs: int | None = None,
                thinning: Thinning | None = None) -> TrainedModel:
    """Fit scaler, autoencoder and threshold on ``windows`` of ``group``. NotEnoughData if there are too few.

    ``warm_start``: start from this detector's weights when ``warm_start_compatible`` (else from scratch; the
    metadata records which). ``epochs`` overrides the group's configured epochs. A smoothed threshold is fitted on
    each asset's smoothed validation stream, leaving out the first windows of each stream whose level has not
    settled (``Thinning.streams``); ``thinning``: how a retrain's long lookback was thinned (default: not at all).
    """
    if not windows:
        raise NotEnoughData(f"group {group.name!r}: no complete windows in the training data")
    ordered = sorted(windows, key=lambda w: (w.start_ms, w.asset))
    stacked = np.stack([w.values for w in ordered])
    rows = stacked.reshape(-1, stacked.shape[-1])
    spread = rows.std(axis=0)
    still = [s for s, std in zip(group.sensor_names, spread, strict=True) if std < MIN_STD]  # as the scaler decides
    if len(still) == len(group.sensor_names):
        raise NotEnoughData(f"group {group.name!r}: every sensor was constant in the training data; a model needs "
                            "normal variation to learn from")
    if still:
        log.warning("group %s: sensor(s) %s never moved in the training data: any change on them is judged against "
                    "a scale of 1 raw unit (or its floor); train on data where they vary if they normally do",
                    group.name, ", ".join(still))
    m = group.model
    # floors measured on each window's first ``stride`` rows: the readings without the windows' overlap
    distinct_rows = stacked[:, : min(group.window.stride, group.window.length), :].reshape(-1, stacked.shape[-1])
    floors = scale_floors(distinct_rows, level_floor=m.scale_floor_level, step_floor=m.scale_floor_step)
    scaler = StandardScaler.fit(stacked, floor=floors)
    scaled = scaler.transform(stacked)
    seed_everything(m.seed)  # weight initialisation too, so a CPU training run is reproducible
    hyperparameters = m.hyperparameters()
    model = build_model(m.type, group.window.length, len(group.sensors), hyperparameters)
    warm_from = None
    if warm_start is not None and warm_start_compatible(warm_start, group):
        model.load_state_dict(warm_start.model.state_dict())
        warm_from = warm_start.version
    result = fit(
        model, scaled, epochs=epochs or m.epochs, batch_size=m.batch_size, learning_rate=m.learning_rate,
        weight_decay=m.weight_decay, validation_fraction=m.validation_fraction, patience=m.patience, seed=m.seed,
        progress=progress, description=f"training {group.name} ({m.type})",
    )
    t = group.threshold
    val_scores = result.val_scores  # of the last len(val_scores) windows of ``ordered``
    if m.score_steps is not None:  # the threshold applies to the score the detector will report
        validation = scaled[len(scaled) - len(val_scores):]
        val_scores, _ = reconstruction_errors(model, validation, last_steps=m.score_steps)
    raw_val_scores = val_scores
    if t.ewma_alpha is not None:  # the threshold applies to each asset's smoothed stream: fit it on that
        thin = thinning or Thinning.for_smoothing(group.window.stride * group.period_ms, [t.ewma_alpha])
        keys, settled = thin.streams(ordered[len(ordered) - len(val_scores):])
        val_scores = ewma_by_key(val_scores, keys, t.ewma_alpha)
        if settled.sum() >= MIN_SETTLED:
            val_scores = val_scores[settled]
        else:
            log.warning("group %s: only %d of %d validation windows have a settled smoothed score; fitting the "
                        "threshold on all of them", group.name, int(settled.sum()), len(val_scores))
    threshold, threshold_info = fit_threshold(val_scores, t.method, **t.fit_kwargs())
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"group {group.name!r}: the {t.method} threshold came out {threshold:g}; check the "
                         f"group's threshold settings")
    if t.method == "pot":
        _note_thin_tail(group.name, threshold_info)
    threshold_info["ewma_alpha"] = t.ewma_alpha
    threshold_info["windows"] = len(val_scores)
    # the share of validation windows above the threshold as fitted (method, multiplier and smoothing included): the
    # false-alarm rate the model is built for, which the retrain gate holds a candidate to when it has no active
    # model to compare with
    threshold_info["validation_exceed_rate"] = exceed_rate(np.asarray(val_scores), threshold)
    start_ms, end_ms = min(w.start_ms for w in windows), max(w.end_ms for w in windows)
    metrics = {
        "train_loss": result.train_loss[-1], "val_loss": result.val_loss[result.best_epoch],
        "best_epoch": result.best_epoch, "epochs_run": len(result.train_loss),
        "train_seconds": round(result.seconds, 2), "val_score_p50": float(np.median(raw_val_scores)),
        "warm_start_from": warm_from,
    }
    if threshold_info.get("fallback"):  # shown by `models show`, and in the retrain run's metrics
        metrics["threshold_fallback"] = threshold_info["fallback"]
    detector = Detector(
        version=new_version_name(group.name), group=group.name, model_type=m.type,
        hyperparameters=hyperparameters, sensors=group.sensor_names, window=group.window.length,
        scaler=scaler, threshold=threshold, model=model,
        metadata={
            "config_hash": group.model_hash(), "threshold_info": threshold_info, "metrics": metrics,
            "training_range": {
                "start": ms_to_datetime(start_ms).isoformat(),
                "end": ms_to_datetime(end_ms).isoformat(),
            },
            "windows_used": len(windows),
            # each sensor's 1st and 99th percentile in training (raw units): a valid_range set inside them later
            # would dead-letter normal readings (``registry.range_conflicts``)
            "sensor_quantiles": dict(zip(("p01", "p99"), np.percentile(rows, [1, 99], axis=0).tolist(), strict=True)),
            "window_thinning": thinning.keep_every if thinning is not None else 1,
            "window_smooth": group.window.smooth,  # the model learned windows smoothed like this
            "sampling_period_s": group.sampling_period_s,  # ... on this grid
            "score_steps": m.score_steps,  # None: the whole window is scored
            "scale_floors": {"level": m.scale_floor_level, "step": m.scale_floor_step, "values": floors.tolist()},
        },
    )
    return TrainedModel(detector, len(windows), start_ms, end_ms, metrics)


POT_FEW_PEAKS = 20  # a generalised Pareto tail fitted to fewer validation peaks than this is a rough guess


def _note_thin_tail(group: str, info: dict[str, Any]) -> None:
    """Warn when a peaks-over-threshold fit had little tail to go on, or fell back to an empirical quantile."""
    peaks = info.get("peaks")
    if info.get("fallback"):
        log.warning("group %s: pot threshold: %s (%s validation peaks); lower threshold.tail_quantile or train on "
                    "more data", group, info["fallback"], peaks)
    elif isinstance(peaks, int) and peaks < POT_FEW_PEAKS:
        log.warning("group %s: pot threshold fitted to only %d validation peaks (fewer than %d): a rough estimate; "
                    "lower threshold.tail_quantile or train on more data", group, peaks, POT_FEW_PEAKS)


def register_trained(*, session: Session, trained: TrainedModel, group: GroupConfig, model_dir: Path,
                     activate: bool = True) -> ModelVersion:
    """Save a freshly trained model's bundle, register it with its data range and metrics, and (by default) make it
    the group's active model. The caller owns the transaction."""
    row = register(
        session=session, detector=trained.detector, group=group, model_dir=model_dir, status="candidate",
        data_range=(ms_to_datetime(trained.data_start_ms), ms_to_datetime(trained.data_end_ms)),
        windows_used=trained.windows_used, metrics=trained.metrics,
    )
    return repo.activate_model_version(session=session, version=row.version) if activate else row
