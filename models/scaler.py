"""Per-sensor standardisation fitted on training data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_STD = 1e-6  # a sensor whose training std is below this never moved: it gets std 1 (or its floor)


@dataclass(frozen=True)
class StandardScaler:
    """``(x - mean) / std`` per sensor. A sensor that never moved in training gets std 1 (so it cannot divide by 0)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, min_std: float = MIN_STD, floor: np.ndarray | None = None) -> StandardScaler:
        """Fit on ``rows`` [T, F] (or windows [N, W, F], flattened over time). ``floor`` (per sensor): the least std
        to use. A sensor that never moved (std below ``min_std``) gets std 1, or its floor when that is larger."""
        flat = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        least = np.zeros_like(std) if floor is None else np.asarray(floor, dtype=np.float64)
        return cls(mean=mean, std=np.where(std < min_std, np.maximum(1.0, least), np.maximum(std, least)))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Standardise along the last axis; returns float32 (values beyond its range become +-inf: scored maximal)."""
        with np.errstate(over="ignore"):
            return ((values - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-friendly form."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> StandardScaler:
        """Inverse of ``to_dict``."""
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        if mean.shape != std.shape or mean.ndim != 1 or not np.all(std > 0):
            raise ValueError("scaler needs equal-length mean and positive std vectors")
        return cls(mean=mean, std=std)
