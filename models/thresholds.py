"""Alert thresholds from validation reconstruction errors, without labels, and smoothing of the score stream.

Methods: ``percentile`` (a percentile of the errors), ``mean_std`` (mean + k standard deviations) and ``pot``
(peaks over threshold: a generalised Pareto distribution fitted to the tail of the errors by maximum likelihood, then
the score exceeded with probability ``target_rate`` is read off the fitted tail, as in SPOT, Siffer et al., KDD 2017).
Every method's value is then scaled by ``multiplier``. ``ewma`` smooths a score stream causally.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLD_METHODS = ("percentile", "mean_std", "pot")
MIN_PEAKS = 5  # fewer tail points than this cannot support a GPD fit


@dataclass(frozen=True)
class GpdFit:
    """A generalised Pareto distribution of excesses ``y >= 0``: ``P(Y > y) = (1 + shape * y / scale) ** (-1/shape)``
    (``exp(-y / scale)`` when ``shape == 0``)."""

    shape: float
    scale: float

    def survival(self, y: np.ndarray | float) -> np.ndarray:
        """``P(Y > y)`` for excesses ``y``."""
        y = np.maximum(np.asarray(y, dtype=np.float64), 0.0)
        if abs(self.shape) < 1e-12:
            return np.exp(-y / self.scale)
        base = np.maximum(1.0 + self.shape * y / self.scale, 0.0)
        with np.errstate(divide="ignore"):
            return np.where(base > 0, base ** (-1.0 / self.shape), 0.0)

    def quantile_of_survival(self, p: float) -> float:
        """The excess ``y`` with ``P(Y > y) = p`` (``0 < p <= 1``)."""
        if abs(self.shape) < 1e-12:
            return float(-self.scale * np.log(p))
        return float(self.scale / self.shape * (p ** (-self.shape) - 1.0))


def _profile_loglik(theta: float, y: np.ndarray) -> float:
    """GPD log-likelihood maximised over the scale for fixed ``theta = shape / scale`` (Grimshaw's reduction)."""
    n = y.size
    if abs(theta) < 1e-12:
        return float(-n * np.log(y.mean()) - n)
    z = 1.0 + theta * y
    if np.any(z <= 0):
        return -np.inf
    logs = np.log(z)
    shape = float(logs.mean())
    if (shape <= 0 and theta > 0) or shape < -1.0:  # below -1 the likelihood is unbounded: no MLE
        return -np.inf
    scale = shape / theta
    if scale <= 0:
        return -np.inf
    return float(-n * np.log(scale) - (1.0 + 1.0 / shape) * logs.sum()) if abs(shape) > 1e-12 else -np.inf


def fit_gpd(excesses: np.ndarray) -> GpdFit:
    """Maximum-likelihood GPD fit of positive ``excesses`` (numpy only).

    Grimshaw's reduction turns the two-parameter likelihood into a one-dimensional profile in ``theta = shape/scale``
    on ``(-1/max(y), 2(mean-min)/min^2]``; it is maximised on a grid and refined by golden-section search, and compared
    with the exponential (``shape = 0``) and the uniform (``shape = -1``, scale ``max(y)``). Shapes below -1 are
    excluded (the likelihood is unbounded there), so a short tail is fitted with ``shape >= -1``. ValueError on fewer
    than MIN_PEAKS excesses or non-positive ones.
    """
    y = np.asarray(excesses, dtype=np.float64)
    if y.size < MIN_PEAKS or not np.all(np.isfinite(y)):
        raise ValueError(f"GPD fit needs at least {MIN_PEAKS} finite excesses, got {y.size}")
    y = y[y > 0]
    if y.size < MIN_PEAKS:
        raise ValueError("GPD fit needs positive excesses (all tail values equal the initial threshold)")
    ymax, ymin, ymean = float(y.max()), float(y.min()), float(y.mean())
    low = -1.0 / ymax * (1.0 - 1e-6)
    high = 2.0 * (ymean - ymin) / (ymin * ymin) if ymin > 0 else 1e6 / ymax
    high = max(min(high, 1e6 / ymax), 1e-9)
    grid = np.concatenate([np.linspace(low, 0.0, 60, endpoint=False)[1:], np.geomspace(1e-9 * high, high, 120)])
    values = np.array([_profile_loglik(t, y) for t in grid])
    best = int(np.argmax(values))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(60):
        if _profile_loglik(c, y) > _profile_loglik(d, y):
            b = d
        else:
            a = c
        c, d = b - ratio * (b - a), a + ratio * (b - a)
    theta = (a + b) / 2.0
    candidates = [(theta, _profile_loglik(theta, y)), (0.0, _profile_loglik(0.0, y))]
    theta, loglik = max(candidates, key=lambda item: item[1])
    # shape -1 (uniform on [0, scale]) bounds the allowed shapes; the profile reaches it only with scale > max(y),
    # while its own maximum-likelihood scale is max(y)
    if -y.size * np.log(ymax) > loglik:
        return GpdFit(shape=-1.0, scale=ymax)
    if theta == 0.0:
        return GpdFit(shape=0.0, scale=float(ymean))
    shape = float(np.log1p(theta * y).mean())
    return GpdFit(shape=shape, scale=float(shape / theta))


def pot_threshold(errors: np.ndarray, *, target_rate: float = 1e-3, tail_quantile: float = 0.98
                  ) -> tuple[float, dict[str, Any]]:
    """Peaks-over-threshold: the score exceeded with probability ``target_rate`` under a GPD tail model.

    The initial threshold ``t`` is the ``tail_quantile`` quantile of ``errors``; the excesses over it are fitted with
    ``fit_gpd`` and ``z = t + GPD quantile at survival target_rate * n / n_peaks``. When ``target_rate`` is not below
    the tail fraction, or the tail has fewer than MIN_PEAKS points, the empirical ``1 - target_rate`` quantile is
    returned instead (``info["fallback"]`` says so).
    """
    if not 0 < target_rate < 1 or not 0 < tail_quantile < 1:
        raise ValueError("target_rate and tail_quantile must lie in (0, 1)")
    errors = np.asarray(errors, dtype=np.float64)
    initial = float(np.quantile(errors, tail_quantile))
    peaks = errors[errors > initial] - initial
    info: dict[str, Any] = {"target_rate": target_rate, "tail_quantile": tail_quantile, "initial": initial,
                            "peaks": int(peaks.size)}
    tail_fraction = peaks.size / errors.size
    if target_rate >= tail_fraction:
        return float(np.quantile(errors, 1.0 - target_rate)), {**info, "fallback": "empirical quantile"}
    if np.count_nonzero(peaks > 0) < MIN_PEAKS:
        fallback = f"fewer than {MIN_PEAKS} peaks for a GPD fit: empirical quantile"
        return float(np.quantile(errors, 1.0 - target_rate)), {**info, "fallback": fallback}
    gpd = fit_gpd(peaks)
    value = initial + gpd.quantile_of_survival(target_rate / tail_fraction)
    return float(value), {**info, "gpd_shape": gpd.shape, "gpd_scale": gpd.scale}


def fit_threshold(errors: np.ndarray, method: str, *, percentile: float = 99.5, k: float = 4.0,
                  multiplier: float = 1.0, target_rate: float = 1e-3, tail_quantile: float = 0.98,
                  ewma_alpha: float | None = None) -> tuple[float, dict[str, Any]]:
    """Threshold for window scores ``errors`` and a description of how it was set.

    ``percentile``: that percentile of the errors. ``mean_std``: mean + k standard deviations. ``pot``: see
    ``pot_threshold``. Either is then scaled by ``multiplier``. With ``ewma_alpha`` the errors are first smoothed by
    ``ewma`` (the threshold then applies to the smoothed stream). Raises ValueError on an empty or non-finite error
    vector or an unknown method.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0 or not np.all(np.isfinite(errors)):
        raise ValueError("threshold needs a non-empty vector of finite errors")
    if ewma_alpha is not None:
        errors = ewma(errors, ewma_alpha)
    if method == "percentile":
        base = float(np.percentile(errors, percentile))
        params: dict[str, Any] = {"percentile": percentile}
    elif method == "mean_std":
        base = float(errors.mean() + k * errors.std())
        params = {"k": k}
    elif method == "pot":
        base, params = pot_threshold(errors, target_rate=target_rate, tail_quantile=tail_quantile)
    else:
        raise ValueError(f"unknown threshold method {method!r} (have: {', '.join(THRESHOLD_METHODS)})")
    value = base * multiplier
    return value, {"method": method, "value": value, "multiplier": multiplier, **params,
                   "ewma_alpha": ewma_alpha, "validation_windows": int(errors.size)}


def ewma(scores: np.ndarray, alpha: float, initial: float | None = None) -> np.ndarray:
    """Causal exponentially weighted moving average: ``s[t] = alpha * x[t] + (1 - alpha) * s[t-1]``.

    ``s[-1]`` is ``initial`` (the state carried over from a previous batch) or, when None, ``x[0]``. ``alpha`` in
    ``(0, 1]``; ``alpha = 1`` returns the scores unchanged. Output ``t`` depends on inputs up to ``t`` only.
    """
    if not 0 < alpha <= 1:
        raise ValueError("ewma alpha must lie in (0, 1]")
    x = np.asarray(scores, dtype=np.float64)
    out = np.empty_like(x)
    if x.size == 0:
        return out
    state = float(x[0]) if initial is None else float(initial)
    for i, value in enumerate(x):
        state = alpha * value + (1.0 - alpha) * state
        out[i] = state
    return out


def ewma_by_key(scores: np.ndarray, keys: Sequence[Hashable], alpha: float) -> np.ndarray:
    """``ewma`` of each key's scores separately (e.g. per asset), in the order given; output aligned with ``scores``.

    Scores of one key must be in time order; keys may interleave. ValueError when the lengths differ.
    """
    x = np.asarray(scores, dtype=np.float64)
    if len(keys) != x.size:
        raise ValueError(f"{x.size} scores but {len(keys)} keys")
    positions: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, []).append(i)
    out = np.empty_like(x)
    for index in positions.values():
        out[index] = ewma(x[index], alpha)
    return out


def exceed_rate(scores: np.ndarray, threshold: float) -> float | None:
    """Fraction of ``scores`` above ``threshold`` (how the pipeline flags a window); None when there are none."""
    return float(np.mean(scores > threshold)) if len(scores) else None
