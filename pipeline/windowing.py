"""Per-asset alignment on the sampling grid and sliding windows. Pure: no I/O; clocks are passed in.

A reading at ``ts_ms`` lands in grid slot ``round(ts_ms / period_ms)``; readings of different sensors in the same slot
merge, and a second value for a sensor already present in that slot is a duplicate (the reading's other sensors
are still placed). Window ``k`` covers slots
``[k*stride, k*stride + length)``. It closes once the asset has reported a slot ``lateness`` steps past the window's
last slot (or, when the asset falls silent, ``idle_close_s`` of wall-clock time after its last reading). Then a missing
value is filled with the sensor's previous value if the gap is at most that sensor's ``max_gap``, and a window with
holes left is skipped, never scored on invented data. A reading for a slot no open window can use any more is late.

A reading more than a window (plus the lateness) ahead of its asset's latest slot (after a restart: the slot before
its first window not closed) is held, not placed: placing it would close every window up to it, and the asset's real
readings after it would all be late. The asset's next instant decides: a reading at another slot near the held one
confirms that the asset's time moved on (back after an outage) and they are placed; one ahead of the asset's latest
slot but not near the held one means the held readings carried a glitching clock, and they are reported
(``jumped``). Readings at the held slot (the instant's other sensors, a retry) join it; past ``HELD_MAX`` per asset,
one that brings no new sensor (a clock stuck ahead, repeating it) is a duplicate. Stragglers at or before the latest
slot are placed as usual. Neither decides. Held readings of an asset that falls silent are reported as jumped when
its windows close for idleness: nothing followed them.

Restarts: ``resume`` seeds an asset with the first window start not yet closed, and ``set_replay_boundary`` tells which
offsets the previous owner already processed. A replayed reading for an already-closed slot is then recognised as
replay (dropped silently) instead of being reported late again, and a held reading that a replayed reading decides as
a jump (the previous owner decided it too, and reported it) is replay as well. ``safe_offsets`` tells how far offsets
may be committed so that a restarted consumer can rebuild every open window from the replayed records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import GroupConfig
from pipeline.types import Reading, SkippedWindow, Window


def forward_fill(values: np.ndarray, limit: int | np.ndarray) -> np.ndarray:
    """Fill NaNs in each column of ``values`` [T, F] with the last valid value at most ``limit`` rows back.

    ``limit`` is one number or one per column.
    """
    if not np.isnan(values).any() or np.all(np.asarray(limit) <= 0):
        return values
    rows = np.arange(values.shape[0])[:, None]
    valid_at = np.where(~np.isnan(values), rows, -1)
    last_valid = np.maximum.accumulate(valid_at, axis=0)
    fillable = (last_valid >= 0) & (rows - last_valid <= np.asarray(limit))
    cols = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    filled = values[np.maximum(last_valid, 0), cols]
    return np.where(np.isnan(values) & fillable, filled, values)


def causal_mean(values: np.ndarray, span: int) -> np.ndarray:
    """Per column of ``values`` [T, F]: the mean of the non-NaN values among the ``span`` rows ending at each row.
    A row that is NaN stays NaN (a missing value is never invented by smoothing)."""
    present = ~np.isnan(values)
    # centre each column on its first value so that running sums of large levels keep their precision
    first = values[np.argmax(present, axis=0), np.arange(values.shape[1])]
    reference = np.where(present.any(axis=0), first, 0.0)
    sums = np.cumsum(np.where(present, values - reference, 0.0), axis=0)
    counts = np.cumsum(present, axis=0)
    sums[span:] = sums[span:] - sums[:-span]
    counts[span:] = counts[span:] - counts[:-span]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, reference + sums / np.maximum(counts, 1), np.nan)


_NEVER = -(2**62)  # max_slot before an asset's first reading
HELD_MAX = 64  # readings held per asset, past which repeats of held sensors (a clock stuck ahead) are duplicates


@dataclass
class _AssetState:
    group: GroupConfig
    next_start: int
    partition: int
    max_slot: int = _NEVER
    last_arrival_ms: int = 0
    rows: dict[int, list[float]] = field(default_factory=dict)
    offsets: dict[tuple[int, int], int] = field(default_factory=dict)  # (slot, partition) -> smallest offset
    min_offsets: dict[int, int] | None = None  # partition -> smallest of ``offsets``, kept while nothing is dropped
    held: list[Reading] = field(default_factory=list)  # readings far ahead of max_slot, until the next one tells
    fresh: bool = False  # no window of it closed yet (and not resumed): nothing it sends can be late


@dataclass
class WindowBatch:
    """What one call produced: closed windows (scored next), skipped windows, late and duplicate readings."""

    windows: list[Window] = field(default_factory=list)
    skipped: list[SkippedWindow] = field(default_factory=list)
    late: list[Reading] = field(default_factory=list)
    jumped: list[Reading] = field(default_factory=list)  # far ahead of their asset, and its next reading was not
    duplicates: list[Reading] = field(default_factory=list)  # every value of the reading was there already
    # readings placed in part: the sensors whose value was there already (the others were placed)
    partial_duplicates: list[tuple[Reading, tuple[str, ...]]] = field(default_factory=list)
    placed: int = 0  # readings placed on a grid for the first time (not replayed, rebuilt, late, held or duplicate)
    replayed: int = 0  # readings a previous owner processed, for windows it closed (dropped)
    rebuilt: int = 0  # readings a previous owner processed, placed again to rebuild the windows it left open


def _complete(row: list[float] | None) -> bool:
    """A grid row holding a value of every sensor (NaN marks a missing one)."""
    return row is not None and all(v == v for v in row)


def _repeats(held: list[Reading], reading: Reading) -> bool:
    """Every value of ``reading`` is one of a sensor already held (a reading bringing a new sensor is never one)."""
    known = {sensor for r in held for sensor in r.values}
    return all(sensor in known for sensor in reading.values)


class Windower:
    """Holds the open windows of every asset and emits the ones that close."""

    def __init__(self, groups: Iterable[GroupConfig]) -> None:
        self._group_of: dict[str, GroupConfig] = {a: g for g in groups for a in g.assets}
        self._sensor_index: dict[str, Mapping[str, int]] = {
            g.name: {s: i for i, s in enumerate(g.sensor_names)} for g in self._group_of.values()
        }
        self._gaps: dict[str, np.ndarray] = {g.name: np.array(g.max_gaps()) for g in self._group_of.values()}
        # slots kept before a window's start: for gap filling, plus the rolling mean's earlier slots
        self._lookback: dict[str, int] = {g.name: int(self._gaps[g.name].max()) + g.window.smooth - 1
                                          for g in self._group_of.values()}
        self._assets: dict[str, _AssetState] = {}
        self._unsaved: set[str] = set()  # assets whose next window start moved since ``mark_saved``
        self._holding: set[str] = set()  # assets with held readings
        self._resume: dict[str, int] = {}
        self._replay_upto: dict[int, int] = {}

    def admit(self, group: GroupConfig, assets: Iterable[str]) -> None:
        """Window ``assets`` too, by ``group``'s settings (one of the groups given): a table's assets that are not
        configured ones (training on another plant's readings). An asset already known keeps its group."""
        for asset in assets:
            self._group_of.setdefault(asset, group)

    # -- restart support -------------------------------------------------------------------------------------------
    def unseen(self, assets: Iterable[str]) -> set[str]:
        """Assets with no state here yet (candidates for ``resume``)."""
        return {a for a in assets if a not in self._assets and a not in self._resume}

    def resume(self, asset: str, next_window_start_ms: int) -> None:
        """Continue ``asset`` from the first window start not closed before (as recorded with the last results); its
        first reading is judged for a jump against the slot before that start, as any later one is."""
        if asset in self._group_of and asset not in self._assets:
            self._resume[asset] = round(next_window_start_ms / self._group_of[asset].period_ms)

    def set_replay_boundary(self, partition: int, processed_upto: int) -> None:
        """Offsets below ``processed_upto`` on ``partition`` were processed by a previous owner."""
        self._replay_upto[partition] = processed_upto

    def unsaved_window_starts(self) -> dict[str, int]:
        """Per asset whose first window not closed yet moved (or appeared) since ``mark_saved``, its start (epoch
        ms): what ``resume`` takes after a restart. Only those assets, so a quiet poll costs nothing per asset."""
        return {a: self._assets[a].next_start * self._assets[a].group.period_ms for a in self._unsaved}

    def mark_saved(self, assets: Iterable[str]) -> None:
        """These assets' window starts (from ``unsaved_window_starts``) are stored."""
        self._unsaved.difference_update(assets)

    # -- the work --------------------------------------------------------------------------------------------------
    def add(self, readings: Iterable[Reading], now_ms: int = 0) -> WindowBatch:
        """Place readings on their assets' grids and return every window that closed, in time order per asset.

        ``now_ms`` is the wall-clock arrival time (used only to close the windows of assets that fall silent).
        """
        out = WindowBatch()
        for reading in readings:
            group = self._group_of[reading.asset]
            w = group.window
            slot = round(reading.ts_ms / group.period_ms)
            state = self._assets.get(reading.asset)
            if state is None:
                start = self._resume.pop(reading.asset, None)
                resumed = start is not None
                if start is None:
                    first = slot - w.lateness  # earlier readings may still arrive within the lateness
                    start = math.ceil(first / w.stride) * w.stride
                state = _AssetState(group, start, reading.partition, max_slot=start - 1 if resumed else _NEVER,
                                    fresh=not resumed)
                self._assets[reading.asset] = state
                self._unsaved.add(reading.asset)
            reach = w.length + w.lateness  # a jump further than this would close a whole window at once
            if state.held:
                held_slot = round(state.held[0].ts_ms / group.period_ms)
                if slot == held_slot:  # the same instant (its other sensors, a producer's retry): decides nothing
                    if len(state.held) >= HELD_MAX and _repeats(state.held, reading):
                        out.duplicates.append(reading)  # a clock stuck ahead repeating it: memory stays bounded
                    else:
                        self._hold(reading.asset, state, reading, now_ms)
                    continue
                if slot <= state.max_slot:  # a straggler of the stream so far decides nothing either
                    self._place(reading.asset, reading, state, out, now_ms)
                    continue
                held, state.held = state.held, []
                self._holding.discard(reading.asset)
                if abs(slot - held_slot) <= reach:
                    # the next instant follows the jump: the asset's time really moved on (back after an outage)
                    for r in sorted([*held, reading], key=lambda r: r.ts_ms):
                        self._place(reading.asset, r, state, out, now_ms, was_held=r is not reading)
                    continue
                # the stream went on elsewhere: the held ones carried a glitching clock. Decided by a replayed
                # reading, the previous owner decided it too, and sent the verdict
                if reading.offset < self._replay_upto.get(reading.partition, -1):
                    out.replayed += len(held)
                else:
                    out.jumped += held
            if state.max_slot > _NEVER and slot > state.max_slot + reach:
                self._hold(reading.asset, state, reading, now_ms)  # until the asset's next instant tells
                continue
            self._place(reading.asset, reading, state, out, now_ms)
        return out

    def _hold(self, asset: str, state: _AssetState, reading: Reading, now_ms: int) -> None:
        state.held.append(reading)
        state.partition = reading.partition  # where the asset's latest reading came from (rebalances go by it)
        state.last_arrival_ms = max(state.last_arrival_ms, now_ms)
        self._holding.add(asset)

    def _place(self, asset: str, reading: Reading, state: _AssetState, out: WindowBatch, now_ms: int,
               was_held: bool = False) -> None:
        """Put one reading on its asset's grid and close the windows its time closes. ``was_held``: it was held, so
        it was never counted, even before a restart (it is counted as placed, not as rebuilt)."""
        group = state.group
        slot = round(reading.ts_ms / group.period_ms)
        if slot < state.next_start - self._lookback[group.name] and not state.fresh:
            if reading.offset < self._replay_upto.get(reading.partition, -1):
                out.replayed += 1  # processed before a restart: its windows are already stored
            else:
                out.late.append(reading)
            return
        index = self._sensor_index[group.name]
        row = state.rows.get(slot)
        if row is None:
            row = state.rows[slot] = [math.nan] * len(index)
        taken = [s for s in reading.values if row[index[s]] == row[index[s]]]  # set (NaN is unequal to itself)
        if len(taken) == len(reading.values):
            out.duplicates.append(reading)
            return
        if taken:
            out.partial_duplicates.append((reading, tuple(taken)))
        for sensor, value in reading.values.items():
            if sensor not in taken:
                row[index[sensor]] = value
        if reading.offset < self._replay_upto.get(reading.partition, -1) and not was_held:
            out.rebuilt += 1  # counted when it was first consumed
        else:
            out.placed += 1
        key = (slot, reading.partition)  # an asset can move partitions (a re-partitioned topic): track each
        previous = state.offsets.get(key)
        state.offsets[key] = reading.offset if previous is None else min(previous, reading.offset)
        if state.min_offsets is not None:
            least = state.min_offsets.get(reading.partition)
            state.min_offsets[reading.partition] = reading.offset if least is None else min(least, reading.offset)
        state.partition = reading.partition
        state.last_arrival_ms = max(state.last_arrival_ms, now_ms)
        if slot > state.max_slot:
            # close as soon as the watermark moves, so what counts as late does not depend on batch boundaries
            state.max_slot = slot
            self._close_windows(asset, state, slot, out)
        elif slot == state.max_slot:  # the latest slot filling up (per-sensor messages): a window may end in it
            self._close_windows(asset, state, slot, out)

    def _idle(self, state: _AssetState, now_ms: int) -> bool:
        return bool(state.rows or state.held) and \
            now_ms - state.last_arrival_ms >= state.group.window.idle_close_s * 1000

    def restart_idle_clocks(self, now_ms: int) -> None:
        """Count every asset's silence from ``now_ms`` on (after a broker outage: devices could not publish either,
        so readings sent once it is back must not find their windows closed by idle close)."""
        for state in self._assets.values():
            state.last_arrival_ms = max(state.last_arrival_ms, now_ms)

    def idle_partitions(self, now_ms: int) -> set[int]:
        """Partitions of assets silent for longer than their group's ``idle_close_s`` (for ``close_idle``)."""
        return {state.partition for state in self._assets.values() if self._idle(state, now_ms)}

    def close_idle(self, now_ms: int, partitions: set[int] | None = None) -> WindowBatch:
        """Close every window holding data of assets silent for longer than their group's ``idle_close_s``.

        ``partitions`` limits this to assets of those partitions: the caller passes the ones it has read to the end,
        so a silent asset is told apart from a broker outage or a consumer lagging behind its readings.
        """
        out = WindowBatch()
        if partitions is not None and not partitions:
            return out
        for asset, state in sorted(self._assets.items()):
            if self._idle(state, now_ms) and (partitions is None or state.partition in partitions):
                out.jumped += state.held  # nothing came after them to confirm the jump
                state.held = []
                self._holding.discard(asset)
                if not state.rows:
                    continue
                w = state.group.window
                # as if the asset had reported just past every window that holds one of its readings
                self._close_windows(asset, state, max(state.rows) + w.length - 1 + w.lateness, out, settled=True)
                state.rows.clear()  # no lookback kept for a silent asset: it must not hold back offset commits
                state.offsets.clear()
                state.min_offsets = None
        return out

    def _close_windows(self, asset: str, state: _AssetState, watermark: int, out: WindowBatch, *,
                       settled: bool = False) -> None:
        """Close the windows that the asset's latest slot ``watermark`` closes: those ending ``lateness`` slots before
        it. With ``lateness`` 0 a window ending in the watermark slot itself waits until that slot has every sensor
        or a later slot begins (per-sensor messages: closed at the instant's first message, its other sensors were
        forward-filled from the step before). ``settled``: no more readings come for the watermark (idle close)."""
        w = state.group.window
        period = state.group.period_ms
        if state.next_start + w.length - 1 + w.lateness <= watermark:
            self._unsaved.add(asset)  # its next window start moves below
        while state.next_start + w.length - 1 + w.lateness <= watermark:
            if not (settled or w.lateness or state.next_start + w.length - 1 < watermark
                    or _complete(state.rows.get(watermark))):
                break
            state.fresh = False
            start = state.next_start
            first_data = min(state.rows) if state.rows else watermark
            if first_data >= start + w.length:
                # Nothing at all in this window: jump over the silent stretch in one skipped span.
                closable = (watermark - w.lateness - w.length + 1 - start) // w.stride + 1
                jump = min((first_data - start - w.length) // w.stride + 1, closable)
                state.next_start += jump * w.stride
                end = start + (jump - 1) * w.stride + w.length
                out.skipped.append(SkippedWindow(asset, state.group.name, start * period, end * period, end - start))
                self._prune(state)
                continue
            values = self._materialise(state, start)
            missing = int(np.isnan(values).any(axis=1).sum())
            start_ms, end_ms = start * period, (start + w.length) * period
            if missing:
                out.skipped.append(SkippedWindow(asset, state.group.name, start_ms, end_ms, missing))
            else:
                out.windows.append(Window(asset, state.group.name, start_ms, end_ms, values))
            state.next_start += w.stride
            self._prune(state)

    def _materialise(self, state: _AssetState, start: int) -> np.ndarray:
        w = state.group.window
        gaps = self._gaps[state.group.name]
        lookback = self._lookback[state.group.name]
        empty = [math.nan] * len(gaps)
        span = np.array([state.rows.get(slot, empty) for slot in range(start - lookback, start + w.length)])
        filled = forward_fill(span, gaps)
        if w.smooth > 1:
            filled = causal_mean(filled, w.smooth)
        return filled[lookback:]

    def _prune(self, state: _AssetState) -> None:
        keep_from = state.next_start - self._lookback[state.group.name]
        for slot in [s for s in state.rows if s < keep_from]:
            del state.rows[slot]
        dropped = [k for k in state.offsets if k[0] < keep_from]
        for key in dropped:
            del state.offsets[key]
        if dropped:
            state.min_offsets = None

    # -- offsets and rebalances ------------------------------------------------------------------------------------
    def safe_offsets(self) -> dict[int, int]:
        """Per partition, the smallest offset that an open window still needs (commit no further than this); that
        includes readings an asset sent on a partition it has since moved away from."""
        safe: dict[int, int] = {}
        for state in self._assets.values():
            if state.min_offsets is None:  # recomputed only after readings were dropped from the asset's buffer
                state.min_offsets = {}
                for (_, partition), offset in state.offsets.items():
                    least = state.min_offsets.get(partition)
                    state.min_offsets[partition] = offset if least is None else min(least, offset)
            for partition, offset in state.min_offsets.items():
                if offset < safe.get(partition, offset + 1):
                    safe[partition] = offset
        for asset in self._holding:  # held readings are not committed past either
            for r in self._assets[asset].held:
                if r.offset < safe.get(r.partition, r.offset + 1):
                    safe[r.partition] = r.offset
        return safe

    def forget_partitions(self, partitions: Iterable[int]) -> list[str]:
        """Drop the state of assets last seen on these partitions (a rebalance took them away); returns them."""
        gone = set(partitions)
        if not gone:
            return []
        assets = [a for a, s in self._assets.items() if s.partition in gone]
        for asset in assets:
            del self._assets[asset]
        self._unsaved.difference_update(assets)
        self._holding.difference_update(assets)
        for p in gone:
            self._replay_upto.pop(p, None)
        self._resume.clear()
        return assets

    def partition_of(self, asset: str) -> int | None:
        """The partition an asset's readings come from (None if it has no state here)."""
        state = self._assets.get(asset)
        return state.partition if state is not None else None

    def held_keys(self) -> set[tuple[int, int]]:
        """(partition, offset) of every reading held for being far ahead of its asset."""
        return {(r.partition, r.offset) for a in self._holding for r in self._assets[a].held}

    def open_assets(self) -> list[str]:
        """Assets with buffered readings."""
        return [a for a, s in self._assets.items() if s.rows or s.held]
