"""Thresholds on known distributions: the GPD fit, peaks over threshold, and EWMA smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from models.thresholds import GpdFit, ewma, fit_gpd, fit_threshold, pot_threshold
from pipeline.config import ThresholdConfig


def _gpd_sample(shape: float, scale: float, n: int, seed: int) -> np.ndarray:
    u = np.random.default_rng(seed).uniform(size=n)
    return scale * np.log1p(-u) * -1 if shape == 0 else scale / shape * ((1 - u) ** -shape - 1)


@pytest.mark.parametrize("shape", [-0.3, 0.0, 0.25])
def test_gpd_fit_recovers_parameters(shape: float) -> None:
    fitted = fit_gpd(_gpd_sample(shape, 2.0, 5000, seed=1))
    assert fitted.shape == pytest.approx(shape, abs=0.06)
    assert fitted.scale == pytest.approx(2.0, rel=0.08)


def test_gpd_survival_and_quantile_are_inverse() -> None:
    for gpd in (GpdFit(0.2, 1.5), GpdFit(0.0, 1.5), GpdFit(-0.2, 1.5)):
        y = gpd.quantile_of_survival(0.01)
        assert float(gpd.survival(y)) == pytest.approx(0.01)


@pytest.mark.parametrize("target", [1e-2, 1e-3, 1e-4])
def test_pot_on_exponential_data_hits_its_target_rate(target: float) -> None:
    rng = np.random.default_rng(7)
    train, fresh = rng.exponential(1.0, 50_000), rng.exponential(1.0, 1_000_000)
    threshold, info = pot_threshold(train, target_rate=target, tail_quantile=0.98)
    assert threshold == pytest.approx(-np.log(target), rel=0.1)  # the exact quantile of Exp(1)
    assert np.mean(fresh > threshold) == pytest.approx(target, rel=0.5)
    assert info["peaks"] == pytest.approx(1000, abs=2) and abs(info["gpd_shape"]) < 0.1


def test_pot_extrapolates_beyond_the_sample_where_a_percentile_cannot() -> None:
    errors = np.random.default_rng(0).exponential(1.0, 20_000)
    threshold, _ = pot_threshold(errors, target_rate=1e-5, tail_quantile=0.98)
    assert threshold > errors.max()  # a target rate below 1/n: beyond any percentile of the sample
    assert threshold == pytest.approx(-np.log(1e-5), rel=0.15)


def test_pot_falls_back_to_the_empirical_quantile_when_the_tail_is_too_small() -> None:
    errors = np.arange(100, dtype=float)
    value, info = pot_threshold(errors, target_rate=1e-3, tail_quantile=0.98)
    assert "fallback" in info and value == pytest.approx(np.quantile(errors, 1 - 1e-3))
    value, info = pot_threshold(errors, target_rate=0.1, tail_quantile=0.98)
    assert info["fallback"] == "empirical quantile"


def test_fit_threshold_pot_records_method_and_multiplier() -> None:
    errors = np.random.default_rng(0).exponential(2.0, 20_000)
    value, info = fit_threshold(errors, "pot", target_rate=1e-3, tail_quantile=0.98, multiplier=1.5)
    assert info["method"] == "pot" and info["multiplier"] == 1.5 and "gpd_scale" in info
    assert value == pytest.approx(1.5 * 2.0 * np.log(1e3), rel=0.15)
    with pytest.raises(ValueError, match="unknown threshold method"):
        fit_threshold(errors, "magic")


def test_threshold_config_feeds_fit_threshold() -> None:
    config = ThresholdConfig(method="pot", target_rate=1e-3)
    errors = np.random.default_rng(1).exponential(1.0, 5000)
    value, info = fit_threshold(errors, config.method, **config.fit_kwargs())
    assert info["target_rate"] == 1e-3 and value > 0
    assert "ewma_alpha" not in ThresholdConfig(ewma_alpha=0.5).fit_kwargs()  # pipeline.train smooths per asset
    with pytest.raises(ValueError):
        ThresholdConfig(method="pot", ewma_alpha=1.5)


def test_ewma_step_response_and_constants() -> None:
    x = np.ones(6)
    assert np.allclose(ewma(x, 0.3), 1.0)
    step = ewma(x, 0.5, initial=0.0)
    assert np.allclose(step, 1 - 0.5 ** np.arange(1, 7))
    assert np.array_equal(ewma(np.array([3.0, 1.0]), 1.0), [3.0, 1.0])
    assert ewma(np.array([]), 0.5).size == 0
    with pytest.raises(ValueError, match="alpha"):
        ewma(x, 0.0)


def test_ewma_is_causal_and_batches_chain() -> None:
    x = np.random.default_rng(2).normal(size=50)
    whole = ewma(x, 0.2)
    assert np.array_equal(ewma(x[:20], 0.2), whole[:20])  # the past does not depend on the future
    first = ewma(x[:20], 0.2)
    second = ewma(x[20:], 0.2, initial=first[-1])
    assert np.allclose(np.concatenate([first, second]), whole)  # state carried across batches


def test_ewma_smoothing_lowers_a_threshold_set_on_noisy_scores() -> None:
    errors = np.random.default_rng(4).exponential(1.0, 5000)
    raw, _ = fit_threshold(errors, "percentile", percentile=99)
    smoothed, info = fit_threshold(errors, "percentile", percentile=99, ewma_alpha=0.1)
    assert smoothed < raw and info["ewma_alpha"] == 0.1


def test_short_tails_fit_with_shape_at_least_minus_one() -> None:
    uniform = np.random.default_rng(5).uniform(0.0, 1.0, 4000)  # GPD with shape -1, scale 1
    fitted = fit_gpd(uniform)
    assert -1.0 <= fitted.shape < -0.8 and fitted.scale == pytest.approx(1.0, rel=0.1)
    tiny = fit_gpd(np.random.default_rng(6).uniform(0.0, 1.0, 9))
    assert tiny.shape >= -1.0 and np.isfinite(tiny.scale)


def _gpd_loglik(y: np.ndarray, fit: GpdFit) -> float:
    z = 1.0 + fit.shape * y / fit.scale
    assert np.all(z >= 0), "the fitted support must hold every excess"
    if fit.shape == -1.0:  # uniform on [0, scale]
        return float(-y.size * np.log(fit.scale))
    with np.errstate(divide="ignore"):
        return float(-y.size * np.log(fit.scale) - (1.0 + 1.0 / fit.shape) * np.log(z).sum())


@pytest.mark.parametrize("seed", [0, 1, 4, 7])
def test_a_tail_at_the_shape_bound_gets_the_maximum_likelihood_scale(seed: int) -> None:
    """At shape -1 (uniform excesses) the likelihood is (1/scale)^n on scale >= max(y): largest at max(y)."""
    y = np.random.default_rng(seed).uniform(0.0, 1.0, 12)
    fitted = fit_gpd(y)
    assert _gpd_loglik(y, fitted) >= -y.size * np.log(y.max()) - 1e-9
    if fitted.shape == -1.0:
        assert fitted.scale == pytest.approx(y.max())


def test_pot_on_a_tail_of_equal_peaks_stays_within_the_data() -> None:
    errors = np.r_[np.zeros(900), np.full(100, 1.0)]  # every peak over the 0.9 quantile (0.1) is 0.9
    threshold, info = pot_threshold(errors, target_rate=1e-3, tail_quantile=0.9)
    assert info["gpd_shape"] == -1.0 and threshold <= 1.0
