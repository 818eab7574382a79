"""Unit tests for pipeline.simulate (pure code, plain data)."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.simulate import (
    ANOMALY_KINDS,
    DEFAULT_SENSORS,
    InjectedAnomaly,
    SensorSpec,
    inject,
    read_ground_truth,
    simulate_fleet,
    simulate_normal,
    to_messages,
    write_ground_truth,
)

T0 = pd.Timestamp("2024-05-01T00:00:00Z")
DAY = 8640  # one day at 10 s
HALF_DAY = 4320
NAMES = [s.name for s in DEFAULT_SENSORS]
RANGES = {s.name: (s.low, s.high) for s in DEFAULT_SENSORS}


@functools.cache
def normal_day(asset: str = "pump-01", seed: int = 3) -> pd.DataFrame:
    return simulate_normal(asset, T0, DAY, 10.0, seed)


@functools.cache
def holdout_frame() -> pd.DataFrame:
    return simulate_normal("pump-01", T0 + pd.Timedelta(days=1), HALF_DAY, 10.0, seed=11)


def day_std(name: str) -> float:
    return float(normal_day()[name].std())


def assert_in_ranges(frame: pd.DataFrame, specs: tuple[SensorSpec, ...] = DEFAULT_SENSORS) -> None:
    for spec in specs:
        col = frame[spec.name].to_numpy()
        assert np.isfinite(col).all()
        assert col.min() >= spec.low and col.max() <= spec.high, spec.name


def span_mask(frame: pd.DataFrame, anomaly: InjectedAnomaly) -> np.ndarray:
    return np.asarray((frame.index >= anomaly.start) & (frame.index < anomaly.end))


# ----------------------------------------------------------------------------------------- specs


def test_default_sensors_describe_a_pump() -> None:
    assert 6 <= len(DEFAULT_SENSORS) <= 8
    assert len(set(NAMES)) == len(NAMES)
    assert {"flow", "pressure", "speed", "current", "vibration", "bearing_temp"} <= set(NAMES)
    assert all(s.low < s.high and s.unit for s in DEFAULT_SENSORS)


def test_sensor_spec_rejects_empty_range() -> None:
    with pytest.raises(ValueError):
        SensorSpec("x", "u", 1.0, 1.0)


def test_anomaly_kinds() -> None:
    assert ANOMALY_KINDS == ("spike", "drift", "stuck", "broken_correlation", "noise_burst")


# ----------------------------------------------------------------------------------- normal data


def test_simulate_normal_shape_index_columns() -> None:
    frame = simulate_normal("pump-01", T0, 500, 10.0, seed=1)
    assert frame.shape == (500, len(DEFAULT_SENSORS))
    assert list(frame.columns) == NAMES
    assert isinstance(frame.index, pd.DatetimeIndex)
    assert frame.index.name == "ts"
    assert str(frame.index.tz) == "UTC"
    assert frame.index[0] == T0
    assert (np.diff(frame.index.asi8) == 10 * 10**9).all()
    assert all(dtype == np.float64 for dtype in frame.dtypes)


def test_simulate_normal_naive_start_is_utc_and_fractional_period() -> None:
    frame = simulate_normal("p", pd.Timestamp("2024-05-01 06:00"), 10, 0.5, seed=1)
    assert frame.index[0] == pd.Timestamp("2024-05-01T06:00Z")
    assert frame.index[1] - frame.index[0] == pd.Timedelta(milliseconds=500)


def test_simulate_normal_sensor_subset_order_and_ranges() -> None:
    specs = (SensorSpec("vibration", "mm/s", 0.0, 2.4), SensorSpec("flow", "m3/h", 0.0, 500.0))
    frame = simulate_normal("pump-01", T0, 2000, 10.0, seed=3, sensors=specs)
    assert list(frame.columns) == ["vibration", "flow"]
    assert frame["vibration"].max() <= 2.4  # clipped to the custom range
    full = normal_day().iloc[:2000]
    np.testing.assert_array_equal(frame["flow"].to_numpy(), full["flow"].to_numpy())


def test_simulate_normal_longer_series_extends_shorter() -> None:
    short = simulate_normal("pump-01", T0, 700, 10.0, seed=8)
    long = simulate_normal("pump-01", T0, 1500, 10.0, seed=8)
    pd.testing.assert_frame_equal(short, long.iloc[:700])


def test_simulate_normal_unknown_sensor_and_bad_args() -> None:
    with pytest.raises(ValueError, match="no model"):
        simulate_normal("p", T0, 10, 10.0, 1, sensors=(SensorSpec("humidity", "%", 0, 100),))
    with pytest.raises(ValueError):
        simulate_normal("p", T0, 0, 10.0, 1)
    with pytest.raises(ValueError):
        simulate_normal("p", T0, 10, 0.0, 1)
    with pytest.raises(ValueError):
        simulate_normal("p", T0, 10, 10.0, -1)


def test_simulate_normal_deterministic_per_seed() -> None:
    a = simulate_normal("pump-01", T0, 1000, 10.0, seed=5)
    b = simulate_normal("pump-01", T0, 1000, 10.0, seed=5)
    c = simulate_normal("pump-01", T0, 1000, 10.0, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())


def test_operating_point_depends_on_asset_not_seed() -> None:
    a1 = simulate_normal("pump-01", T0, DAY, 10.0, seed=1).mean()
    a2 = simulate_normal("pump-01", T0, DAY, 10.0, seed=2).mean()
    b1 = simulate_normal("pump-02", T0, DAY, 10.0, seed=1).mean()
    assert abs(a1["flow"] - a2["flow"]) / a1["flow"] < 0.04
    assert abs(a1["bearing_temp"] - a2["bearing_temp"]) < 3.0
    assert not np.allclose(a1.to_numpy(), b1.to_numpy(), rtol=0.01)


def test_normal_values_within_ranges() -> None:
    for seed in range(4):
        assert_in_ranges(simulate_normal(f"pump-{seed}", T0, DAY, 10.0, seed))


def test_channels_correlated_as_designed() -> None:
    f = normal_day()
    corr = f.corr()
    assert corr.loc["flow", "speed"] > 0.8
    assert corr.loc["pressure", "speed"] > 0.8
    assert corr.loc["vibration", "speed"] > 0.6
    assert np.corrcoef(f["current"], f["flow"] * f["pressure"])[0, 1] > 0.9
    # affinity laws: flow ~ speed^1, pressure ~ speed^2
    log_s = np.log(f["speed"])
    assert np.polyfit(log_s, np.log(f["flow"]), 1)[0] == pytest.approx(1.0, abs=0.2)
    assert np.polyfit(log_s, np.log(f["pressure"]), 1)[0] == pytest.approx(2.0, abs=0.3)
    # temperatures are slow first-order lags: tiny sample-to-sample change vs their daily range
    for name in ("motor_temp", "bearing_temp"):
        assert f[name].diff().std() < 0.1 * f[name].std()


def test_daily_cycle_in_temperatures() -> None:
    f = simulate_normal("pump-03", T0, 2 * DAY, 10.0, seed=2)
    hourly = f["bearing_temp"].groupby(f.index.hour).mean()
    assert hourly.max() - hourly.min() > 4.0  # ambient cycle of several kelvin


# -------------------------------------------------------------------------------------- anomalies


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(ANOMALY_KINDS),
    start_i=st.integers(0, HALF_DAY - 1),
    duration_n=st.integers(1, 120),
    seed=st.integers(0, 2**32),
)
def test_inject_changes_only_inside_span_and_stays_in_range(
    kind: str, start_i: int, duration_n: int, seed: int
) -> None:
    frame = holdout_frame()
    duration_n = min(duration_n, HALF_DAY - start_i)
    out, rec = inject(frame, "pump-01", kind, frame.index[start_i], pd.Timedelta(seconds=10 * duration_n), seed)
    mask = span_mask(frame, rec)
    assert mask.sum() == duration_n
    pd.testing.assert_frame_equal(out[~mask], frame[~mask])
    untouched = [c for c in frame.columns if c not in rec.sensors]
    pd.testing.assert_frame_equal(out[untouched], frame[untouched])
    assert_in_ranges(out)
    assert rec.kind == kind and rec.asset == "pump-01" and rec.sensors
    assert rec.end - rec.start == pd.Timedelta(seconds=10 * duration_n)
    if duration_n > 1 or kind != "stuck":
        assert not out.equals(frame)


def _inject(
    kind: str, sensors: tuple[str, ...] | None, n: int = 60, at: int = 2000, seed: int = 4
) -> tuple[pd.DataFrame, pd.DataFrame, InjectedAnomaly, np.ndarray]:
    frame = holdout_frame()
    out, rec = inject(frame, "pump-01", kind, frame.index[at], pd.Timedelta(seconds=10 * n), seed, sensors)
    return frame, out, rec, span_mask(frame, rec)


def test_inject_does_not_mutate_input_and_is_deterministic() -> None:
    frame = holdout_frame()
    before = frame.copy()
    a = inject(frame, "p", "noise_burst", frame.index[100], pd.Timedelta(minutes=5), seed=9)
    b = inject(frame, "p", "noise_burst", frame.index[100], pd.Timedelta(minutes=5), seed=9)
    pd.testing.assert_frame_equal(frame, before)
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.mark.parametrize("sensor", ["vibration", "pressure", "current"])
def test_spike_is_large_short_and_spread(sensor: str) -> None:
    frame, out, _rec, mask = _inject("spike", (sensor,), n=90)
    delta = np.abs(out[sensor] - frame[sensor]).to_numpy()[mask] / day_std(sensor)
    hit = np.flatnonzero(delta > 0)
    assert delta.max() >= 6.0
    assert delta[hit].min() >= 5.0  # every excursion is large (day std vs robust scale)
    assert len(hit) <= 0.25 * mask.sum()  # a burst of short spikes, not a level shift
    assert np.diff(np.concatenate([[-1], hit, [mask.sum()]])).max() <= 24  # spread over the span


def test_drift_ramps_to_large_offset_early_and_holds() -> None:
    frame, out, _rec, mask = _inject("drift", ("bearing_temp",), n=60)
    offset = (out["bearing_temp"] - frame["bearing_temp"]).to_numpy()[mask] / day_std("bearing_temp")
    assert offset[0] < offset[15]  # gradual start
    assert (offset[15:] >= 6.0).all()  # reached early, held to the end
    assert np.all(np.diff(offset) > 0)  # monotone ramp / creep upwards (bearing heating)


def test_stuck_is_flat_at_last_value() -> None:
    frame, out, _rec, mask = _inject("stuck", ("flow",), n=60)
    i0 = int(np.argmax(mask))
    seg = out["flow"].to_numpy()[mask]
    assert (seg == frame["flow"].iloc[i0 - 1]).all()
    assert frame["flow"].to_numpy()[mask].std() > 0  # the true signal kept moving


def test_stuck_at_frame_start_freezes_first_sample() -> None:
    frame = holdout_frame()
    out, _ = inject(frame, "p", "stuck", frame.index[0], pd.Timedelta(minutes=2), 1, ["speed"])
    assert (out["speed"].iloc[:12] == frame["speed"].iloc[0]).all()


def test_broken_correlation_decouples_flow_downwards() -> None:
    frame, out, _rec, mask = _inject("broken_correlation", ("flow",), n=60)
    dev = (out["flow"] - frame["flow"]).to_numpy()[mask] / day_std("flow")
    assert np.median(dev[6:]) <= -5.0  # flow drops while speed and pressure carry on
    pd.testing.assert_series_equal(out["speed"], frame["speed"])
    assert out["flow"].to_numpy()[mask][6:].std() > 0  # still a live, noisy reading


@pytest.mark.parametrize("sensor", ["vibration", "flow", "current"])
def test_noise_burst_amplifies_noise(sensor: str) -> None:
    frame, out, _rec, mask = _inject("noise_burst", (sensor,), n=90)
    added = (out[sensor] - frame[sensor]).to_numpy()[mask]
    normal_noise = frame[sensor].diff().std() / np.sqrt(2.0)
    assert added.std() >= 7.0 * normal_noise
    assert abs(added.mean()) < 0.5 * added.std()  # noise, not an offset


def test_inject_default_sensor_choice() -> None:
    frame = holdout_frame()
    for kind in ANOMALY_KINDS:
        for seed in range(5):
            _, rec = inject(frame, "p", kind, frame.index[10], pd.Timedelta(minutes=3), seed)
            assert 1 <= len(rec.sensors) <= 2 and set(rec.sensors) <= set(NAMES)
            if kind in ("drift", "stuck", "broken_correlation"):
                assert len(rec.sensors) == 1


def test_inject_clips_to_spec_ranges() -> None:
    frame = holdout_frame()
    specs = (SensorSpec("vibration", "mm/s", 0.0, frame["vibration"].max() + 0.01),)
    out, _ = inject(frame, "p", "spike", frame.index[10], pd.Timedelta(minutes=10), 1, ["vibration"], specs=specs)
    assert out["vibration"].max() <= specs[0].high
    assert out["vibration"].min() >= 0.0


def test_inject_generic_column() -> None:
    frame = holdout_frame().assign(extra=np.linspace(0.0, 1.0, HALF_DAY))
    out, rec = inject(frame, "p", "noise_burst", frame.index[10], pd.Timedelta(minutes=10), 1, "extra")
    assert rec.sensors == ("extra",)
    assert not out["extra"].equals(frame["extra"])


def test_inject_rejects_bad_input() -> None:
    frame = holdout_frame()
    ts, five = frame.index[10], pd.Timedelta(minutes=5)
    with pytest.raises(ValueError, match="kind"):
        inject(frame, "p", "meltdown", ts, five, 1)
    with pytest.raises(ValueError):
        inject(frame, "p", "spike", ts, pd.Timedelta(0), 1)
    with pytest.raises(ValueError, match="within"):
        inject(frame, "p", "spike", frame.index[-1], five, 1)
    with pytest.raises(ValueError, match="within"):
        inject(frame, "p", "spike", frame.index[0] - five, five, 1)
    with pytest.raises(ValueError, match="no samples"):
        inject(frame, "p", "spike", ts + pd.Timedelta(seconds=1), pd.Timedelta(seconds=2), 1)
    with pytest.raises(ValueError, match="missing"):
        inject(frame, "p", "spike", ts, five, 1, ["humidity"])
    with pytest.raises(ValueError):
        inject(frame.reset_index(drop=True), "p", "spike", ts, five, 1)


# ------------------------------------------------------------------------------------ ground truth


def test_injected_anomaly_normalises_and_validates() -> None:
    rec = InjectedAnomaly(
        "p",
        "spike",
        ["flow"],
        pd.Timestamp("2024-05-01 01:00"),  # type: ignore[arg-type]
        pd.Timestamp("2024-05-01T04:00+02:00"),
    )
    assert rec.sensors == ("flow",)
    assert str(rec.start.tz) == "UTC" and rec.end == pd.Timestamp("2024-05-01T02:00Z")
    with pytest.raises(ValueError):
        InjectedAnomaly("p", "spike", ("flow",), T0, T0)
    with pytest.raises(ValueError):
        InjectedAnomaly("p", "leak", ("flow",), T0, T0 + pd.Timedelta(1, "s"))


def test_ground_truth_json_round_trip(tmp_path: Path) -> None:
    _, anomalies = simulate_fleet(["a", "b", "c"], T0, HALF_DAY, 10.0, seed=2)
    d = anomalies[0].to_dict()
    assert set(d) == {"asset", "kind", "sensors", "start", "end"}
    assert pd.Timestamp(d["start"]) == anomalies[0].start and d["start"].endswith("+00:00")
    json.dumps(d)
    path = tmp_path / "truth.json"
    write_ground_truth(path, anomalies)
    assert json.loads(path.read_text()) == [a.to_dict() for a in anomalies]
    assert read_ground_truth(path) == anomalies
    write_ground_truth(path, [])
    assert read_ground_truth(path) == []
    path.write_text("{}")
    with pytest.raises(ValueError):
        read_ground_truth(path)


# ------------------------------------------------------------------------------------------- fleet


def test_fleet_places_separated_anomalies_and_every_kind() -> None:
    assets = ["p1", "p2", "p3", "p4"]
    margin = 60
    frames, anomalies = simulate_fleet(assets, T0, HALF_DAY, 10.0, seed=7, anomalies_per_asset=3, margin_periods=margin)
    assert set(frames) == set(assets)
    assert len(anomalies) == 12
    assert {a.kind for a in anomalies} == set(ANOMALY_KINDS)
    period = pd.Timedelta(seconds=10)
    for asset in assets:
        frame = frames[asset]
        clean = simulate_normal(asset, T0, HALF_DAY, 10.0, seed=7)
        own = sorted((a for a in anomalies if a.asset == asset), key=lambda a: a.start)
        assert len(own) == 3
        assert own[0].start - frame.index[0] >= margin * period
        assert frame.index[-1] + period - own[-1].end >= margin * period
        for prev, nxt in itertools.pairwise(own):
            assert nxt.start - prev.end >= margin * period
        inside = np.zeros(len(frame), bool)
        for a in own:
            assert pd.Timedelta(minutes=3) <= a.end - a.start <= pd.Timedelta(minutes=15)
            assert a.start in frame.index
            inside |= span_mask(frame, a)
        pd.testing.assert_frame_equal(frame[~inside], clean[~inside])
        assert not frame[inside].equals(clean[inside])
        assert_in_ranges(frame)


def test_fleet_deterministic_and_respects_anomalous_assets() -> None:
    args = (["p1", "p2", "p3"], T0, 2000, 10.0, 4)
    f1, a1 = simulate_fleet(*args, anomalous_assets=["p2"], anomalies_per_asset=5)
    f2, a2 = simulate_fleet(*args, anomalous_assets=["p2"], anomalies_per_asset=5)
    assert a1 == a2
    for k in f1:
        pd.testing.assert_frame_equal(f1[k], f2[k])
    assert {a.asset for a in a1} == {"p2"}
    assert [a.kind for a in a1] == list(ANOMALY_KINDS)
    pd.testing.assert_frame_equal(f1["p1"], simulate_normal("p1", T0, 2000, 10.0, 4))
    _, a3 = simulate_fleet(*args[:4], 5, anomalous_assets=["p2"], anomalies_per_asset=5)
    assert a3 != a1


def test_fleet_kinds_subset_and_no_anomalies() -> None:
    _, anomalies = simulate_fleet(["a", "b"], T0, 2000, 10.0, 1, kinds=("stuck",))
    assert [a.kind for a in anomalies] == ["stuck"] * 4
    frames, none = simulate_fleet(["a"], T0, 500, 10.0, 1, anomalies_per_asset=0)
    assert none == [] and len(frames["a"]) == 500
    _, none = simulate_fleet(["a"], T0, 500, 10.0, 1, anomalous_assets=[])
    assert none == []


def test_fleet_stuck_placed_where_signal_moves() -> None:
    frames, anomalies = simulate_fleet(["a", "b", "c"], T0, HALF_DAY, 10.0, 3, kinds=("stuck",))
    for a in anomalies:
        name = a.sensors[0]
        clean = simulate_normal(a.asset, T0, HALF_DAY, 10.0, 3)[name]
        mask = span_mask(clean, a)
        gap = np.abs(clean.to_numpy()[mask] - frames[a.asset][name].to_numpy()[mask])
        assert gap.max() > 1.5 * clean.std()  # a flat line that clearly departs from the true signal


def test_fleet_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        simulate_fleet(["a"], T0, 200, 10.0, 1, anomalies_per_asset=3)
    with pytest.raises(ValueError):
        simulate_fleet(["a", "a"], T0, 300, 10.0, 1)
    with pytest.raises(ValueError):
        simulate_fleet(["a"], T0, 3000, 10.0, 1, anomalous_assets=["b"])
    with pytest.raises(ValueError):
        simulate_fleet(["a"], T0, 3000, 10.0, 1, kinds=("leak",))
    with pytest.raises(ValueError):
        simulate_fleet(["a"], T0, 3000, 10.0, 1, min_duration_s=600, max_duration_s=300)


# ---------------------------------------------------------------------------------------- messages


def test_to_messages_format_and_order() -> None:
    idx_b = pd.date_range("2024-05-01T00:00:05Z", periods=3, freq="10s", name="ts")
    frames = {
        "b": simulate_normal("b", T0, 3, 10.0, 1),
        "a": simulate_normal("a", T0, 3, 10.0, 1),
        "c": simulate_normal("c", T0, 3, 10.0, 1).set_axis(idx_b),
    }
    messages = to_messages(frames)
    assert len(messages) == 9
    keys = [(p["ts"], asset) for asset, p in messages]
    assert keys == sorted(keys)
    assert [asset for asset, _ in messages[:4]] == ["a", "b", "c", "a"]
    for asset, payload in messages:
        assert set(payload) == {"asset", "ts", "values"}
        assert payload["asset"] == asset
        assert type(payload["ts"]) is int
        assert list(payload["values"]) == NAMES
        assert all(type(v) is float for v in payload["values"].values())
    first = messages[0][1]
    assert first["ts"] == 1714521600000
    assert first["values"] == frames["a"].iloc[0].to_dict()
    assert messages[2][1]["ts"] == 1714521605000
    json.dumps([p for _, p in messages])
    assert to_messages({}) == []


# ------------------------------------------------------------------------------ detectability sanity


def _window_errors(
    frame: pd.DataFrame, mu: pd.Series, sd: pd.Series, mean: np.ndarray, basis: np.ndarray, width: int = 30
) -> np.ndarray:
    z = ((frame - mu) / sd).to_numpy()
    win = np.lib.stride_tricks.sliding_window_view(z, (width, z.shape[1]))[:, 0].reshape(len(z) - width + 1, -1)
    centred = win - mean
    resid = centred - (centred @ basis) @ basis.T
    return (resid**2).mean(axis=1)


def test_every_kind_is_detectable_by_a_window_reconstruction_model() -> None:
    """PCA (12 comps) on standardised 30-sample windows of a normal day; anomalies must stand out."""
    train = simulate_normal("pump-07", T0, DAY, 10.0, seed=1)
    mu, sd = train.mean(), train.std()
    z = ((train - mu) / sd).to_numpy()
    win = np.lib.stride_tricks.sliding_window_view(z, (30, z.shape[1]))[:, 0].reshape(DAY - 29, -1)
    mean = win.mean(axis=0)
    basis = np.linalg.svd(win - mean, full_matrices=False)[2][:12].T
    threshold = np.percentile(_window_errors(train, mu, sd, mean, basis), 99.5)

    frames, anomalies = simulate_fleet(
        ["pump-07"], T0 + pd.Timedelta(days=1), HALF_DAY, 10.0, seed=2, anomalies_per_asset=5
    )
    frame = frames["pump-07"]
    errors = _window_errors(frame, mu, sd, mean, basis)
    labelled = np.zeros(len(errors), bool)
    for a in anomalies:
        i0 = frame.index.get_loc(a.start)
        n = int(span_mask(frame, a).sum())
        overlapping = errors[max(0, i0 - 29) : i0 + n]
        labelled[max(0, i0 - 29) : i0 + n] = True
        assert overlapping.max() > 3.0 * threshold, a.kind
        assert (overlapping > threshold).mean() > 0.5, a.kind
    assert (errors[~labelled] > threshold).mean() < 0.03  # clean stretches stay quiet


def test_the_demo_uses_names_of_its_own_in_a_shared_database() -> None:
    """With DATABASE_URL set, the demo trained and activated a model of group 'pumps' and wrote alerts of 'pump-1':
    a plant's names (config/example.yaml's). In its own SQLite file it keeps the readable ones."""
    from pipeline.demo import demo_config, demo_names

    assert demo_names("ab12cd34", 2, shared_database=False) == ("pumps", ["pump-1", "pump-2"])
    group, assets = demo_names("ab12cd34", 2, shared_database=True)
    assert group == "demo-ab12cd34" and assets == ["demo-ab12cd34-pump-1", "demo-ab12cd34-pump-2"]
    assert group != demo_names("ef56ab78", 2, shared_database=True)[0]  # a second run does not reuse them
    cfg = demo_config(bootstrap="b:9092", database_url="sqlite://", model_dir=Path("m"), assets=assets,
                      run_id="ab12cd34", group=group)
    assert [g.name for g in cfg.groups] == [group] and cfg.groups[0].assets == assets
