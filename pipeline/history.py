"""Recorded readings (a table, or a CSV of them read whole or in pieces) cut into a group's windows exactly as the
streaming pipeline cuts them, for training, backtests and replays: what the pipeline would reject is left out and
counted, and a warning or an error names the data and the first offending row."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from models.training import NotEnoughData
from pipeline.config import GroupConfig
from pipeline.csv_format import separator, timestamps_ms
from pipeline.decode import MAX_ABS_VALUE
from pipeline.errors import ConfigError
from pipeline.thinning import Thinning, thin_to
from pipeline.types import Reading, Window, ms_to_datetime
from pipeline.windowing import Windower

log = logging.getLogger(__name__)
T = TypeVar("T")


def windows_from_frame(frame: pd.DataFrame, group: GroupConfig, asset_column: str = "asset",
                       what: str = "training data", *, to_the_end: bool = False) -> list[Window]:
    """Cut a group's windows from a table of readings, through the same windower as the streaming pipeline.
    Warnings name rows by the frame's index (for a CSV read by ``read_readings_csv``: the data row, from 0).

    ``frame`` has a ``ts`` column (or a DatetimeIndex), one column per configured sensor, and optionally an ``asset``
    column (rows without one are attributed to the group's first asset). Extra columns are ignored. ``what`` names the
    data in warnings and errors. A value the decoder would reject (outside its sensor's ``valid_range``, above its
    magnitude limit, or infinite) is left out, as the decoder leaves it out of a reading while keeping the reading's
    other values; a warning counts them. ``to_the_end``: the windows still open after the last readings are closed
    as the pipeline closes them once the assets fall silent (``window.idle_close_s``), so with ``window.lateness``
    or an incomplete last row the last windows are cut too. (``FrameWindower`` does the same for a table read in
    pieces.)
    """
    windower = FrameWindower(group, asset_column, what, to_the_end=to_the_end)
    windows = windower.add(frame)
    return windows + windower.close()


def windows_from_csv(path: Path, group: GroupConfig, *, max_windows: int | None = None,
                     what: str = "training data") -> tuple[list[Window], Thinning]:
    """The windows of the CSV of readings at ``path`` (``windows_from_frame``), read in pieces
    (``read_in_time_order``, ``FrameWindower``) so that the windows are held, not the rows. Beyond ``max_windows``
    (None: no bound) they are thinned as the nightly retrain thins its lookback (``thin_to``: whole blocks of each
    asset's windows, every k-th kept), with a log line; returns the windows and their thinning (for
    ``train_group``). ConfigError naming it as ``what`` when it cannot be read."""
    start = Thinning.for_smoothing(group.window.stride * group.period_ms, [group.threshold.ewma_alpha])

    def cut(pieces: Iterable[pd.DataFrame]) -> tuple[list[Window], Thinning, int]:
        """The windows kept, their thinning and how many were cut: each piece's windows thinned as they come."""
        windower, thin, windows, count = FrameWindower(group, what=what), start, [], 0

        def keep(new: list[Window]) -> None:
            nonlocal windows, thin, count
            count += len(new)
            windows, thin = thin_to(windows + [w for w in new if thin.keeps(w)], thin, max_windows)

        for piece in pieces:
            keep(windower.add(piece))
        keep(windower.close())
        return windows, thin, count

    windows, thin, count = read_in_time_order(
        path, what, cut, lambda exc: log.warning("%s; the file is read whole instead (held in memory)", exc))
    if thin.keep_every > 1:
        log.warning("%s: %d windows, over retrain.max_windows = %d: kept %s of each asset (%d left), as the "
                    "nightly retrain keeps them", what, count, max_windows, thin.kept(), len(windows))
    if max_windows is not None and len(windows) > max_windows:
        log.warning("%s: the %d windows kept are still over retrain.max_windows = %d: no coarser thinning keeps "
                    "fewer but some (whole blocks of %d windows of an asset), so training holds them all", what,
                    len(windows), max_windows, thin.block)
    return windows, thin


def read_in_time_order(path: Path, what: str, use: Callable[[Iterable[pd.DataFrame]], T],
                       whole: Callable[[OutOfOrder], None]) -> T:
    """``use`` of the CSV of readings at ``path`` read in pieces (``read_readings_pieces``), so that its length is
    not bounded by memory; when an asset's rows go back in time from one piece to the next (``use`` raised
    ``OutOfOrder``), ``whole`` is told why and ``use`` runs again on the file read whole (one piece)."""
    try:
        return use(read_readings_pieces(path, what))
    except OutOfOrder as exc:
        whole(exc)
        return use([read_readings_csv(path, what)])


SILENT_MS = 2**62  # a wall clock past every asset's idle_close_s (readings are placed at wall clock 0)
DUPLICATE_LIMIT = 0.05  # more (asset, ts) repeats than this share of the rows: the data is not one stream per asset


class OutOfOrder(ConfigError):
    """A table read in pieces goes back in time for an asset: one of its rows is older than a row of the same asset
    in an earlier piece (which the windower has placed, and maybe closed windows after)."""


@dataclass
class _Count:
    """How many of something were left out, and the first one (a row and its value, for a warning)."""

    n: int = 0
    first: str = ""

    def add(self, n: int, first: Callable[[], str]) -> None:
        if n and not self.n:
            self.first = first()
        self.n += n


class FrameWindower:
    """``windows_from_frame`` over a table that comes in pieces (``read_readings_pieces``): each piece's readings are
    windowed as they come, so between pieces only the windows still open are held, and a history of any length is
    cut in bounded memory. Within a piece rows may come in any order; across pieces each asset's rows must come in
    time order: a row older than a row of its asset in an earlier piece raises OutOfOrder naming both (sort the file
    by ts, or read it whole). What is left out is counted over all pieces, and ``close`` warns of each kind once;
    errors about the table's columns come with the first piece. The windows are those of ``windows_from_frame`` on
    the whole table."""

    def __init__(self, group: GroupConfig, asset_column: str = "asset", what: str = "training data", *,
                 to_the_end: bool = False) -> None:
        self.group, self.asset_column, self.what, self.to_the_end = group, asset_column, what, to_the_end
        self._windower = Windower([group])
        self._columns_checked = False
        self._has_asset_column = True
        self._assets: set[str] = set()
        self._newest: dict[str, int] = {}  # per asset: its newest ts so far
        self._rows = self._readable = self._repeats = self._skipped = 0
        self._first_ts: object = None  # the table's first ts value (for the error when none can be read)
        self._ts_numbers = True  # every piece's ts column numbers (pandas reads the whole file's as text otherwise)
        self._ts_largest: float | None = None  # the largest |ts| of those numbers
        self._ts_max_ms = -1  # the latest ts
        self._unreadable, self._not_numbers, self._rejected = _Count(), _Count(), _Count()

    def add(self, frame: pd.DataFrame) -> list[Window]:
        """The windows that this piece of the table closes, in time order per asset."""
        data = self._checked(frame)
        column = data["ts"]
        if not pd.api.types.is_numeric_dtype(column):
            self._ts_numbers = False
        elif column.notna().any():
            self._ts_largest = max(self._ts_largest or 0.0, float(column.abs().max()))
        if data.empty:
            return []
        if self._first_ts is None:
            self._first_ts = column.iloc[0]
        ts_ms = timestamps_ms(column)
        self._ts_max_ms = max(self._ts_max_ms, int(ts_ms.max()))
        self._rows += len(data)
        unreadable = ts_ms < 0
        if unreadable.any():
            first = int(np.flatnonzero(unreadable)[0])
            self._unreadable.add(int(unreadable.sum()), lambda: f"row {data.index[first]}, {column.iloc[first]}")
            data, ts_ms = data[~unreadable], ts_ms[~unreadable]
        if data.empty:
            return []
        self._readable += len(data)
        group = self.group
        assets = (data[self.asset_column].astype(str).to_numpy() if self._has_asset_column
                  else np.full(len(data), group.assets[0]))
        values = self._numeric(data)
        self._count_repeats(assets, ts_ms)
        self._in_order(assets, ts_ms, data.index)
        cells = _rejected_cells(values, group)
        if cells.any():
            first = int(np.flatnonzero(cells.any(axis=1))[0])
            example = ", ".join(f"{s}={v:g}" for s, v, bad in zip(group.sensor_names, values[first], cells[first],
                                                                  strict=True) if bad)
            self._rejected.add(int(cells.sum()), lambda: f"row {data.index[first]}, {example}")
            values = np.where(cells, np.nan, values)
        readings = [
            Reading(str(a), int(t), {s: float(v) for s, v in zip(group.sensor_names, row, strict=True)
                                     if np.isfinite(v)})
            for a, t, row in zip(assets, ts_ms, values, strict=True)
        ]
        readings = [r for r in readings if r.values]  # a row with nothing usable is no reading
        new = set(map(str, assets)) - self._assets
        self._assets |= new
        self._windower.admit(group, new)
        order = sorted(range(len(readings)), key=lambda i: (readings[i].asset, readings[i].ts_ms))
        batch = self._windower.add(readings[i] for i in order)
        self._skipped += len(batch.skipped)
        return batch.windows

    def close(self) -> list[Window]:
        """The windows still open that ``to_the_end`` closes (else none); then the warnings of the whole table.
        NotEnoughData for a table without rows, ConfigError for one without a readable ts or with many repeated
        (asset, ts) pairs."""
        what = self.what
        if not self._rows:
            raise NotEnoughData(f"{what} has no rows")
        if not self._readable:
            raise ConfigError(f"{what}: no readable ts (first value {self._first_ts}); ISO-8601 or epoch ms")
        self._refuse_repeats(self._repeats, self._readable)
        if self._ts_numbers and self._ts_largest is not None and self._ts_largest < 1e11:
            # 1e11 ms is 1973; in seconds it is the year 5138
            log.warning("%s: numeric ts are read as epoch milliseconds, so they end at %s; if they are "
                        "epoch seconds, multiply them by 1000", what, ms_to_datetime(self._ts_max_ms).isoformat())
        if self._unreadable.n:
            log.warning("%s: %d of %d rows left out: ts unreadable (first: %s)", what, self._unreadable.n,
                        self._rows, self._unreadable.first)
        if self._not_numbers.n:
            log.warning("%s: %d value(s) are not numbers and count as missing (first: %s)", what,
                        self._not_numbers.n, self._not_numbers.first)
        if self._repeats:
            log.warning("%s: %d row(s) repeat an asset's timestamp; the first of each is used", what, self._repeats)
        self._warn_of_assets()
        if self._rejected.n:
            log.warning("%s: %d value(s) left out: outside their sensor's valid_range, above the magnitude limit or "
                        "infinite, which the pipeline leaves out too (first: %s)", what, self._rejected.n,
                        self._rejected.first)
        windows: list[Window] = []
        if self.to_the_end:  # the windows running past the data's end are skipped there: no gap of the data's
            windows = self._windower.close_idle(now_ms=SILENT_MS).windows
        if self._skipped:
            log.warning("%s: %d window(s) left out for gaps longer than window.max_gap steps", what, self._skipped)
        return windows

    def _checked(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The piece with a ``ts`` column; at the first piece, ConfigError for missing sensor or ``ts`` columns and
        a note of the columns left out."""
        group, what = self.group, self.what
        extra = [str(c) for c in frame.columns if c not in (*group.sensor_names, "ts", self.asset_column)]
        data = frame.reset_index() if "ts" not in frame.columns else frame
        if self._columns_checked:
            return data
        if extra:
            log.info("%s: column(s) %s are not sensors of group %s and are left out", what,
                     ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""), group.name)
        missing = [s for s in group.sensor_names if s not in frame.columns]
        if missing:
            raise ConfigError(f"{what} lacks sensor column(s) {', '.join(missing)} of group {group.name!r}")
        if "ts" not in data.columns:
            other = ", ".join(map(str, extra[:8])) if extra else "none"
            raise ConfigError(f"{what} needs a 'ts' column (ISO-8601 or epoch ms): rename your time column to ts "
                              f"(columns that are not sensors: {other})")
        self._has_asset_column = self.asset_column in data.columns
        self._columns_checked = True
        return data

    def _numeric(self, data: pd.DataFrame) -> np.ndarray:
        """The sensor columns as floats; a cell that is not a number becomes missing (NaN), counted."""
        sensors = self.group.sensor_names
        frame = data[sensors].apply(pd.to_numeric, errors="coerce")
        unreadable = (frame.isna() & data[sensors].notna()).to_numpy()
        if unreadable.any():
            row, col = (int(i[0]) for i in np.nonzero(unreadable))
            self._not_numbers.add(int(unreadable.sum()),
                                  lambda: f"row {data.index[row]}, {sensors[col]}={data[sensors[col]].iloc[row]}")
        return frame.to_numpy(dtype=np.float64)

    def _count_repeats(self, assets: np.ndarray, ts_ms: np.ndarray) -> None:
        """Count the piece's rows that repeat an (asset, ts) pair of the piece or of the earlier pieces (there, only
        the asset's newest ts can repeat: older ones are OutOfOrder). ``close`` refuses many (by the whole table's
        share, so that it does not depend on where the pieces end)."""
        pairs = pd.DataFrame({"a": assets, "t": ts_ms})
        first = ~pairs.duplicated().to_numpy()
        newest = pairs["a"].map(self._newest).to_numpy(dtype=np.float64, na_value=np.nan)
        self._repeats += int((~first).sum() + (first & (ts_ms == newest)).sum())

    def _refuse_repeats(self, repeats: int, rows: int) -> None:
        if repeats > DUPLICATE_LIMIT * rows:
            hint = "" if self._has_asset_column else "; several assets' readings in one file? add an 'asset' column"
            raise ConfigError(f"{self.what}: {repeats} of {rows} rows repeat an asset's timestamp{hint}")

    def _in_order(self, assets: np.ndarray, ts_ms: np.ndarray, index: pd.Index) -> None:
        """OutOfOrder when a row of the piece is older than its asset's newest row in the earlier pieces; then
        remember each asset's newest."""
        by_asset = pd.Series(ts_ms).groupby(assets)
        if self._newest:
            for asset, oldest in by_asset.min().items():
                newest = self._newest.get(str(asset))
                if newest is not None and oldest < newest:
                    row = int(np.flatnonzero((assets == asset) & (ts_ms < newest))[0])
                    raise OutOfOrder(
                        f"{self.what}: row {index[row]} ({asset} at {ms_to_datetime(int(ts_ms[row])).isoformat()}) "
                        f"is older than a row of {asset} before it in the file "
                        f"({ms_to_datetime(newest).isoformat()}): read in pieces, each asset's rows must come in "
                        "time order")
        for asset, newest in by_asset.max().items():
            self._newest[str(asset)] = max(int(newest), self._newest.get(str(asset), int(newest)))

    def _warn_of_assets(self) -> None:
        """Warnings for assets that are not in the group or have no rows (what that means for the model when the
        table is the training data)."""
        group, what = self.group, self.what
        training = what == "training data"
        unknown = sorted(self._assets - set(group.assets))
        if unknown:
            log.warning("%s: asset(s) %s are not in group %s's assets%s", what,
                        ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""), group.name,
                        "; their readings train it too" if training else "")
        absent = [a for a in group.assets if a not in self._assets]
        if self._has_asset_column and absent:
            log.warning("%s: no rows of %s (of group %s's %d assets)%s", what,
                        ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else ""), group.name, len(group.assets),
                        ": the model learns the others' normal, and judges these by it" if training else "")


def _rejected_cells(values: np.ndarray, group: GroupConfig) -> np.ndarray:
    """Per value of ``values`` ``[N, sensors]``: whether the decoder would reject it (infinite, above
    ``MAX_ABS_VALUE``, or outside the sensor's ``valid_range``; a missing value, NaN, is no rejection)."""
    finite = np.isfinite(values)
    bad = ~np.isnan(values) & (~finite | (np.abs(np.where(finite, values, 0.0)) > MAX_ABS_VALUE))
    for i, sensor in enumerate(group.sensors):
        if sensor.valid_range is not None:
            low, high = sensor.valid_range
            bad[:, i] |= finite[:, i] & ((values[:, i] < low) | (values[:, i] > high))
    return bad


def read_readings_csv(path: Path, what: str = "training data") -> pd.DataFrame:
    """Read a CSV of readings (``ts`` column, one column per sensor, optional ``asset``, read as text: an asset id
    ``007`` stays ``007``); separator sniffed. ConfigError naming it as ``what`` when it cannot be read."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        return pd.read_csv(path, sep=separator(path), dtype={"asset": str})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


PIECE_ROWS = 100_000  # rows per piece of a history read in pieces (about 100 MB of readings and windows)


def read_readings_pieces(path: Path, what: str = "training data", rows: int | None = None
                         ) -> Iterator[pd.DataFrame]:
    """``read_readings_csv`` in pieces of ``rows`` rows (default ``PIECE_ROWS``), read as they are asked for (the
    index counts the data rows across pieces), for ``FrameWindower``. ConfigError naming it as ``what`` when it
    cannot be read, raised by the piece where that shows."""
    rows = rows or PIECE_ROWS
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        with pd.read_csv(path, sep=separator(path), dtype={"asset": str}, chunksize=rows) as reader:
            yield from reader
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
