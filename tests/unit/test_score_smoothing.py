"""EWMA smoothing of the score stream (``threshold.ewma_alpha``): the alert engine's per-asset state, the threshold
fitted on smoothed validation scores, and a runner that restarts mid-stream continuing the smoothed stream exactly.
SQLite and a stand-in detector where a runner is involved: no broker."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models.scaler import StandardScaler
from models.thresholds import ewma, ewma_by_key, fit_threshold
from pipeline.alerting import AlertEngine
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.kafka_io import RawRecord
from pipeline.runner import Runner
from pipeline.store.tables import Alert, WindowScore
from pipeline.train import train_group
from pipeline.types import Score, Window, datetime_to_ms

T0 = 1772326800000  # 2026-03-01T01:00:00Z


def _raw(alpha: float | None = 0.5, **alert: int) -> dict:
    threshold = {"method": "percentile", "percentile": 99} | ({"ewma_alpha": alpha} if alpha is not None else {})
    return {"groups": [{"name": "g", "assets": ["a", "b"], "sampling_period_s": 1,
                        "sensors": [{"name": "x"}, {"name": "y"}], "window": {"length": 4, "stride": 2, "max_gap": 0},
                        "threshold": threshold, "alert": {"k": 1, "n": 1, "clear_after": 1} | alert}]}


def _score(asset: str, end_s: int, value: float, threshold: float = 1.0) -> Score:
    return Score(asset, "g", (end_s - 4) * 1000, end_s * 1000, value, threshold, {"x": value, "y": 0.0}, "v1")


def test_ewma_alpha_is_validated_with_its_key() -> None:
    assert parse_config(_raw(0.3), env={}).groups[0].threshold.ewma_alpha == 0.3
    assert parse_config(_raw(None), env={}).groups[0].threshold.ewma_alpha is None
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"groups\[0\]\.threshold\.ewma_alpha"):
            parse_config(_raw(bad), env={})


def test_engine_smooths_per_asset_and_leaves_replays_and_raw_groups_alone() -> None:
    engine = AlertEngine(parse_config(_raw(), env={}).groups)
    first = engine.smooth([_score("a", 4, 2.0), _score("b", 4, 8.0), _score("a", 6, 0.0)], {"g": 0.5})
    assert [(s.asset, s.end_ms, s.smoothed) for s in first] == [("a", 4000, 2.0), ("a", 6000, 1.0), ("b", 4000, 8.0)]
    second = engine.smooth([_score("a", 6, 100.0), _score("a", 8, 3.0)], {"g": 0.5})
    assert second[0].smoothed is None  # a replayed window: not smoothed again, the state is unchanged
    assert second[1].smoothed == pytest.approx(0.5 * 3.0 + 0.5 * 1.0)
    [plain] = engine.smooth([_score("a", 10, 5.0)], {"g": None})
    assert plain.smoothed is None and plain.level == 5.0


def test_smoothing_starts_afresh_after_maintenance_and_with_a_new_model() -> None:
    raw = _raw()
    raw["groups"][0]["alert"]["maintenance"] = [{"start": "2026-03-01T01:00:10Z", "end": "2026-03-01T01:00:20Z"}]
    engine = AlertEngine(parse_config(raw, env={}).groups)
    base = T0 // 1000
    stream = [_score("a", base + 4 + 2 * i, 50.0 if 12 <= 4 + 2 * i <= 22 else 0.2) for i in range(16)]
    smoothed = engine.smooth(stream, {"g": 0.3})
    inside = [x for x in smoothed if x.score == 50.0]
    after = [x for x in smoothed if x.end_ms > (base + 22) * 1000]
    assert inside and all(x.smoothed is None for x in inside)  # maintenance windows: not smoothed, state dropped
    assert after[0].smoothed == pytest.approx(0.2)  # starts again from the raw score, not from the 50s
    assert engine.process(smoothed) == []  # so no alert follows the maintenance
    old = [replace(_score("b", 4 + 2 * i, 5.0, threshold=10.0), model_version="v1") for i in range(5)]
    new = [replace(_score("b", 14 + 2 * i, 0.2), model_version="v2") for i in range(5)]
    swapped = engine.smooth(old + new, {"g": 0.3})
    # a new model's scale: the old level carries over as a fraction of the threshold (5 of 10 -> 0.5 of 1.0), not
    # as a raw value, and not dropped for the raw score
    assert swapped[5].smoothed == pytest.approx(0.3 * 0.2 + 0.7 * 0.5)
    assert engine.process(swapped) == []


def test_a_retrain_mid_stream_carries_the_level_over_as_a_fraction_of_the_threshold() -> None:
    """Restored from a stored v1 level at 2x its threshold, the first v2 windows continue from 2x v2's threshold
    (an excursion in progress stays visible); a normal v1 level continues as a normal v2 level, so a noisy first v2
    score is smoothed as any other instead of being judged raw."""
    engine = AlertEngine(parse_config(_raw(), env={}).groups)
    stored = replace(_score("a", 6, 8.0, threshold=4.0), smoothed=8.0)
    engine.restore("a", "g", open_alert=None, recent=[stored])
    [first] = engine.smooth([replace(_score("a", 8, 0.1, threshold=0.5), model_version="v2")], {"g": 0.2})
    assert first.smoothed == pytest.approx(0.2 * 0.1 + 0.8 * (8.0 / 4.0 * 0.5))
    assert first.level > first.threshold
    quiet = AlertEngine(parse_config(_raw(), env={}).groups)
    quiet.restore("a", "g", open_alert=None, recent=[replace(_score("a", 6, 1.0, threshold=4.0), smoothed=1.0)])
    [spike] = quiet.smooth([replace(_score("a", 8, 0.9, threshold=0.5), model_version="v2")], {"g": 0.2})
    assert spike.smoothed == pytest.approx(0.2 * 0.9 + 0.8 * 0.125) and spike.level < spike.threshold  # raw: 0.9


def test_engine_restores_the_smoothed_state_from_the_latest_stored_score() -> None:
    engine = AlertEngine(parse_config(_raw(), env={}).groups)
    stored = [_score("a", 4, 2.0), _score("a", 6, 4.0)]
    stored = [replace(s, smoothed=v) for s, v in zip(stored, (2.0, 3.0), strict=True)]
    engine.restore("a", "g", open_alert=None, recent=list(reversed(stored)))
    [next_score] = engine.smooth([_score("a", 8, 5.0)], {"g": 0.5})
    assert next_score.smoothed == pytest.approx(4.0)  # continues from the stored 3.0, not from scratch


def test_a_single_spike_alerts_on_raw_scores_but_not_on_smoothed_ones() -> None:
    groups = parse_config(_raw(), env={}).groups
    stream = [_score("a", 4 + 2 * i, 2.0 if i == 5 else 0.2) for i in range(12)]
    raw_events = AlertEngine(groups).process(stream)
    smoothing = AlertEngine(groups)
    smoothed_events = smoothing.process(smoothing.smooth(stream, {"g": 0.3}))
    assert [e.kind for e in raw_events] == ["opened", "resolved"]
    assert smoothed_events == []  # the spike's EWMA: 0.3 * 2.0 + 0.7 * 0.2 = 0.74, below the threshold
    sustained = [_score("a", 4 + 2 * i, 2.0 if 4 <= i < 9 else 0.2) for i in range(12)]
    engine = AlertEngine(groups)
    events = engine.process(engine.smooth(sustained, {"g": 0.3}))
    assert [e.kind for e in events][:1] == ["opened"] and events[0].alert.peak_score > 1.0


def test_ewma_by_key_smooths_each_key_in_order() -> None:
    scores = np.array([1.0, 10.0, 3.0, 20.0, 5.0])
    keys = ["a", "b", "a", "b", "a"]
    out = ewma_by_key(scores, keys, 0.5)
    np.testing.assert_allclose(out[[0, 2, 4]], ewma(np.array([1.0, 3.0, 5.0]), 0.5))
    np.testing.assert_allclose(out[[1, 3]], ewma(np.array([10.0, 20.0]), 0.5))
    with pytest.raises(ValueError, match="keys"):
        ewma_by_key(scores, keys[:3], 0.5)


def test_training_fits_the_threshold_on_smoothed_validation_scores_per_asset() -> None:
    rng = np.random.default_rng(3)
    windows = [Window(asset, "g", i * 2000, i * 2000 + 4000, rng.normal(size=(4, 2)) * (1 + 4 * (i % 17 == 0)))
               for i in range(120) for asset in ("a", "b")]
    raw_group = parse_config(_raw(None), env={}).groups[0]
    smooth_group = parse_config(_raw(0.2), env={}).groups[0]
    raw = train_group(windows, raw_group, progress=False)
    smooth = train_group(windows, smooth_group, progress=False)
    assert raw.detector.ewma_alpha is None and smooth.detector.ewma_alpha == 0.2
    assert smooth.detector.metadata["threshold_info"]["ewma_alpha"] == 0.2
    # same seed, same data: same network; the smoothed threshold is the 99th percentile of the per-asset EWMA
    ordered = sorted(windows, key=lambda w: (w.start_ms, w.asset))
    val = ordered[-len(ordered) // 5:]
    errors = smooth.detector.score(np.stack([w.values for w in val]))[0]
    expected, _ = fit_threshold(ewma_by_key(errors, [w.asset for w in val], 0.2), "percentile", percentile=99)
    assert smooth.detector.threshold == pytest.approx(expected, rel=1e-5)
    assert smooth.detector.threshold < raw.detector.threshold  # spiky errors: the smoothed tail is lower


class _MeanDetector:
    """Scores a window by the mean absolute value of each sensor; smooths with alpha 0.4."""

    version, group, sensors, threshold, window, ewma_alpha, score_steps = "fake-1", "g", ["x", "y"], 1.0, 4, 0.4, None
    scaler = StandardScaler(mean=np.zeros(2), std=np.full(2, 1e12))  # its training data: no window far outside it

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_sensor = np.abs(windows).mean(axis=1)
        return per_sensor.sum(axis=1), per_sensor


def _records(start_s: int, stop_s: int) -> list[RawRecord]:
    out = []
    for i in range(start_s, stop_s):
        for partition, asset in enumerate(("a", "b")):
            value = 5.0 if (asset == "a" and 30 <= i < 50) else 0.1 + 0.05 * (i % 3)
            payload = {"asset": asset, "ts": T0 + i * 1000, "values": {"x": value, "y": 0.1}}
            out.append(RawRecord("readings", partition, i, asset.encode(), orjson.dumps(payload), T0 + i * 1000))
    return out


def _runner(sessions: sessionmaker[Session]) -> Runner:
    """A runner (a fresh process, as after a restart) with the smoothing stand-in detector; no broker."""
    url = str(sessions.kw["bind"].url)
    config = parse_config({"database": {"url": url}, **_raw(0.4, k=2, n=3, clear_after=2)}, env={})
    return Runner(config, sessions=sessions, detectors={"g": _MeanDetector()},  # type: ignore[dict-item]
                  producer=None, stop=threading.Event())  # type: ignore[arg-type]


def _stored_scores(sessions: sessionmaker[Session]) -> list[WindowScore]:
    with sessions() as s:
        return list(s.scalars(select(WindowScore).order_by(WindowScore.asset, WindowScore.window_end)))


def test_a_restarted_runner_continues_the_smoothed_stream_exactly(sessions: sessionmaker[Session]) -> None:
    records = _records(0, 90)  # two per second: a on partition 0, b on partition 1
    _runner(sessions).process(records[:70], T0 + 35_000)  # up to second 34: mid-anomaly
    # a restart (all in-memory state gone): seconds 30-34 again (a replay, as after a crash), then new ones
    _runner(sessions).process(records[60:], T0 + 90_000)
    rows = _stored_scores(sessions)
    with sessions() as s:
        alerts = s.scalars(select(Alert)).all()
    for asset in ("a", "b"):
        mine = [r for r in rows if r.asset == asset]
        ends = [datetime_to_ms(r.window_end) for r in mine]
        assert ends == sorted(set(ends)) and len(mine) >= 40  # every window once
        expected = ewma(np.array([r.score for r in mine]), 0.4)
        np.testing.assert_allclose([r.smoothed_score for r in mine], expected)
        assert [r.is_anomaly for r in mine] == [bool(v > 1.0) for v in expected]
    assert [a.asset for a in alerts] == ["a"]  # the anomaly on a alerts; b's noise does not
    assert alerts[0].status == "resolved" and alerts[0].peak_score == pytest.approx(max(
        r.smoothed_score for r in rows if r.asset == "a"))


def test_alert_history_judges_the_smoothed_level_when_there_is_one() -> None:
    from datetime import timedelta

    from pipeline.alert_format import history_rows
    from pipeline.types import ms_to_datetime

    start = ms_to_datetime(T0)

    def row(i: int, score: float, smoothed: float | None) -> WindowScore:
        return WindowScore(asset="a", group_name="g", window_start=start + timedelta(seconds=2 * i),
                           window_end=start + timedelta(seconds=2 * i + 4), score=score, smoothed_score=smoothed,
                           threshold=1.0, is_anomaly=False, sensor_errors={"x": score}, model_version="v1")

    alert = Alert(asset="a", opened_at=start, last_seen_at=start + timedelta(seconds=10), closed_at=None)
    rows = history_rows([row(0, 3.0, 0.8), row(1, 0.5, 1.2), row(2, 2.0, None)], alert)
    assert [(r["smoothed"], r["ratio"], r["above"]) for r in rows] == [(0.8, 0.8, False), (1.2, 1.2, True),
                                                                       (None, 2.0, True)]


def test_a_failed_transaction_leaves_the_smoothed_stream_continuous(sessions: sessionmaker[Session],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from pipeline.store import repo

    runner = _runner(sessions)
    records = _records(0, 90)
    runner.process(records[:70], T0 + 35_000)
    real_insert, failures = repo.insert_scores, []

    def flaky_insert(**kwargs: object) -> None:
        if not failures:
            failures.append(1)  # the database drops the connection once, after the scores were smoothed
            raise OperationalError("INSERT INTO window_scores", {}, Exception("connection lost"))
        real_insert(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "insert_scores", flaky_insert)
    runner.process(records[70:], T0 + 90_000)  # retried after the failure
    assert failures == [1]
    rows = _stored_scores(sessions)
    for asset in ("a", "b"):
        mine = [r for r in rows if r.asset == asset]
        np.testing.assert_allclose([r.smoothed_score for r in mine], ewma(np.array([r.score for r in mine]), 0.4))


def test_retrain_evaluation_judges_subsets_on_the_stream_smoothed_in_context() -> None:
    from pipeline.retrain import evaluate

    class Smoothing:
        version, threshold, ewma_alpha, score_steps = "v", 1.0, 0.5, None

        def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return windows[:, 0, 0], windows[:, 0, :]

    raw = [0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    context = [Window("a", "g", i * 1000, i * 1000 + 4000, np.full((4, 2), v)) for i, v in enumerate(raw)]
    alerts, holdout = context[4:6], context[6:]
    in_context = evaluate(Smoothing(), holdout, alerts, context)  # type: ignore[arg-type]
    alone = evaluate(Smoothing(), holdout, alerts)  # type: ignore[arg-type]
    # in the pipeline the level after the incident decays 1.125, 0.56, ...: the first held-out window still exceeds
    assert in_context.far == pytest.approx(0.25) and in_context.recall == pytest.approx(1.0)
    assert alone.far == 0.0  # smoothed on its own, the held-out stretch would start from scratch
    levels = dict(zip(((w.asset, w.end_ms) for w in context), ewma(np.array(raw), 0.5), strict=True))
    assert evaluate(Smoothing(), holdout, alerts, context, levels=levels) == in_context  # type: ignore[arg-type]
