"""The SKAB protocol on a tiny synthetic directory (split, causal scoring, metric arithmetic by hand) and the
``sensorwatch evaluate`` command on a subset of the real data."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from models.drift import causal_rolling_mean, fit_floored_scaler, persistent_flags, quantisation_step, sliding_windows
from models.sequence_detector import SequenceDetector, default_settings
from pipeline.cli import app
from pipeline.skab import (
    DUPLICATED_TAIL_ROWS,
    TRAIN_ROWS,
    CausalityError,
    Confusion,
    confusion,
    evaluate_files,
    load_skab,
    normal_segments,
)
from pipeline.skab_plot import render_evaluation_html, runs

ROOT = Path(__file__).resolve().parents[2]
SHARED_SKAB = ROOT.parent / "shared" / "datasets" / "skab"
ROWS, ANOMALY = 600, (450, 520)  # each synthetic file: 600 rows, anomaly on rows 450..519 (test rows are 400..599)


def _write(path: Path, rows: int, anomaly: tuple[int, int] | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 0.1, (rows, 3)) + np.array([1.0, 5.0, 20.0])
    frame = pd.DataFrame(values, columns=["a", "b", "c"])
    frame.insert(0, "datetime", pd.date_range("2020-01-01", periods=rows, freq="s").strftime("%Y-%m-%d %H:%M:%S"))
    if anomaly is not None:
        labels = np.zeros(rows)
        labels[anomaly[0] : anomaly[1]] = 1.0
        frame.loc[labels > 0, "b"] += 10.0
        frame["anomaly"] = labels
        frame["changepoint"] = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep=";", index=False)


@pytest.fixture
def skab_dir(tmp_path: Path) -> Path:
    for i, name in enumerate(["valve1/1.csv", "valve1/0.csv", "other/10.csv", "other/2.csv"]):
        _write(tmp_path / name, ROWS, ANOMALY, seed=i)
    _write(tmp_path / "anomaly-free" / "anomaly-free.csv", 2000, None, seed=9)
    return tmp_path


class FixedRows:
    """Flags rows 440..479 of any file: hand-countable against anomaly rows 450..519."""

    train_seconds = 0.0

    def fit(self, rows: np.ndarray) -> FixedRows:
        assert len(rows) == TRAIN_ROWS
        return self

    def flags(self, rows: np.ndarray) -> np.ndarray:
        out = np.zeros(len(rows), dtype=bool)
        out[440:480] = True
        return out[: len(rows)]


class PeeksAhead(FixedRows):
    """Cheats: flags a row when the NEXT row's sensor b is high."""

    def flags(self, rows: np.ndarray) -> np.ndarray:
        high = rows[:, 1] > 10
        return np.append(high[1:], False)


def test_loads_files_in_protocol_order_with_labels(skab_dir: Path) -> None:
    files = load_skab(skab_dir)
    assert [f.name for f in files] == ["valve1/0.csv", "valve1/1.csv", "other/2.csv", "other/10.csv"]
    assert files[0].sensors == ("a", "b", "c") and files[0].values.shape == (ROWS, 3)
    assert files[0].labels.sum() == ANOMALY[1] - ANOMALY[0] and files[0].labels[ANOMALY[0]]
    assert [f.name for f in load_skab(skab_dir, limit=2)] == ["valve1/0.csv", "valve1/1.csv"]


def test_confusion_arithmetic() -> None:
    flags = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    labels = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    c = confusion(flags, labels)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert c.f1 == pytest.approx(4 / 6) and c.far == pytest.approx(1 / 3) and c.mar == pytest.approx(1 / 3)
    total = c + Confusion(tp=1, fp=0, fn=0, tn=5)
    assert (total.tp, total.tn) == (3, 7) and total.far == pytest.approx(1 / 8)
    assert Confusion().f1 == 0.0 and Confusion().far == 0.0 and Confusion().mar == 0.0
    with pytest.raises(ValueError, match="shape"):
        confusion(flags, labels[:3])


def test_split_and_summed_metrics_match_hand_counts(skab_dir: Path) -> None:
    result = evaluate_files(load_skab(skab_dir), FixedRows, model="fixed", progress=False)
    # per file, test rows 400..599: flagged 440..479, anomalous 450..519
    per_file = Confusion(tp=30, fp=10, fn=40, tn=200 - 80)
    assert all(r.confusion == per_file for r in result.files)
    total = result.confusion
    assert (total.tp, total.fp, total.fn, total.tn) == (120, 40, 160, 480)
    report = result.to_dict()
    assert {"model", "f1", "far", "mar", "files"} <= set(report) and report["files"] == 4
    assert report["f1"] == pytest.approx(round(240 / (240 + 40 + 160), 4))
    assert report["far"] == pytest.approx(round(40 / 520, 4)) and report["mar"] == pytest.approx(round(160 / 280, 4))


def test_a_detector_that_looks_ahead_is_caught(skab_dir: Path) -> None:
    with pytest.raises(CausalityError, match="later rows"):
        evaluate_files(load_skab(skab_dir, limit=1), PeeksAhead, model="cheat", progress=False)


def test_sequence_detector_is_causal_and_finds_the_shift(skab_dir: Path) -> None:
    files = load_skab(skab_dir, limit=2)
    settings = default_settings("dense", epochs=5, smooth=5, window=8, score_steps=4)
    assert default_settings("dense", window=8).score_steps == 8  # dense's 10, within a shorter window: all of it
    with pytest.raises(ValueError, match=r"score_steps must be within 1\.\.window \(8\), got 10"):
        default_settings("dense", window=8, score_steps=10)
    result = evaluate_files(files, lambda: SequenceDetector(settings), model="dense", progress=False)
    assert result.confusion.mar < 0.3 and result.confusion.far < 0.1  # check_causal ran on both files too
    detector = SequenceDetector(settings).fit(files[0].values[:TRAIN_ROWS])
    ratios = detector.ratios(files[0].values)
    assert np.isnan(ratios[: settings.smooth + settings.window - 2]).all()
    assert np.nanmedian(ratios[460:520]) > 10 * np.nanmedian(ratios[TRAIN_ROWS:450])


def test_a_trend_following_baseline_follows_a_steady_ramp_but_not_a_step() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 0.1, (1400, 3)) + np.array([1.0, 5.0, 20.0])
    rows[TRAIN_ROWS:, 2] += 0.0015 * np.arange(1000)  # normal warming: 15 training stds over the test rows
    stepped = rows.copy()
    stepped[900:1000, 1] += 1.0  # a fault: a 10-std step on another sensor
    flagged = {}
    for span in (None, 150):
        settings = default_settings("dense", epochs=5, smooth=5, window=8, score_steps=4, trend_span=span)
        detector = SequenceDetector(settings).fit(rows[:TRAIN_ROWS])
        flagged[span] = int(detector.flags(rows)[TRAIN_ROWS:].sum())
        assert detector.flags(stepped)[910:1000].mean() > 0.9
    assert flagged[None] > 300 and flagged[150] < 50  # the level-only baseline lags the ramp; the trend follows it
    with pytest.raises(ValueError, match="trend_span needs a baseline_span"):
        default_settings("dense", baseline_span=None, trend_span=150)


def test_the_fast_release_ends_the_alarm_sooner_after_a_fault_but_holds_it_inside() -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 0.1, (1200, 3)) + np.array([1.0, 5.0, 20.0])
    rows[900:1000, 1] += 1.0  # a 10-std step on sensor b, rows 900..999
    settings = default_settings("dense", epochs=5, window=8, score_steps=4)
    plain = SequenceDetector(settings).fit(rows[:TRAIN_ROWS])
    released = SequenceDetector(replace(settings, release_smooth=4, release_ratio=0.5)).fit(rows[:TRAIN_ROWS])
    plain_ratios, plain_flags = plain.decide(rows)
    released_ratios, released_flags = released.decide(rows)
    np.testing.assert_array_equal(plain_ratios, released_ratios)  # an output filter: the detector's ratios are kept
    assert not (released_flags & ~plain_flags).any()  # it only takes flags away
    assert released.release_threshold > released.threshold  # the light view is noisier, so its threshold is higher
    assert released_flags[930:1000].mean() > 0.9 and plain_flags[930:1000].mean() > 0.9
    after_plain, after_released = int(plain_flags[1000:1060].sum()), int(released_flags[1000:1060].sum())
    assert after_plain >= 8 and after_released <= after_plain // 2  # the 30-row mean remembers the fault; 4 rows do not
    with pytest.raises(ValueError, match=r"release_smooth must be within 1\.\.smooth \(30\), got 40"):
        default_settings("dense", release_smooth=40)


def test_normal_segments_drop_the_duplicated_tail(skab_dir: Path) -> None:
    segments = normal_segments(skab_dir, length=500, sensors=["a", "c"])
    assert len(segments) == (2000 - DUPLICATED_TAIL_ROWS) // 500 and segments[0].shape == (500, 2)
    assert normal_segments(skab_dir / "nowhere", length=500, sensors=["a"]) == []


def test_drift_helpers() -> None:
    rows = np.array([[1.0, 0.0], [3.0, 0.0], [5.0, 1.0], [7.0, 1.0]])
    assert np.allclose(causal_rolling_mean(rows, 2)[:, 0], [1, 2, 4, 6])
    assert np.allclose(causal_rolling_mean(rows[:3], 2), causal_rolling_mean(rows, 2)[:3])
    assert sliding_windows(rows, 3).shape == (2, 3, 2) and np.array_equal(sliding_windows(rows, 3)[1], rows[1:])
    flow = np.tile([32.0, 33.0, 32.0, 32.0], 50)[:, None]
    assert quantisation_step(flow)[0] == 1.0
    scaler = fit_floored_scaler(np.full((10, 1), 32.0), raw_rows=flow[:10], level_floor=0.01, step_floor=0.5)
    assert scaler.std[0] == pytest.approx(0.5)  # the quantisation step wins over 1% of 32
    assert persistent_flags(np.array([1, 1, 0, 1, 1, 1], bool), 2).tolist() == [False, True, False, False, True, True]


def test_the_evaluation_page_shows_each_files_labels_flags_and_counts(skab_dir: Path) -> None:
    files = load_skab(skab_dir)
    result = evaluate_files(files, FixedRows, model="fixed", progress=False, keep_traces=True)
    page = render_evaluation_html(result, files)
    assert page.count('<svg class="plot"') == 4 and all(f'data-plot="file:{i}"' in page for i in range(4))
    assert page.count("rows 450-519: labelled anomaly") == 4 and page.count("rows 440-479: flagged") == 4
    assert page.count("(TP 30, FP 10, FN 40, TN 120)") == 4  # the hand counts of each file
    assert "TP 120, FP 40, FN 160, TN 480" in page and 'data-series="flagged"' in page  # no ratios: flags drawn
    assert runs(np.array([0, 1, 1, 0, 1], bool)) == [(1, 3), (4, 5)] and runs(np.zeros(3, bool)) == []
    with pytest.raises(ValueError, match="keep_traces"):
        render_evaluation_html(evaluate_files(files, FixedRows, model="fixed", progress=False), files)


runner = CliRunner()


def test_evaluate_command_on_synthetic_directory(skab_dir: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--dataset", "skab", "--data", str(skab_dir), "--model", "dense",
                                 "--output", "json", "--files", "2", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert {"model", "f1", "far", "mar", "files", "baselines"} <= set(report) and report["files"] == 2
    flag_all = next(b for b in report["baselines"] if b["model"] == "flag-everything")
    assert flag_all["far"] == 1.0 and flag_all["mar"] == 0.0
    assert report["settings"]["score_steps"] == 10  # dense's default: the last 10 of 20 rows
    whole = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--output", "json", "--files", "2", "--epochs",
                                "3", "--no-baselines", "--score-steps", "20"])
    assert whole.exit_code == 0, whole.output
    whole_report = json.loads(whole.stdout[whole.stdout.index("{"):])
    assert whole_report["settings"]["score_steps"] == 20
    counts = [{k: r["per_file"][0][k] for k in ("tp", "fp", "fn", "tn")} for r in (report, whole_report)]
    assert counts[0] != counts[1], counts  # another score, other flags


def test_evaluate_command_writes_the_plot_page(skab_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "out" / "skab.html"
    result = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--model", "dense", "--output", "json",
                                 "--files", "2", "--epochs", "3", "--no-baselines", "--plot", str(page)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    text = page.read_text()
    assert report["plot"] == str(page) and text.count('<svg class="plot"') == 2
    assert text.count('data-series="score / threshold"') == 2 and text.count('data-series="threshold"') == 2
    assert text.count("rows 450-519: labelled anomaly") == 2 and "valve1/0.csv: F1" in text


def test_the_pipeline_chain_is_causal_and_finds_the_shift(skab_dir: Path) -> None:
    from pipeline.skab_chain import PipelineChain

    files = load_skab(skab_dir, limit=2)
    result = evaluate_files(files, lambda: PipelineChain("dense", epochs=5), model="dense", progress=False)
    assert result.confusion.mar < 0.3  # check_causal ran on both files too
    chain = PipelineChain("dense", epochs=5).fit(files[0].values[:TRAIN_ROWS])
    ratios, flags = chain.decide(files[0].values)
    assert np.isnan(ratios[:19]).all() and np.isfinite(ratios[19:]).all()  # from the first window of 20 rows on
    # flags only from the anomaly's start to the end of its tail (a window of 20 rows of 30-row means still holds
    # anomalous rows up to 48 rows after it): the recipe's lag, which the false-alarm rate here is made of
    flagged = TRAIN_ROWS + np.flatnonzero(flags[TRAIN_ROWS:])
    assert flagged.min() >= ANOMALY[0] and flagged.max() < ANOMALY[1] + 30 + 20 - 2
    assert np.nanmedian(ratios[460:520]) > 10 * np.nanmedian(ratios[TRAIN_ROWS:450])
    described = chain.describe()
    assert described["drift"] == {"span_s": 150.0, "max_offset": None}
    assert described["model"]["hidden"] == [16, 2] and "lstm_hidden" not in described["model"]  # what was used
    assert described["model"]["score_steps"] == 10  # the detector's recipe for dense


def test_evaluate_command_runs_the_pipeline_chain(skab_dir: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--chain", "pipeline", "--model", "dense",
                                 "--output", "json", "--files", "2", "--epochs", "3", "--no-baselines", "--no-drift",
                                 "--score-steps", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["chain"] == "pipeline" and report["model"] == "dense" and report["files"] == 2
    assert report["settings"]["drift"] is None and report["settings"]["alert"]["aftermath"]["relative"] == 0.3
    assert report["settings"]["model"]["score_steps"] == 5
    refused = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--chain", "pipeline", "--calibrate"])
    assert refused.exit_code == 2 and "does not take calibration" in refused.output
    ignored = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--no-drift"])  # the detector chain's default
    assert ignored.exit_code == 2 and "pipeline chain only" in ignored.output


def test_evaluate_command_rejects_bad_arguments(skab_dir: Path) -> None:
    assert runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--dataset", "nab"]).exit_code == 2
    assert runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--model", "gru"]).exit_code == 2
    assert runner.invoke(app, ["evaluate", "--data", str(skab_dir / "missing"), "--output", "json"]).exit_code == 2
    assert runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--chain", "both"]).exit_code == 2
    too_long = runner.invoke(app, ["evaluate", "--data", str(skab_dir), "--chain", "pipeline", "--score-steps", "21"])
    assert too_long.exit_code == 2 and "--score-steps" in too_long.output


@pytest.mark.skipif(not SHARED_SKAB.is_dir(), reason=f"SKAB data not found at {SHARED_SKAB}")
def test_evaluate_command_on_real_skab_subset() -> None:
    result = runner.invoke(app, ["evaluate", "--dataset", "skab", "--data", str(SHARED_SKAB), "--model", "dense",
                                 "--output", "json", "--files", "2", "--epochs", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert {"model", "f1", "far", "mar", "files"} <= set(report)
    assert report["model"] == "dense" and report["files"] == 2 and 0 <= report["f1"] <= 1
    assert report["baselines"][0]["model"] == "flag-everything"


def test_library_baseline_is_skipped_with_a_note_without_river(skab_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    import models.baselines
    from pipeline.skab import evaluate_skab

    monkeypatch.setattr(models.baselines, "river_available", lambda: "river is not installed (test)")
    report = evaluate_skab(skab_dir, "dense", limit=1, progress=False, overrides={"epochs": 2})
    assert [b["model"] for b in report["baselines"]] == ["flag-everything"]
    assert any("skipped" in note and "river" in note for note in report["notes"])


def test_evaluate_names_a_missing_directory_and_a_file_with_bad_values(skab_dir: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["evaluate", "--dataset", "skab", "--data", str(tmp_path / "nope"), "--model",
                                  "dense"])
    assert missing.exit_code == 2 and "nope: no such directory" in " ".join(missing.output.split())
    path = skab_dir / "other" / "10.csv"
    frame = pd.read_csv(path, sep=";")
    frame.loc[100, "b"] = np.nan
    frame.to_csv(path, sep=";", index=False)
    bad = runner.invoke(app, ["evaluate", "--dataset", "skab", "--data", str(skab_dir), "--model", "dense"])
    assert bad.exit_code == 2
    assert "other/10.csv: 1 value(s) are missing or not finite numbers (first: row 102 of the file, column 'b')" in (
        " ".join(bad.output.split()))


def test_calibration_on_segments_no_longer_than_the_training_rows_says_so() -> None:
    """Every normal segment within the training rows leaves nothing to measure: a clear error, not an IndexError."""
    from models.sequence_detector import calibrate_multiplier

    segments = [np.random.default_rng(0).normal(size=(300, 3)), np.random.default_rng(1).normal(size=(400, 3))]
    with pytest.raises(ValueError, match=r"longer than the 400 training rows \(the longest has 400\)"):
        calibrate_multiplier(default_settings("dense"), segments, train_rows=400, false_alarm_rate=0.01)
