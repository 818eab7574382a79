"""Model bundles on disk: ``weights.pt`` (a plain state dict, loaded with ``weights_only=True``) + ``metadata.json``.

``metadata.json`` records the sensors in order, the scaler, the threshold and how it was set, the configuration hash,
the training range and metrics, and the SHA-256 of the weights. The bundle's checksum is the SHA-256 of
``metadata.json`` (which pins the weights through their hash). Bundles are written to a temporary directory and renamed
into place, so a reader never sees half a bundle. Loading refuses anything that does not check out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.autoencoders import build_model
from models.detector import Detector
from models.scaler import StandardScaler
from pipeline.errors import ModelError

FORMAT = 1
WEIGHTS = "weights.pt"
METADATA = "metadata.json"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(detector: Detector, directory: Path) -> str:
    """Write ``detector`` to ``directory`` (which must not exist yet) atomically; returns the bundle checksum."""
    directory = Path(directory)
    if directory.exists():
        raise ModelError(f"refusing to overwrite existing bundle {directory}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # made with mkdir, not mkdtemp (0700): the bundle gets the umask's permissions, so a pipeline or scheduler running
    # as another user than `train` can read it
    staging = directory.parent / f".{directory.name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        torch.save(detector.model.state_dict(), staging / WEIGHTS)
        metadata = {
            **detector.metadata,
            "format": FORMAT,
            "version": detector.version,
            "group": detector.group,
            "model_type": detector.model_type,
            "hyperparameters": detector.hyperparameters,
            "sensors": detector.sensors,
            "window": detector.window,
            "scaler": detector.scaler.to_dict(),
            "threshold": detector.threshold,
            "weights_sha256": sha256_file(staging / WEIGHTS),
        }
        (staging / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8")
        for item in staging.iterdir():
            with item.open("rb") as fh:
                os.fsync(fh.fileno())
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sha256_file(directory / METADATA)


def load_bundle(
    directory: Path, *, expected_sensors: Sequence[str] | None = None, expected_checksum: str | None = None
) -> Detector:
    """Load and verify a bundle.

    ModelError when files are missing or corrupt, a checksum fails, or the sensors differ from ``expected_sensors``.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / METADATA, directory / WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{directory}: not a model bundle (needs {METADATA} and {WEIGHTS})")
    if expected_checksum is not None and sha256_file(meta_path) != expected_checksum:
        raise ModelError(f"{directory}: metadata checksum does not match the registry")
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{directory}: metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise ModelError(f"{directory}: unsupported bundle format {meta.get('format')!r}")
    if sha256_file(weights_path) != meta.get("weights_sha256"):
        raise ModelError(f"{directory}: weights checksum mismatch (file changed or corrupt)")
    if expected_sensors is not None and list(expected_sensors) != meta.get("sensors"):
        raise ModelError(
            f"{directory}: bundle sensors {meta.get('sensors')} do not match configured {list(expected_sensors)}"
        )
    problem = metadata_problem(meta)
    if problem:
        raise ModelError(f"{directory}: {problem}")
    try:
        model = build_model(meta["model_type"], meta["window"], len(meta["sensors"]), meta["hyperparameters"])
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        scaler = StandardScaler.from_dict(meta["scaler"])
        threshold = float(meta["threshold"])
    except ModelError:
        raise
    except Exception as exc:  # any failure to rebuild means the bundle is unusable
        raise ModelError(f"{directory}: cannot rebuild model ({type(exc).__name__}: {exc})") from None
    model.eval()
    return Detector(
        version=meta["version"], group=meta["group"], model_type=meta["model_type"],
        hyperparameters=meta["hyperparameters"], sensors=meta["sensors"], window=meta["window"],
        scaler=scaler, threshold=threshold, model=model, metadata=meta,
    )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What makes bundle metadata unusable (a missing or ill-typed key, a scaler or threshold that would make every
    score meaningless), in words; None when it is sound. Checked on load, before anything is rebuilt."""
    for key, kind, name in (("version", str, "string"), ("group", str, "string"), ("model_type", str, "string"),
                            ("hyperparameters", dict, "JSON object"), ("sensors", list, "list"),
                            ("window", int, "whole number"), ("scaler", dict, "JSON object")):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"metadata key {key!r} is missing or not a {name}"
    sensors, window = meta["sensors"], meta["window"]
    if not sensors or not all(isinstance(s, str) for s in sensors) or len(set(sensors)) != len(sensors):
        return "metadata 'sensors' must be a non-empty list of distinct names"
    if window < 2:
        return f"metadata 'window' must be at least 2, got {window}"
    scaler = meta["scaler"]
    for part in ("mean", "std"):
        values = scaler.get(part)
        if not isinstance(values, list) or len(values) != len(sensors) or not all(_number(v) for v in values):
            return f"scaler {part} must hold one finite number per sensor ({len(sensors)})"
    if not all(v > 0 for v in scaler["std"]):
        return "scaler std must be positive"
    if not _number(meta.get("threshold")) or meta["threshold"] <= 0:
        return f"threshold must be a finite number > 0, got {meta.get('threshold')!r}"
    steps = meta.get("score_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= window):
        return f"score_steps must be within 1..window ({window}), got {steps!r}"
    info = meta.get("threshold_info", {})
    if not isinstance(info, dict):
        return "threshold_info must be a JSON object"
    alpha = info.get("ewma_alpha")
    if alpha is not None and not (_number(alpha) and 0 < alpha <= 1):
        return f"threshold_info.ewma_alpha must be in (0, 1], got {alpha!r}"
    smooth = meta.get("window_smooth", 1)
    if not isinstance(smooth, int) or isinstance(smooth, bool) or smooth < 1:
        return f"window_smooth must be a whole number >= 1, got {smooth!r}"
    period = meta.get("sampling_period_s")
    if period is not None and not (_number(period) and period > 0):
        return f"sampling_period_s must be a positive number, got {period!r}"
    return None
