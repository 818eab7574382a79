"""Model bundles on disk: ``weights.pt`` (a plain state dict, loaded with ``weights_only=True``) + ``metadata.json``.

``metadata.json`` records the sensors in order, the scaler, the threshold and how it was set, the configuration hash,
the training range and metrics, and the SHA-256 of the weights. The bundle's checksum is the SHA-256 of
``metadata.json`` (which pins the weights through their hash). Bundles are written to a temporary directory and renamed
into place, so a reader never sees half a bundle. Loading refuses anything that does not check out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
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
    if meta.get("format") != FORMAT:
        raise ModelError(f"{directory}: unsupported bundle format {meta.get('format')!r}")
    if sha256_file(weights_path) != meta.get("weights_sha256"):
        raise ModelError(f"{directory}: weights checksum mismatch (file changed or corrupt)")
    if expected_sensors is not None and list(expected_sensors) != meta.get("sensors"):
        raise ModelError(
            f"{directory}: bundle sensors {meta.get('sensors')} do not match configured {list(expected_sensors)}"
        )
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
