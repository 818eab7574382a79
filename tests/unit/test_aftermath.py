"""The alert rule's aftermath (``alert.aftermath``): after a large incident the bar is raised to ``relative`` x the
decayed peak ratio, exactly however the stream is batched and across restarts; alerts resolve under the raised bar.
A runner on SQLite with a stand-in detector where a restart is involved: no broker."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from streams import records

from models.scaler import StandardScaler
from pipeline.alerting import AlertEngine
from pipeline.config import Config, parse_config
from pipeline.errors import ConfigError
from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.store import repo
from pipeline.store.tables import Alert, WindowScore
from pipeline.types import AlertEvent, AlertRecord, Score, ms_to_datetime

T0 = 1772326800000  # 2026-03-01T01:00:00Z
HALF_LIFE_S = 20.0
RUNNER_HALF_LIFE_S = 120.0  # the runner test's: long enough to hold back all of its 30 s aftermath


def _raw(aftermath: dict | None = None, **alert: object) -> dict:
    rule = {"k": 1, "n": 1, "clear_after": 2} | alert
    if aftermath is not None:
        rule["aftermath"] = aftermath
    return {"groups": [{"name": "g", "assets": ["a", "b"], "sampling_period_s": 1,
                        "sensors": [{"name": "x"}, {"name": "y"}], "window": {"length": 4, "stride": 2, "max_gap": 0},
                        "alert": rule}]}


def _engine(relative: float = 0.3, half_life_s: float = HALF_LIFE_S, **alert: object) -> AlertEngine:
    raw = _raw({"relative": relative, "half_life_s": half_life_s}, **alert)
    return AlertEngine(parse_config(raw, env={}).groups)


def _score(asset: str, end_s: float, value: float, threshold: float = 1.0) -> Score:
    end = T0 + round(end_s * 1000)
    return Score(asset, "g", end - 4000, end, value, threshold, {"x": value, "y": 0.0}, "v1")


def _judge(engine: AlertEngine, scores: list[Score]) -> list[Score]:
    return engine.judge(scores)[0]


def _reference_floors(judged: list[Score], events: list[AlertEvent], *, relative: float = 0.3,
                      half_life_s: float = HALF_LIFE_S, top: float = 3.0) -> list[float | None]:
    """Brute force, from one asset's judged windows and its alert events: a window of an incident counts once both it
    and the incident's opening window have ended; the floor is relative x the largest decayed (capped) ratio of the
    counted windows (each ratio at most ``top / relative``), x the threshold (None when not above it)."""
    incidents: dict[int, tuple[int, int]] = {}  # opened_ms -> (end of the opening window, last seen)
    for e in events:
        opening = incidents.get(e.alert.opened_ms, (e.alert.last_seen_ms, 0))[0]
        incidents[e.alert.opened_ms] = (opening, e.alert.last_seen_ms)
    floors: list[float | None] = []
    for score in judged:
        decayed = [
            min(w.level / w.threshold, top / relative) * 0.5 ** ((score.end_ms - w.end_ms) / 1000 / half_life_s)
            for w in judged if w.is_anomaly and any(
                opened <= w.start_ms and w.end_ms <= last and max(w.end_ms, opening) < score.end_ms
                for opened, (opening, last) in incidents.items())
        ]
        bar = relative * max(decayed, default=0.0)
        floors.append(bar * score.threshold if bar > 1 else None)
    return floors


def _assert_same_floors(actual: list[float | None], expected: list[float | None]) -> None:
    assert [a is None for a in actual] == [e is None for e in expected]
    assert [a for a in actual if a is not None] == pytest.approx([e for e in expected if e is not None], rel=1e-9)


def test_aftermath_is_validated_with_its_key() -> None:
    group = parse_config(_raw({"relative": 0.25, "half_life_s": 60}), env={}).groups[0]
    assert group.alert.aftermath is not None and group.alert.aftermath.relative == 0.25
    assert parse_config(_raw(), env={}).groups[0].alert.aftermath is None  # off unless configured
    for bad, key in (({"relative": 1.0}, "relative"), ({"relative": 0}, "relative"),
                     ({"half_life_s": 0}, "half_life_s"), ({"relativ": 0.3}, "relativ")):
        with pytest.raises(ConfigError, match=rf"groups\[0\]\.alert\.aftermath\.{key}"):
            parse_config(_raw(bad), env={})
    one_tier = _raw({}, severities=[{"name": "warning", "multiple": 1}])
    with pytest.raises(ConfigError, match=r"groups\[0\]\.alert.*severity tier above 1x"):
        parse_config(one_tier, env={})


def test_an_incident_raises_the_bar_up_to_the_top_tier_and_it_decays() -> None:
    engine = _engine()  # k=1 of n=1; tiers warning 1x, critical 3x
    out = _judge(engine, [_score("a", 2, 0.5), _score("a", 4, 20.0), _score("a", 6, 2.5), _score("a", 8, 3.5),
                          _score("a", 4 + HALF_LIFE_S, 1.4), _score("a", 4 + 2 * HALF_LIFE_S, 1.2)])
    assert [s.aftermath_floor for s in out[:2]] == [None, None]  # nothing before; an incident never raises its own
    # 20x counts as 3 / 0.3 = 10x (where the bar reaches the 3x top tier), decayed for 2 s
    assert out[2].aftermath_floor == pytest.approx(3.0 * 0.5 ** (2 / HALF_LIFE_S)) and not out[2].is_anomaly
    assert out[3].is_anomaly  # a level above the top tier always counts
    assert out[4].aftermath_floor == pytest.approx(1.5) and not out[4].is_anomaly  # one half-life: 0.3 x 10 / 2
    assert out[5].aftermath_floor is None and out[5].is_anomaly  # 0.3 x 10 / 4 < 1: the threshold alone again
    [other] = _judge(engine, [_score("b", 6, 2.5)])
    assert other.aftermath_floor is None and other.is_anomaly  # per asset
    plain = AlertEngine(parse_config(_raw(), env={}).groups)
    assert all(s.aftermath_floor is None for s in _judge(plain, [_score("a", 4, 20.0), _score("a", 6, 2.5)]))


def test_a_lone_spike_raises_no_bar_and_hides_no_fault() -> None:
    engine = _engine(k=2, n=3)
    stream = [_score("a", 2 * i, v) for i, v in enumerate([0.2, 1000.0, 0.2, 0.2, 0.2, *[2.0] * 6])]
    judged, events = engine.judge(stream)
    assert all(s.aftermath_floor is None for s in judged)  # the spike opened no incident: no aftermath
    assert [e.kind for e in events][:1] == ["opened"] and events[0].alert.opened_ms == stream[5].start_ms
    # once an incident has opened, its windows do raise the bar: the same fault right after a 1000x incident waits
    after = _engine(k=2, n=3, half_life_s=3600)
    _, events = after.judge([_score("a", 2 * i, v) for i, v in enumerate([1000.0, 1000.0, 0.2, 0.2, *[2.0] * 6])])
    assert [e.kind for e in events if e.kind != "updated"] == ["opened", "resolved"]


@pytest.mark.parametrize("rule", [{"k": 2, "n": 3}, {"k": 2, "n": 3, "min_duration_s": 6, "cooldown_s": 10}])
def test_floors_are_exact_in_any_batching_and_skip_replays(rule: dict[str, float]) -> None:
    rng = np.random.default_rng(7)
    values = np.exp(rng.normal(-0.5, 1.2, size=1000))  # ratios from 0.01x to ~100x the threshold
    stream = [_score("a", 2 * i + rng.uniform(0, 1), float(v), threshold=float(rng.uniform(0.5, 2)))
              for i, v in enumerate(values)]
    whole, events = _engine(**rule).judge(stream)
    _assert_same_floors([s.aftermath_floor for s in whole], _reference_floors(whole, events))
    assert sum(s.aftermath_floor is not None for s in whole) >= 25  # the check above is not vacuous
    assert sum(s.level > s.threshold and not s.is_anomaly for s in whole) >= 3  # and some windows were held back
    engine, pieces, piece_events, i = _engine(**rule), [], [], 0
    while i < len(stream):
        size = int(rng.integers(1, 30))
        judged, new = engine.judge(stream[i : i + size])
        pieces += judged
        piece_events += new
        replayed, none = engine.judge(stream[max(i - 3, 0) : i + size])  # a replay: unchanged, state untouched
        assert replayed == stream[max(i - 3, 0) : i + size] and none == []
        i += size
    assert pieces == whole and piece_events == events


def test_maintenance_windows_neither_get_a_floor_nor_count_as_incident_windows() -> None:
    raw = _raw({"relative": 0.3, "half_life_s": HALF_LIFE_S})
    raw["groups"][0]["alert"]["maintenance"] = [{"start": "2026-03-01T01:00:05Z", "end": "2026-03-01T01:00:09Z"}]
    engine = AlertEngine(parse_config(raw, env={}).groups)
    out, events = engine.judge([_score("a", 12, 50.0), _score("a", 14, 2.0)])  # the first overlaps maintenance
    assert [s.aftermath_floor for s in out] == [None, None] and out[1].is_anomaly
    assert [e.kind for e in events] == ["opened"]


def test_an_alert_resolves_once_the_level_falls_well_below_its_peak() -> None:
    # an incident peaking at 20x, after which the plant settles at 2x the threshold
    stream = [_score("a", 2 * i, v) for i, v in enumerate([0.2, 0.2, 8.0, 20.0, 12.0, *[2.0] * 10, 0.2, 0.2])]
    plain = AlertEngine(parse_config(_raw(), env={}).groups)
    [*_, closing] = plain.process(stream)  # without the rule, 2x keeps the incident open until the level drops
    assert closing.kind == "resolved" and closing.alert.closed_ms == stream[-1].end_ms
    engine = _engine(half_life_s=3600)
    events = engine.process(stream)
    kinds = [e.kind for e in events]
    assert kinds.count("opened") == 1 and kinds[-1] == "resolved"  # and nothing re-opens while the bar is raised
    resolved = events[-1].alert
    assert resolved.closed_ms == stream[6].end_ms  # two windows (clear_after) at 2x, under the 3x bar
    assert resolved.peak_score == 20.0 and resolved.window_count == 3 and resolved.severity == "critical"
    hysteresis = _engine(half_life_s=3600, exit_level=0.5)
    events = hysteresis.process(stream)
    # exit level 0.5 of the 3x bar: 2x stays above it, so the alert stays open until the level falls further
    assert [e.kind for e in events][-1] == "resolved" and events[-1].alert.closed_ms == stream[-1].end_ms


def _stored_state(events: list[AlertEvent]) -> tuple[AlertRecord | None, AlertRecord | None, list[tuple[int, int]]]:
    """The open alert, the last resolved alert and every incident's span, as the database holds them."""
    latest = {e.alert.opened_ms: e.alert for e in events}
    records = sorted(latest.values(), key=lambda r: r.opened_ms)
    open_ = next((r for r in reversed(records) if r.status == "open"), None)
    resolved = [r for r in records if r.status == "resolved"]
    last = max(resolved, key=lambda r: r.closed_ms or 0) if resolved else None
    return open_, last, [(r.opened_ms, r.last_seen_ms) for r in records]


@pytest.mark.parametrize("rule", [{"k": 2, "n": 3}, {"k": 1, "n": 1}, {"k": 2, "n": 4, "min_duration_s": 4},
                                  {"k": 2, "n": 3, "cooldown_s": 10, "exit_level": 0.6, "min_duration_s": 2}],
                         ids=lambda r: ",".join(f"{k}={v}" for k, v in r.items()))
def test_restart_at_any_point_reproduces_the_unbroken_floors_and_events(rule: dict[str, float]) -> None:
    """The runner's restore, emulated: the latest ``history_windows`` judged scores, the stored alerts, and the
    stored incident windows above 1 / relative within the lookback (``repo.excursions``)."""
    rng = np.random.default_rng(5)
    values = np.exp(rng.normal(-1.0, 0.6, size=240))
    for start in (20, 90, 170):  # incidents peaking at 50x, each followed by a 2x settling with brief dips
        values[start : start + 3] = [50.0, 1.5, 1.5]
        values[start + 3 : start + 40] = 2.0 * (rng.uniform(size=37) > 0.15)
    stream = [_score("a", 2 * i + 4, float(v)) for i, v in enumerate(values)]
    whole, events = _engine(half_life_s=120, **rule).judge(stream)
    assert sum(s.level > s.threshold and not s.is_anomaly for s in whole) > 30  # the rule holds windows back
    for split in range(1, len(stream)):
        _assert_restart_reproduces(rule, stream, split, whole, events)


def _assert_restart_reproduces(rule: dict[str, float], stream: list[Score], split: int, whole: list[Score],
                               events: list[AlertEvent]) -> None:
    """Restart after window ``split`` as the runner does (the latest ``history_windows`` judged scores, the stored
    alerts, the stored incident windows above 1 / relative within the lookback: ``repo.excursions`` emulated) and
    check the floors and events equal the unbroken run's."""
    probe = _engine(half_life_s=120, **rule)
    history, lookback = probe.history_windows(), probe.aftermath_lookback_ms("g")
    assert lookback is not None
    before_scores, before = _engine(half_life_s=120, **rule).judge(stream[:split])
    open_alert, last_resolved, spans = _stored_state(before)
    latest = before_scores[-1].end_ms
    excursions = [s for s in before_scores if s.is_anomaly and s.end_ms >= latest - lookback
                  and s.level * 0.3 > s.threshold and any(o <= s.start_ms and s.end_ms <= e for o, e in spans)]
    restarted = _engine(half_life_s=120, **rule)
    restarted.restore("a", "g", open_alert=open_alert, recent=before_scores[max(split - history, 0):],
                      last_resolved=last_resolved, excursions=excursions)
    after_scores, after = restarted.judge(stream)  # the windows before the split are replays
    assert after_scores[split:] == whole[split:], f"restart after window {split}"
    got = [(e.kind, e.alert.opened_ms, e.alert.last_seen_ms, e.alert.closed_ms, e.alert.window_count)
           for e in before + after]
    assert got == [(e.kind, e.alert.opened_ms, e.alert.last_seen_ms, e.alert.closed_ms, e.alert.window_count)
                   for e in events], f"restart after window {split}"


def test_a_restart_while_an_incident_is_pending_keeps_its_earliest_evidence() -> None:
    # k-of-n first holds at window 23 with evidence back to the 50x window 20; min_duration holds the opening to 27
    rule = {"k": 2, "n": 4, "min_duration_s": 4}
    values = [0.2] * 20 + [50.0, 0.2, 0.2, 1.5, 1.5, 0.2, 0.2] + [2.0] * 20
    stream = [_score("a", 2 * i + 4, v) for i, v in enumerate(values)]
    whole, events = _engine(half_life_s=120, **rule).judge(stream)
    assert events[0].kind == "opened" and events[0].alert.opened_ms == stream[20].start_ms
    assert events[0].alert.last_seen_ms == stream[27].end_ms
    assert not any(s.is_anomaly for s in whole[29:])  # the 2x settling is held back by the 50x evidence
    _assert_restart_reproduces(rule, stream, 27, whole, events)  # restart after window 26: pending since 23


def _value(asset: str, second: int) -> float:
    """a: an incident at 9x, then 30 s settling at 1.5x; later one at 8x, settling at 1.6x. b: one at 5x."""
    if asset == "a":
        for first, last, value in ((30, 39, 9.0), (40, 69, 1.5), (150, 159, 8.0), (160, 189, 1.6)):
            if first <= second <= last:
                return value
    elif 60 <= second < 80:
        return 5.0
    return 0.2


def _far_back(asset: str, second: int) -> float:
    """a: a 2000x incident at 30-39 s, quiet until 150 s, then 1.1x: held back by a bar that is 110 s old at 150 s."""
    if asset == "a" and 30 <= second < 40:
        return 2000.0
    return 1.1 if asset == "a" and second >= 150 else 0.2


def _records(start_s: int, stop_s: int, value: Callable[[str, int], float] = _value) -> list[RawRecord]:
    return records(T0, start_s, stop_s, lambda asset, second: {"x": value(asset, second), "y": 0.1})


class _MeanDetector:
    """Scores a window by the mean absolute value of each sensor; no smoothing."""

    version, group, sensors, threshold, window, ewma_alpha, score_steps = "fake-1", "g", ["x", "y"], 1.0, 4, None, None
    scaler = StandardScaler(mean=np.zeros(2), std=np.full(2, 1e12))  # its training data: no window far outside it

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_sensor = np.abs(windows).mean(axis=1)
        return per_sensor.sum(axis=1), per_sensor


def _config(sessions: sessionmaker[Session], half_life_s: float) -> Config:
    raw = _raw({"relative": 0.3, "half_life_s": half_life_s}, k=2, n=3)
    return parse_config({"database": {"url": str(sessions.kw["bind"].url)}, **raw}, env={})


def _run_with_restarts(sessions: sessionmaker[Session], spans: list[tuple[int, int]], half_life_s: float,
                       value: Callable[[str, int], float]) -> tuple[list[WindowScore], list[Score], list[Any]]:
    """One fresh runner (a new process, no broker) per span of seconds; then the stored rows, the scores an unbroken
    engine judges from the same raw scores, and the stored alerts (asset, opened, last seen, closed, windows)."""
    for first_s, last_s in spans:
        runner = Runner(_config(sessions, half_life_s), sessions=sessions,
                        detectors={"g": _MeanDetector()},  # type: ignore[dict-item]
                        producer=None, stop=threading.Event())  # type: ignore[arg-type]
        runner.process(_records(first_s, last_s, value), T0 + last_s * 1000)
    with sessions() as s:
        rows = list(s.scalars(select(WindowScore).order_by(WindowScore.asset, WindowScore.window_end)))
        stored_alerts = sorted((a.asset, a.opened_at, a.last_seen_at, a.closed_at, a.window_count)
                               for a in s.scalars(select(Alert)))
    raw = [replace(repo.score_of(r), aftermath_floor=None) for r in rows]  # as scored, before judging
    unbroken, events = AlertEngine(_config(sessions, half_life_s).groups).judge(raw)
    assert [r.aftermath_floor for r in rows] == [s.aftermath_floor for s in unbroken]
    assert [r.is_anomaly for r in rows] == [s.is_anomaly for s in unbroken]
    final = {(e.alert.asset, e.alert.opened_ms): e.alert for e in events}
    assert stored_alerts == sorted((a.asset, ms_to_datetime(a.opened_ms), ms_to_datetime(a.last_seen_ms),
                                    None if a.closed_ms is None else ms_to_datetime(a.closed_ms), a.window_count)
                                   for a in final.values())
    for asset in ("a", "b"):
        mine = [s for s in unbroken if s.asset == asset]
        _assert_same_floors([s.aftermath_floor for s in mine], _reference_floors(
            mine, [e for e in events if e.alert.asset == asset], half_life_s=half_life_s))
    return rows, unbroken, stored_alerts


def test_a_restart_finds_an_incident_just_inside_the_lookback(sessions: sessionmaker[Session]) -> None:
    engine = AlertEngine(_config(sessions, 100.0).groups)
    assert engine.aftermath_lookback_ms("g") == math.ceil(100_000 * math.log2(3.0))  # 158.5 s: from 3x down to 1x
    _, unbroken, _ = _run_with_restarts(sessions, [(0, 150), (150, 190)], 100.0, _far_back)
    held = {s.end_ms // 1000 - T0 // 1000 for s in unbroken if s.level > s.threshold and not s.is_anomaly}
    assert {154, 160, 166} <= held  # after the restart, by the incident that ended 110 s before it


def test_restarted_runners_store_what_an_unbroken_engine_decides(sessions: sessionmaker[Session]) -> None:
    # four processes; each restart replays the last 10 s of the previous one (as after a crash)
    rows, unbroken, stored_alerts = _run_with_restarts(
        sessions, [(0, 60), (50, 110), (100, 170), (160, 240)], RUNNER_HALF_LIFE_S, _value)
    ends = [(r.asset, r.window_end) for r in rows]
    assert ends == sorted(set(ends)) and len(rows) >= 2 * 115  # every window once
    held = [s for s in unbroken if s.level > s.threshold and not s.is_anomaly]
    # the settling after each of a's incidents is held back, across the restarts at 60 and 170 s
    assert {s.end_ms // 1000 - T0 // 1000 for s in held} >= {44, 58, 62, 70, 164, 168, 172, 190}
    assert sorted(a[0] for a in stored_alerts) == ["a", "a", "b"]  # one incident each, not one per settling


def test_alert_history_marks_windows_above_the_raised_bar_only() -> None:
    from datetime import timedelta

    from pipeline.alert_format import history_rows
    from pipeline.types import ms_to_datetime

    start = ms_to_datetime(T0)

    def row(i: int, score: float, floor: float | None) -> WindowScore:
        return WindowScore(asset="a", group_name="g", window_start=start + timedelta(seconds=2 * i),
                           window_end=start + timedelta(seconds=2 * i + 4), score=score, smoothed_score=None,
                           aftermath_floor=floor, threshold=1.0, is_anomaly=False, sensor_errors={"x": score},
                           model_version="v1")

    alert = Alert(asset="a", opened_at=start, last_seen_at=start + timedelta(seconds=10), closed_at=None)
    rows = history_rows([row(0, 20.0, None), row(1, 3.0, 6.0), row(2, 7.0, 6.0)], alert)
    assert [(r["aftermath_floor"], r["ratio"], r["above"]) for r in rows] == [(None, 20.0, True), (6.0, 3.0, False),
                                                                              (6.0, 7.0, True)]
