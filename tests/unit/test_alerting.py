"""The alert state machine: k-of-n opening, updates, resolution, severity, and restart from stored state."""

from __future__ import annotations

from pipeline.alerting import AlertEngine
from pipeline.config import parse_config
from pipeline.types import Score


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
