"""Retraining's pure parts (window filtering and holdout, the validation gate, the cron trigger), the retrain lock on
SQLite, and the runner's hot reload refusing a broken bundle while the current model keeps serving."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from models.thresholds import ewma, ewma_by_key
from pipeline.config import Config, parse_config
from pipeline.errors import ConfigError
from pipeline.registry import load_active, register
from pipeline.retrain import GateDecision, ModelEval, Span, design_rate, exceed_rate, gate, near_alerts, split_windows
from pipeline.runner import Runner
from pipeline.scheduler import cron_trigger
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.store.tables import PipelineInstance, RetrainLock
from pipeline.thinning import Thinning, thin_to
from pipeline.train import train_group
from pipeline.types import Window

MIN = 60_000


def _window(asset: str, start_min: int, length_min: int = 10) -> Window:
    return Window(asset, "g", start_min * MIN, (start_min + length_min) * MIN, np.zeros((2, 1)))


# -- split_windows -----------------------------------------------------------------------------------------------
def test_split_holds_out_the_newest_windows_and_never_shares_readings() -> None:
    windows = [_window(a, s) for a in ("a", "b") for s in range(0, 100, 5)]  # 20 per asset, 10 min long, 5 apart
    split = split_windows(windows, alerts=[], flagged=set(), margin_ms=0, holdout_fraction=0.25)
    cut = min(w.start_ms for w in split.holdout)
    assert len(split.holdout) == 10  # the newest quarter of 40 windows
    assert all(w.end_ms <= cut for w in split.train)  # no training window reaches into the held-out span
    assert len(split.train) == 28  # the two windows per asset straddling the cut are in neither
    assert split.total == 40 and split.anomalous == 0 and split.alert_windows == []


def test_split_drops_windows_near_alerts_and_above_threshold_from_training() -> None:
    windows = [_window("a", s) for s in range(0, 200, 5)]
    alert = Span("a", 50 * MIN, 70 * MIN)
    flagged = {("a", (100 + 10) * MIN)}  # the window starting at minute 100
    split = split_windows(windows, alerts=[alert], flagged=flagged, margin_ms=10 * MIN, holdout_fraction=0.2)
    in_alert = {w.start_ms // MIN for w in split.alert_windows}
    assert in_alert == {45, 50, 55, 60, 65}  # [start, end) meets [50, 70]
    train = {w.start_ms // MIN for w in split.train}
    assert not train & set(range(35, 76))  # widened by the 10-minute margin on both sides
    assert 30 in train and 80 in train and 100 not in train
    assert split.near_alert == 9 and split.flagged == 1 and split.anomalous == 10
    assert split.anomalous_fraction == pytest.approx(10 / 40)


def test_flagged_windows_stay_in_the_holdout_where_they_count_as_false_alarms() -> None:
    windows = [_window("a", s) for s in range(0, 100, 5)]
    newest = windows[-1]
    split = split_windows(windows, alerts=[Span("b", 0, 10**9)], flagged={("a", newest.end_ms)}, margin_ms=0,
                          holdout_fraction=0.2)
    assert newest in split.holdout  # another asset's alert does not touch asset a
    assert split.alert_windows == []


def test_split_of_nothing() -> None:
    split = split_windows([], alerts=[], flagged=set(), margin_ms=0, holdout_fraction=0.2)
    assert (split.total, split.train, split.holdout, split.anomalous_fraction) == (0, [], [], 0.0)


def test_exceed_rate_counts_strictly_above_like_the_pipeline() -> None:
    assert exceed_rate(np.array([0.5, 1.0, 1.5, 2.0]), 1.0) == 0.5
    assert exceed_rate(np.empty(0), 1.0) is None


# -- the gate ------------------------------------------------------------------------------------------------------
def _eval(far: float | None, recall: float | None = None, version: str = "c") -> ModelEval:
    return ModelEval(version, 1.0, far, recall)


def test_gate_promotes_a_candidate_not_worse_beyond_the_tolerance() -> None:
    decision = gate(_eval(0.03, 0.9), _eval(0.02, 0.91, "a"), anomalous_fraction=0.1, max_anomalous_fraction=0.5,
                    tolerance=0.02)
    assert decision.promote
    assert "3.00% vs active 2.00%" in decision.reason and "90.00% vs 91.00%" in decision.reason


@pytest.mark.parametrize(("candidate", "active", "fraction", "expected"), [
    (_eval(0.05), _eval(0.02, version="a"), 0.1, "false-alarm rate on held-out normal data 5.00%"),
    (_eval(0.01, 0.5), _eval(0.01, 0.9, "a"), 0.1, "flags 50.00% of the alert windows, the active model 90.00%"),
    (_eval(0.01), _eval(0.01, version="a"), 0.6, "60.0% of the recent windows"),
    (_eval(None), _eval(0.01, version="a"), 0.1, "no held-out normal windows"),
])
def test_gate_rejects_with_the_reason(candidate: ModelEval, active: ModelEval, fraction: float, expected: str
                                      ) -> None:
    decision = gate(candidate, active, anomalous_fraction=fraction, max_anomalous_fraction=0.5, tolerance=0.02)
    assert not decision.promote
    assert expected in decision.reason


def test_gate_reports_every_failed_check_and_skips_recall_without_alert_windows() -> None:
    decision = gate(_eval(0.2, 0.1), _eval(0.0, 0.9, "a"), anomalous_fraction=0.7, max_anomalous_fraction=0.5,
                    tolerance=0.02)
    assert len(decision.reasons) == 3
    assert gate(_eval(0.0, None), _eval(0.0, 0.9, "a"), anomalous_fraction=0.0, max_anomalous_fraction=0.5,
                tolerance=0.0).promote


def test_gate_does_not_compare_recall_across_a_score_steps_change() -> None:

    candidate, active = replace(_eval(0.01, 0.5), score_steps=10), _eval(0.01, 0.9, "a")
    decision = gate(candidate, active, anomalous_fraction=0.1, max_anomalous_fraction=0.5, tolerance=0.02)
    assert decision.promote  # the active model's alert windows hold the lag the candidate no longer has
    assert "(not compared: the candidate scores the last 10 steps of each window, the active model the whole " \
           "window)" in decision.reason
    worse = replace(_eval(0.05, 0.5), score_steps=10)  # the false-alarm check still applies
    assert not gate(worse, active, anomalous_fraction=0.1, max_anomalous_fraction=0.5, tolerance=0.02).promote
    same = replace(active, version="c", recall=0.5)  # same steps: compared as before
    assert not gate(same, active, anomalous_fraction=0.1, max_anomalous_fraction=0.5, tolerance=0.02).promote


def test_gate_rejects_a_candidate_that_flags_fewer_synthetic_faults() -> None:
    """Without recent alerts, recall on alert windows cannot be compared: a candidate whose threshold went slack (a
    re-trial promoted one 9x less sensitive) is caught by the synthetic faults instead, beyond sampling noise."""

    active = replace(_eval(0.0, None, "a"), sensitivity=0.92)
    slack = replace(_eval(0.0, None), sensitivity=0.15)
    decision = gate(slack, active, anomalous_fraction=0.0, max_anomalous_fraction=0.5, tolerance=0.02)
    assert not decision.promote
    assert "flags 15.00% of synthetic faults (a 3-sigma step on one sensor), the active model 92.00%" in decision.reason
    close = replace(slack, sensitivity=0.85)  # within SENSITIVITY_SLACK: noise, not a slacker model
    decision = gate(close, active, anomalous_fraction=0.0, max_anomalous_fraction=0.5, tolerance=0.02)
    assert decision.promote and "synthetic faults flagged 85.00% vs 92.00%" in decision.reason


def test_synthetic_faults_step_one_moving_sensor_over_the_second_half() -> None:
    from pipeline.retrain import synthetic_faults

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 2.0, (50, 8, 1)), np.full((50, 8, 1), 5.0)], axis=2)  # sensor 1 constant
    windows = [Window("a", "g", i * 1000, i * 1000 + 8000, values[i]) for i in range(50)]
    faults = synthetic_faults(windows, count=20)
    assert faults.faulty.shape == faults.clean.shape == (20, 8, 2) and faults.faulty.dtype == values.dtype
    assert all(any(np.array_equal(c, v) for v in values) for c in faults.clean)  # held-out windows as they were
    std = values[:, :, 0].std()
    step = faults.faulty - faults.clean
    assert np.allclose(step[:, :4], 0) and np.allclose(step[:, :, 1], 0)  # first half and constant sensor untouched
    assert np.allclose(step[:, 4:, 0], np.array([3 * std if i % 2 == 0 else -3 * std for i in range(20)])[:, None])
    assert len(synthetic_faults([])) == 0
    assert len(synthetic_faults([Window("a", "g", 0, 8000, np.ones((8, 2)))])) == 0


def test_a_slack_threshold_shows_as_lower_sensitivity(tmp_path: Path) -> None:

    from pipeline.retrain import evaluate, synthetic_faults

    group = _config().groups[0]
    rng = np.random.default_rng(1)
    t = np.arange(4)[None, :] + np.arange(200)[:, None]
    series = np.stack([np.sin(t * 0.3), np.cos(t * 0.3)], axis=2) + rng.normal(0, 0.05, (200, 4, 2))
    windows = [Window("a", "g", i * 1000, i * 1000 + 4000, series[i]) for i in range(200)]
    detector = train_group(windows[:150], group, progress=False).detector
    faults = synthetic_faults(windows[150:])
    sharp = evaluate(detector, windows[150:], [], faults=faults)
    slack = evaluate(replace(detector, threshold=detector.threshold * 9), windows[150:], [], faults=faults)
    assert sharp.sensitivity is not None and slack.sensitivity is not None
    assert sharp.sensitivity >= slack.sensitivity + 0.3, (sharp.sensitivity, slack.sensitivity)
    assert not gate(slack, sharp, anomalous_fraction=0.0, max_anomalous_fraction=0.5, tolerance=0.02).promote


def test_gate_without_an_active_model_holds_the_candidate_to_absolute_floors() -> None:
    """Nothing to compare with (a new group, or an active model that cannot serve a changed configuration): the
    candidate may not run far above its threshold's design rate on held-out normal data (a day-2 trial promoted one
    with 10.7% false alarms after a sensor was added); mostly anomalous data still rejects."""
    def run(far: float, sensitivity: float | None = None, fraction: float = 0.1) -> GateDecision:
        return gate(replace(_eval(far), sensitivity=sensitivity), None, anomalous_fraction=fraction,
                    max_anomalous_fraction=0.5, tolerance=0.02, design=0.005)

    assert run(0.02, 0.4).promote and run(0.025).promote  # within 0.5% + 2%
    flood = run(0.107, 0.4)
    assert not flood.promote and "10.70%" in flood.reason and "fitted for" in flood.reason
    assert "synthetic faults flagged 40.00%" in run(0.02, 0.4).reason
    assert not run(0.0, fraction=0.9).promote
    assert gate(_eval(0.3), None, anomalous_fraction=0.1, max_anomalous_fraction=0.5, tolerance=0.02).promote  # a
    # model from before the design rate was recorded: nothing to hold it to


@pytest.mark.parametrize("threshold", [{"method": "percentile", "percentile": 99.0, "multiplier": 0.8},
                                       {"method": "mean_std", "k": 2.0}, {"method": "pot", "target_rate": 0.01},
                                       {"method": "percentile", "ewma_alpha": 0.3}])
def test_the_design_rate_is_what_the_fitted_threshold_flags_of_the_validation_windows(
        threshold: dict[str, object]) -> None:
    """Measured on the candidate's own validation scores, so a multiplier, mean_std (which states no rate) and
    smoothing are all accounted for; a held-out set like the validation set passes the gate."""
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                                    "sensors": [{"name": "x"}, {"name": "y"}],
                                    "window": {"length": 4, "stride": 2}, "threshold": threshold,
                                    "model": {"epochs": 3}}]}, env={})
    rng = np.random.default_rng(1)
    windows = [Window("a", "g", i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2))) for i in range(400)]
    detector = train_group(windows, cfg.groups[0], progress=False).detector
    rate = design_rate(detector)
    assert rate is not None and 0.0 < rate < 0.2, rate
    assert design_rate(replace(detector, metadata={})) is None


# -- bounded memory: thinning a long lookback ------------------------------------------------------------------------
def _grid_windows(asset: str, first: int, last: int, step: int = 5_000) -> list[Window]:
    return [Window(asset, "g", i * step, i * step + 30_000, np.zeros((6, 1))) for i in range(first, last)]


def test_thinning_keeps_whole_blocks_per_asset_and_doubling_halves_the_fleet() -> None:
    thin = Thinning.for_smoothing(5_000, [0.1, None])
    assert (thin.block, thin.warmup, thin.keep_every) == (300, 30, 1)  # max(256, 30 / 0.1) windows; 3 / 0.1 settle
    assert Thinning.for_smoothing(5_000, [None, 1.0]).block == 1 and Thinning.for_smoothing(5_000, [0.01]).block == 3000
    fleet = [w for a in range(200) for w in _grid_windows(f"pump-{a}", 1_000, 3_016)]  # a week of 5-min windows
    assert all(thin.keeps(w) for w in fleet)
    counts, kept = [len(fleet)], fleet
    for _ in range(4):
        thin, previous = thin.coarser(), {id(w) for w in kept}
        kept = [w for w in fleet if thin.keeps(w)]
        counts.append(len(kept))
        assert {id(w) for w in kept} <= previous  # every 2k-th block is one of the k-th
    assert all(0.35 < b / a < 0.65 for a, b in itertools.pairwise(counts)), counts  # assets keep different times
    mine = [thin.index(w) for w in kept if w.asset == "pump-7"]
    runs = np.split(mine, np.flatnonzero(np.diff(mine) > 1) + 1)
    assert all(len(r) == 300 for r in runs[1:-1])  # whole blocks of consecutive windows
    later = [w for w in fleet if w.asset == "pump-7" and thin.index(w) >= 2_000]
    assert [thin.index(w) for w in later if thin.keeps(w)] == [i for i in mine if i >= 2_000]  # same on every read


def test_thin_to_coarsens_until_the_windows_fit_and_keeps_those_that_must_stay() -> None:
    fleet = [w for a in range(20) for w in _grid_windows(f"pump-{a}", 1_000, 3_016)]
    thin = Thinning(5_000, block=64)
    assert thin_to(fleet, thin, None) == (fleet, thin) and thin_to(fleet, thin, len(fleet)) == (fleet, thin)
    kept, coarse = thin_to(fleet, thin, len(fleet) // 5)
    assert len(kept) <= len(fleet) // 5 < 2 * len(kept) and coarse.keep_every == 8  # halved until it fits
    assert kept == [w for w in fleet if coarse.keeps(w)]  # the same windows a read thinned from the start keeps
    assert (thin.kept(), coarse.kept(), Thinning(5_000, keep_every=2).kept()) == (
        "every 1st block of 64 windows", "every 8th block of 64 windows", "every 2nd window")
    near = {id(w) for w in fleet if w.asset == "pump-3"}  # say, near an alert
    kept, coarse = thin_to(fleet, thin, len(fleet) // 5, must=lambda w: id(w) in near)
    assert near <= {id(w) for w in kept} and len(kept) <= len(fleet) // 5
    alone, _ = thin_to(fleet, thin, 100, must=lambda w: id(w) in near)  # those alone are over the bound: kept
    assert {id(w) for w in alone} == near


def test_thin_to_never_thins_to_nothing_nor_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole blocks: where the next coarser thinning would keep none of the windows (a block alone is over the
    bound), they stay, over the bound, rather than none; windows of the first block of their asset's grid (readings
    from 1970), which every coarser thinning keeps, end it too instead of coarsening for ever."""
    coarser, calls = Thinning.coarser, []

    def counted(self: Thinning) -> Thinning:
        calls.append(self)
        assert len(calls) < 64, "coarsening for ever"
        return coarser(self)

    monkeypatch.setattr(Thinning, "coarser", counted)
    thin = Thinning(5_000, block=600)
    odd = Thinning(5_000, keep_every=2, block=600)  # every 2nd block: an asset's odd blocks are the others
    window = next(w for a in range(100) for w in _grid_windows(f"pump-{a}", 1_000, 1_001) if not odd.keeps(w))
    start = next(i for i in range(1_000, 400, -1) if odd.keeps(_grid_windows(window.asset, i, i + 1)[0])) + 1
    block = _grid_windows(window.asset, start, start + 600)  # one odd block of one asset
    assert not any(odd.keeps(w) for w in block)
    assert thin_to(block, thin, 100) == (block, thin)  # not ([], every 2nd block)
    first = Thinning(5_000, keep_every=2**40, block=600)  # keeps only each asset's block 0
    asset = next(a for a in (f"pump-{i}" for i in range(100_000)) if first.keeps(_grid_windows(a, 299, 300)[0]))
    epoch = _grid_windows(asset, 0, 300)  # readings from 0 ms
    assert all(first.keeps(w) for w in epoch)
    calls.clear()
    assert thin_to(epoch, thin, 100) == (epoch, thin)


def test_a_lookback_whose_blocks_alone_are_over_max_windows_is_kept_with_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Read back in batches, 1,999 windows of one asset in blocks of 1,500 (ewma_alpha 0.02) are over max_windows =
    1,000, and every 8th block keeps none: the reader keeps the blocks of the last thinning that kept some, and warns
    so (not of windows near alerts, of which there are none)."""
    from pipeline import kafka_io, retrain

    config = parse_config({"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                                       "sensors": [{"name": "x"}], "window": {"length": 8, "stride": 4}}]}, env={})
    t0 = 1_772_326_800_000
    records = [kafka_io.RawRecord("t", 0, i, b"a", kafka_io.encode_reading(
        {"asset": "a", "ts": t0 + i * 1000, "values": {"x": float(i % 7)}}), t0 + i * 1000) for i in range(8000)]
    monkeypatch.setattr(kafka_io, "read_since", lambda *_a, **_k: iter([records[i:i + 500]
                                                                         for i in range(0, len(records), 500)]))
    with caplog.at_level("INFO", logger="pipeline.retrain"):
        data = retrain.read_recent_windows(config, config.groups[0], since_ms=0, max_windows=1_000,
                                           thinning=Thinning.for_smoothing(4_000, [0.02]))
    assert data.windows and data.thinning is not None and data.thinning.keep_every > 1
    assert all(data.thinning.keeps(w) for w in data.windows) and len(data.windows) > 1_000
    assert "near alerts" not in caplog.text and caplog.text.count("over retrain.max_windows = 1000") >= 2
    assert f"windows of whole blocks ({data.thinning.kept()} of each asset) are over retrain.max_windows" in caplog.text


def test_streams_restart_where_thinning_dropped_windows_and_settle_after_the_warmup() -> None:
    windows = _grid_windows("a", 0, 10) + _grid_windows("b", 0, 3) + _grid_windows("a", 50, 55)
    keys, settled = Thinning(5_000, warmup=3).streams(windows)  # unthinned: one stream per asset
    assert keys == ["a"] * 10 + ["b"] * 3 + ["a"] * 5
    assert settled.tolist() == [False] * 3 + [True] * 7 + [False] * 3 + [True] * 5
    keys, settled = Thinning(5_000, keep_every=2, block=4, warmup=3).streams(windows)
    assert keys == [("a", 0)] * 10 + [("b", 0)] * 3 + [("a", 1)] * 5  # the jump 9 -> 50 starts a new stream
    assert settled.tolist() == [False] * 3 + [True] * 7 + [False] * 3 + [False] * 3 + [True] * 2
    assert Thinning.unthinned().streams(windows)[1].all()


def test_near_alerts_agrees_with_the_plain_overlap_test() -> None:
    rng = np.random.default_rng(5)
    spans = [Span(str(rng.integers(3)), int(a), int(a + rng.integers(1, 40))) for a in rng.integers(0, 1000, 60)]
    windows = [Window(str(rng.integers(4)), "g", int(a), int(a + 10), np.zeros((1, 1))) for a in range(-60, 1100, 3)]
    for margin in (0, 5, 50):
        near = near_alerts(spans, margin)
        assert [near(w) for w in windows] == [any(w.start_ms < s.end_ms + margin and w.end_ms > s.start_ms - margin
                                                  for s in spans if s.asset == w.asset) for w in windows]
    assert not near_alerts([], 10)(windows[0])


def test_a_thinned_smoothed_threshold_matches_the_full_streams() -> None:
    """Each kept block smoothed on its own with the pipeline's alpha, settled windows only: the same tail as the
    stream the pipeline holds to the threshold (every k-th window alone, even re-weighted, would be noisier)."""
    rng = np.random.default_rng(3)
    n, alpha = 200_000, 0.1
    raw = np.convolve(np.abs(rng.normal(size=n + 5)), np.ones(6) / 6, mode="valid")[:n]  # overlapping windows
    windows = _grid_windows("a", 0, n)
    full = np.percentile(ewma(raw, alpha), 99.5)
    thin = Thinning.for_smoothing(5_000, [alpha])
    for _ in range(5):  # keep every 32nd block
        thin = thin.coarser()
    kept = [i for i, w in enumerate(windows) if thin.keeps(w)]
    keys, settled = thin.streams([windows[i] for i in kept])
    levels = ewma_by_key(raw[kept], keys, alpha)
    assert len(kept) < n / 25 and abs(np.percentile(levels[settled], 99.5) / full - 1) < 0.05
    every_kth = ewma(raw[::32], 1 - (1 - alpha) ** 32)  # what this replaced: 1.3x too high a threshold
    assert np.percentile(every_kth, 99.5) / full > 1.15


# -- configuration and the cron trigger -------------------------------------------------------------------------------
def _instances(sessions: sessionmaker[Session]) -> list[PipelineInstance]:
    with sessions() as s:
        rows = repo.list_instances(session=s)
        s.expunge_all()
        return rows


def _config(url: str = "sqlite://", **retrain: object) -> Config:
    return parse_config({
        "database": {"url": url},
        "groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
                    "window": {"length": 4, "stride": 2, "max_gap": 0},
                    "model": {"type": "dense", "hidden": [4, 2], "epochs": 1, "batch_size": 32}}],
        "retrain": retrain,
    }, env={})


def test_retrain_section_defaults_and_validation() -> None:
    rc = _config().retrain
    assert (rc.cron, rc.timezone, rc.coalesce, rc.warm_start) == ("0 2 * * *", "UTC", True, True)
    with pytest.raises(ConfigError, match=r"retrain\.cron"):
        _config(cron="0 25 * * *")
    with pytest.raises(ConfigError, match=r"retrain\.timezone"):
        _config(timezone="Nowhere/Special")
    with pytest.raises(ConfigError, match=r"retrain\.min_windows"):
        _config(min_windows=10)
    assert rc.max_windows == 200_000
    with pytest.raises(ConfigError, match=r"retrain.*max_windows \(10000\) must be at least 12500: after the holdout "
                                          r"\(0.2\) it must leave room for twice min_windows \(5000\)"):
        _config(min_windows=5000, max_windows=10000)
    assert _config(min_windows=455, max_windows=1300, holdout_fraction=0.3).retrain.max_windows == 1300  # exact edge
    with pytest.raises(ConfigError, match=r"retrain\.max_windows"):
        _config(max_windows=10)


def test_cron_trigger_reads_weekdays_as_crontab_does() -> None:
    thursday = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    sunday = cron_trigger("0 2 * * 0", "UTC").get_next_fire_time(None, thursday)
    assert sunday == datetime(2026, 11, 29, 2, 0, tzinfo=UTC) and sunday.isoweekday() == 7
    berlin = cron_trigger("0 2 * * *", "Europe/Berlin").get_next_fire_time(None, thursday)
    assert berlin.astimezone(UTC) == datetime(2026, 11, 27, 1, 0, tzinfo=UTC)
    either = cron_trigger("0 3 1 * mon", "UTC")  # Vixie cron: the 1st of the month OR a Monday
    assert either.get_next_fire_time(None, thursday) == datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    assert either.get_next_fire_time(None, datetime(2026, 11, 30, 4, 0, tzinfo=UTC)) == datetime(
        2026, 12, 1, 3, 0, tzinfo=UTC)


# -- the retrain lock (SQLite here; PostgreSQL in the integration tests) --------------------------------------------
def test_retrain_lock_admits_one_holder_until_released_or_expired(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def take(holder: str, at: datetime) -> bool:
        with sessions.begin() as s:
            return repo.acquire_retrain_lock(session=s, group="g", holder=holder, now=at, ttl_s=60)

    assert take("one", now)
    assert not take("two", now + timedelta(seconds=30))
    with sessions.begin() as s:
        repo.release_retrain_lock(session=s, group="g", holder="two")  # not the holder: nothing happens
    assert not take("two", now + timedelta(seconds=59))
    assert take("two", now + timedelta(seconds=61))  # "one" crashed: its claim expired
    with sessions.begin() as s:
        repo.release_retrain_lock(session=s, group="g", holder="two")
    assert take("three", now + timedelta(seconds=62))
    engine.dispose()


def test_the_lock_keeper_renews_and_notices_a_takeover(tmp_path: Path) -> None:
    from pipeline.retrain import _LockKeeper

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)

    def now() -> datetime:
        return datetime.now(UTC)

    with sessions.begin() as s:
        assert repo.acquire_retrain_lock(session=s, group="g", holder="me", now=now(), ttl_s=0.3)
    with _LockKeeper(sessions, "g", "me", 0.3, now) as keeper:
        time.sleep(0.9)  # three times the time to live
        with sessions.begin() as s:
            assert not repo.acquire_retrain_lock(session=s, group="g", holder="other", now=now(), ttl_s=60)
        keeper.check()  # still ours
        with sessions.begin() as s:
            s.execute(RetrainLock.__table__.update().values(holder="other"))  # as if it had expired and been taken
        time.sleep(0.5)
        assert keeper.lost
        with pytest.raises(RuntimeError, match="lost the retrain lock"):
            keeper.check()
    engine.dispose()


# -- hot reload ------------------------------------------------------------------------------------------------------
def test_runner_swaps_in_a_newly_active_model_and_refuses_a_broken_bundle(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    config = _config(url).model_copy(update={"model_dir": tmp_path / "models"})
    group = config.groups[0]
    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 1000, i * 1000 + 4000, rng.normal(size=(4, 2))) for i in range(64)]
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    versions = []
    for _ in range(3):
        detector = train_group(windows, group, progress=False).detector
        with sessions.begin() as s:
            register(session=s, detector=detector, group=group, model_dir=config.model_dir, status="candidate",
                     data_range=None, windows_used=64, metrics={})
        versions.append(detector.version)
    first, broken, good = versions
    with sessions.begin() as s:
        repo.activate_model_version(session=s, version=first)
        detectors = load_active(session=s, config=config)
    runner = Runner(config, sessions=sessions, detectors=detectors, producer=None,  # type: ignore[arg-type]
                    stop=threading.Event())
    assert runner.reload_models() == {}  # nothing changed

    with sessions.begin() as s:
        row = repo.activate_model_version(session=s, version=broken)
    (Path(row.artifact_path) / "weights.pt").write_bytes(b"tampered")
    assert runner.reload_models() == {}
    assert detectors["g"].version == first  # the previous model keeps serving
    assert f"refusing model {broken}" in caplog.text
    runner.report_serving()  # what `models serving` and `check` read
    (row,) = _instances(sessions)
    assert row.instance == runner._owner and row.serving == {"g": first}
    assert row.unserved["g"].startswith(f"model {broken} refused: ")

    with sessions.begin() as s:
        repo.activate_model_version(session=s, version=good)
    assert runner.reload_models() == {"g": good}
    assert detectors["g"].version == good
    assert [x.labels for x in runner.metrics.model_info.collect()[0].samples] == [{"group": "g", "version": good}]
    runner.report_serving()
    (row,) = _instances(sessions)
    assert (row.serving, row.unserved) == ({"g": good}, {})
    runner.forget_serving()  # a clean stop
    assert _instances(sessions) == []

    # a pipeline started while the broken bundle was active: the start logged it, the first reload does not again;
    # a later activation of it is logged as usual
    with sessions.begin() as s:
        repo.activate_model_version(session=s, version=broken)
    caplog.clear()
    started = Runner(config, sessions=sessions, detectors={}, producer=None,  # type: ignore[arg-type]
                     stop=threading.Event(), reported={"g": "its model was refused"})
    assert started.reload_models() == {} and "refusing model" not in caplog.text
    started.report_serving()
    (row,) = _instances(sessions)
    assert row.serving == {} and row.unserved["g"].startswith(f"model {broken} refused: ")  # the reload's reason
    with sessions.begin() as s:
        repo.activate_model_version(session=s, version=broken)  # activated again: a new activation time
    assert started.reload_models() == {} and f"refusing model {broken}" in caplog.text
    engine.dispose()


def test_a_failed_run_never_marks_a_promoted_candidate_failed(tmp_path: Path) -> None:
    """The promotion committed but the run then failed (e.g. the connection dropped while COMMIT was answered): the
    failure record leaves the now-active version alone, so it is neither left 'failed' (no active model) nor
    treated as a failed candidate whose bundle retention may delete."""
    from pipeline.retrain import _Progress, _record_failure
    from pipeline.store.tables import ModelVersion

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with sessions.begin() as s:
        for name in ("old", "new"):
            repo.add_model_version(session=s, version=ModelVersion(
                version=name, group_name="g", model_type="dense", status="candidate", created_at=now,
                artifact_path=str(tmp_path / name), checksum="0" * 64, config_hash="0" * 64, threshold=1.0,
                threshold_method="percentile", windows_used=1, metrics={}))
        repo.activate_model_version(session=s, version="old")
        run = repo.start_retrain_run(session=s, group="g", trigger="manual", holder="h", now=now)
    with sessions.begin() as s:
        repo.activate_model_version(session=s, version="new")
    progress = _Progress()
    progress.candidate_version = "new"
    _record_failure("g", sessions=sessions, run_id=run.id, progress=progress, exc=OSError("connection lost"),
                    clock=lambda: now)
    with sessions() as s:
        assert {r.version: r.status for r in repo.list_model_versions(session=s)} == {"new": "active",
                                                                                      "old": "retired"}
        assert [r.outcome for r in repo.list_retrain_runs(session=s, group="g")] == ["failed"]
    engine.dispose()


# -- the scheduler's retrain process ---------------------------------------------------------------------------------
def test_the_retrain_process_exit_status_is_explained() -> None:
    import signal

    from pipeline.scheduler import child_problem

    assert child_problem(0) is None and child_problem(1) is None and child_problem(3) is None  # logged by the child
    killed = child_problem(-signal.SIGKILL)
    assert killed is not None and killed.startswith("the retrain process was killed by SIGKILL (out of memory?)")
    assert "abandoned" in killed
    assert child_problem(-signal.SIGSEGV) is not None and "SIGSEGV" in (child_problem(-signal.SIGSEGV) or "")
    assert child_problem(2) == "the retrain process exited with status 2"


def test_the_retrain_process_names_a_bad_configuration(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "c.yaml"
    bad.write_text("groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}]\n    window: {length: 1}\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.retrain_job", str(bad), "--log-format", "plain",
                           "--firing", "2026-11-27T02:00:00+00:00"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "scheduled retrain not started: configuration" in done.stderr and "groups[0].window.length" in done.stderr


def test_the_retrain_process_logs_an_unexpected_error_in_the_configured_format(tmp_path: Path) -> None:
    """A database driver that is not installed (or any other error) is one log record in the format the scheduler
    passed (JSON here), the password scrubbed, not a bare traceback; status 1 (the scheduler adds nothing)."""
    import json
    import subprocess
    import sys

    conf = tmp_path / "c.yaml"
    conf.write_text("database: {url: 'mysql+pymysql://sw:s3cretpw@127.0.0.1:1/sw'}\n"
                    "groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}]\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.retrain_job", str(conf), "--log-format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line a JSON record
    assert records[-1]["level"] == "ERROR" and records[-1]["message"].startswith("scheduled retrain failed: ")
    assert "s3cretpw" not in done.stderr


def test_the_retrain_process_finishes_its_run_on_sigterm(tmp_path: Path) -> None:
    """A service manager that signals the whole group of processes (systemd's default KillMode=control-group) sends
    SIGTERM to the retrain process too: it finishes its run, as the scheduler's stop waits for it, instead of dying
    and leaving the group's lock held for retrain.lock_ttl_s."""
    import signal
    import subprocess
    import sys

    conf = tmp_path / "c.yaml"
    conf.write_text("groups:\n  - name: g\n    assets: [a]\n    sensors: [{name: x}]\n")
    code = ("import sys, time\n"
            "import pipeline.retrain as r\n"
            "def slow(*a, **k):\n"
            "    print('training', file=sys.stderr, flush=True); time.sleep(2); return []\n"
            "r.retrain_all = slow\n"
            "from pipeline.retrain_job import main\n"
            f"raise SystemExit(main([{str(conf)!r}, '--log-format', 'plain']))\n")
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None and child.stderr.readline().strip() == "training"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0
        assert "SIGTERM" in child.stderr.read()
    finally:
        child.kill()
        child.wait()


def test_promotions_within_the_tolerance_cannot_ratchet_the_false_alarm_rate_up() -> None:
    """A trial saw nightly retrains on unchanged data promote 0.00% -> 1.63% -> 2.24% held-out false alarms, each
    within 2 points of the active model. Above its design rate plus the tolerance, a candidate must not be worse than
    the active model; below it, or no worse than the active model, it passes as before."""
    def run(candidate: float, active: float) -> GateDecision:
        return gate(_eval(candidate), _eval(active, version="a"), anomalous_fraction=0.1, max_anomalous_fraction=0.5,
                    tolerance=0.02, design=0.005)

    assert run(0.0163, 0.0).promote and run(0.0224, 0.0163).promote  # within 0.5% + 2%: as before
    creep = run(0.0389, 0.0224)  # within 2 points of the active model, but above 2.5%
    assert not creep.promote
    assert creep.reason == ("false-alarm rate on held-out normal data 3.89% is above the active model's 2.24% and more "
                            "than 2.00% above the 0.50% its threshold is fitted for: promotions each within the "
                            "tolerance of the last must not add up")
    assert run(0.05, 0.06).promote  # drifted data: high, but better than the active model
    assert run(0.05, 0.05).promote
    assert gate(_eval(0.0389), _eval(0.0224, version="a"), anomalous_fraction=0.1, max_anomalous_fraction=0.5,
                tolerance=0.02).promote  # a model from before the design rate was recorded: as before


def test_a_renamed_groups_alerts_still_keep_their_windows_out_of_training(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Alerts keep the group they were raised in once resolved; after the group is renamed, the retrain still leaves
    the windows near its assets' alerts out of training and checks the candidate on them (it found none: the
    alert windows of the lookback went into training as normal data, and the recall check was skipped)."""
    from pipeline import retrain
    from pipeline.alerting import AlertRecord

    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    t0 = int((now - timedelta(hours=2)).timestamp() * 1000)
    with sessions.begin() as s:  # raised while the group was called "old-name"
        repo.upsert_alerts(session=s, alerts=[AlertRecord("a", "old-name", t0 + 30 * MIN, t0 + 40 * MIN,
                                                          t0 + 45 * MIN, 3.0, 1.0, "warning", "resolved", 5, [],
                                                          "old-name-1")])
    windows = [Window("a", "g", t0 + m * MIN, t0 + (m + 10) * MIN, np.zeros((4, 2))) for m in range(0, 100, 5)]
    monkeypatch.setattr(retrain, "read_recent_windows",
                        lambda *args, **kwargs: retrain.RecentData(windows, records=100, rejected=0))
    cfg = _config(url)
    metrics: dict[str, object] = {}
    result = retrain._recent_split(cfg, cfg.group("g"), None, sessions=sessions, now=now, metrics=metrics)
    assert result is not None
    split = result[0]
    assert metrics["alerts"] == 1 and split.alert_windows
    assert not {w.start_ms for w in split.train} & {w.start_ms for w in split.alert_windows}
