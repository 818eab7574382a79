"""The alert state machine: k-of-n opening, hysteresis, severity tiers, minimum duration, cooldown, maintenance
windows, and restart from stored state."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from pipeline.alerting import AlertEngine
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.types import AlertEvent, AlertRecord, Score, datetime_to_ms


def _engine(k: int = 2, n: int = 3, clear_after: int = 2) -> AlertEngine:
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a", "b"], "sensors": [{"name": "x"}, {"name": "y"}],
                                    "alert": {"k": k, "n": n, "clear_after": clear_after,
                                              "critical_multiplier": 3.0, "top_sensors": 1}}]}, env={})
    return AlertEngine(cfg.groups)


def _scores(values: list[float], asset: str = "a", t0: int = 0) -> list[Score]:
    return [Score(asset, "g", t0 + i * 10, t0 + i * 10 + 30, v, 1.0, {"x": v * 0.9, "y": v * 0.1}, "m1")
            for i, v in enumerate(values)]


def test_single_exceedance_does_not_open_but_k_of_n_does() -> None:
    engine = _engine()
    assert engine.process(_scores([0.5, 2.0, 0.5, 0.5, 0.5])) == []
    events = _engine().process(_scores([0.5, 2.0, 0.5, 2.5]))
    assert [e.kind for e in events] == ["opened"]
    alert = events[0].alert
    assert alert.opened_ms == 10 and alert.last_seen_ms == 60  # from the first flagged window to the latest
    assert alert.window_count == 2 and alert.peak_score == 2.5 and alert.severity == "warning"
    assert alert.top_sensors[0]["sensor"] == "x" and alert.top_sensors[0]["share"] == 0.9


def test_alert_updates_escalates_and_resolves_after_clear_after_windows() -> None:
    events = _engine().process(_scores([2.0, 2.0, 4.0, 0.5, 2.0, 0.5, 0.5, 0.5]))
    assert [e.kind for e in events] == ["opened", "updated", "updated", "resolved"]
    assert events[1].alert.severity == "critical"
    final = events[-1].alert
    assert final.status == "resolved" and final.closed_ms == 6 * 10 + 30
    assert final.window_count == 4


def test_replayed_windows_are_ignored() -> None:
    engine = _engine()
    first = engine.process(_scores([2.0, 2.0, 2.0]))
    assert engine.process(_scores([2.0, 2.0, 2.0])) == []
    assert len(first) == 2


def test_restart_from_stored_state_continues_the_same_incident() -> None:
    scores = _scores([2.0, 2.0, 2.0, 0.5, 0.5, 0.5])
    uninterrupted = _engine().process(scores)
    engine = _engine()
    before = engine.process(scores[:4])
    stored = before[-1].alert
    restarted = _engine()
    restarted.restore("a", "g", open_alert=stored, recent=scores[1:4])
    after = restarted.process(scores)  # the replay includes windows already processed
    assert [e.kind for e in after] == ["resolved"]
    assert after[-1].alert == uninterrupted[-1].alert


def test_assets_are_independent() -> None:
    events = _engine().process(_scores([2.0, 2.0], "a") + _scores([0.1, 0.1], "b"))
    assert {e.alert.asset for e in events} == {"a"}


# -- rules from YAML: hysteresis, severity tiers, minimum duration, cooldown, maintenance ------------------------------
STEP = 10_000  # 10 s between window ends (sampling 1 s, stride 10 steps)
T0 = datetime_to_ms(datetime(2026, 3, 1, 1, 0, tzinfo=UTC))


def _rule_engine(**alert: Any) -> AlertEngine:
    rule = {"k": 2, "n": 3, "clear_after": 2, "top_sensors": 2, **alert}
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a", "b"], "sensors": [{"name": "x"}, {"name": "y"}],
                                    "sampling_period_s": 1, "window": {"length": 30, "stride": 10},
                                    "alert": rule}]}, env={})
    return AlertEngine(cfg.groups)


def _timed(values: list[float], asset: str = "a", t0: int = T0, step: int = STEP) -> list[Score]:
    """Windows of 30 s ending every ``step`` ms from ``t0 + 30 s``; threshold 1."""
    return [Score(asset, "g", t0 + i * step, t0 + i * step + 30_000, v, 1.0, {"x": v * 0.75, "y": v * 0.25}, "m1")
            for i, v in enumerate(values)]


def _kinds(events: list[AlertEvent]) -> list[str]:
    return [e.kind for e in events]


def test_hysteresis_keeps_one_alert_while_the_score_hovers_around_the_threshold() -> None:
    hovering = [2.0, 2.0] + [0.8, 1.3, 1.2, 0.7, 0.9, 0.8, 1.4, 1.1, 0.6] * 3 + [0.3, 0.3]
    plain = _rule_engine().process(_timed(hovering))
    assert _kinds(plain).count("opened") >= 3  # without hysteresis the alert flaps: resolved and opened again
    events = _rule_engine(exit_level=0.5).process(_timed(hovering))
    assert _kinds(events).count("opened") == 1 and _kinds(events).count("resolved") == 1
    assert events[-1].kind == "resolved" and events[-1].alert.closed_ms == _timed(hovering)[-1].end_ms
    assert events[-1].alert.window_count == 2 + 4 * 3  # every window above the threshold belongs to the one alert


def test_k_of_n_ignores_isolated_exceedances() -> None:
    isolated = [2.0, 0.5, 0.5] * 6
    assert _rule_engine(k=2, n=3).process(_timed(isolated)) == []
    assert _kinds(_rule_engine(k=1, n=1, clear_after=1).process(_timed(isolated))).count("opened") == 6


def test_severity_tiers_escalate_and_never_fall_during_an_incident() -> None:
    tiers = [{"name": "warning", "multiple": 1}, {"name": "major", "multiple": 2}, {"name": "critical", "multiple": 4}]
    events = _rule_engine(severities=tiers).process(_timed([1.5, 1.5, 2.5, 1.5, 5.0, 1.2, 0.5, 0.5]))
    assert _kinds(events) == ["opened", "updated", "updated", "updated", "updated", "resolved"]
    assert [e.alert.severity for e in events] == ["warning", "major", "major", "critical", "critical", "critical"]
    assert [e.escalated for e in events] == [False, True, False, True, False, False]
    assert events[1].previous_severity == "warning" and events[3].previous_severity == "major"


def test_default_tiers_come_from_critical_multiplier() -> None:
    events = _rule_engine(critical_multiplier=4.0).process(_timed([2.0, 3.9, 4.0]))
    assert [e.alert.severity for e in events] == ["warning", "critical"]


@pytest.mark.parametrize(("alert", "message"), [
    ({"severities": [{"name": "warning", "multiple": 1}], "critical_multiplier": 4.0}, "either severities or"),
    ({"severities": [{"name": "warning", "multiple": 2}]}, "start with a tier at multiple 1"),
    ({"severities": [{"name": "w", "multiple": 1}, {"name": "c", "multiple": 3}, {"name": "m", "multiple": 2}]},
     "strictly increasing"),
    ({"severities": [{"name": "w", "multiple": 1}, {"name": "w", "multiple": 3}]}, "unique"),
    ({"exit_level": 1.5}, "exit_level"),
    ({"maintenance": [{"cron": "0 2 * *", "duration_minutes": 30}]}, "5 fields"),
    ({"maintenance": [{"cron": "0 25 * * *", "duration_minutes": 30}]}, "hour"),
    ({"maintenance": [{"cron": "0 2 * * *"}]}, "both required"),
    ({"maintenance": [{"start": "2026-03-01T02:00:00Z"}]}, "start and end"),
    ({"maintenance": [{"start": "2026-03-01T02:00:00Z", "end": "2026-03-01T01:00:00Z"}]}, "end after start"),
    ({"maintenance": [{"start": "2026-03-01T02:00:00Z", "end": "2026-03-01T03:00:00Z", "cron": "@daily"}]},
     "either start and end"),
])
def test_invalid_alert_rules_are_reported_with_their_key(alert: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"groups\[0\]\.alert") as info:
        _rule_engine(**alert)
    assert message in str(info.value)


def test_min_duration_opens_only_after_the_condition_has_held_long_enough() -> None:
    assert _rule_engine(min_duration_s=30).process(_timed([2.0, 2.0, 2.0, 0.5, 0.5, 2.0, 0.5, 0.5])) == []
    events = _rule_engine(min_duration_s=30).process(_timed([2.0] * 6))
    assert _kinds(events) == ["opened", "updated"]
    opened = events[0].alert
    # k-of-n first holds at window 1; 30 s later is window 4, and the alert covers every exceeding window so far
    assert opened.last_seen_ms == _timed([2.0] * 6)[4].end_ms
    assert opened.opened_ms == T0 and opened.window_count == 5


def test_cooldown_blocks_a_new_alert_right_after_a_resolution() -> None:
    values = [2.0, 2.0, 0.5, 0.5] + [2.0] * 12
    scores = _timed(values)
    without = _rule_engine().process(scores)
    assert _kinds(without) == ["opened", "resolved", "opened"] + ["updated"] * 10
    assert without[2].alert.last_seen_ms == scores[5].end_ms
    events = _rule_engine(cooldown_s=60).process(scores)
    resolved_at = events[1].alert.closed_ms
    assert resolved_at == scores[3].end_ms
    assert _kinds(events) == ["opened", "resolved", "opened"] + ["updated"] * 6
    reopened = events[2].alert
    assert reopened.last_seen_ms == resolved_at + 60_000  # the first window at the end of the cooldown
    assert reopened.opened_ms == scores[7].start_ms  # k-of-n history from the cooldown still counts (last 3 windows)
    assert reopened.window_count == 3


def test_explicit_maintenance_window_silences_one_asset_and_drops_evidence_from_before() -> None:
    start, end = T0 + 35_000, T0 + 70_000  # overlaps windows 1..6 (each is 30 s long)
    window = {"assets": ["a"], "start": datetime.fromtimestamp(start / 1000, UTC).isoformat(),
              "end": datetime.fromtimestamp(end / 1000, UTC).isoformat(), "reason": "pump swap"}
    engine = _rule_engine(maintenance=[window])
    values = [2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 2.0, 0.5, 0.5]
    assert engine.process(_timed(values, "a")) == []  # window 0 and window 7 never combine across maintenance
    events = engine.process(_timed(values, "b"))
    assert _kinds(events)[0] == "opened"  # the other asset of the group is not in maintenance


def test_cron_maintenance_repeats_daily_and_freezes_an_open_alert() -> None:
    nightly = {"cron": "0 2 * * *", "duration_minutes": 60}  # 02:00-03:00 UTC every day
    engine = _rule_engine(maintenance=[nightly])
    step = 5 * 60_000  # a window every 5 minutes from 01:00
    # open at 01:35, keep exceeding into the maintenance hour (wildly), then quiet windows from 02:50
    values = [0.5] * 6 + [2.0] * 8 + [9.0, 0.1] * 4 + [0.3] * 8
    scores = _timed(values, step=step)
    events = engine.process(scores)
    silenced = {s.end_ms for s in scores if datetime.fromtimestamp(s.start_ms / 1000, UTC).hour == 2}
    assert len(silenced) == 12
    assert not any(e.alert.last_seen_ms in silenced or e.alert.closed_ms in silenced for e in events)
    assert _kinds(events) == ["opened"] + ["updated"] * 4 + ["resolved"]
    assert all(e.alert.severity == "warning" for e in events)  # the 9.0 windows fell inside the maintenance hour
    after = [s for s in scores if s.end_ms not in silenced and s.start_ms > scores[14].start_ms]
    assert events[-1].alert.closed_ms == after[1].end_ms  # the second quiet window after 03:00 resolves it
    # the next night is silenced too
    next_night = _timed([5.0] * 10, t0=T0 + 86_400_000 + 3_600_000 + 60_000, step=step)
    assert engine.process(next_night) == []


# -- restart: the state rebuilt from what the database holds gives the same events as an uninterrupted run ------------
def _stored_state(events: list[AlertEvent]) -> tuple[AlertRecord | None, AlertRecord | None]:
    """The open alert and the last resolved alert, as the database holds them after these events."""
    latest: dict[int, AlertRecord] = {}
    for e in events:
        latest[e.alert.opened_ms] = e.alert
    records = sorted(latest.values(), key=lambda r: r.opened_ms)
    open_ = next((r for r in reversed(records) if r.status == "open"), None)
    resolved = [r for r in records if r.status == "resolved"]
    return open_, (max(resolved, key=lambda r: r.closed_ms or 0) if resolved else None)


RULES = [
    {},
    {"exit_level": 0.6, "clear_after": 3},
    {"k": 3, "n": 5, "clear_after": 2, "exit_level": 0.8},
    {"min_duration_s": 40},
    {"k": 2, "n": 4, "min_duration_s": 20},  # evidence from before k-of-n held, pending for two strides
    {"cooldown_s": 50, "min_duration_s": 20},
    {"severities": [{"name": "low", "multiple": 1}, {"name": "high", "multiple": 2.5}], "cooldown_s": 30},
    {"maintenance": [{"start": "2026-03-01T01:02:00Z", "end": "2026-03-01T01:03:00Z"}]},
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ",".join(r) or "default")
def test_restart_at_any_point_reproduces_the_uninterrupted_events(rule: dict[str, Any]) -> None:
    rng = np.random.default_rng(len(str(rule)))
    values = [float(v) for v in np.clip(rng.normal(0.8, 0.9, 60), 0.05, None)]
    values[10:22] = [3.0] * 12  # one sure incident
    scores = _timed(values)
    expected = _rule_engine(**rule).process(scores)
    assert expected, "the sequence should raise at least one alert"
    history = _rule_engine(**rule).history_windows()
    for split in range(1, len(scores)):
        first = _rule_engine(**rule)
        before = first.process(scores[:split])
        open_alert, last_resolved = _stored_state(before)
        restarted = _rule_engine(**rule)
        restarted.restore("a", "g", open_alert=open_alert, recent=scores[max(split - history, 0):split],
                          last_resolved=last_resolved)
        after = restarted.process(scores)  # the replay includes windows already processed
        _assert_same_events(before + after, expected, f"restart after window {split}")


def _assert_same_events(got: list[AlertEvent], expected: list[AlertEvent], where: str) -> None:
    """Equal events; stored shares and errors are rounded, so the top sensors match to rounding."""
    assert _kinds(got) == _kinds(expected), where
    for g, e in zip(got, expected, strict=True):
        assert g.previous_severity == e.previous_severity, where
        assert replace(g.alert, top_sensors=[]) == replace(e.alert, top_sensors=[]), where
        assert [t["sensor"] for t in g.alert.top_sensors] == [t["sensor"] for t in e.alert.top_sensors], where
        for a, b in zip(g.alert.top_sensors, e.alert.top_sensors, strict=True):
            assert a["share"] == pytest.approx(b["share"], abs=2e-4), where
            assert a["error"] == pytest.approx(b["error"], rel=1e-5), where


def test_restore_reports_what_a_changed_rule_implies_for_the_open_alert() -> None:
    scores = _timed([2.0, 2.0, 2.0, 0.9, 0.9, 0.9])
    before = _rule_engine(exit_level=0.5).process(scores)  # 0.9 is above the exit level: still open
    assert before[-1].alert.status == "open"
    restarted = _rule_engine()  # exit level back to the threshold: the stored windows resolve it
    restarted.restore("a", "g", open_alert=before[-1].alert, recent=scores[-3:])
    events = restarted.process([])
    assert _kinds(events) == ["resolved"] and events[0].alert.closed_ms == scores[4].end_ms


def test_restored_top_sensor_shares_stay_consistent() -> None:
    scores = [Score("a", "g", T0 + i * STEP, T0 + i * STEP + 30_000, 2.0, 1.0, {"x": 1.0, "y": 0.6, "z": 0.4}, "m")
              for i in range(6)]
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": s} for s in "xyz"],
                                    "alert": {"k": 2, "n": 3, "top_sensors": 1}}]}, env={})
    expected = AlertEngine(cfg.groups).process(scores)
    first = AlertEngine(cfg.groups)
    before = first.process(scores[:3])
    restarted = AlertEngine(cfg.groups)
    restarted.restore("a", "g", open_alert=before[-1].alert, recent=scores[:3])
    after = restarted.process(scores)
    assert after[-1].alert.top_sensors == expected[-1].alert.top_sensors == [
        {"sensor": "x", "share": 0.5, "error": 6.0}]
    legacy = AlertEngine(cfg.groups)  # a record stored before the error sums were kept
    legacy.restore("a", "g", open_alert=replace(before[-1].alert, error_sums=None), recent=scores[:3])
    updated = legacy.process(scores)[-1].alert
    assert updated.top_sensors == [{"sensor": "x", "share": 0.5, "error": 6.0}]  # y and z stay in the total, as
    # their remainder; the rebuilt sums (rounded, one internal remainder) are never stored as exact ones
    assert updated.error_sums is None


def test_a_sensor_beyond_the_listed_ones_can_overtake_them_after_a_restart() -> None:
    """The stored alert keeps every sensor's unrounded error sum: after a restart the ranking goes on exactly as in
    an unbroken run (it used to keep only the listed sensors, so an unlisted one could never enter the list)."""
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": s} for s in "xyz"],
                                    "alert": {"k": 1, "n": 1, "top_sensors": 1}}]}, env={})
    errors = [{"x": 1.0, "y": 0.9, "z": 0.1}, {"x": 0.0, "y": 1.0, "z": 1.0}]
    scores = [Score("a", "g", T0 + i * STEP, T0 + i * STEP + 30_000, 2.0, 1.0, e, "m") for i, e in enumerate(errors)]
    expected = AlertEngine(cfg.groups).process(scores)
    assert expected[-1].alert.top_sensors == [{"sensor": "y", "share": 0.475, "error": 1.9}]
    stored = AlertEngine(cfg.groups).process(scores[:1])[-1].alert
    assert stored.top_sensors[0]["sensor"] == "x"
    restarted = AlertEngine(cfg.groups)
    restarted.restore("a", "g", open_alert=stored, recent=scores[:1])
    assert restarted.process(scores[1:])[-1].alert == expected[-1].alert


def test_error_sums_are_not_rounded_across_restarts() -> None:
    """A restart before every window ends with the same unrounded sums as an unbroken run."""
    cfg = parse_config({"groups": [{"name": "g", "assets": ["a"], "sensors": [{"name": "x"}],
                                    "alert": {"k": 1, "n": 1}}]}, env={})
    scores = [Score("a", "g", T0 + i * STEP, T0 + i * STEP + 30_000, 2.0, 1.0, {"x": 0.1234564}, "m")
              for i in range(20)]
    expected = AlertEngine(cfg.groups).process(scores)[-1].alert
    stored: AlertRecord | None = None
    for i in range(20):
        engine = AlertEngine(cfg.groups)
        engine.restore("a", "g", open_alert=stored, recent=scores[max(i - 1, 0):i])
        events = engine.process(scores[i:i + 1])
        stored = events[-1].alert if events else stored
    assert stored == expected and stored.error_sums == {"x": sum(s.sensor_errors["x"] for s in scores)}


def test_history_windows_covers_k_of_n_resolution_and_pending_time() -> None:
    assert _rule_engine(n=4, clear_after=9).history_windows() == 9
    assert _rule_engine(n=4, clear_after=6).history_windows() == 2 * 4  # a pending incident's evidence
    assert _rule_engine(n=3, clear_after=2, min_duration_s=95).history_windows() == 2 * 3 + math.ceil(95 / 10)


@pytest.mark.parametrize("rule", [{}, {"exit_level": 0.6, "clear_after": 3}], ids=["default", "hysteresis"])
def test_restart_from_open_alert_and_latest_scores_only(rule: dict[str, Any]) -> None:
    """Without the last resolved alert, and with max(n, clear_after) latest scores, the restore is still exact when
    the rule has no cooldown, no minimum duration, and n <= clear_after (e.g. the demo's rule)."""
    rng = np.random.default_rng(7)
    values = [float(v) for v in np.clip(rng.normal(0.8, 0.9, 50), 0.05, None)]
    scores = _timed(values)
    expected = _rule_engine(**rule).process(scores)
    history = max(3, rule.get("clear_after", 2))
    for split in range(1, len(scores)):
        before = _rule_engine(**rule).process(scores[:split])
        restarted = _rule_engine(**rule)
        restarted.restore("a", "g", open_alert=_stored_state(before)[0], recent=scores[max(split - history, 0):split])
        _assert_same_events(before + restarted.process(scores[split:]), expected, f"restart after window {split}")


def test_restore_without_scores_does_not_count_the_alerts_windows_twice() -> None:
    scores = _timed([2.0, 2.0, 2.0, 2.0])
    stored = _rule_engine().process(scores)[-1].alert
    restarted = _rule_engine()
    restarted.restore("a", "g", open_alert=stored, recent=[])
    assert restarted.process(scores) == []  # every window is at or before the stored last_seen
    (event,) = restarted.process(_timed([3.0], t0=T0 + 4 * STEP))
    assert event.alert.window_count == stored.window_count + 1


def test_a_restart_mid_incident_after_a_model_swap_keeps_the_severity() -> None:
    """The incident opened under threshold 1.0 (v1) and went on under 1.75 (v2): 3.5 is 2x the new threshold, so it
    stays a warning (critical at 3x), also after a restart that knows only the stored peak and opening threshold."""
    scores = _timed([2.0, 3.5, 2.0])
    scores[1:] = [replace(s, threshold=1.75, model_version="m2") for s in scores[1:]]
    engine = _rule_engine(k=1, n=1)
    expected = engine.process(scores)
    assert [e.alert.severity for e in expected] == ["warning"] * 3
    before = _rule_engine(k=1, n=1).process(scores[:2])
    restarted = _rule_engine(k=1, n=1)
    restarted.restore("a", "g", open_alert=before[-1].alert, recent=scores[:2])
    assert [e.alert.severity for e in restarted.process(scores)] == ["warning"]  # was critical: 3.5 / 1.0


def test_an_open_alert_follows_its_asset_into_a_renamed_group() -> None:
    """Stored under group "old"; the asset's group is "g" after a rename: its updates and resolution say "g", so
    the alert is found under the group the asset is in now."""
    scores = _timed([2.0, 2.0, 2.0])
    stored = replace(_rule_engine().process(scores)[-1].alert, group="old")
    restarted = _rule_engine()
    restarted.restore("a", "g", open_alert=stored, recent=scores)
    events = restarted.process(_timed([3.0, 0.5, 0.5], t0=T0 + 3 * STEP))
    assert _kinds(events) == ["updated", "resolved"] and {e.alert.group for e in events} == {"g"}


def test_an_alert_keeps_the_sensors_far_outside_training_across_its_windows_and_a_restart() -> None:
    """The opening gathers the flagged windows' off-training sensors (farthest each); updates add farther ones;
    windows below the threshold add none; a restart from the stored record goes on from it."""
    far = [{}, {"y": -12.0}, {}, {"y": -9.0, "x": 5.0}, {"x": 80.0}, {"x": 200.0}]
    scores = [replace(s, off_training=off) for s, off in zip(_scores([0.5, 2.0, 0.5, 2.5, 2.0, 0.5]), far,
                                                             strict=True)]
    events = _engine().process(scores[:4])
    assert [e.kind for e in events] == ["opened"] and events[0].alert.off_training == {"y": -12.0, "x": 5.0}
    restarted = _engine()
    restarted.restore("a", "g", open_alert=events[0].alert, recent=scores[:4])
    (updated,) = restarted.process(scores[4:])  # the last window is below the threshold: its 200 is not the alert's
    assert updated.kind == "updated" and updated.alert.off_training == {"y": -12.0, "x": 80.0}
    legacy = _engine()  # an alert stored before off_training was kept
    legacy.restore("a", "g", open_alert=replace(events[0].alert, off_training=None), recent=scores[:4])
    assert legacy.process(scores[4:5])[0].alert.off_training == {"x": 80.0}
