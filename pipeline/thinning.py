"""Bounding the nightly retrain's memory: which windows of a long lookback to keep, and how to smooth over them.

A retrain reads back every window of its lookback; for a large fleet or a long lookback that can be more than fits in
memory (``retrain.max_windows``). ``Thinning`` then keeps whole blocks of consecutive windows of each asset: block
``b`` (``block`` windows on the window grid) is kept when ``b % keep_every == 0``. Whole blocks rather than single
windows, so that a smoothed score (``threshold.ewma_alpha``) is computed over each block exactly as the pipeline
computes it, with the same alpha (every k-th window alone would average k times fewer scores: a noisier level and a
threshold fitted too high). The first ``warmup`` windows of a block, whose smoothed level has not settled yet, are
left out of what is measured (the threshold fit, the gate's false-alarm rate). Without score smoothing a block is one
window: every k-th window is kept.

The choice uses the absolute window index, so every read keeps the same windows, and keeping every 2k-th block keeps
a subset of every k-th: a reader doubles ``keep_every`` whenever it holds more than it may (``coarser``). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace

from pipeline.types import Window

#: Windows per kept block when scores are smoothed: at least this many, and at least 30 / alpha.
MIN_BLOCK = 256


@dataclass(frozen=True)
class Thinning:
    """Keep block ``b`` of ``block`` consecutive windows (window index = start / ``step_ms``) when
    ``b % keep_every == 0``; the first ``warmup`` windows of a block are not settled. ``keep_every`` 1 keeps all."""

    step_ms: int
    keep_every: int = 1
    block: int = 1
    warmup: int = 0

    @classmethod
    def for_smoothing(cls, step_ms: int, alphas: Iterable[float | None]) -> Thinning:
        """Keeping everything, with blocks sized for the strongest of the score smoothings ``alphas`` (None: raw
        scores): ``max(MIN_BLOCK, 30 / alpha)`` windows, of which the first ``3 / alpha`` settle the level (the
        starting score then weighs (1 - alpha) ** (3 / alpha) < 5%)."""
        smoothing = [a for a in alphas if a is not None]
        if not smoothing:
            return cls(step_ms)
        alpha = min(smoothing)
        return cls(step_ms, block=max(MIN_BLOCK, math.ceil(30 / alpha)), warmup=math.ceil(3 / alpha))

    def index(self, window: Window) -> int:
        """The window's position on its asset's window grid."""
        return window.start_ms // self.step_ms

    def keeps(self, window: Window) -> bool:
        """True when the window's block is kept."""
        return (self.index(window) // self.block) % self.keep_every == 0

    def coarser(self) -> Thinning:
        """Keep half as many blocks (a subset of what this keeps)."""
        return replace(self, keep_every=self.keep_every * 2)

    def stream(self, window: Window) -> Hashable:
        """The score stream the window's smoothed level belongs to: its asset, or (asset, block) once blocks are
        dropped (each kept block is smoothed on its own)."""
        return window.asset if self.keep_every == 1 else (window.asset, self.index(window) // self.block)

    def settled(self, window: Window) -> bool:
        """False for the first ``warmup`` windows of a block once blocks are dropped (their smoothed level still
        leans on where the block started)."""
        return self.keep_every == 1 or self.index(window) % self.block >= self.warmup
