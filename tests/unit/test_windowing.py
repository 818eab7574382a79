"""Alignment and sliding windows: grid placement, fill policy, skipped and late data, safe offsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.detector import Detector
from pipeline.config import GroupConfig, parse_config
from pipeline.history import windows_from_frame
from pipeline.store.tables import ModelVersion
from pipeline.types import Reading
from pipeline.windowing import Windower, forward_fill


def _group(length: int = 4, stride: int = 2, max_gap: int = 1, lateness: int = 0, smooth: int = 1):
    return parse_config({"groups": [{"name": "g", "assets": ["a", "b"], "sampling_period_s": 1,
                                     "sensors": [{"name": "x"}, {"name": "y"}],
                                     "window": {"length": length, "stride": stride, "max_gap": max_gap,
                                                "lateness": lateness, "smooth": smooth}}]}, env={}).groups[0]


def _readings(asset: str, slots: list[int], offset0: int = 0) -> list[Reading]:
    return [Reading(asset, s * 1000, {"x": float(s), "y": -float(s)}, 0, offset0 + i) for i, s in enumerate(slots)]


def test_forward_fill_respects_limit() -> None:
    col = np.array([[1.0], [np.nan], [np.nan], [4.0], [np.nan]])
    assert np.array_equal(forward_fill(col, 1), np.array([[1.0], [1.0], [np.nan], [4.0], [4.0]]), equal_nan=True)
    assert np.isnan(forward_fill(np.array([[np.nan], [2.0]]), 3)[0, 0])


def test_windows_are_aligned_on_the_absolute_grid() -> None:
    w = Windower([_group()])
    out = w.add(_readings("a", list(range(3, 12))))
    # first window starts at the first multiple of stride >= 3; closes when its last slot has been seen
    assert [(x.start_ms // 1000, x.end_ms // 1000) for x in out.windows] == [(4, 8), (6, 10), (8, 12)]
    assert out.windows[0].values[:, 0].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert out.windows[0].values[:, 1].tolist() == [-4.0, -5.0, -6.0, -7.0]


def test_small_gap_is_filled_and_large_gap_skips_windows() -> None:
    w = Windower([_group(max_gap=1)])
    out = w.add(_readings("a", [0, 1, 2, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]))
    starts = {x.start_ms // 1000: x for x in out.windows}
    assert starts[2].values[:, 0].tolist() == [2.0, 2.0, 4.0, 5.0]  # slot 3 filled from slot 2
    skipped = {s.start_ms // 1000: s.missing for s in out.skipped}
    assert skipped == {6: 1, 8: 1}  # slots 8, 9 missing: slot 9 is two steps after the last value > max_gap of 1
    assert 6 not in starts and 8 not in starts
    assert 10 in starts


def test_silent_stretch_is_one_skipped_span_not_thousands() -> None:
    w = Windower([_group()])
    out = w.add(_readings("a", [*range(0, 8), *range(100_000, 100_010)]))
    assert len(out.skipped) <= 4
    assert sum(s.missing for s in out.skipped) >= 100_000 - 8
    assert out.windows[-1].end_ms // 1000 == 100_010


def test_late_reading_is_reported_and_within_lateness_is_placed() -> None:
    w = Windower([_group(lateness=2)])
    first = w.add(_readings("a", [0, 1, 2, 4]))
    assert first.windows == []  # window [0, 4) needs slot 5 = 3 + lateness before closing
    second = w.add(_readings("a", [3], offset0=10))
    assert second.late == []
    third = w.add(_readings("a", [5, 6, 7, 8], offset0=20))
    assert third.windows[0].values[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert [r.ts_ms for r in w.add(_readings("a", [0], offset0=30)).late] == [0]


def test_safe_offsets_point_at_oldest_reading_an_open_window_needs() -> None:
    w = Windower([_group(length=4, stride=2, max_gap=0)])
    w.add(_readings("a", list(range(0, 10))))  # windows up to [6, 10) emitted; next window starts at 8
    assert w.safe_offsets() == {0: 8}
    w.forget_partitions([0])
    assert w.safe_offsets() == {}


def test_safe_offsets_hold_back_a_partition_an_asset_moved_away_from() -> None:
    w = Windower([_group(length=4, stride=2, max_gap=0)])
    w.add(_readings("a", list(range(0, 9))))  # partition 0, offsets 0..8; the window [8, 12) is open
    moved = [Reading("a", slot * 1000, {"x": 1.0, "y": 1.0}, 1, 100 + slot) for slot in (9, 10)]
    w.add(moved)  # the topic was re-partitioned: a's readings now arrive on partition 1
    assert w.partition_of("a") == 1
    # slot 8 (offset 8 on partition 0) is still needed by the open window: partition 0 must not commit past it
    assert w.safe_offsets() == {0: 8, 1: 109}


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(0, 24))), st.integers(min_value=0, max_value=3))
def test_any_arrival_order_within_lateness_gives_the_same_windows(order: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    lateness = 24  # every permutation of 24 slots is within lateness
    reference = Windower([_group(lateness=lateness)]).add(_readings("a", [*list(range(24)), 48]))
    shuffled = Windower([_group(lateness=lateness)])
    chunks = np.array_split(np.array(order), rng.integers(1, 5))
    got = []
    for chunk in chunks:
        got += shuffled.add(_readings("a", [int(c) for c in chunk])).windows
    got += shuffled.add(_readings("a", [48])).windows
    assert [(x.start_ms, x.end_ms) for x in got] == [(x.start_ms, x.end_ms) for x in reference.windows]
    assert all(np.array_equal(a.values, b.values) for a, b in zip(got, reference.windows, strict=True))


def test_duplicate_sensor_value_in_a_slot_is_reported_and_not_merged() -> None:
    w = Windower([_group()])
    first = Reading("a", 2000, {"x": 1.0}, 0, 0)
    other_sensor = Reading("a", 2200, {"y": 2.0}, 0, 1)  # same slot, other sensor: merged
    again = Reading("a", 1900, {"x": 5.0}, 0, 2)  # same slot, same sensor: duplicate
    out = w.add([first, other_sensor, again])
    assert out.duplicates == [again]
    out = w.add(_readings("a", list(range(3, 8)), offset0=3))
    assert out.windows[0].values[0].tolist() == [1.0, 2.0]


def test_a_reading_with_one_duplicate_value_still_places_its_other_values() -> None:
    w = Windower([_group()])
    first = Reading("a", 2000, {"x": 1.0}, 0, 0)
    both = Reading("a", 2100, {"x": 9.0, "y": 2.0}, 0, 1)  # x is there already, y is new
    out = w.add([first, both])
    assert out.duplicates == [] and out.partial_duplicates == [(both, ("x",))]
    out = w.add(_readings("a", list(range(3, 8)), offset0=3))
    assert out.windows[0].values[0].tolist() == [1.0, 2.0]  # y placed, x kept its first value


def test_per_sensor_gap_limit_overrides_the_window_default() -> None:
    group = parse_config({"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                                      "sensors": [{"name": "x", "max_gap": 3}, {"name": "y"}],
                                      "window": {"length": 4, "stride": 4, "max_gap": 0}}]}, env={}).groups[0]
    w = Windower([group])
    readings = [Reading("a", s * 1000, {"x": float(s), "y": 0.0} if s != 1 else {"y": 0.0}, 0, s) for s in range(9)]
    out = w.add(readings)
    assert out.windows[0].values[:, 0].tolist() == [0.0, 0.0, 2.0, 3.0]  # x filled over one missing step
    gapped = [Reading("a", s * 1000, {"x": 1.0} if s == 10 else {"x": 1.0, "y": 0.0}, 0, s) for s in range(9, 17)]
    assert [s.start_ms for s in w.add(gapped).skipped] == [8000]  # y may not be filled at all


def test_silent_asset_windows_close_on_wall_clock() -> None:
    w = Windower([_group(lateness=3)])
    out = w.add(_readings("a", list(range(0, 6))), now_ms=1_000)
    assert [x.start_ms for x in out.windows] == []  # window [0, 4) waits for slot 3 + lateness = 6
    assert w.close_idle(now_ms=60_000).windows == []  # not idle long enough (idle_close_s = 120)
    assert w.idle_partitions(now_ms=60_000) == set() and w.idle_partitions(now_ms=121_000) == {0}
    assert w.close_idle(now_ms=121_000, partitions=set()).windows == []  # partition not read to its end yet
    idle = w.close_idle(now_ms=1_000 + 120_000, partitions={0})
    assert [x.start_ms // 1000 for x in idle.windows] == [0, 2]
    assert [(s.start_ms // 1000, s.missing) for s in idle.skipped] == [(4, 1)]
    assert w.safe_offsets() == {}  # nothing open any more: everything may be committed


def test_resume_after_restart_skips_closed_windows_and_recognises_replay() -> None:
    first = Windower([_group(max_gap=0)])
    stream = _readings("a", list(range(0, 12)))
    done = first.add(stream[:9])  # closes windows [0,4), [2,6), [4,8)
    resume_at = first.unsaved_window_starts()["a"]
    safe = first.safe_offsets()[0]
    restarted = Windower([_group(max_gap=0)])
    restarted.resume("a", resume_at)
    restarted.set_replay_boundary(0, 9)  # the previous owner processed offsets < 9
    replay = restarted.add([*stream[safe:], Reading("a", 1000, {"x": 0.0, "y": 0.0}, 0, 20)])
    assert replay.replayed == 0 and [r.offset for r in replay.late] == [20]  # a genuinely late reading
    assert replay.rebuilt == 9 - safe  # offsets safe..8 rebuild the open windows; they were counted before
    both = [x.start_ms for x in done.windows + replay.windows]
    assert both == [0, 2000, 4000, 6000, 8000]  # every window exactly once across the restart
    again = Windower([_group(max_gap=0)])
    again.resume("a", resume_at + 4000)
    again.set_replay_boundary(0, 12)
    replayed = again.add(stream[4:])
    assert replayed.replayed == 6  # slots 4..9 belong to closed windows: replay, not late
    assert replayed.rebuilt == 2  # slots 10, 11 (offsets below 12) rebuild an open window


def test_smoothed_windows_hold_the_causal_rolling_mean_of_each_sensor() -> None:
    rng = np.random.default_rng(5)
    values = rng.normal(size=40)
    stream = [Reading("a", i * 1000, {"x": float(v), "y": 1.0}, 0, i) for i, v in enumerate(values)]
    windows = Windower([_group(length=6, stride=3, max_gap=0, smooth=5)]).add(stream).windows
    rolling = pd.Series(values).rolling(5, min_periods=1).mean().to_numpy()  # partial at the very start only
    assert len(windows) >= 10
    for w in windows:
        first = w.start_ms // 1000
        np.testing.assert_allclose(w.values[:, 0], rolling[first : first + 6])
        np.testing.assert_allclose(w.values[:, 1], 1.0)


def test_smoothing_never_fills_a_missing_slot_and_survives_a_restart_unchanged() -> None:
    slots = [s for s in range(40) if s not in (17, 18, 19)]  # a 3-slot hole: beyond max_gap 1
    stream = _readings("a", slots)
    whole = Windower([_group(length=4, stride=2, max_gap=1, smooth=4)]).add(stream)
    assert {(s.start_ms // 1000, s.missing) for s in whole.skipped} >= {(16, 2), (18, 2)}
    assert all(not np.isnan(w.values).any() for w in whole.windows)
    first = Windower([_group(length=4, stride=2, max_gap=1, smooth=4)])
    before = first.add(stream[:25])
    resume_at, safe = first.unsaved_window_starts()["a"], first.safe_offsets()[0]
    restarted = Windower([_group(length=4, stride=2, max_gap=1, smooth=4)])
    restarted.resume("a", resume_at)
    restarted.set_replay_boundary(0, 25)
    after = restarted.add(stream[safe:])  # replay from the committed offset, as after a crash
    got = before.windows + after.windows
    assert [w.start_ms for w in got] == [w.start_ms for w in whole.windows]
    assert all(np.array_equal(a.values, b.values) for a, b in zip(got, whole.windows, strict=True))


def test_a_model_trained_on_other_smoothing_is_refused(tmp_path: Path) -> None:
    from pipeline.errors import ModelError
    from pipeline.registry import load_version

    smooth4 = _group(smooth=4)
    row, detector = _registered(smooth4, tmp_path)
    assert load_version(row, smooth4, tmp_path).version == detector.version
    with pytest.raises(ModelError, match=r"smoothed over 4 step\(s\).*window.smooth 1"):
        load_version(row, _group(smooth=1), tmp_path)


def test_a_model_scoring_other_steps_keeps_serving_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                  ) -> None:
    from pipeline.registry import load_version

    group = _group()
    row, _ = _registered(group, tmp_path)
    last3 = group.model_copy(update={"model": group.model.model_copy(update={"score_steps": 3})})
    caplog.clear()  # the config's own notes (this tiny window's default code size) are not the point here
    with caplog.at_level("WARNING", logger="pipeline.registry"):
        assert load_version(row, group, tmp_path).score_steps is None and not caplog.records
        loaded = load_version(row, last3, tmp_path)
    assert loaded.score_steps is None  # it keeps the score its threshold was fitted on
    assert "it scores the whole window, model.score_steps is 3: the change takes effect with the next trained " \
           "model" in caplog.text


def _registered(group: GroupConfig, tmp_path: Path) -> tuple[ModelVersion, Detector]:
    """A model trained for ``group`` on noise, registered in a fresh SQLite registry under ``tmp_path``."""
    from pipeline.registry import register
    from pipeline.store.db import make_engine, make_sessionmaker, upgrade
    from pipeline.train import train_group
    from pipeline.types import Window

    rng = np.random.default_rng(0)
    windows = [Window("a", "g", i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2))) for i in range(64)]
    detector = train_group(windows, group, progress=False).detector
    url = f"sqlite:///{tmp_path / 'sw.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            row = register(session=session, detector=detector, group=group, model_dir=tmp_path / "models",
                           status="candidate", data_range=None, windows_used=64, metrics={})
    finally:
        engine.dispose()
    return row, detector


def test_training_leaves_out_values_the_pipeline_would_reject(caplog: pytest.LogCaptureFixture) -> None:
    raw = {"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                       "sensors": [{"name": "x", "valid_range": [0, 250]}, {"name": "y"}],
                       "window": {"length": 4, "stride": 4, "max_gap": 0}}]}
    group = parse_config(raw, env={}).groups[0]
    frame = pd.DataFrame({"ts": np.arange(40) * 1000, "x": np.full(40, 10.0), "y": np.arange(40, dtype=float)})
    frame.loc[21, "x"] = 9999.0  # a glitch the decoder rejects as out_of_range
    frame.loc[30, "y"] = 1e16  # above the decoder's magnitude limit
    frame.loc[5, "x"] = np.nan  # missing, not rejected
    frame.loc[37, "y"] = np.inf  # non-finite: rejected
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows = windows_from_frame(frame, group)
    assert "3 value(s) left out" in caplog.text and "row 21, x=9999" in caplog.text
    assert all(w.values[:, 0].max() <= 250 and np.abs(w.values).max() < 1e15 for w in windows)
    # the windows holding rows 21, 30 and 37 have a hole there (max_gap 0): neither is cut, as in the pipeline
    assert [w.start_ms // 1000 for w in windows] == [0, 8, 12, 16, 24, 32]


def test_silence_during_a_broker_outage_is_not_the_assets() -> None:
    from kafka.errors import KafkaTimeoutError

    from pipeline.config import parse_config
    from pipeline.runner import Runner

    class Consumer:  # a stand-in: one partition, read to its end whenever the broker answers
        down = False

        def assignment(self) -> set[object]:
            from kafka import TopicPartition

            return {TopicPartition("t", 0)}

        def end_offsets(self, tps: list[object], timeout_ms: int) -> dict[object, int]:
            if self.down:
                raise KafkaTimeoutError("no broker")
            return dict.fromkeys(tps, 6)

        def position(self, tp: object, timeout_ms: int) -> int:
            return 6

    config = parse_config({"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                                       "sensors": [{"name": "x"}, {"name": "y"}],
                                       "window": {"length": 4, "stride": 2, "lateness": 3}}]}, env={})
    runner = Runner(config, sessions=None, detectors={}, producer=None, stop=None)  # type: ignore[arg-type]
    runner._windower.add(_readings("a", list(range(0, 6))), now_ms=1_000)
    consumer = Consumer()
    consumer.down = True
    assert runner._idle_partitions(consumer, now_ms=200_000) == set()  # the broker does not answer: none
    consumer.down = False
    assert runner._idle_partitions(consumer, now_ms=201_000) == set()  # back: silence counts from now
    assert runner._idle_partitions(consumer, now_ms=201_000 + 119_000) == set()
    assert runner._idle_partitions(consumer, now_ms=201_000 + 120_000) == {0}  # idle_close_s after it answered


def test_only_window_starts_that_moved_are_unsaved() -> None:
    w = Windower([_group()])
    w.add(_readings("a", [0, 1]) + _readings("b", [0, 1], offset0=10))
    assert w.unsaved_window_starts() == {"a": 0, "b": 0}  # new assets: their start is not stored yet
    w.mark_saved(["a", "b"])
    assert w.unsaved_window_starts() == {}
    w.add(_readings("a", [2, 3, 4], offset0=2))  # closes [0, 4): a's next window starts at 2
    assert w.unsaved_window_starts() == {"a": 2000}
    w.add(_readings("b", [2], offset0=12))  # nothing closes for b
    assert w.unsaved_window_starts() == {"a": 2000}
    assert w.forget_partitions([0]) == ["a", "b"] and w.unsaved_window_starts() == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 40), st.integers(0, 2),
                          st.booleans()), min_size=1, max_size=60))
def test_safe_offsets_equal_the_smallest_buffered_offset_of_each_partition(
        steps: list[tuple[str, int, int, bool]]) -> None:
    """Whatever the order of readings, partitions, window closes and idle closes, the kept per-partition minimum
    is what a scan of every buffered (or held) offset gives."""
    w = Windower([_group(length=4, stride=2, lateness=2)])
    now = 0
    for offset, (asset, slot, partition, go_idle) in enumerate(steps):
        now += 1000
        w.add([Reading(asset, slot * 1000, {"x": 1.0, "y": 2.0}, partition, offset)], now_ms=now)
        if go_idle:
            now += 121_000
            w.close_idle(now_ms=now, partitions={partition})
        scanned: dict[int, int] = {}
        for state in w._assets.values():
            for p, o in [*((p, o) for (_, p), o in state.offsets.items()),
                         *((r.partition, r.offset) for r in state.held)]:  # held readings too
                scanned[p] = min(o, scanned.get(p, o))
        assert w.safe_offsets() == scanned


def test_a_model_dir_moved_to_another_path_still_serves_its_verified_bundles(tmp_path: Path) -> None:
    """A new host or volume: the registered path is gone, the bundle is under the configured model_dir now."""
    from pipeline.errors import ModelError
    from pipeline.registry import bundle_path, load_version

    group = _group()
    row, detector = _registered(group, tmp_path)
    moved = tmp_path / "elsewhere"
    (tmp_path / "models").rename(moved)
    assert bundle_path(row, moved) == moved.resolve() / "g" / detector.version
    assert load_version(row, group, moved).version == detector.version
    with pytest.raises(ModelError, match="not a model bundle"):  # nowhere to be found
        load_version(row, group, tmp_path / "empty")
    from models.bundle import WEIGHTS

    weights = moved / "g" / detector.version / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ModelError, match="checksum"):  # found there, but not the same bundle: refused
        load_version(row, group, moved)


def test_a_valid_range_that_cuts_into_the_training_data_is_warned_of(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The model was trained on x, y ~ N(0, 1): a valid_range inside their 1st-99th percentiles would dead-letter
    normal readings (a day-2 trial narrowed motor_temp to [-30, 60] around a mean of 55 and lost 81 windows, with
    check all ok). A range around the training data, or a skewed sensor's physical floor at its lowest readings, is
    fine; a bundle from before the percentiles were recorded is judged by its training mean."""
    from dataclasses import replace

    from pipeline.registry import load_version, range_conflicts

    group = _group()
    row, detector = _registered(group, tmp_path)

    def ranged(x: tuple[float, float] | None, y: tuple[float, float] | None = None) -> GroupConfig:
        sensors = [s.model_copy(update={"valid_range": r}) for s, r in zip(group.sensors, (x, y), strict=True)]
        return group.model_copy(update={"sensors": sensors})

    low, high = (detector.metadata["sensor_quantiles"][q][0] for q in ("p01", "p99"))
    assert -3.0 < low < -1.5 and 1.5 < high < 3.0
    assert range_conflicts(detector, group) == [] and range_conflicts(detector, ranged((-5, 5), (-5, 5))) == []
    assert range_conflicts(detector, ranged((low, high))) == []  # exactly at the percentiles
    narrow = ranged((-5, 1.0))
    conflicts = range_conflicts(detector, narrow)
    assert len(conflicts) == 1 and conflicts[0].startswith("sensor x: valid_range [-5, 1] leaves out part")
    assert "out_of_range" in conflicts[0]
    assert len(range_conflicts(detector, ranged((-1.0, 9), (-9, 0.5)))) == 2
    legacy = replace(detector, metadata={k: v for k, v in detector.metadata.items() if k != "sensor_quantiles"})
    assert range_conflicts(legacy, narrow) == [] and len(range_conflicts(legacy, ranged((2, 9)))) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.registry"):
        assert load_version(row, narrow, tmp_path / "models") is not None  # it serves: a warning, not a refusal
    assert "sensor x: valid_range" in caplog.text


def test_a_changed_grid_or_sensor_list_is_refused_and_a_changed_threshold_is_warned_of(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.errors import ModelError
    from pipeline.registry import load_version

    group = _group()
    row, _ = _registered(group, tmp_path)
    models = tmp_path / "models"
    coarser = group.model_copy(update={"sampling_period_s": 2.0})
    with pytest.raises(ModelError, match=r"trained on a grid of 1 s, group 'g' is configured for sampling_period_s "
                                         r"2: retrain it"):
        load_version(row, coarser, models)
    swapped = group.model_copy(update={"sensors": list(reversed(group.sensors))})
    with pytest.raises(ModelError, match=r"group 'g', model .*do not match configured \['y', 'x'\] \(their order is "
                                         r"the model's input order\): retrain it"):
        load_version(row, swapped, models)
    stricter = group.model_copy(update={"threshold": group.threshold.model_copy(update={"multiplier": 3.0})})
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.registry"):
        assert load_version(row, group, models) is not None and not caplog.records
        assert load_version(row, stricter, models) is not None  # it keeps the threshold it was fitted with
    assert "its threshold was fitted with multiplier=1.0: the change takes effect with the next trained model" \
        in caplog.text
    other_type = group.model_copy(update={"model": group.model.model_copy(update={"type": "lstm"})})
    wider = group.model_copy(update={"model": group.model.model_copy(update={"hidden": [6, 3]})})
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.registry"):
        load_version(row, other_type, models)
        load_version(row, wider, models)
    assert f"group 'g', model {row.version}: it is a dense model, model.type is lstm: the change takes effect with " \
           "the next trained model" in caplog.text
    assert "it was trained with other model settings (hidden): the change" in caplog.text


def test_one_reading_from_a_glitching_clock_costs_that_reading_only() -> None:
    """pump a sends slots 0..40, with one reading stamped 1000 slots ahead after slot 20: the stream's next reading
    is at 21, so the outlier is reported as jumped, and nothing of the real stream is late or lost. Until then it
    holds back its partition's commits."""
    w = Windower([_group()])
    stream = _readings("a", [*range(21), 1020, *range(21, 41)])
    first = w.add(stream[:22])
    assert first.jumped == [] and w.held_keys() == {(0, 21)}
    assert w.safe_offsets()[0] <= 21  # the held reading is not committed past
    rest = w.add(stream[22:])
    assert rest.jumped == [stream[21]] and w.held_keys() == set()
    windows = first.windows + rest.windows
    assert not first.late and not rest.late and not first.skipped and not rest.skipped
    assert [x.start_ms // 1000 for x in windows] == list(range(0, 37, 2))  # every window of slots 0..40


def test_an_asset_back_after_an_outage_is_held_for_one_reading_then_followed() -> None:
    w = Windower([_group()])
    out = w.add(_readings("a", [*range(11), 500]))
    assert w.held_keys() == {(0, 11)} and not out.skipped
    out = w.add(_readings("a", range(501, 510), offset0=12))  # the next reading follows the jump
    assert w.held_keys() == set() and not out.jumped and not out.late
    assert [x.start_ms // 1000 for x in out.windows] == [8, 500, 502, 504, 506]  # 11 filled from 10 (max_gap 1)
    # the outage: skipped as usual (the windows around its edges, and one span for the silent stretch)
    assert [(x.start_ms // 1000, x.end_ms // 1000) for x in out.skipped] == [(10, 14), (12, 500), (498, 502)]


def test_a_held_reading_of_an_asset_that_falls_silent_is_reported_when_it_closes_for_idleness() -> None:
    """Nothing followed it: placing it would make the asset's real readings after its return late."""
    w = Windower([_group()])
    w.add(_readings("a", [*range(11), 500]), now_ms=1000)
    out = w.close_idle(now_ms=1000 + 121_000)
    assert w.held_keys() == set() and [r.ts_ms for r in out.jumped] == [500_000]
    assert w.safe_offsets() == {}
    back = w.add(_readings("a", range(11, 30), offset0=12), now_ms=200_000)
    assert not back.late and not back.jumped


def test_what_decides_a_held_reading_and_what_does_not() -> None:
    """A glitch sent as one instant's per-sensor messages, or sent twice, is held as one and goes as one; a
    straggler of the old stream (within lateness) right after an asset's return decides nothing; the first reading
    after a restart is judged against where the asset's windows stopped."""
    w = Windower([_group()])
    w.add(_readings("a", range(11)))
    glitch = [Reading("a", 200_000, {"x": 1.0}, 0, 11), Reading("a", 200_000, {"y": 1.0}, 0, 12),
              Reading("a", 200_000, {"x": 1.0}, 0, 13)]  # the instant's two sensors, then a retry
    assert w.add(glitch).jumped == [] and w.held_keys() == {(0, 11), (0, 12), (0, 13)}
    out = w.add(_readings("a", range(11, 21), offset0=14))
    assert out.jumped == glitch and not out.late and not out.duplicates

    late = Windower([_group(lateness=2)])
    late.add(_readings("a", [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]))
    out = late.add(_readings("a", [300, 7, *range(301, 309)], offset0=20))  # back after an outage; 7 straggles in
    assert not out.jumped and not out.late and late.held_keys() == set()
    assert 300 in [x.start_ms // 1000 for x in out.windows]  # the return was followed, from its first reading

    restarted = Windower([_group()])
    restarted.resume("a", 8000)  # the windows before slot 8 were closed before the restart
    first = restarted.add([Reading("a", 200_000, {"x": 1.0, "y": 1.0}, 0, 0)])
    assert not first.windows and restarted.held_keys() == {(0, 0)}
    out = restarted.add(_readings("a", range(11, 21), offset0=1))
    assert [r.ts_ms for r in out.jumped] == [200_000] and not out.late


def test_a_clock_stuck_ahead_holds_a_bounded_number_of_readings() -> None:
    """A device repeating one instant far ahead: its first HELD_MAX readings are held, the rest are duplicates (each
    was held before: 200,000 repeats held 59 MB and every offset after the first), and once the repeats stop
    counting as arrivals the asset closes for idleness, which reports the held ones and frees the commits."""
    from pipeline.windowing import HELD_MAX

    w = Windower([_group()])
    w.add(_readings("a", range(11)), now_ms=1000)
    stuck = [Reading("a", 900_000, {"x": 1.0, "y": 1.0}, 0, 11 + i) for i in range(HELD_MAX + 136)]
    out = w.add(stuck, now_ms=2000)
    assert len(w.held_keys()) == HELD_MAX and out.duplicates == stuck[HELD_MAX:] and not out.jumped
    assert w.safe_offsets()[0] <= 11  # not past the first held reading until something decides
    more = w.add([Reading("a", 900_000, {"x": 2.0}, 0, 300)], now_ms=120_000)
    assert len(more.duplicates) == 1 and len(w.held_keys()) == HELD_MAX
    closed = w.close_idle(now_ms=2000 + 121_000)
    assert closed.jumped == stuck[:HELD_MAX] and w.held_keys() == set() and w.safe_offsets() == {}


def test_a_new_asset_starting_between_window_starts_loses_nothing_as_late() -> None:
    """Its first window starts at the next multiple of the stride: the readings before it were dead-lettered as late
    ("window already closed") though no window had ever closed. They now just precede its first window (and fill
    its gaps, within max_gap); once a window closed, late is late again."""
    w = Windower([_group(length=4, stride=4, max_gap=0)])
    out = w.add(_readings("a", range(5, 20)))  # windows start at multiples of 4: the first at 8
    assert out.late == [] and out.placed == 15
    assert [x.start_ms // 1000 for x in out.windows] == [8, 12, 16]
    again = w.add(_readings("a", [5], offset0=100))  # before the first window, which has closed now: late
    assert len(again.late) == 1


def test_per_sensor_messages_close_a_window_once_its_last_step_is_whole() -> None:
    """One message per sensor: a window ending in a step closed at that step's first message, so its other sensors
    were forward-filled from the step before (or, with max_gap 0, every window was skipped). It now waits for the
    step's last sensor, or for the next step when one never comes."""
    w = Windower([_group(max_gap=3)])
    per_sensor = [Reading("a", s * 1000, {n: float(s) if n == "x" else -float(s)}, 0, 2 * s + i)
                  for s in range(8) for i, n in enumerate(("x", "y"))]
    out = w.add(per_sensor)
    assert [x.start_ms // 1000 for x in out.windows] == [0, 2, 4] and not out.skipped
    for window in out.windows:
        last = window.start_ms // 1000 + 3
        assert window.values[-1].tolist() == [float(last), -float(last)]  # its own values, not the step before's
    strict = Windower([_group(max_gap=0)])
    assert [x.start_ms // 1000 for x in strict.add(per_sensor).windows] == [0, 2, 4]
    quiet_y = Windower([_group(max_gap=3)])  # y misses step 3: the window closes when step 4 begins, y filled
    partial = [r for r in per_sensor if not (r.ts_ms == 3000 and "y" in r.values)]
    first = quiet_y.add(partial[:7])
    assert first.windows == [] and first.skipped == []
    assert [x.start_ms // 1000 for x in quiet_y.add(partial[7:8]).windows] == [0]


def test_an_instant_of_many_per_sensor_messages_is_held_whole() -> None:
    """An asset of 80 sensors sending one message per sensor comes back after an outage: every sensor of its first
    instant is held (the cap counts only repeats of held sensors), then placed with the next instant."""
    from pipeline.windowing import HELD_MAX

    names = [f"s{i}" for i in range(80)]
    group = parse_config({"groups": [{"name": "g", "assets": ["a"], "sampling_period_s": 1,
                                      "sensors": [{"name": n} for n in names],
                                      "window": {"length": 4, "stride": 2, "max_gap": 0}}]}, env={}).groups[0]
    w = Windower([group])
    offset = 0

    def instant(slot: int) -> list[Reading]:
        nonlocal offset
        offset += len(names)
        return [Reading("a", slot * 1000, {n: 1.0}, 0, offset - len(names) + i) for i, n in enumerate(names)]

    w.add([r for slot in range(11) for r in instant(slot)])
    back = w.add(instant(1000))
    assert len(w.held_keys()) == 80 > HELD_MAX and not back.duplicates
    out = w.add([r for slot in range(1001, 1006) for r in instant(slot)])
    assert not out.duplicates and not out.jumped and not out.late
    assert 1000 in [x.start_ms // 1000 for x in out.windows]


def test_a_held_reading_follows_its_asset_to_a_new_partition() -> None:
    """An asset that moved partitions (a re-partitioned topic) holds a reading from the new one: revoking the old
    partition keeps it (and its commit bound), revoking the new one hands it to the new owner."""
    w = Windower([_group()])
    w.add([Reading("a", s * 1000, {"x": 1.0, "y": 1.0}, 0, s) for s in range(8)])
    w.add([Reading("a", 500_000, {"x": 1.0, "y": 1.0}, 1, 500)])
    assert w.partition_of("a") == 1 and w.safe_offsets()[1] == 500
    assert w.forget_partitions([0]) == [] and w.held_keys() == {(1, 500)} and w.safe_offsets()[1] == 500
    assert w.forget_partitions([1]) == ["a"] and w.held_keys() == set()


def test_a_reading_held_before_a_restart_counts_as_placed_when_it_is_followed() -> None:
    """It was never counted before the restart (held readings are counted when placed), so its replay is not
    'rebuilt' but placed; the readings placed before the restart are rebuilt as usual."""
    w = Windower([_group()])
    w.resume("a", 8000)
    w.set_replay_boundary(0, 3)  # offsets 0..2 were processed by the previous owner; offset 2 was held there
    out = w.add(_readings("a", [9, 10], offset0=0))
    assert (out.rebuilt, out.placed) == (2, 0)
    back = w.add([Reading("a", 300_000, {"x": 1.0, "y": 1.0}, 0, 2), *_readings("a", [301, 302], offset0=3)])
    assert back.rebuilt == 0 and back.placed == 3 and not back.jumped
