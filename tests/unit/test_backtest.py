"""Backtest: a trained model and the configured alert rules run over recorded history through the pipeline's own
steps, on SQLite (the embedded default) with a real model; nothing is written to the database."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import backtest
from pipeline.cli import app
from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.evaluation import Span
from pipeline.history import read_readings_csv, windows_from_frame
from pipeline.kafka_io import RawRecord, encode_reading
from pipeline.registry import load_active
from pipeline.replay import csv_messages
from pipeline.report import read_signals
from pipeline.runner import Runner
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, upgrade
from pipeline.types import Score, datetime_to_ms, ms_to_datetime

SENSORS = ["speed", "flow", "pressure", "current", "vibration", "motor_temp", "bearing_temp"]
runner = CliRunner()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained, active dense model of two simulated pumps, and 12 hours of their history with 2 injected anomalies
    each (``hist/readings.csv``, ``hist/ground_truth.json``)."""
    root = tmp_path_factory.mktemp("backtest")
    config = root / "c.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{root / 'sw.db'}"}, "model_dir": str(root / "models"),
        "groups": [{"name": "pumps", "assets": ["pump-1", "pump-2"], "sampling_period_s": 10,
                    "sensors": [{"name": s} for s in SENSORS], "window": {"length": 30, "stride": 5},
                    "model": {"type": "dense", "epochs": 8}}]}))
    for args in (["simulate", "--out", str(root / "normal"), "--anomalies", "0", "--hours", "24",
                  "--assets", "pump-1,pump-2"],
                 ["simulate", "--out", str(root / "hist"), "--anomalies", "2", "--hours", "12", "--assets",
                  "pump-1,pump-2", "--start", "2026-01-02T00:00:00", "--seed", "11"],
                 ["db", "upgrade", "-c", str(config)],
                 ["train", "-c", str(config), "--csv", str(root / "normal" / "readings.csv")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    return root


def test_a_backtest_raises_the_alerts_the_history_calls_for_and_writes_nothing(deployed: Path) -> None:
    out = deployed / "out"
    result = runner.invoke(app, [
        "backtest", "-c", str(deployed / "c.yaml"), "--csv", str(deployed / "hist" / "readings.csv"), "--format",
        "json", "--incidents", str(deployed / "hist" / "ground_truth.json"), "--scores-out", str(out / "s.csv"),
        "--report-dir", str(out / "reports")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["group"] == "pumps" and doc["model_version"].startswith("pumps-")
    assert [a["asset"] for a in doc["assets"]] == ["pump-1", "pump-2"]
    windows = sum(a["windows"] for a in doc["assets"])
    assert windows == 2 * (12 * 360 - 30) // 5 + 2  # every complete window of the 12 hours, stride 5
    assert doc["incidents"]["recall"] == 1.0 and doc["incidents"]["missed"] == []  # all 4 injected anomalies
    assert doc["alerts"] and all(a["severity"] in ("warning", "critical") for a in doc["alerts"])
    assert sum(sum(a["alerts"].values()) for a in doc["assets"]) == len(doc["alerts"])
    scores = pd.read_csv(out / "s.csv")
    assert len(scores) == windows and set(SENSORS) <= set(scores.columns)
    assert scores["is_anomaly"].sum() == sum(a["anomalous"] for a in doc["assets"]) > 0
    assert sorted(p.name for p in (out / "reports").iterdir()) == ["pump-1.html", "pump-2.html"]
    assert "data-alert-id" in (out / "reports" / "pump-1.html").read_text(encoding="utf-8")
    engine = make_engine(f"sqlite:///{deployed / 'sw.db'}")
    with make_sessionmaker(engine)() as session:  # a backtest changes nothing
        assert repo.count_scores(session=session) == 0 and repo.list_alerts(session=session, limit=None) == []
    engine.dispose()


def test_the_backtest_does_not_depend_on_how_the_history_is_chunked(deployed: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Alerts and verdicts are the same whether the windows go through in one forward pass or in many small ones
    (the streaming pipeline's batches are whatever a poll brings)."""
    from pipeline.config import load_config
    from pipeline.history import read_readings_csv, windows_from_frame
    from pipeline.registry import load_active

    cfg = load_config(deployed / "c.yaml")
    group = cfg.groups[0]
    windows = windows_from_frame(read_readings_csv(deployed / "hist" / "readings.csv"), group)
    engine = make_engine(cfg.database.url)
    with make_sessionmaker(engine)() as session:
        detector = load_active(session=session, config=cfg)["pumps"]
    engine.dispose()
    whole = backtest.run_backtest(windows, detector, group)
    monkeypatch.setattr(backtest, "CHUNK", 37)
    seen: list[int] = []
    chunked = backtest.run_backtest(windows, detector, group, advance=seen.append)
    assert sum(seen) == len(windows) and len(seen) == -(-len(windows) // 37)
    assert chunked.alerts == whole.alerts and len(whole.alerts) > 0
    assert [(s.asset, s.end_ms, s.is_anomaly) for s in chunked.scores] == [
        (s.asset, s.end_ms, s.is_anomaly) for s in whole.scores]


class _NoDeadLetters:
    """The runner's producer: a backtest's history has no record to dead-letter."""

    def send(self, topic: str, **kwargs: object) -> None:
        raise AssertionError(f"dead-lettered to {topic}: {kwargs}")

    def flush(self, timeout: float | None = None) -> None:
        return None


def test_the_backtest_judges_the_history_as_the_streaming_pipeline_does(deployed: Path, tmp_path: Path) -> None:
    """The pipeline's runner, fed the history as ``replay`` produces it (polled batches of records, then the assets'
    idle close), stores the windows, verdicts and alerts that the backtest reports, under rules that use every step
    the two share: lateness, smoothing, drift following, k-of-n with a minimum duration, hysteresis, cooldown,
    aftermath and a maintenance window. The history is shuffled and has holes (as recorded files do)."""
    raw = yaml.safe_load((deployed / "c.yaml").read_text())
    raw["database"]["url"] = f"sqlite:///{tmp_path / 'stream.db'}"
    group = raw["groups"][0]
    group["window"]["lateness"] = 2
    group["drift"] = {"span_s": 3600, "max_offset": 2}
    group["alert"] = {"k": 2, "n": 4, "clear_after": 2, "exit_level": 0.8, "min_duration_s": 60, "cooldown_s": 600,
                      "aftermath": {"relative": 0.5, "half_life_s": 1800},
                      "maintenance": [{"start": "2026-01-02T05:30:00Z", "end": "2026-01-02T05:40:00Z",
                                       "assets": ["pump-1"]}]}
    cfg = parse_config(raw, env={})
    engine = make_engine(f"sqlite:///{deployed / 'sw.db'}")
    with make_sessionmaker(engine)() as session:
        active = load_active(session=session, config=load_config(deployed / "c.yaml"))["pumps"]
    engine.dispose()
    info = {**active.metadata.get("threshold_info", {}), "ewma_alpha": 0.5}
    detector = dataclasses.replace(active, metadata={**active.metadata, "threshold_info": info})
    frame = read_readings_csv(deployed / "hist" / "readings.csv").sample(frac=1.0, random_state=3)
    frame.loc[frame.sample(frac=0.02, random_state=4).index, "flow"] = None
    result = backtest.run_backtest(windows_from_frame(frame, cfg.groups[0], to_the_end=True), detector, cfg.groups[0])

    upgrade(cfg.database.url)
    stream = make_engine(cfg.database.url)
    runner = Runner(cfg, sessions=make_sessionmaker(stream), detectors={"pumps": detector},
                    producer=_NoDeadLetters(), stop=threading.Event())  # type: ignore[arg-type]
    messages = csv_messages(frame, cfg).messages
    now = messages[-1][1]["ts"] + 60_000
    records = [RawRecord("readings", 0, i, asset.encode(), encode_reading(payload), now)
               for i, (asset, payload) in enumerate(messages)]
    for start in range(0, len(records), 997):
        runner.process(records[start:start + 997], now)
    runner.process([], now + 3_600_000, idle_partitions={0})  # the assets fall silent: their last windows close
    with make_sessionmaker(stream)() as session:
        alerts = sorted(repo.list_alerts(session=session, limit=None), key=lambda a: (a.opened_at, a.asset))
        stored = [repo.score_of(row) for asset in ("pump-1", "pump-2") for row in repo.scores_between(
            session=session, asset=asset, start=ms_to_datetime(0), end=ms_to_datetime(now))]
    stream.dispose()
    assert [(s.asset, s.end_ms, s.is_anomaly) for s in stored] == [
        (s.asset, s.end_ms, s.is_anomaly) for s in result.scores]
    assert [s.level for s in stored] == pytest.approx([s.level for s in result.scores], rel=1e-5)
    assert any(s.drift_offset and any(s.drift_offset.values()) for s in result.scores)
    assert [(a.asset, datetime_to_ms(a.opened_at), datetime_to_ms(a.closed_at) if a.closed_at else None, a.severity,
             a.window_count) for a in alerts] == [
        (a.asset, a.opened_ms, a.closed_ms, a.severity, a.window_count) for a in result.alerts]
    assert len(result.alerts) >= 4


def test_a_backtest_without_a_model_or_with_another_groups_model_is_refused(deployed: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((deployed / "c.yaml").read_text())
    raw["groups"][0]["name"] = "fans"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    csv = str(deployed / "hist" / "readings.csv")
    none = runner.invoke(app, ["backtest", "-c", str(other), "--csv", csv])
    assert none.exit_code == 2 and "group 'fans' has no active model: give --version" in none.output
    version = json.loads(runner.invoke(app, ["models", "list", "-c", str(deployed / "c.yaml"), "--format",
                                             "json"]).stdout)[0]["version"]
    wrong = runner.invoke(app, ["backtest", "-c", str(other), "--csv", csv, "--version", version])
    assert wrong.exit_code == 2 and f"model {version} is of group 'pumps', not 'fans'" in wrong.output


def test_rows_of_other_groups_and_unconfigured_assets_are_left_out(deployed: Path, tmp_path: Path) -> None:
    """The pipeline judges an asset with its own group's model and rejects one it does not know: a history of
    several groups' assets is backtested on the group's assets only, with a note for what was left out."""
    frame = pd.read_csv(deployed / "hist" / "readings.csv")
    stranger = frame[frame["asset"] == "pump-1"].assign(asset="pump-9", vibration=lambda f: f["vibration"] * 5)
    mixed = tmp_path / "mixed.csv"
    pd.concat([frame, stranger]).to_csv(mixed, index=False)
    truth = json.loads((deployed / "hist" / "ground_truth.json").read_text())
    incidents = tmp_path / "incidents.json"
    incidents.write_text(json.dumps([*truth, {"asset": "pump-9", "start": "2026-01-02T01:00:00Z",
                                              "end": "2026-01-02T02:00:00Z"}]))
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(mixed), "--format", "json",
                                 "--incidents", str(incidents)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [a["asset"] for a in doc["assets"]] == ["pump-1", "pump-2"]
    assert {a["asset"] for a in doc["alerts"]} <= {"pump-1", "pump-2"}
    assert doc["incidents"]["recall"] == 1.0  # pump-9's incident is not one of this backtest's
    assert "4320 row(s) of assets not in the configuration left out: pump-9" in result.output
    alone = tmp_path / "alone.csv"
    stranger.to_csv(alone, index=False)
    refused = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(alone)])
    assert refused.exit_code == 2 and "no row of group 'pumps''s assets (pump-1, pump-2) in the data, only of pump-9" \
        in refused.output


def test_an_asset_without_a_complete_window_is_named(deployed: Path, tmp_path: Path) -> None:
    """An asset of the group whose rows make no window (here 10 readings for a window of 30) is not silently missing
    from the table."""
    frame = pd.read_csv(deployed / "hist" / "readings.csv")
    short = frame[frame["asset"] == "pump-2"].head(10)
    path = tmp_path / "short.csv"
    pd.concat([frame[frame["asset"] == "pump-1"], short]).to_csv(path, index=False)
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [a["asset"] for a in json.loads(result.stdout)["assets"]] == ["pump-1"]
    assert "1 asset(s) with rows but no complete window (too few readings, or gaps longer than window.max_gap): " \
        "pump-2" in " ".join(result.output.split())  # the console wraps the note


def test_reports_of_a_history_with_unreadable_times_leave_those_rows_out(deployed: Path, tmp_path: Path) -> None:
    """The backtest leaves a row whose ts cannot be read out with a warning; its HTML reports do the same instead of
    failing on it (``report.read_signals``)."""
    frame = pd.read_csv(deployed / "hist" / "readings.csv")
    frame.loc[3, "ts"] = "garbage"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(bad), "--report-dir",
                                 str(tmp_path / "reports")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["pump-1.html", "pump-2.html"]
    asset = frame.loc[3, "asset"]
    signals = read_signals(bad, asset, SENSORS, 0, 2**62)
    assert len(signals["speed"][0]) == (frame["asset"] == asset).sum() - 1


def test_the_reports_plot_the_history_read_once(deployed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """One HTML report per asset, their raw signals from the table the backtest read (a history of many assets is
    not read again for each)."""
    reads: list[object] = []
    read_csv = pd.read_csv

    def counted(*args: object, **kwargs: object) -> pd.DataFrame:
        reads.append(args[0])
        return read_csv(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(pd, "read_csv", counted)
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv",
                                 str(deployed / "hist" / "readings.csv"), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert len(reads) == 1
    page = (tmp_path / "r" / "pump-2.html").read_text(encoding="utf-8")
    assert "readings.csv" in page and "bearing_temp" in page


def test_the_backtest_names_its_data_as_backtest_data(deployed: Path, tmp_path: Path) -> None:
    """Warnings and errors about the history call it backtest data, not training data."""
    frame = pd.read_csv(deployed / "hist" / "readings.csv").astype({"flow": object})
    frame.loc[5, "flow"] = "broken"
    odd = tmp_path / "odd.csv"
    frame.to_csv(odd, index=False)
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(odd)])
    assert result.exit_code == 0, result.output
    assert "backtest data: 1 value(s) are not numbers" in result.output and "training data" not in result.output
    missing = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(tmp_path / "none.csv")])
    assert missing.exit_code == 2 and "cannot read backtest data" in missing.output


def test_the_last_windows_are_judged_as_the_pipeline_closes_them_when_the_assets_fall_silent(
        deployed: Path, tmp_path: Path) -> None:
    """With window.lateness the pipeline closes the windows ending in the last slots once the assets fall silent
    (idle_close_s) and scores them; the backtest judges them too."""
    raw = yaml.safe_load((deployed / "c.yaml").read_text())
    raw["groups"][0]["window"]["lateness"] = 2
    late = tmp_path / "late.yaml"
    late.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["backtest", "-c", str(late), "--csv", str(deployed / "hist" / "readings.csv"),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    assets = json.loads(result.stdout)["assets"]
    assert [(a["windows"], a["last"]) for a in assets] == [((12 * 360 - 30) // 5 + 1, "2026-01-02T12:00:00Z")] * 2


def test_group_rows_name_the_groups_of_the_assets_left_out() -> None:
    config = parse_config({"groups": [
        {"name": "pumps", "assets": ["p1", "p2"], "sensors": [{"name": "flow"}]},
        {"name": "fans", "assets": ["f1"], "sensors": [{"name": "flow"}]}]}, env={})
    frame = pd.DataFrame({"ts": range(6), "asset": ["p1", "f1", "x", "p2", "f1", None], "flow": 1.0})
    left = backtest.LeftOut()
    pieces = [backtest.group_rows(frame.iloc[:3], config, config.group("pumps"), left),
              backtest.group_rows(frame.iloc[3:], config, config.group("pumps"), left)]  # counted over the pieces
    assert [list(rows.index) for rows in pieces] == [[0], [3]]  # the index names the file's rows in warnings
    assert left.notes(config) == ["2 row(s) of other groups' assets left out: f1 (fans)",
                                  "1 row(s) of assets not in the configuration left out: x",
                                  "1 row(s) without an asset left out"]
    assert left.seen == {"p1", "p2"}
    bare = backtest.LeftOut()
    whole = backtest.group_rows(frame.drop(columns="asset"), config, config.group("fans"), bare)
    assert len(whole) == 6 and bare.notes(config) == [] and bare.seen == {"f1"}
    nothing = backtest.LeftOut()
    backtest.group_rows(frame[frame["asset"] == "x"], config, config.group("fans"), nothing)
    with pytest.raises(ConfigError, match=r"no row of group 'fans''s assets \(f1\) in the data, only of x"):
        nothing.check(config.group("fans"))


def test_incidents_outside_the_history_are_no_misses(deployed: Path, tmp_path: Path) -> None:
    """An incident file covering more than the backtested history (a year of incidents, a month of readings): the
    incidents of other times and other assets could not have been caught and are left out of the recall."""
    truth = json.loads((deployed / "hist" / "ground_truth.json").read_text())
    incidents = tmp_path / "incidents.json"
    incidents.write_text(json.dumps([*truth, {"asset": "pump-1", "start": "2025-12-01T00:00:00+01:00",
                                              "end": "2026-01-01T23:59:00Z"},
                                     {"asset": "pump-2", "start": "2026-01-02T12:00:00Z", "end": "2026-01-03"},
                                     {"asset": "fan-1", "start": "2026-01-02T05:00:00Z", "end": "2026-01-02T06:00"}]))
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv",
                                 str(deployed / "hist" / "readings.csv"), "--format", "json", "--incidents",
                                 str(incidents)])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)["incidents"]
    assert scored["recall"] == 1.0 and scored["missed"] == [] and scored["left_out"] == 3
    spans = backtest.read_incidents(incidents)
    fake = backtest.Backtest("pumps", "v", 1.0, [Score("pump-1", "pumps", 0, 100, 0.0, 1.0, {}, "v"),
                                                 Score("pump-1", "pumps", 50, 150, 0.0, 1.0, {}, "v")], [],
                             [backtest.AssetSummary("pump-1", 0, 150, 2, 0, {}, 0.0)])
    edge = [Span("pump-1", 149, 200), Span("pump-1", 150, 200), Span("pump-1", -10, 1), Span("pump-2", 0, 100)]
    assert backtest.covered_incidents(fake, [*spans, *edge]) == edge[:1] + edge[2:3]


def test_incident_times_may_be_epoch_ms_and_a_csv_any_separator(tmp_path: Path) -> None:
    """As everywhere else, a time is ISO-8601 or epoch ms; a CSV's separator is sniffed as for readings; a time of
    the wrong kind is named as such, not as missing."""
    spans = tmp_path / "incidents.csv"
    spans.write_text("asset;start;end\npump-1;1767315600000;2026-01-02T02:00:00Z\n")
    assert backtest.read_incidents(spans) == [Span("pump-1", 1767315600000, 1767319200000)]
    entries = tmp_path / "incidents.json"
    entries.write_text(json.dumps([{"asset": "pump-1", "start": 1767315600000, "end": 1767319200000}]))
    assert backtest.read_incidents(entries) == [Span("pump-1", 1767315600000, 1767319200000)]
    entries.write_text(json.dumps([{"asset": "pump-1", "start": [2026], "end": 1767319200000}]))
    with pytest.raises(ConfigError, match=r"incidents.json\[0\]: a time is ISO-8601 text or epoch ms, not \[2026\]"):
        backtest.read_incidents(entries)
    spans.write_text("asset,from,to\npump-1,2026-01-02,2026-01-03\n")
    with pytest.raises(ConfigError, match="has no column start, end \\(its columns: asset, from, to\\)"):
        backtest.read_incidents(spans)


def test_known_incidents_are_read_from_json_or_csv_and_bad_entries_are_named(tmp_path: Path) -> None:
    spans = tmp_path / "incidents.csv"
    spans.write_text("asset,start,end,label\npump-1,2026-01-02T01:00:00Z,2026-01-02T02:00:00Z,bearing\n"
                     "pump-2,2026-01-02 03:00,2026-01-02 03:30,\n")
    first, second = backtest.read_incidents(spans)
    assert (first.asset, first.label, first.end_ms - first.start_ms) == ("pump-1", "bearing", 3_600_000)
    assert (second.label, second.end_ms - second.start_ms) == ("", 1_800_000)  # no offset: UTC
    for entries, problem in (([{"asset": "p", "start": "2026-01-02"}], r"incidents i.json\[0\]: missing end"),
                             ([{"asset": "p", "start": "2026-01-02", "end": "yesterday"}], "unreadable time"),
                             ([{"asset": "p", "start": "2026-01-02", "end": "2026-01-01"}], "is not after start"),
                             ({"asset": "p"}, "expected a list")):
        bad = tmp_path / "i.json"
        bad.write_text(json.dumps(entries))
        with pytest.raises(ConfigError, match=problem):
            backtest.read_incidents(bad)


def test_a_history_is_backtested_piece_by_piece_and_one_out_of_time_order_whole(
        deployed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A history is read in pieces (``history.PIECE_ROWS`` rows) so that its length is not bounded by memory; the
    result, the scores written and the reports are those of reading it whole. A file whose rows of an asset go back
    in time from one piece to the next is read whole instead, with a note saying why."""
    import pipeline.history

    history = deployed / "hist" / "readings.csv"
    args = ["backtest", "-c", str(deployed / "c.yaml"), "--format", "json", "--incidents",
            str(deployed / "hist" / "ground_truth.json")]

    def backtested(path: Path, name: str) -> tuple[dict[str, object], pd.DataFrame, str]:
        result = runner.invoke(app, [*args, "--csv", str(path), "--scores-out", str(tmp_path / f"{name}.csv"),
                                     "--report-dir", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        page = re.sub(r"generated [0-9: -]+Z", "", (tmp_path / name / "pump-2.html").read_text(encoding="utf-8"))
        return json.loads(result.stdout), pd.read_csv(tmp_path / f"{name}.csv"), page

    whole, whole_scores, whole_page = backtested(history, "whole")
    monkeypatch.setattr(pipeline.history, "PIECE_ROWS", 500)  # 8,640 rows: 18 pieces
    pieces, piece_scores, piece_page = backtested(history, "pieces")
    assert pieces == whole and len(whole["alerts"]) > 0  # type: ignore[arg-type]
    pd.testing.assert_frame_equal(piece_scores.sort_values(["asset", "window_end"], ignore_index=True),
                                  whole_scores.sort_values(["asset", "window_end"], ignore_index=True))
    assert piece_page == whole_page
    frame = pd.read_csv(history)
    shuffled = tmp_path / "shuffled.csv"
    frame.sample(frac=1.0, random_state=1).to_csv(shuffled, index=False)
    result = runner.invoke(app, [*args, "--csv", str(shuffled)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == whole
    said = " ".join(result.output.split())  # the console wraps the note
    assert "is older than a row of pump-" in said and "the file is read whole instead" in said


def test_scores_out_is_replaced_only_by_a_finished_backtest(deployed: Path, tmp_path: Path) -> None:
    """--scores-out is written beside itself and replaces the file once the backtest is done: a failed backtest
    leaves the previous file as it was (and no partial one), and --scores-out naming the history itself backtests it
    before replacing it."""
    out = tmp_path / "scores.csv"
    out.write_text("previous\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("ts,asset," + ",".join(SENSORS) + "\n")
    failed = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(empty), "--scores-out",
                                 str(out)])
    assert failed.exit_code == 2 and out.read_text() == "previous\n" and sorted(tmp_path.iterdir()) == [empty, out]
    history = tmp_path / "history.csv"
    history.write_bytes((deployed / "hist" / "readings.csv").read_bytes())
    itself = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv", str(history), "--scores-out",
                                 str(history), "--format", "json"])
    assert itself.exit_code == 0, itself.output
    windows = sum(a["windows"] for a in json.loads(itself.stdout)["assets"])
    assert windows > 0 and len(pd.read_csv(history)) == windows


def test_scores_out_lists_the_windows_in_time_order(deployed: Path, tmp_path: Path) -> None:
    """--scores-out lists the judged windows in time order (the README's contract), not asset by asset within each
    forward pass of ``backtest.CHUNK`` windows (12 hours of two pumps: pump-1's windows, then pump-2's)."""
    out = tmp_path / "s.csv"
    result = runner.invoke(app, ["backtest", "-c", str(deployed / "c.yaml"), "--csv",
                                 str(deployed / "hist" / "readings.csv"), "--scores-out", str(out)])
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out)
    assert set(scores["asset"]) == {"pump-1", "pump-2"}
    assert pd.to_datetime(scores["window_end"]).is_monotonic_increasing
