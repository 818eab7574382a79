"""Model registry: bundles on disk + ``model_versions`` rows. Loads the active detector of each group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from models.bundle import load_bundle, save_bundle
from models.detector import Detector, scored_steps_text
from pipeline.config import Config, GroupConfig
from pipeline.errors import ModelError, ModelMismatch
from pipeline.store import repo
from pipeline.store.tables import ModelVersion

log = logging.getLogger(__name__)


def new_version_name(group: str, now: datetime | None = None) -> str:
    """A sortable, unique-enough version name: ``<group>-<UTC timestamp with ms>``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%f")[:-3]
    return f"{group}-{stamp}"


def register(*, session: Session, detector: Detector, group: GroupConfig, model_dir: Path, status: str,
             data_range: tuple[datetime, datetime] | None, windows_used: int, metrics: Mapping[str, Any]
             ) -> ModelVersion:
    """Save the bundle under ``model_dir/<group>/<version>`` and add its registry row (caller commits)."""
    path = Path(model_dir).resolve() / group.name / detector.version
    checksum = save_bundle(detector, path)
    row = ModelVersion(
        version=detector.version, group_name=group.name, model_type=detector.model_type, status=status,
        created_at=datetime.now(UTC), artifact_path=str(path), checksum=checksum,
        config_hash=group.model_hash(), threshold=detector.threshold,
        threshold_method=str(detector.metadata.get("threshold_info", {}).get("method", "")),
        data_start=data_range[0] if data_range else None, data_end=data_range[1] if data_range else None,
        windows_used=windows_used, metrics=dict(metrics),
    )
    repo.add_model_version(session=session, version=row)
    return row


def bundle_path(row: ModelVersion, model_dir: Path) -> Path:
    """Where ``row``'s bundle is: the path stored when it was registered or, when that is gone (``model_dir`` moved
    to another volume or host), ``model_dir/<group>/<version>``. The checksum still decides whether it is the same
    bundle."""
    stored = Path(row.artifact_path)
    if stored.exists():
        return stored
    moved = Path(model_dir).resolve() / row.group_name / row.version
    return moved if moved.exists() else stored


def load_version(row: ModelVersion, group: GroupConfig, model_dir: Path) -> Detector:
    """The verified detector of a registry row (its bundle found by ``bundle_path``): checksum, sensors, window
    length and input smoothing (``window.smooth``) must match ``group``.

    ModelError otherwise (the caller keeps whatever it was using).
    """
    path = bundle_path(row, model_dir)
    if path != Path(row.artifact_path):
        log.info("model %s: bundle found under model_dir at %s (registered at %s)", row.version, path,
                 row.artifact_path)
    retrain = "retrain it ('sensorwatch train --config FILE --csv DATA', or 'models activate' a version that fits)"
    try:
        detector = load_bundle(path, expected_sensors=group.sensor_names, expected_checksum=row.checksum)
    except ModelError as exc:
        if "do not match configured" not in str(exc):
            raise
        raise ModelMismatch(f"group {group.name!r}, model {row.version}: {exc} (their order is the model's input "
                            f"order): {retrain}") from None
    if detector.version != row.version:
        raise ModelError(f"bundle {path} holds version {detector.version}, not {row.version}")
    if detector.window != group.window.length:
        raise ModelMismatch(
            f"model {row.version} was trained on windows of {detector.window} steps, "
            f"group {group.name!r} is configured for {group.window.length}: {retrain}"
        )
    period = detector.metadata.get("sampling_period_s")  # bundles from before it was recorded: not known
    if period is not None and float(period) != group.sampling_period_s:
        raise ModelMismatch(
            f"model {row.version} was trained on a grid of {float(period):g} s, group {group.name!r} is configured "
            f"for sampling_period_s {group.sampling_period_s:g}: {retrain}"
        )
    smooth = int(detector.metadata.get("window_smooth", 1))  # bundles from before the option: unsmoothed
    if smooth != group.window.smooth:
        raise ModelMismatch(
            f"model {row.version} was trained on windows smoothed over {smooth} step(s), group {group.name!r} is "
            f"configured for window.smooth {group.window.smooth}: retrain it ('sensorwatch train')"
        )
    for change in pending_changes(detector, group) + range_conflicts(detector, group):  # it serves as trained
        log.warning("group %r, model %s: %s", group.name, row.version, change)
    return detector


def pending_changes(detector: Detector, group: GroupConfig) -> list[str]:
    """What ``group``'s configuration changed since ``detector`` was trained, that it serves on unchanged until the
    next trained model (sensorwatch retrain or train): the model type or its hyperparameters, the threshold's
    settings, the score's steps; one sentence each, empty when none."""
    m, changes = group.model, []
    later = "takes effect with the next trained model (sensorwatch retrain)"
    if detector.model_type != m.type:
        changes.append(f"it is a {detector.model_type} model, model.type is {m.type}: the change {later}")
    elif detector.hyperparameters != (wanted := m.hyperparameters()):
        differ = sorted(k for k in {*detector.hyperparameters, *wanted}
                        if detector.hyperparameters.get(k) != wanted.get(k))
        changes.append(f"it was trained with other model settings ({', '.join(differ)}): the change {later}")
    fitted = _threshold_changes(detector.metadata.get("threshold_info", {}), group)
    if fitted:
        changes.append(f"its threshold was fitted with {', '.join(fitted)}: the change {later}")
    if detector.score_steps != m.score_steps:
        changes.append(f"it scores {scored_steps_text(detector.score_steps)}, model.score_steps is {m.score_steps}: "
                       f"the change {later}")
    return changes


def range_conflicts(detector: Detector, group: GroupConfig) -> list[str]:
    """Sensors whose ``valid_range`` leaves out part of what ``detector`` was trained on: more than 1% of the
    training readings on one side (the bundle's ``sensor_quantiles``), or, for a bundle from before those were
    recorded, the training mean. Their normal readings would be dead-lettered as ``out_of_range`` and the windows
    holding them skipped. One sentence each, empty when none."""
    quantiles = detector.metadata.get("sensor_quantiles") or {}
    conflicts = []
    for sensor in group.sensors:
        if sensor.valid_range is None or sensor.name not in detector.sensors:
            continue
        i = detector.sensors.index(sensor.name)
        low, high = sensor.valid_range
        if "p01" in quantiles and "p99" in quantiles:
            inner = float(quantiles["p01"][i]), float(quantiles["p99"][i])
            what = f"1st-99th percentile {inner[0]:.4g} to {inner[1]:.4g}"
        else:
            inner = (float(detector.scaler.mean[i]),) * 2
            what = f"mean {inner[0]:.4g}"
        if low > inner[0] or high < inner[1]:
            conflicts.append(f"sensor {sensor.name}: valid_range [{low:g}, {high:g}] leaves out part of what the "
                             f"model was trained on ({what}): normal readings outside it are dead-lettered as "
                             "out_of_range and their windows skipped (valid_range bounds plausible values; it is "
                             "not an alarm limit)")
    return conflicts


def _threshold_changes(info: Mapping[str, Any], group: GroupConfig) -> list[str]:
    """The threshold settings a model was fitted with (``threshold_info``) that differ from the group's now, as
    ``key=fitted``; empty when they agree (or the model does not record them)."""
    t = group.threshold
    if not info.get("method"):
        return []
    keys = {"percentile": ("percentile",), "mean_std": ("k",), "pot": ("target_rate", "tail_quantile")}
    wanted = {"method": t.method, "multiplier": t.multiplier, "ewma_alpha": t.ewma_alpha,
              **{k: getattr(t, k) for k in keys.get(t.method, ())}}
    if info["method"] != t.method:
        return [f"method={info['method']}"]
    return [f"{k}={info.get(k)}" for k, v in wanted.items() if k != "method" and info.get(k) != v]


def load_servable(*, session: Session, config: Config) -> tuple[dict[str, Detector], dict[str, str], set[str]]:
    """The verified active detector of every configured group that has a usable one; per group that has none, why
    (no active model, or its bundle refused); and the groups whose active model's bundle is missing, unreadable or
    corrupt (not merely trained for another configuration: the volume may only be unmounted)."""
    active = repo.active_model_versions(session=session)
    detectors: dict[str, Detector] = {}
    problems: dict[str, str] = {}
    broken: set[str] = set()
    for group in config.groups:
        row = active.get(group.name)
        if row is None:
            problems[group.name] = "no active model: run 'sensorwatch train --config FILE --csv DATA'"
            continue
        try:
            detectors[group.name] = load_version(row, group, config.model_dir)
        except (ModelError, OSError) as exc:  # OSError: e.g. a bundle file that cannot be read
            problems[group.name] = str(exc)
            if not isinstance(exc, ModelMismatch):
                broken.add(group.name)
    return detectors, problems, broken


def load_active(*, session: Session, config: Config) -> dict[str, Detector]:
    """The verified active detector of every configured group. ModelError names the groups that have none."""
    detectors, problems, _ = load_servable(session=session, config=config)
    if problems:
        raise ModelError("; ".join(f"group {g}: {why}" for g, why in problems.items()))
    return detectors
