"""Multivariate sensor simulator for centrifugal pumps, with injected anomalies and ground truth.

Normal data is driven by a few latent factors per asset:

* load: pump speed fraction = set point x daily demand cycle + fast and slow Ornstein-Uhlenbeck (OU)
  fluctuations, smoothed by the drive's ramp;
* valve: a slow OU process for the system resistance (opening trades pressure for flow);
* ambient temperature: daily cycle (peak mid-afternoon local time) plus a slow OU wander.

Channels follow the pump affinity laws: flow ~ speed, pressure ~ speed^2, current ~ flow * pressure
(electrical power), vibration ~ speed^2; motor and bearing temperatures are first-order lags towards
ambient + load-dependent heating. Each sensor gets its own white measurement noise.

The operating point of an asset (set point, rated flow/pressure, heating, daily phase) depends on the
asset name only, so separate calls for the same asset (a training day, a later test span with another
seed) describe the same machine; the stochastic paths depend on ``(seed, asset)``.

Everything here is pure (no I/O) except :func:`write_ground_truth` / :func:`read_ground_truth`.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "ANOMALY_KINDS",
    "DEFAULT_SENSORS",
    "InjectedAnomaly",
    "SensorSpec",
    "inject",
    "read_ground_truth",
    "simulate_fleet",
    "simulate_normal",
    "to_messages",
    "write_ground_truth",
]


@dataclass(frozen=True)
class SensorSpec:
    """A sensor channel; ``[low, high]`` is its valid physical range (all simulated values stay inside)."""

    name: str
    unit: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"sensor {self.name!r}: low must be < high")


DEFAULT_SENSORS: tuple[SensorSpec, ...] = (
    SensorSpec("speed", "rpm", 0.0, 3600.0),
    SensorSpec("flow", "m3/h", 0.0, 250.0),
    SensorSpec("pressure", "bar", 0.0, 16.0),
    SensorSpec("current", "A", 0.0, 150.0),
    SensorSpec("vibration", "mm/s", 0.0, 45.0),
    SensorSpec("motor_temp", "C", -30.0, 180.0),
    SensorSpec("bearing_temp", "C", -30.0, 150.0),
)

ANOMALY_KINDS: tuple[str, ...] = ("spike", "drift", "stuck", "broken_correlation", "noise_burst")

_RATED_RPM = 2960.0
_NO_LOAD_A = 11.0  # magnetising current
_RATED_A = 70.0
_A_PER_W = 1.0 / (math.sqrt(3.0) * 400.0 * 0.87 * 0.93)  # 400 V, cos(phi) 0.87, motor efficiency 0.93

# White measurement noise (1 sigma) per channel.
_NOISE: dict[str, float] = {
    "speed": 2.0,
    "flow": 1.0,
    "pressure": 0.03,
    "current": 0.3,
    "vibration": 0.05,
    "motor_temp": 0.1,
    "bearing_temp": 0.1,
}

# Typical std of each default channel over a normal day (measured over many assets); a floor for the
# scale used to size anomalies, so that short frames do not yield tiny anomalies.
_NOMINAL_STD: dict[str, float] = {
    "speed": 170.0,
    "flow": 7.6,
    "pressure": 0.59,
    "current": 6.3,
    "vibration": 0.175,
    "motor_temp": 8.1,
    "bearing_temp": 4.5,
}

# Default sensor candidates per kind (used when ``sensors`` is None and the frame has these columns).
_KIND_CANDIDATES: dict[str, tuple[str, ...]] = {
    "spike": ("vibration", "pressure", "current"),
    "drift": ("bearing_temp", "motor_temp", "vibration"),
    "stuck": ("flow", "pressure", "speed", "current"),
    "broken_correlation": ("flow", "pressure", "current"),
    "noise_burst": ("vibration", "flow", "pressure", "current"),
}
_MAX_SENSORS: dict[str, int] = {"spike": 2, "noise_burst": 2}

# Physically plausible direction (+1 up, -1 down) for offset-type anomalies.
_DIRECTION: dict[str, dict[str, int]] = {
    "drift": {"bearing_temp": 1, "motor_temp": 1, "vibration": 1, "current": 1},
    "broken_correlation": {"flow": -1, "pressure": -1, "current": 1, "speed": -1, "vibration": 1},
    "spike": {"vibration": 1},
}


@dataclass(frozen=True)
class InjectedAnomaly:
    """Ground truth for one injected anomaly; ``start``/``end`` are UTC, ``end`` exclusive."""

    asset: str
    kind: str
    sensors: tuple[str, ...]
    start: pd.Timestamp
    end: pd.Timestamp

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {self.kind!r}")
        object.__setattr__(self, "sensors", tuple(self.sensors))
        object.__setattr__(self, "start", _utc(self.start))
        object.__setattr__(self, "end", _utc(self.end))
        if not self.start < self.end:
            raise ValueError("anomaly start must be before end")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict with ISO-8601 UTC timestamps."""
        return {
            "asset": self.asset,
            "kind": self.kind,
            "sensors": list(self.sensors),
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InjectedAnomaly:
        """Inverse of :meth:`to_dict`."""
        return cls(
            asset=str(data["asset"]),
            kind=str(data["kind"]),
            sensors=tuple(str(s) for s in data["sensors"]),
            start=pd.Timestamp(data["start"]),
            end=pd.Timestamp(data["end"]),
        )


# --------------------------------------------------------------------------------------------- helpers


def _utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    """Timestamp in UTC; naive input is taken to be UTC."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """Generator determined by ``seed`` and string keys (stable across runs and platforms)."""
    if seed < 0:
        raise ValueError("seed must be non-negative")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(_key(k) for k in keys)]))


def _lag(target: np.ndarray, a: float) -> np.ndarray:
    """First-order lag y[k] = a*y[k-1] + (1-a)*target[k], started at steady state."""
    out = np.empty_like(target)
    y = float(target[0])
    b = 1.0 - a
    for k, u in enumerate(target.tolist()):
        y = a * y + b * u
        out[k] = y
    return out


def _ou(rng: np.random.Generator, n: int, dt: float, tau: float, sigma: float) -> np.ndarray:
    """Stationary zero-mean OU path (exact discretisation), std ``sigma``, time constant ``tau`` s."""
    a = math.exp(-dt / tau)
    first = rng.standard_normal() * sigma
    shocks = rng.standard_normal(n) * sigma * math.sqrt(1.0 - a * a)
    shocks[0] = first
    out = np.empty(n)
    x = 0.0
    for k, e in enumerate(shocks.tolist()):
        x = a * x + e
        out[k] = x
    return out


_LOAD_FAST = (300.0, 0.045)  # (time constant s, std) of fast load fluctuations, fraction of rated speed


@dataclass(frozen=True)
class _Asset:
    setpoint: float
    q_rated: float
    p_rated: float
    pump_eff: float
    vib_base: float
    vib_gain: float
    motor_rise: float
    bearing_rise: float
    amb_mean: float
    amb_amp: float
    phase_h: float


def _asset_params(asset: str) -> _Asset:
    r = np.random.default_rng(np.random.SeedSequence([_key("asset"), _key(asset)]))
    u = r.uniform
    return _Asset(
        setpoint=u(0.76, 0.86),
        q_rated=u(115.0, 140.0),
        p_rated=u(5.8, 7.2),
        pump_eff=u(0.68, 0.76),
        vib_base=u(0.8, 1.4),
        vib_gain=u(1.4, 2.0),
        motor_rise=u(55.0, 70.0),
        bearing_rise=u(20.0, 28.0),
        amb_mean=u(18.0, 26.0),
        amb_amp=u(4.0, 7.0),
        phase_h=u(-2.0, 2.0),
    )


def _index(start: pd.Timestamp, periods: int, period_s: float) -> pd.DatetimeIndex:
    if periods < 1:
        raise ValueError("periods must be >= 1")
    if not period_s > 0:
        raise ValueError("period_s must be > 0")
    idx = pd.date_range(_utc(start), periods=periods, freq=pd.Timedelta(seconds=period_s), name="ts")
    return idx.as_unit("ns")


# ----------------------------------------------------------------------------------------- normal data


def simulate_normal(
    asset: str,
    start: pd.Timestamp,
    periods: int,
    period_s: float,
    seed: int,
    sensors: Sequence[SensorSpec] = DEFAULT_SENSORS,
) -> pd.DataFrame:
    """Normal operation of one pump.

    Returns a float frame with a UTC DatetimeIndex named ``"ts"`` (``periods`` rows, ``period_s`` apart,
    starting at ``start``; naive = UTC) and one column per sensor in ``sensors`` order; values are clipped
    to each spec's range. Sensor names must be among ``DEFAULT_SENSORS``' names (ranges may differ).
    Deterministic in ``(asset, start, periods, period_s, seed)``; a longer series extends a shorter one
    with the same other arguments, and a column does not depend on which other sensors are requested.
    """
    unknown = [s.name for s in sensors if s.name not in _NOISE]
    if unknown:
        raise ValueError(f"no model for sensors {unknown}; known: {sorted(_NOISE)}")
    idx = _index(start, periods, period_s)
    n, dt = periods, float(period_s)
    p = _asset_params(asset)

    def rng(stream: str) -> np.random.Generator:  # one stream per process: longer series extend shorter ones
        return _rng(seed, "normal", asset, stream)

    epoch_s = idx.asi8 / 1e9
    hour = np.mod(epoch_s / 3600.0 + p.phase_h, 24.0)
    day = np.sin(2.0 * np.pi * (hour - 9.0) / 24.0)  # +1 at 15:00 local, -1 at 03:00
    demand = np.sin(2.0 * np.pi * (hour - 8.0) / 24.0)

    load = (
        p.setpoint * (1.0 + 0.06 * demand)
        + _ou(rng("load_fast"), n, dt, *_LOAD_FAST)
        + _ou(rng("load_slow"), n, dt, 5400.0, 0.02)
    )
    s = _lag(np.clip(load, 0.45, 1.05), math.exp(-dt / 20.0))  # drive ramp
    valve = np.exp(_ou(rng("valve"), n, dt, 1800.0, 0.02))
    ambient = p.amb_mean + p.amb_amp * day + _ou(rng("ambient"), n, dt, 3600.0, 0.4)

    flow = p.q_rated * s * np.sqrt(valve)
    pressure = p.p_rated * s**2 / np.sqrt(valve)
    current = _NO_LOAD_A + flow / 3600.0 * pressure * 1e5 / p.pump_eff * _A_PER_W
    motor = _lag(ambient + 8.0 + p.motor_rise * (current / _RATED_A) ** 2, math.exp(-dt / 1500.0))
    bearing = _lag(ambient + 6.0 + p.bearing_rise * s, math.exp(-dt / 2100.0))
    true = {
        "speed": _RATED_RPM * s,
        "flow": flow,
        "pressure": pressure,
        "current": current,
        "vibration": p.vib_base + p.vib_gain * s**2,
        "motor_temp": motor,
        "bearing_temp": bearing,
    }
    data = {
        spec.name: np.clip(
            true[spec.name] + _NOISE[spec.name] * rng("noise:" + spec.name).standard_normal(n), spec.low, spec.high
        )
        for spec in sensors
    }
    return pd.DataFrame(data, index=idx, dtype=float)


# ------------------------------------------------------------------------------------------- anomalies


def _scale(name: str, x: np.ndarray) -> float:
    """Robust normal-variation scale of a channel: 1.4826*MAD, floored by the nominal daily std."""
    mad = 1.4826 * float(np.median(np.abs(x - np.median(x))))
    return max(mad, _NOMINAL_STD.get(name, 0.0), 1e-9)


def _noise_sigma(name: str, x: np.ndarray) -> float:
    """Measurement-noise sigma: known for default channels, else robust std of first differences / sqrt 2."""
    if name in _NOISE:
        return _NOISE[name]
    d = np.diff(x)
    return max(1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0), 1e-9)


def _sign(rng: np.random.Generator, kind: str, name: str, seg: np.ndarray, size: float, low: float, high: float) -> int:
    """Preferred (or random) direction, flipped if the other side has more room for ``size``."""
    sign = _DIRECTION.get(kind, {}).get(name) or int(rng.choice([-1, 1]))
    room = {1: high - float(seg.max()), -1: float(seg.min()) - low}
    if room[sign] < size and room[-sign] > room[sign]:
        sign = -sign
    return sign


def _smooth(x: np.ndarray, w: int = 7) -> np.ndarray:
    pad = np.pad(x, (w // 2, w // 2), mode="edge")
    return np.convolve(pad, np.ones(w) / w, mode="valid")


_Injector = Callable[[np.random.Generator, str, np.ndarray, int, int, float, float], np.ndarray]


def _spike(rng: np.random.Generator, name: str, x: np.ndarray, i0: int, n: int, low: float, high: float) -> np.ndarray:
    """Intermittent spikes (1-2 samples, 6-12 scale each), one in every block of <= 12 samples of the span."""
    seg = x[i0 : i0 + n].copy()
    scale = _scale(name, x)
    count = max(1, math.ceil(n / 12))
    bounds = np.linspace(0, n, count + 1).astype(int)
    for a, b in itertools.pairwise(bounds.tolist()):
        pos = int(rng.integers(a, max(a + 1, b - 1)))
        width = min(int(rng.integers(1, 3)), n - pos)
        amp = rng.uniform(6.0, 12.0) * scale
        sign = _sign(rng, "spike", name, seg[pos : pos + width], amp, low, high)
        seg[pos : pos + width] += sign * amp
    return seg


def _drift(rng: np.random.Generator, name: str, x: np.ndarray, i0: int, n: int, low: float, high: float) -> np.ndarray:
    """Ramp reaching 6-8 scale within the first quarter of the span, then creeping on (up to +2 scale)."""
    seg = x[i0 : i0 + n].copy()
    scale = _scale(name, x)
    level, creep = rng.uniform(6.0, 8.0), rng.uniform(0.5, 2.0)
    k = np.arange(1, n + 1, dtype=float)
    offset = scale * (level * np.minimum(1.0, k / max(2.0, n / 4.0)) + creep * k / n)
    return seg + _sign(rng, "drift", name, seg, float(offset.max()), low, high) * offset


def _stuck(rng: np.random.Generator, name: str, x: np.ndarray, i0: int, n: int, low: float, high: float) -> np.ndarray:
    """Flat line at the last reading before the span (the first sample if the span starts the frame)."""
    return np.full(n, x[i0 - 1] if i0 > 0 else x[i0])


def _broken(rng: np.random.Generator, name: str, x: np.ndarray, i0: int, n: int, low: float, high: float) -> np.ndarray:
    """Sensor decouples from its drivers: moves quickly to a fixed level 6-8 scale away and stays there."""
    seg = x[i0 : i0 + n].copy()
    smooth = _smooth(x)
    scale = _scale(name, x)
    size = rng.uniform(6.0, 8.0) * scale
    ref = float(smooth[max(i0 - 1, 0)])
    target = ref + _sign(rng, "broken_correlation", name, seg, size, low, high) * size
    ramp = np.minimum(1.0, np.arange(1, n + 1) / max(1.0, min(6.0, n / 4.0)))
    hf = seg - smooth[i0 : i0 + n]  # keep the measurement noise
    return (1.0 - ramp) * seg + ramp * (target + hf)


def _noise_burst(
    rng: np.random.Generator, name: str, x: np.ndarray, i0: int, n: int, low: float, high: float
) -> np.ndarray:
    """Noise sigma multiplied by 8-10 (at least 2 scale so slow channels still show it)."""
    seg = x[i0 : i0 + n].copy()
    sigma = max(rng.uniform(8.0, 10.0) * _noise_sigma(name, x), 2.0 * _scale(name, x))
    return seg + rng.standard_normal(n) * sigma


_INJECTORS: dict[str, _Injector] = {
    "spike": _spike,
    "drift": _drift,
    "stuck": _stuck,
    "broken_correlation": _broken,
    "noise_burst": _noise_burst,
}


def _pick_sensors(kind: str, columns: Sequence[str], rng: np.random.Generator) -> tuple[str, ...]:
    pool = [c for c in _KIND_CANDIDATES[kind] if c in columns] or list(columns)
    count = int(rng.integers(1, min(_MAX_SENSORS.get(kind, 1), len(pool)) + 1))
    picked = rng.choice(len(pool), size=count, replace=False)
    return tuple(pool[i] for i in sorted(picked))


def inject(
    frame: pd.DataFrame,
    asset: str,
    kind: str,
    start: pd.Timestamp,
    duration: pd.Timedelta,
    seed: int,
    sensors: Sequence[str] | None = None,
    *,
    specs: Sequence[SensorSpec] = DEFAULT_SENSORS,
) -> tuple[pd.DataFrame, InjectedAnomaly]:
    """Inject one anomaly of ``kind`` over ``[start, start + duration)``.

    Returns a modified copy of ``frame`` (only rows in the span and only the anomaly's sensors change;
    values clipped to the ranges in ``specs``, where the column has one) and the ground truth. ``sensors``
    None picks 1-2 plausible channels for the kind from ``seed``. Anomaly sizes are in units of a robust
    per-sensor scale (see module constants). The span must lie within the frame and hold >= 1 sample.
    A ``stuck`` anomaly is only visible if the frozen channel's true signal moves during the span.
    """
    if kind not in _INJECTORS:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")
    idx = frame.index
    if not isinstance(idx, pd.DatetimeIndex) or idx.tz is None or len(idx) == 0:
        raise ValueError("frame needs a non-empty tz-aware DatetimeIndex")
    duration = pd.Timedelta(duration)
    if duration <= pd.Timedelta(0):
        raise ValueError("duration must be positive")
    t0, t1 = _utc(start), _utc(start) + duration
    step = idx[1] - idx[0] if len(idx) > 1 else pd.Timedelta(0)
    if t0 < idx[0] or t1 > idx[-1] + step:
        raise ValueError("anomaly span must lie within the frame")
    mask = np.asarray((idx >= t0) & (idx < t1))
    n = int(mask.sum())
    if n == 0:
        raise ValueError("anomaly span contains no samples")
    i0 = int(np.argmax(mask))
    rng = _rng(seed, "inject", asset, kind)
    if isinstance(sensors, str):
        sensors = (sensors,)
    chosen = tuple(dict.fromkeys(sensors)) if sensors is not None else _pick_sensors(kind, list(frame.columns), rng)
    missing = [s for s in chosen if s not in frame.columns]
    if not chosen or missing:
        raise ValueError(f"sensors must be non-empty frame columns; missing: {missing}")
    ranges = {s.name: (s.low, s.high) for s in specs}
    out = frame.copy()
    for name in chosen:
        x = frame[name].to_numpy(dtype=float)
        low, high = ranges.get(name, (-np.inf, np.inf))
        col = x.copy()
        col[i0 : i0 + n] = np.clip(_INJECTORS[kind](rng, name, x, i0, n, low, high), low, high)
        out[name] = col
    return out, InjectedAnomaly(asset=asset, kind=kind, sensors=chosen, start=t0, end=t1)


# ----------------------------------------------------------------------------------------------- fleet


def _stuck_placement(
    frame: pd.DataFrame, default: tuple[str, ...], lo: int, hi: int, n: int
) -> tuple[tuple[str, ...], int]:
    """(sensor, start in ``[lo, hi]``) where a frozen load-driven channel departs most from its true signal."""
    names = [c for c in _KIND_CANDIDATES["stuck"] if c in frame.columns] or list(default)
    starts = np.arange(max(lo, 1), hi + 1)
    if len(starts) == 0:
        return default, lo
    best = (-1.0, default, lo)
    for name in names:
        x = frame[name].to_numpy(dtype=float)
        spans = np.lib.stride_tricks.sliding_window_view(_smooth(x), n)[starts]
        score = np.abs(spans - x[starts - 1][:, None]).mean(axis=1) / _scale(name, x)
        k = int(np.argmax(score))
        if score[k] > best[0]:
            best = (float(score[k]), (name,), int(starts[k]))
    return best[1], best[2]


def simulate_fleet(
    assets: Sequence[str],
    start: pd.Timestamp,
    periods: int,
    period_s: float,
    seed: int,
    anomalous_assets: Sequence[str] | None = None,
    anomalies_per_asset: int = 2,
    kinds: Sequence[str] = ANOMALY_KINDS,
    sensors: Sequence[SensorSpec] = DEFAULT_SENSORS,
    min_duration_s: float = 180.0,
    max_duration_s: float = 900.0,
    margin_periods: int = 60,
) -> tuple[dict[str, pd.DataFrame], list[InjectedAnomaly]]:
    """Simulate a fleet and inject anomalies; returns ``({asset: frame}, anomalies)``.

    ``anomalous_assets`` None means all assets. Each anomalous asset gets ``anomalies_per_asset``
    anomalies, one per equal slot of the series, so that anomalies never overlap and are separated from
    each other and from both ends by at least ``margin_periods`` clean samples. Durations are whole
    periods in ``[min_duration_s, max_duration_s]`` (capped by the slot). Kinds are cycled over the
    fleet in ``kinds`` order, so every kind appears once there are ``len(kinds)`` anomalies; ``stuck``
    is placed where the frozen channel moves most. Anomalies are listed by asset order, then time.
    Deterministic for a given seed. Raises ValueError if the anomalies cannot fit.
    """
    if len(set(assets)) != len(assets) or not assets:
        raise ValueError("assets must be non-empty and unique")
    chosen_assets = list(assets) if anomalous_assets is None else list(anomalous_assets)
    if not set(chosen_assets) <= set(assets):
        raise ValueError("anomalous_assets must be a subset of assets")
    bad = [k for k in kinds if k not in ANOMALY_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {ANOMALY_KINDS}")
    if anomalies_per_asset < 0 or margin_periods < 0:
        raise ValueError("anomalies_per_asset and margin_periods must be >= 0")
    min_n = max(1, math.ceil(min_duration_s / period_s - 1e-9))
    max_n = math.floor(max_duration_s / period_s + 1e-9)
    if max_n < min_n:
        raise ValueError("max_duration_s must be >= min_duration_s and >= one period")

    frames = {a: simulate_normal(a, start, periods, period_s, seed, sensors) for a in assets}
    anomalies: list[InjectedAnomaly] = []
    if anomalies_per_asset == 0 or not chosen_assets:
        return frames, anomalies
    slot = (periods - margin_periods) // anomalies_per_asset
    capacity = slot - margin_periods
    if capacity < min_n:
        raise ValueError(
            f"{anomalies_per_asset} anomalies of >= {min_n} periods with margins of {margin_periods} "
            f"do not fit in {periods} periods"
        )
    rng = _rng(seed, "fleet")
    j = 0
    for asset in (a for a in assets if a in set(chosen_assets)):
        frame = frames[asset]
        idx = frame.index
        for i in range(anomalies_per_asset):
            kind = kinds[j % len(kinds)]
            j += 1
            top = min(max_n, capacity)
            low_n = (min_n + top) // 2 if kind == "stuck" else min_n  # a frozen sensor stays frozen
            n = int(rng.integers(low_n, top + 1))
            lo = margin_periods + i * slot
            hi = lo + capacity - n
            chosen = _pick_sensors(kind, list(frame.columns), rng)
            if kind == "stuck":
                chosen, i0 = _stuck_placement(frame, chosen, lo, hi, n)
            else:
                i0 = int(rng.integers(lo, hi + 1))
            frame, record = inject(
                frame,
                asset,
                kind,
                idx[i0],
                n * pd.Timedelta(seconds=period_s),
                seed=int(rng.integers(0, 2**31)),
                sensors=chosen,
                specs=sensors,
            )
            anomalies.append(record)
        frames[asset] = frame
    return frames, anomalies


# ------------------------------------------------------------------------------------ messages and I/O


def to_messages(frames: Mapping[str, pd.DataFrame]) -> list[tuple[str, dict[str, Any]]]:
    """Flatten frames to ``(asset, payload)`` sorted by time, then asset.

    ``payload == {"asset": asset, "ts": <epoch ms int>, "values": {sensor: float}}`` (columns in order).
    """
    out: list[tuple[int, str, dict[str, Any]]] = []
    for asset, frame in frames.items():
        ts_ms = (pd.DatetimeIndex(frame.index).as_unit("ns").asi8 // 1_000_000).tolist()
        names = [str(c) for c in frame.columns]
        for ts, row in zip(ts_ms, frame.to_numpy(dtype=float).tolist(), strict=True):
            payload = {"asset": asset, "ts": int(ts), "values": dict(zip(names, row, strict=True))}
            out.append((int(ts), asset, payload))
    out.sort(key=lambda t: (t[0], t[1]))
    return [(asset, payload) for _, asset, payload in out]


def write_ground_truth(path: Path, anomalies: Sequence[InjectedAnomaly]) -> None:
    """Write anomalies as a JSON list of :meth:`InjectedAnomaly.to_dict` (UTF-8, indented)."""
    Path(path).write_text(json.dumps([a.to_dict() for a in anomalies], indent=2) + "\n", encoding="utf-8")


def read_ground_truth(path: Path) -> list[InjectedAnomaly]:
    """Read a file written by :func:`write_ground_truth`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list")
    return [InjectedAnomaly.from_dict(item) for item in data]
