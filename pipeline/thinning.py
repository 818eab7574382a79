"""Bounding the nightly retrain's memory: which windows of a long lookback to keep, and how to smooth over them.

A retrain reads back every window of its lookback; for a large fleet or a long lookback that can be more than fits in
memory (``retrain.max_windows``). ``Thinning`` then keeps whole blocks of consecutive windows of each asset: block
``b`` of ``block`` windows is kept when ``b % keep_every == 0``. Each asset's blocks start at its own stable phase, so
the assets keep different stretches of time and doubling ``keep_every`` halves what the fleet keeps. Whole blocks
rather than single windows, so that a smoothed score (``threshold.ewma_alpha``) runs over each kept stretch as the
pipeline runs it, with the same alpha (every k-th window alone averages k times fewer scores: a noisier level and a
threshold fitted too high).

``streams`` says which smoothed stream each window belongs to (its asset; once thinned, a new stream wherever the
asset's windows jump) and whether its level has settled (at least ``warmup`` windows into its stream): only settled
windows are measured (threshold fit, false-alarm rate). The choice uses the absolute window index, so every read keeps
the same windows, and keeping every 2k-th block keeps a subset of every k-th (``coarser``). Pure.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pipeline.types import Window


@functools.cache
def _phase(asset: str) -> int:
    """Where the asset's blocks start: stable per asset and across processes (computed once per asset)."""
    return zlib.crc32(asset.encode())


#: Windows per kept block when scores are smoothed: at least this many, and at least 30 / alpha.
MIN_BLOCK = 256


@dataclass(frozen=True)
class Thinning:
    """Keep block ``b`` (``block`` consecutive windows of one asset, window index = start / ``step_ms``) when
    ``b % keep_every == 0``; ``warmup``: windows a smoothed stream needs before its level counts. ``keep_every`` 1
    keeps everything."""

    step_ms: int
    keep_every: int = 1
    block: int = 1
    warmup: int = 0

    @classmethod
    def for_smoothing(cls, step_ms: int, alphas: Iterable[float | None]) -> Thinning:
        """Keeping everything, sized for the strongest of the score smoothings ``alphas`` (None or 1: raw scores):
        blocks of ``max(MIN_BLOCK, 30 / alpha)`` windows, of which the first ``3 / alpha`` settle the level (the
        starting score then weighs (1 - alpha) ** (3 / alpha) < 5%)."""
        smoothing = [a for a in alphas if a is not None and a < 1]
        if not smoothing:
            return cls(step_ms)
        alpha = min(smoothing)
        return cls(step_ms, block=max(MIN_BLOCK, math.ceil(30 / alpha)), warmup=math.ceil(3 / alpha))

    @classmethod
    def unthinned(cls, warmup: int = 0) -> Thinning:
        """Keeping everything (the window step then only matters for thinning, so it is left at 1)."""
        return cls(1, warmup=warmup)

    def index(self, window: Window) -> int:
        """The window's position on its asset's window grid."""
        return window.start_ms // self.step_ms

    def _block_of(self, window: Window) -> int:
        return (self.index(window) + _phase(window.asset) % (self.block * 1024)) // self.block

    def keeps(self, window: Window) -> bool:
        """True when the window's block is kept."""
        return self.keep_every == 1 or self._block_of(window) % self.keep_every == 0

    def kept(self) -> str:
        """What it keeps of each asset's windows, in words: "every 2nd window", "every 4th block of 256 windows"."""
        n = self.keep_every
        nth = f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"
        return f"every {nth} window" if self.block == 1 else f"every {nth} block of {self.block} windows"

    def coarser(self) -> Thinning:
        """Keep half as many blocks (a subset of what this keeps)."""
        return replace(self, keep_every=self.keep_every * 2)

    def streams(self, windows: Sequence[Window]) -> tuple[list[Hashable], np.ndarray]:
        """For ``windows`` (time-ordered per asset): each one's smoothed-score stream key, and whether its level has
        settled. Unthinned, an asset is one stream; thinned, its stream restarts wherever its windows jump (a dropped
        stretch). A window has settled once ``warmup`` windows of its stream came before it."""
        keys: list[Hashable] = []
        settled = np.zeros(len(windows), dtype=bool)
        state: dict[str, tuple[int, int, int]] = {}  # asset -> (last index, stream number, windows in the stream)
        for i, window in enumerate(windows):
            index = self.index(window)
            last, number, count = state.get(window.asset, (index - 1, 0, 0))
            if self.keep_every > 1 and index - last > 1:
                number, count = number + 1, 0
            keys.append(window.asset if self.keep_every == 1 else (window.asset, number))
            settled[i] = count >= self.warmup
            state[window.asset] = (index, number, count + 1)
        return keys, settled


def thin_to(windows: list[Window], thin: Thinning, max_windows: int | None,
            must: Callable[[Window], bool] | None = None) -> tuple[list[Window], Thinning]:
    """``windows`` (those that ``thin`` keeps) within ``max_windows`` (None: no bound): the thinning is made
    ``coarser`` until at most that many are left, every window that ``must`` holds to staying. More are left only
    when no coarser thinning would leave fewer but some: those that must stay, or that every thinning keeps (the
    first block of their asset's grid: readings from 1970), are alone more, or the next coarser thinning would leave
    none (whole blocks: one alone can be more). The windows left, in their order, and the thinning they were cut to."""
    while max_windows is not None and len(windows) > max_windows:
        if all((must is not None and must(w)) or thin._block_of(w) == 0 for w in windows):
            break
        coarser = thin.coarser()
        kept = [w for w in windows if coarser.keeps(w) or (must is not None and must(w))]
        if not kept:
            break
        windows, thin = kept, coarser
    return windows, thin
