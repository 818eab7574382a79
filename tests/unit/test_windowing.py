"""Alignment and sliding windows: grid placement, fill policy, skipped and late data, safe offsets."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import parse_config
from pipeline.types import Reading
from pipeline.windowing import Windower, forward_fill


def _group(length: int = 4, stride: int = 2, max_gap: int = 1, lateness: int = 0):
    return parse_config({"groups": [{"name": "g", "assets": ["a", "b"], "sampling_period_s": 1,
                                     "sensors": [{"name": "x"}, {"name": "y"}],
                                     "window": {"length": length, "stride": stride, "max_gap": max_gap,
                                                "lateness": lateness}}]}, env={}).groups[0]


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


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(0, 24))), st.integers(min_value=0, max_value=3))
def test_any_arrival_order_within_lateness_gives_the_same_windows(order: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    lateness = 24  # every permutation of 24 slots is within lateness
    reference = Windower([_group(lateness=lateness)]).add(_readings("a", list(range(24)) + [48]))
    shuffled = Windower([_group(lateness=lateness)])
    chunks = np.array_split(np.array(order), rng.integers(1, 5))
    got = []
    for chunk in chunks:
        got += shuffled.add(_readings("a", [int(c) for c in chunk])).windows
    got += shuffled.add(_readings("a", [48])).windows
    assert [(x.start_ms, x.end_ms) for x in got] == [(x.start_ms, x.end_ms) for x in reference.windows]
    assert all(np.array_equal(a.values, b.values) for a, b in zip(got, reference.windows, strict=True))
