"""Alert thresholds from validation reconstruction errors, without labels."""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_threshold(errors: np.ndarray, method: str, *, percentile: float = 99.5, k: float = 4.0,
                  multiplier: float = 1.0) -> tuple[float, dict[str, Any]]:
    """Threshold for window scores ``errors`` and a description of how it was set.

    ``percentile``: that percentile of the errors. ``mean_std``: mean + k standard deviations. Either is then scaled by
    ``multiplier``. Raises ValueError on an empty or non-finite error vector.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0 or not np.all(np.isfinite(errors)):
        raise ValueError("threshold needs a non-empty vector of finite errors")
    if method == "percentile":
        base = float(np.percentile(errors, percentile))
        params: dict[str, Any] = {"percentile": percentile}
    elif method == "mean_std":
        base = float(errors.mean() + k * errors.std())
        params = {"k": k}
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    value = base * multiplier
    return value, {"method": method, "value": value, "multiplier": multiplier, **params,
                   "validation_windows": int(errors.size)}
