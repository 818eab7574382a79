"""What an operator meets when training from YAML and a CSV: bad settings refused with their key, a training run
that diverges named as such, constant sensors, thin tails, and training data that is not what it seems (unreadable
cells and timestamps, several assets in one stream, assets outside the group), each said rather than trained on
silently."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from models.autoencoders import build_model
from models.training import NotEnoughData, TrainingDiverged, fit
from pipeline.config import GroupConfig, parse_config
from pipeline.errors import ConfigError
from pipeline.history import FrameWindower, OutOfOrder, windows_from_frame
from pipeline.train import train_group


def _group(**overrides: Any) -> GroupConfig:
    group = {"name": "g", "assets": ["a"], "sampling_period_s": 1, "sensors": [{"name": "x"}, {"name": "y"}],
             "window": {"length": 8, "stride": 4, "max_gap": 0},
             "model": {"type": "dense", "hidden": [8, 2], "epochs": 2, "batch_size": 64}}
    for key, value in overrides.items():
        group[key] = {**group.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config({"groups": [group]}, env={}).groups[0]


def _frame(rows: int = 800, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"ts": 1_772_326_800_000 + np.arange(rows) * 1000, "x": rng.normal(10, 1, rows),
                         "y": rng.normal(5, 0.5, rows)})


@pytest.mark.parametrize(("override", "key"), [
    ({"threshold": {"multiplier": float("inf")}}, r"threshold\.multiplier"),
    ({"threshold": {"method": "mean_std", "k": float("inf")}}, r"threshold\.k"),
    ({"model": {"learning_rate": float("nan")}}, r"model\.learning_rate"),
    ({"model": {"hidden": []}}, r"model\.hidden"),
])
def test_settings_that_would_train_a_useless_model_are_refused_with_their_key(override: dict[str, Any],
                                                                               key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _group(**override)


def test_a_diverging_training_run_says_so_and_what_to_change() -> None:
    windows = np.random.default_rng(0).normal(size=(200, 8, 2)).astype(np.float32)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 1 .*model\.learning_rate"):
        fit(build_model("dense", 8, 2, {"hidden": [8, 2]}), windows, epochs=3, batch_size=32, learning_rate=1e30,
            progress=False)


def test_constant_sensors_are_named_and_an_all_constant_stream_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    group = _group()
    with pytest.raises(NotEnoughData, match="training data has no rows"):
        windows_from_frame(_frame().iloc[:0], group)
    frame = _frame()
    frame["y"] = 5.0 + 1e-9 * (np.arange(len(frame)) % 2)  # jitter far below any scale: the scaler treats it as still
    with caplog.at_level("WARNING", logger="pipeline.train"):
        train_group(windows_from_frame(frame, group), group, progress=False)
    assert "sensor(s) y never moved in the training data" in caplog.text
    frame["x"] = 1.0
    with pytest.raises(NotEnoughData, match="every sensor was constant"):
        train_group(windows_from_frame(frame, group), group, progress=False)


def test_a_threshold_that_is_not_a_positive_number_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.train

    monkeypatch.setattr(pipeline.train, "fit_threshold", lambda scores, method, **kw: (float("inf"), {}))
    group = _group()
    with pytest.raises(ValueError, match="the percentile threshold came out inf"):
        train_group(windows_from_frame(_frame(), group), group, progress=False)


def test_a_pot_threshold_on_a_thin_tail_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    for tail_quantile, note in ((0.95, "pot threshold: fewer than 5 peaks for a GPD fit: empirical quantile"),
                                (0.6, "pot threshold fitted to only")):
        group = _group(threshold={"method": "pot", "tail_quantile": tail_quantile, "target_rate": 0.001})
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.train"):
            trained = train_group(windows_from_frame(_frame(), group), group, progress=False)
        peaks = trained.detector.metadata["threshold_info"]["peaks"]
        assert peaks < 20 and note in caplog.text and "lower threshold.tail_quantile" in caplog.text
        fallback = trained.metrics.get("threshold_fallback")  # recorded with the version, not only logged
        assert fallback == ("fewer than 5 peaks for a GPD fit: empirical quantile" if tail_quantile == 0.95 else None)


def test_unreadable_cells_and_timestamps_are_counted_and_named(caplog: pytest.LogCaptureFixture) -> None:
    group = _group()
    frame = _frame().astype({"x": object, "ts": object})
    frame.loc[7, "x"] = "abc"
    frame.loc[9, "ts"] = "not a date"
    frame["ts"] = frame["ts"].map(lambda t: t if isinstance(t, str) else pd.Timestamp(t, unit="ms", tz="UTC")
                                  .isoformat())
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows = windows_from_frame(frame, group)
    assert "1 of 800 rows left out: ts unreadable (first: row 9, not a date)" in caplog.text
    assert "1 value(s) are not numbers and count as missing (first: row 7, x=abc)" in caplog.text
    assert windows  # the rest trains


def test_several_assets_in_one_stream_are_refused_and_unknown_assets_named(caplog: pytest.LogCaptureFixture
                                                                           ) -> None:
    group = _group()
    one, two = _frame(seed=1), _frame(seed=2)
    mixed = pd.concat([one, two]).sort_values("ts", kind="stable")  # two pumps, no asset column
    with pytest.raises(ConfigError, match="800 of 1600 rows repeat an asset's timestamp; several assets"):
        windows_from_frame(mixed, group)
    tagged = pd.concat([one.assign(asset="a"), two.assign(asset="pump-9")])
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows = windows_from_frame(tagged, group)
    assert "asset(s) pump-9 are not in group g's assets" in caplog.text
    assert {w.asset for w in windows} == {"a", "pump-9"}
    three = _group(assets=["a", "b", "c"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows_from_frame(tagged, three)
    assert "no rows of b, c (of group g's 3 assets): the model learns the others' normal" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.history"):
        windows_from_frame(one.assign(ambient=1.0), three)  # no asset column: the group's first asset, no warning
    assert "no rows of" not in caplog.text and "column(s) ambient are not sensors of group g" in caplog.text


def test_small_numeric_timestamps_are_read_as_milliseconds_with_a_hint(caplog: pytest.LogCaptureFixture) -> None:
    group = _group()
    frame = _frame()
    frame["ts"] = 1_772_326_800 + np.arange(len(frame))  # epoch seconds
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows_from_frame(frame, group)
    assert "read as epoch milliseconds, so they end at 1970-01-21" in caplog.text
    assert "multiply them by 1000" in caplog.text


def test_shapes_that_cannot_learn_and_keys_of_other_types_are_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="pipeline.config"):
        _group(model={"type": "conv", "kernel_size": 11, "conv_channels": [4, 2]})
        _group(model={"hidden": [64, 16]})
        _group(model={"type": "lstm", "hidden": [8, 4], "beta": 2.0})
    assert "model.kernel_size 11 is wider than window.length 8" in caplog.text
    assert "no layer of model.hidden [64, 16] is narrower than a window's 16 values" in caplog.text
    assert "model: beta, hidden not used by type lstm (it uses lstm_hidden, lstm_layers, code_size)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.config"):
        _group(model={"type": "vae", "hidden": [8, 2], "beta": 0.5})
        _group(model={"type": "dense", "hidden": [8, 32]})  # the 8-wide layer is the bottleneck
        _group(model={"type": "sparse", "hidden": [64, 32]})  # wide on purpose: the penalty restricts it
    assert caplog.text == ""


def test_penalty_options_without_a_weight_are_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """Options that would train the same network as leaving them out (their weight is 0) are named; the ones that
    act are not."""
    with caplog.at_level("WARNING", logger="pipeline.config"):
        _group(model={"type": "lstm", "sparsity": "kl", "sparsity_target": 0.2})
        _group(model={"type": "sparse", "sparsity_target": 0.3})  # the default l1 penalty ignores the target
        _group(model={"type": "sparse", "sparsity_weight": 0})
        _group(model={"type": "contractive", "contractive_weight": 0})
    assert "group g: model: sparsity, sparsity_target has no effect without sparsity_weight > 0 (type lstm)" \
        in caplog.text
    assert "sparsity_target is used by sparsity: kl only (sparsity is l1)" in caplog.text
    assert "type sparse with sparsity_weight 0 trains a plain dense autoencoder" in caplog.text
    assert "type contractive with contractive_weight 0 trains a plain dense autoencoder" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.config"):
        _group(model={"type": "lstm", "sparsity": "kl", "sparsity_target": 0.2, "sparsity_weight": 0.01})
        _group(model={"type": "sparse", "sparsity": "kl", "sparsity_target": 0.1})  # the type's default weight
        _group(model={"type": "conv", "contractive_weight": 0.01})
    assert not any(part in caplog.text for part in ("no effect", "kl only", "plain dense"))


def test_a_time_column_not_named_ts_is_named_with_what_to_do() -> None:
    """SKAB-like exports call their time column `datetime`: the refusal names the columns it saw and says to rename
    one to ts (it spoke of a pandas DatetimeIndex, which a CSV user cannot give)."""
    frame = _frame().rename(columns={"ts": "datetime"})
    with pytest.raises(ConfigError, match="rename your time column to ts") as refused:
        windows_from_frame(frame, _group())
    assert "datetime" in str(refused.value) and "DatetimeIndex" not in str(refused.value)


def _two_assets(rows: int = 400) -> pd.DataFrame:
    """Two assets' readings interleaved in time order, with a gap of 20 s in b's (a window skipped)."""
    rng = np.random.default_rng(3)
    ts = 1_772_326_800_000 + np.repeat(np.arange(rows), 2) * 1000
    frame = pd.DataFrame({"ts": ts, "asset": np.tile(["a", "b"], rows), "x": rng.normal(10, 1, 2 * rows),
                          "y": rng.normal(5, 0.5, 2 * rows)})
    return frame.drop(index=[2 * i + 1 for i in range(100, 120)])


def test_a_table_read_in_pieces_gives_the_windows_of_the_whole_and_warns_once(caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    """``FrameWindower`` over pieces of any size (down to one row) cuts the windows ``windows_from_frame`` cuts from
    the whole table, the last ones closed as the assets fall silent; its warnings count over all pieces, once."""
    group = _group(assets=["a", "b"], window={"lateness": 1})
    frame = _two_assets().astype({"x": object})
    frame.loc[7, "x"] = "abc"
    frame.loc[600, "x"] = "def"
    with caplog.at_level("WARNING", logger="pipeline.history"):
        whole = windows_from_frame(frame, group, to_the_end=True)
    assert caplog.text.count("2 value(s) are not numbers and count as missing (first: row 7, x=abc)") == 1
    for rows in (1, 7, 250):
        caplog.clear()
        windower = FrameWindower(group, to_the_end=True)
        with caplog.at_level("WARNING", logger="pipeline.history"):
            pieces = [windower.add(frame.iloc[i:i + rows]) for i in range(0, len(frame), rows)]
            assert "not numbers" not in caplog.text  # warned of at the end, once, for the whole table
            windows = [w for piece in pieces for w in piece] + windower.close()
        assert sorted((w.asset, w.start_ms, w.values.tolist()) for w in windows) == sorted(
            (w.asset, w.start_ms, w.values.tolist()) for w in whole)  # the order among assets is no contract
        assert caplog.text.count("2 value(s) are not numbers and count as missing (first: row 7, x=abc)") == 1
        assert caplog.text.count("6 window(s) left out for gaps longer than window.max_gap") == 1
    assert {w.asset for w in whole} == {"a", "b"} and len(whole) > 150


def test_a_table_read_in_pieces_that_goes_back_in_time_is_refused_naming_the_row() -> None:
    """Across pieces each asset's rows must come in time order (the windower has placed the earlier ones); another
    asset's older rows are fine, and so is disorder within a piece."""
    group = _group(assets=["a", "b"])
    frame = _two_assets()
    windower = FrameWindower(group)
    windower.add(frame.iloc[100:300].iloc[::-1])  # within a piece any order
    windower.add(frame.iloc[300:400])
    with pytest.raises(OutOfOrder, match=r"row 41 \(b at 2026-03-01T01:00:20\+00:00\) is older than a row of b "
                                         r"before it in the file \(2026-03-01T01:03:29\+00:00\)"):
        windower.add(frame.iloc[41:42])
    only_a = FrameWindower(group)
    only_a.add(frame[frame["asset"] == "a"])
    assert only_a.add(frame[frame["asset"] == "b"]) != []  # asset after asset: each in time order


def test_a_table_without_rows_or_without_a_readable_ts_is_refused_when_it_ends() -> None:
    windower = FrameWindower(_group())
    assert windower.add(_frame().iloc[:0]) == []
    with pytest.raises(NotEnoughData, match="training data has no rows"):
        windower.close()
    unreadable = FrameWindower(_group(), what="backtest data")
    frame = _frame(10).astype({"ts": object})
    frame["ts"] = "soon"
    unreadable.add(frame.iloc[:5])
    unreadable.add(frame.iloc[5:])
    with pytest.raises(ConfigError, match=r"backtest data: no readable ts \(first value soon\)"):
        unreadable.close()


def _in_pieces(frame: pd.DataFrame, group: GroupConfig, rows: int, **kwargs: Any) -> list[Any]:
    windower = FrameWindower(group, **kwargs)
    windows = [w for i in range(0, len(frame), rows) for w in windower.add(frame.iloc[i:i + rows])]
    return windows + windower.close()


def test_repeats_in_a_table_read_in_pieces_are_counted_and_refused_over_the_whole_table(
        caplog: pytest.LogCaptureFixture) -> None:
    """A repeated (asset, ts) pair counts whether its rows fall in one piece or in two; the share of repeats that
    refuses a table is the whole table's, so a small piece (the file's last) with one repeat is no stream of several
    assets."""
    group = _group()
    frame = _frame(100)
    frame = pd.concat([frame.iloc[:50], frame.iloc[[49]], frame.iloc[50:], frame.iloc[[99]]], ignore_index=True)
    with caplog.at_level("WARNING", logger="pipeline.history"):
        whole = windows_from_frame(frame, group)
    assert caplog.text.count("2 row(s) repeat an asset's timestamp; the first of each is used") == 1
    for rows in (1, 7, 50, 51):  # 50: the first repeat straddles a boundary, the last piece is 1 row and its repeat
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.history"):
            windows = _in_pieces(frame, group, rows)
        assert [(w.start_ms, w.values.tolist()) for w in windows] == [(w.start_ms, w.values.tolist()) for w in whole]
        assert caplog.text.count("2 row(s) repeat an asset's timestamp; the first of each is used") == 1, rows


def test_a_ts_column_of_numbers_in_one_piece_and_text_in_another_is_read_as_whole(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """pandas types each piece's ts column on its own (numbers in one, text in another) and the whole file's as text
    when any of it is: a number is epoch ms either way, and the hint for numbers that look like seconds is given
    when the whole column is numbers and all of them are small, as for the file read whole."""
    from pipeline.history import read_readings_csv, read_readings_pieces

    group = _group()
    frame = _frame(100).astype({"ts": object})
    frame.loc[60:, "ts"] = [pd.Timestamp(t, unit="ms", tz="UTC").isoformat() for t in frame.loc[60:, "ts"]]
    path = tmp_path / "mixed.csv"
    frame.to_csv(path, index=False)
    small = _frame(100)
    small.loc[:49, "ts"] = np.arange(50) * 1000  # 1970, then 2026: the numbers are not all small
    small_path = tmp_path / "small.csv"
    small.to_csv(small_path, index=False)
    for csv in (path, small_path):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.history"):
            whole = windows_from_frame(read_readings_csv(csv), group)
        said = caplog.text
        for rows in (1, 30, 60):
            caplog.clear()
            windower = FrameWindower(group)
            with caplog.at_level("WARNING", logger="pipeline.history"):
                windows = [w for piece in read_readings_pieces(csv, rows=rows) for w in windower.add(piece)]
                windows += windower.close()
            assert [(w.start_ms, w.values.tolist()) for w in windows] == [
                (w.start_ms, w.values.tolist()) for w in whole], (csv.name, rows)
            assert caplog.text == said, (csv.name, rows)
    assert len(whole) > 10 and "read as epoch milliseconds" not in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows_from_frame(read_readings_csv(path), group)
    assert "ts unreadable" not in caplog.text  # the numbers in a column that also holds text are epoch ms


def test_a_csv_whose_blocks_alone_are_over_max_windows_trains_on_a_block_not_on_none(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """1,999 windows of one asset in blocks of 1,500 (ewma_alpha 0.02) over max_windows = 1,000: every 8th block
    keeps none, so the windows of the last thinning that kept some are trained on (over the bound), the same as
    thinning the file read whole keeps, and the warning counts them."""
    import pipeline.history
    from pipeline.history import read_readings_csv, windows_from_csv
    from pipeline.thinning import Thinning, thin_to

    group = _group(threshold={"ewma_alpha": 0.02})
    path = tmp_path / "long.csv"
    _frame(8000).to_csv(path, index=False)
    monkeypatch.setattr(pipeline.history, "PIECE_ROWS", 1000)
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows, thinning = windows_from_csv(path, group, max_windows=1000)
    whole, kept = thin_to(windows_from_frame(read_readings_csv(path), group), Thinning.for_smoothing(4000, [0.02]),
                          1000)
    assert windows and [w.start_ms for w in windows] == [w.start_ms for w in whole] and thinning == kept
    assert f"training data: 1999 windows, over retrain.max_windows = 1000: kept {thinning.kept()} of each asset " \
        f"({len(windows)} left)" in caplog.text
    assert f"the {len(windows)} windows kept are still over retrain.max_windows = 1000: no coarser thinning keeps " \
        "fewer but some (whole blocks of 1500 windows of an asset)" in caplog.text


def test_the_windows_running_past_a_historys_end_are_no_gap(caplog: pytest.LogCaptureFixture) -> None:
    # to_the_end closes the windows still open after the last readings; those that run past the data's end are
    # skipped there, and are no gap of the data's: only a real gap is warned of (every backtest warned of some)
    group = _group()
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows_from_frame(_frame(), group, what="backtest data", to_the_end=True)
    assert "left out for gaps" not in caplog.text
    gappy = _frame().drop(index=range(400, 410))
    with caplog.at_level("WARNING", logger="pipeline.history"):
        windows_from_frame(gappy, group, what="backtest data", to_the_end=True)
    assert "backtest data: 4 window(s) left out for gaps longer than window.max_gap steps" in caplog.text
