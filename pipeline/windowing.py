"""Per-asset alignment on the sampling grid and sliding windows. Pure: no I/O, no clocks.

A reading at ``ts_ms`` lands in grid slot ``round(ts_ms / period_ms)``; readings in the same slot merge (the later
value of a sensor wins). Window ``k`` covers slots ``[k*stride, k*stride + length)``. It closes once the asset has
reported a slot ``lateness`` steps past the window's last slot; then a missing value is filled with the sensor's
previous value if the gap is at most ``max_gap`` slots, and a window with holes left is skipped. A reading for a slot
that no open window can use any more is late.

The windower also knows which Kafka offsets its open windows still need (``safe_offsets``): committing no further than
that lets a restarted consumer rebuild every open window from the replayed records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import GroupConfig
from pipeline.types import Reading, SkippedWindow, Window


def forward_fill(values: np.ndarray, limit: int) -> np.ndarray:
    """Fill NaNs in each column of ``values`` [T, F] with the last valid value at most ``limit`` rows back."""
    if limit <= 0 or not np.isnan(values).any():
        return values
    rows = np.arange(values.shape[0])[:, None]
    valid_at = np.where(~np.isnan(values), rows, -1)
    last_valid = np.maximum.accumulate(valid_at, axis=0)
    fillable = (last_valid >= 0) & (rows - last_valid <= limit)
    cols = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    filled = values[np.maximum(last_valid, 0), cols]
    return np.where(np.isnan(values) & fillable, filled, values)


@dataclass
class _AssetState:
    group: GroupConfig
    next_start: int
    partition: int
    max_slot: int = -(2**62)
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)


@dataclass
class WindowBatch:
    """What one call to ``Windower.add`` produced."""

    windows: list[Window] = field(default_factory=list)
    skipped: list[SkippedWindow] = field(default_factory=list)
    late: list[Reading] = field(default_factory=list)


class Windower:
    """Holds the open windows of every asset and emits the ones that close."""

    def __init__(self, groups: Iterable[GroupConfig]) -> None:
        self._group_of: dict[str, GroupConfig] = {a: g for g in groups for a in g.assets}
        self._sensor_index: dict[str, Mapping[str, int]] = {
            g.name: {s: i for i, s in enumerate(g.sensor_names)} for g in self._group_of.values()
        }
        self._assets: dict[str, _AssetState] = {}

    def add(self, readings: Iterable[Reading]) -> WindowBatch:
        """Place readings on their assets' grids and return every window that closed, in time order per asset."""
        out = WindowBatch()
        touched: set[str] = set()
        for reading in readings:
            group = self._group_of[reading.asset]
            slot = round(reading.ts_ms / group.period_ms)
            state = self._assets.get(reading.asset)
            if state is None:
                stride = group.window.stride
                first = slot - group.window.lateness  # earlier readings may still arrive within the lateness
                state = _AssetState(group, math.ceil(first / stride) * stride, reading.partition)
                self._assets[reading.asset] = state
            if slot < state.next_start - group.window.max_gap:
                out.late.append(reading)
                continue
            index = self._sensor_index[group.name]
            row = state.rows.get(slot)
            if row is None:
                row = state.rows[slot] = np.full(len(index), np.nan)
            for sensor, value in reading.values.items():
                row[index[sensor]] = value
            previous = state.offsets.get(slot)
            state.offsets[slot] = reading.offset if previous is None else min(previous, reading.offset)
            state.partition = reading.partition
            state.max_slot = max(state.max_slot, slot)
            touched.add(reading.asset)
        for asset in sorted(touched):
            self._close_windows(asset, self._assets[asset], out)
        return out

    def _close_windows(self, asset: str, state: _AssetState, out: WindowBatch) -> None:
        w = state.group.window
        period = state.group.period_ms
        while state.next_start + w.length - 1 + w.lateness <= state.max_slot:
            start = state.next_start
            first_data = min(state.rows) if state.rows else state.max_slot
            if first_data >= start + w.length:
                # Nothing at all in this window: jump over the silent stretch in one skipped span.
                closable = (state.max_slot - w.lateness - w.length + 1 - start) // w.stride + 1
                jump = min((first_data - start - w.length) // w.stride + 1, closable)
                state.next_start += jump * w.stride
                end = start + (jump - 1) * w.stride + w.length
                out.skipped.append(
                    SkippedWindow(asset, state.group.name, start * period, end * period, end - start)
                )
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

    @staticmethod
    def _materialise(state: _AssetState, start: int) -> np.ndarray:
        w = state.group.window
        n_features = len(state.group.sensors)
        span = np.full((w.max_gap + w.length, n_features), np.nan)
        for i, slot in enumerate(range(start - w.max_gap, start + w.length)):
            row = state.rows.get(slot)
            if row is not None:
                span[i] = row
        return forward_fill(span, w.max_gap)[w.max_gap :]

    @staticmethod
    def _prune(state: _AssetState) -> None:
        keep_from = state.next_start - state.group.window.max_gap
        for slot in [s for s in state.rows if s < keep_from]:
            del state.rows[slot]
            del state.offsets[slot]

    def safe_offsets(self) -> dict[int, int]:
        """Per partition, the smallest offset that an open window still needs (commit no further than this)."""
        safe: dict[int, int] = {}
        for state in self._assets.values():
            if state.offsets:
                oldest = min(state.offsets.values())
                safe[state.partition] = min(oldest, safe.get(state.partition, oldest))
        return safe

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """Drop the state of assets last seen on these partitions (after a rebalance took them away)."""
        gone = set(partitions)
        for asset in [a for a, s in self._assets.items() if s.partition in gone]:
            del self._assets[asset]

    def open_assets(self) -> list[str]:
        """Assets with buffered readings."""
        return [a for a, s in self._assets.items() if s.rows]
