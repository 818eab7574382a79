"""Retraining on recent normal data: read back, keep the normal windows, train a candidate, gate it, promote or not.

One run of one group (``retrain_group``):
  lock     a per-group row in ``retrain_locks`` (atomic upsert with expiry); a concurrent second run is refused; the
           run renews it every third of ``lock_ttl_s``, and promotes only while it still holds it
  read     the last ``retrain.lookback_days`` of the readings topic by record timestamp (``kafka_io.read_since``, a
           consumer outside the pipeline's group), decoded and cut by the pipeline's own Decoder and Windower, so these
           are the windows the pipeline scored; beyond ``retrain.max_windows`` only every k-th block of each asset's
           windows is kept, and every window near an alert (``pipeline.thinning``), so memory stays bounded
  filter   windows overlapping an alert (widened by ``alert_margin_s``) or scored above threshold (a stored score of
           any version, or the active model now) are not training data; too few left: the run is skipped
  train    a candidate on the older windows, optionally starting from the active model's weights
  gate     on the newest ``holdout_fraction`` of windows (alert windows excluded) each model's false-alarm rate against
           its own threshold, on the alert windows each model's recall: promote only if not worse beyond ``tolerance``;
           for a drift-following group, both models following drift from zero offsets over the lookback, the same way
           (``drift_levels``)
  record   the candidate's registry row (active, rejected, or failed) and the run's row in ``retrain_runs``
An exception anywhere leaves the active model untouched and records the run as failed. The decisions (``split_windows``,
``gate``, ``models.thresholds.exceed_rate``) are pure functions of plain values.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from models.detector import Detector, scored_steps_text
from models.thresholds import ewma_by_key, exceed_rate
from pipeline import kafka_io
from pipeline.config import Config, GroupConfig
from pipeline.decode import Decoder
from pipeline.drift import followed_levels
from pipeline.errors import InvalidReading, ModelError, ModelMismatch, TransientError
from pipeline.registry import load_version, register
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, schema_problem
from pipeline.thinning import Thinning, thin_to
from pipeline.train import train_group
from pipeline.types import Reading, Window, datetime_to_ms, ms_to_datetime
from pipeline.windowing import Windower

log = logging.getLogger(__name__)

OUTCOMES = ("promoted", "rejected", "skipped", "failed", "refused")
DAY_MS = 86_400_000


# -- the pure core ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Span:
    """The extent of one alert of one asset: epoch ms ``[start_ms, end_ms)`` (first window start to last window end)."""

    asset: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class WindowSplit:
    """Recent windows sorted into training data, held-out normal data and alert windows, with the counts."""

    train: list[Window]
    holdout: list[Window]
    alert_windows: list[Window]
    total: int
    near_alert: int
    flagged: int
    anomalous: int  # near an alert or flagged (each window counted once)
    windows: list[Window] = field(default_factory=list)  # all of them, by start time (the context of smoothing)

    @property
    def anomalous_fraction(self) -> float:
        """Share of all recent windows that were near an alert or above a threshold."""
        return self.anomalous / self.total if self.total else 0.0


def near_alerts(spans: Iterable[Span], margin_ms: int) -> Callable[[Window], bool]:
    """A test for "does this window ``[start_ms, end_ms)`` meet an alert span ``[start_ms, end_ms)`` of its asset
    widened by ``margin_ms``", in O(log n) per window: the widened spans are merged per asset and searched by
    bisection."""
    merged: dict[str, list[list[int]]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: (s.asset, s.start_ms)):
        runs = merged[span.asset]
        lo, hi = span.start_ms - margin_ms, span.end_ms + margin_ms
        if runs and lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    starts = {asset: [r[0] for r in runs] for asset, runs in merged.items()}

    def near(window: Window) -> bool:
        runs = merged.get(window.asset)
        if not runs:
            return False
        i = bisect.bisect_left(starts[window.asset], window.end_ms) - 1  # the last run starting before the end
        return i >= 0 and runs[i][1] > window.start_ms

    return near


def split_windows(windows: Sequence[Window], *, alerts: Sequence[Span], flagged: set[tuple[str, int]],
                  margin_ms: int, holdout_fraction: float,
                  counted: Callable[[Window], bool] | None = None) -> WindowSplit:
    """Sort recent windows for training and validation.

    The cut is the start of the window that leaves the newest ``holdout_fraction`` of all windows (by start time)
    after it. Held out: windows starting at or after the cut that do not overlap an alert widened by ``margin_ms``
    (windows above threshold stay in: they are the false alarms being measured). Training: windows ending at or before
    the cut (so no reading is in both) that are neither near an alert nor in ``flagged`` (``(asset, window end ms)``
    scored above threshold). Alert windows: every window overlapping an alert itself (no margin).

    ``counted`` (default: all): the windows that stand for the lookback in the counts and the cut (a thinned read
    keeps every window near an alert but only a sample of the others; counting those extra windows would inflate
    the anomalous fraction).
    """
    ordered = sorted(windows, key=lambda w: (w.start_ms, w.asset))
    if not ordered:
        return WindowSplit([], [], [], 0, 0, 0, 0)
    counts = counted or (lambda _w: True)
    sample = [w for w in ordered if counts(w)] or ordered
    inside, near_one = near_alerts(alerts, 0), near_alerts(alerts, margin_ms)
    cut = sample[min(int(len(sample) * (1.0 - holdout_fraction)), len(sample) - 1)].start_ms
    train: list[Window] = []
    holdout: list[Window] = []
    alert_windows: list[Window] = []
    near = flagged_count = anomalous = 0
    for w in ordered:
        in_alert = inside(w)
        is_near = in_alert or near_one(w)
        is_flagged = (w.asset, w.end_ms) in flagged
        if counts(w):
            near += is_near
            flagged_count += is_flagged
            anomalous += is_near or is_flagged
        if in_alert:
            alert_windows.append(w)
        if w.start_ms >= cut:
            if not is_near:
                holdout.append(w)
        elif w.end_ms <= cut and not (is_near or is_flagged):
            train.append(w)
    return WindowSplit(train, holdout, alert_windows, len(sample), near, flagged_count, anomalous, ordered)


FAULT_SIGMAS = 3.0  # the synthetic faults: one sensor stepped by this many of its standard deviations
FAULT_COUNT = 200  # held-out windows they are made from (at most)
SENSITIVITY_SLACK = 0.1  # the candidate may flag this much less of them than the active model (sampling noise)


@dataclass(frozen=True)
class SyntheticFaults:
    """Held-out normal windows (``clean``, ``[N, W, F]``) and the same windows with a fault each (``faulty``)."""

    clean: np.ndarray
    faulty: np.ndarray

    def __len__(self) -> int:
        return len(self.faulty)


def synthetic_faults(windows: Sequence[Window], *, sigmas: float = FAULT_SIGMAS, count: int = FAULT_COUNT,
                     seed: int = 0) -> SyntheticFaults:
    """Up to ``count`` held-out normal windows, and copies of them each with one sensor (taken in turn, alternately
    up and down) stepped by ``sigmas`` of its standard deviation over the windows, over the window's second half: a
    fault any model worth promoting flags. The same faults judge the candidate and the active model, whatever their
    scalers, so a candidate whose threshold went slack cannot pass for lack of alert windows. Empty when there are no
    windows or no sensor moved."""
    if not windows:
        return SyntheticFaults(np.empty((0, 0, 0)), np.empty((0, 0, 0)))
    values = np.stack([w.values for w in windows])
    std = values.reshape(-1, values.shape[2]).astype(np.float64).std(axis=0)
    moving = np.flatnonzero(std > 0)
    if not len(moving):
        empty = np.empty((0, *values.shape[1:]), dtype=values.dtype)
        return SyntheticFaults(empty, empty)
    rng = np.random.default_rng(seed)
    clean = values[rng.choice(len(values), size=min(count, len(values)), replace=False)]
    faulty = clean.astype(np.float64)
    half = values.shape[1] // 2
    for i in range(len(faulty)):
        sensor = moving[i % len(moving)]
        faulty[i, half:, sensor] += (1 if i % 2 == 0 else -1) * sigmas * std[sensor]
    return SyntheticFaults(clean, faulty.astype(values.dtype))


@dataclass(frozen=True)
class ModelEval:
    """One model on the validation data: its threshold, false-alarm rate on held-out normal windows, recall on alert
    windows (None where there were no such windows), and the 99th percentile of held-out score / threshold (how close
    to its threshold the model runs on recent normal data: drift pushes it up, above 1 are false alarms)."""

    version: str
    threshold: float
    far: float | None
    recall: float | None
    p99_ratio: float | None = None
    score_steps: int | None = None  # the steps of each window its score covers (None: all)
    sensitivity: float | None = None  # share of ``synthetic_faults`` it flags (None: none could be made)


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote the candidate, and why (one reason per failed check, or why it passed)."""

    promote: bool
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        """The reasons as one line."""
        return "; ".join(self.reasons)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def design_rate(detector: Detector) -> float | None:
    """The share of its validation windows above ``detector``'s threshold as fitted (its method, multiplier and
    smoothing included): the false-alarm rate it is built for. None for a model trained before it was recorded."""
    rate = detector.metadata.get("threshold_info", {}).get("validation_exceed_rate")
    return None if rate is None else float(rate)


def gate(candidate: ModelEval, active: ModelEval | None, *, anomalous_fraction: float,
         max_anomalous_fraction: float, tolerance: float, design: float | None = None) -> GateDecision:
    """Promote only when no check speaks against the candidate.

    Rejected when more than ``max_anomalous_fraction`` of the recent windows were anomalous (the rest is likely
    contaminated by the faults), when there were no held-out windows to measure, when its false-alarm rate exceeds the
    active model's by more than ``tolerance``, or exceeds both the active model's and its ``design`` rate plus
    ``tolerance`` (so that nightly promotions, each within the tolerance of the last, cannot ratchet the false-alarm
    rate up), when it flags fewer alert windows than the active model by more than
    ``tolerance``, or fewer ``synthetic_faults`` by more than ``SENSITIVITY_SLACK`` (or ``tolerance``, if larger).
    Without an active model to compare with (none, or one that cannot serve the configuration) the candidate's
    false-alarm rate may exceed its ``design`` rate (``design_rate``; not checked when None) by ``tolerance`` at
    most; its synthetic-fault sensitivity has no floor (sound models of noisy groups flag few 3-sigma steps on one
    sensor). Rates compare each model with its own threshold. Recall is not compared when the two score different
    steps of a window (``model.score_steps`` changed): the active model's alert windows then include the lag after
    each fault that the change removes.
    """
    problems: list[str] = []
    if anomalous_fraction > max_anomalous_fraction:
        problems.append(f"{anomalous_fraction:.1%} of the recent windows were in or near alerts or above threshold "
                        f"(more than {max_anomalous_fraction:.0%}): the data is mostly anomalous")
    if candidate.far is None:
        problems.append("no held-out normal windows to measure false alarms on")
    if active is not None and candidate.far is not None and active.far is not None \
            and candidate.far > active.far + tolerance:
        problems.append(f"false-alarm rate on held-out normal data {_pct(candidate.far)} exceeds the active model's "
                        f"{_pct(active.far)} by more than {_pct(tolerance)}")
    if active is not None and design is not None and candidate.far is not None and active.far is not None \
            and candidate.far > max(design + tolerance, active.far):
        problems.append(f"false-alarm rate on held-out normal data {_pct(candidate.far)} is above the active "
                        f"model's {_pct(active.far)} and more than {_pct(tolerance)} above the {_pct(design)} its "
                        "threshold is fitted for: promotions each within the tolerance of the last must not add up")
    if active is None and design is not None and candidate.far is not None and candidate.far > design + tolerance:
        problems.append(f"false-alarm rate on held-out normal data {_pct(candidate.far)} exceeds the {_pct(design)} "
                        f"its threshold is fitted for by more than {_pct(tolerance)}, with no active model to compare "
                        "with: it would flood alerts (train it on normal data: 'sensorwatch train --csv')")
    if active is not None and candidate.sensitivity is not None and active.sensitivity is not None \
            and candidate.sensitivity < active.sensitivity - max(tolerance, SENSITIVITY_SLACK):
        problems.append(f"flags {_pct(candidate.sensitivity)} of synthetic faults (a {FAULT_SIGMAS:g}-sigma step on "
                        f"one sensor), the active model {_pct(active.sensitivity)}: less sensitive")
    comparable = active is not None and active.score_steps == candidate.score_steps
    if active is not None and comparable and candidate.recall is not None and active.recall is not None \
            and candidate.recall < active.recall - tolerance:
        problems.append(f"flags {_pct(candidate.recall)} of the alert windows, the active model {_pct(active.recall)} "
                        f"(more than {_pct(tolerance)} fewer)")
    if problems:
        return GateDecision(False, tuple(problems))
    if active is None:
        sensitivity = "" if candidate.sensitivity is None else \
            f", synthetic faults flagged {_pct(candidate.sensitivity)}"
        fitted = "" if design is None else f" (threshold fitted for {_pct(design)})"
        return GateDecision(True, (f"no active model; false-alarm rate {_pct(candidate.far)}{fitted}{sensitivity}",))
    summary = f"false-alarm rate {_pct(candidate.far)} vs active {_pct(active.far)}"
    if candidate.sensitivity is not None:
        summary += f", synthetic faults flagged {_pct(candidate.sensitivity)} vs {_pct(active.sensitivity)}"
    if candidate.recall is not None:
        summary += f", alert-window recall {_pct(candidate.recall)} vs {_pct(active.recall)}"
        if not comparable:
            summary += (f" (not compared: the candidate scores {scored_steps_text(candidate.score_steps)}, the "
                        f"active model {scored_steps_text(active.score_steps)})")
    return GateDecision(True, (f"not worse than {active.version} beyond {_pct(tolerance)}: {summary}",))


def evaluate(detector: Detector, holdout: Sequence[Window], alert_windows: Sequence[Window],
             context: Sequence[Window] = (), thinning: Thinning | None = None,
             levels: Mapping[tuple[str, int], float] | None = None,
             faults: SyntheticFaults | None = None) -> ModelEval:
    """``detector`` on the held-out normal windows and the alert windows. A detector that smooths its scores is
    run over all of ``context`` (every recent window, time-ordered per asset), as the pipeline would have, and the
    two subsets are judged on those smoothed levels; without a context each subset is smoothed on its own.
    ``thinning``: how the windows were thinned and smoothed (``Thinning.streams``); the false-alarm rate counts the
    held-out windows whose smoothed level has settled in the context, the same windows for every detector.
    ``levels``: the detector's levels by ``(asset, window end ms)`` when they were computed already: its scores
    (smoothed over ``context`` when it smooths), or for a drift-following group ``drift_levels``. ``faults``:
    ``synthetic_faults``: its sensitivity is the share of them it flags, of those whose clean window it does not
    flag (a model that flags everything is not sensitive, only noisy)."""
    thin = thinning or Thinning.unthinned()
    basis = list(context) or list(holdout)
    _, settled = thin.streams(basis)
    measured = {(w.asset, w.end_ms) for w, ok in zip(basis, settled, strict=True) if ok}
    holdout = [w for w in holdout if (w.asset, w.end_ms) in measured]
    if levels is None and detector.ewma_alpha is not None and context:
        levels = dict(zip(((w.asset, w.end_ms) for w in context), _scores(detector, context, thin), strict=True))
    if levels is not None:
        held = np.array([levels[(w.asset, w.end_ms)] for w in holdout])
        alerted = np.array([levels[(w.asset, w.end_ms)] for w in alert_windows])
    else:
        held, alerted = _scores(detector, holdout, thin), _scores(detector, alert_windows, thin)
    p99 = float(np.percentile(held, 99) / detector.threshold) if len(held) and detector.threshold > 0 else None
    sensitivity = None
    if faults is not None and len(faults):
        quiet = detector.score(faults.clean)[0] <= detector.threshold
        sensitivity = exceed_rate(detector.score(faults.faulty[quiet])[0], detector.threshold) if quiet.any() else None
    return ModelEval(detector.version, detector.threshold, exceed_rate(held, detector.threshold),
                     exceed_rate(alerted, detector.threshold), p99, detector.score_steps, sensitivity)


def drift_levels(detector: Detector, group: GroupConfig, windows: Sequence[Window], thinning: Thinning
                 ) -> dict[tuple[str, int], float] | None:
    """For a drift-following group, ``detector``'s levels over the recent ``windows`` (time-ordered per asset) had it
    run over them following drift from zero offsets (``drift.followed_levels``): the gate measures the active model
    and the candidate this same way. Where thinning dropped windows before one, it moves the offsets as far as the
    dropped stretch would have (its steps on the grid); a window kept after its predecessor moves them one window's
    worth. None for other groups (``evaluate`` scores them plainly)."""
    weight = group.drift_weight
    if weight is None or not windows:
        return None
    steps = [1] * len(windows)
    if thinning.keep_every > 1:
        last: dict[str, int] = {}
        for i, window in enumerate(windows):
            index = thinning.index(window)
            steps[i] = max(index - last.get(window.asset, index - 1), 1)
            last[window.asset] = index
    levels = followed_levels(detector, windows, weight=weight, limit=group.drift_limit,
                             streams=thinning.streams(windows)[0], steps=steps)
    return dict(zip(((w.asset, w.end_ms) for w in windows), levels, strict=True))


def _scores(detector: Detector, windows: Sequence[Window], thinning: Thinning | None = None) -> np.ndarray:
    """What the pipeline holds to ``detector``'s threshold: raw scores, or each asset's smoothed scores when the
    detector smooths (``windows`` in time order per asset; each kept block on its own when ``thinning`` dropped
    blocks)."""
    if not windows:
        return np.empty(0)
    raw = detector.score(np.stack([w.values for w in windows]))[0]
    alpha = detector.ewma_alpha
    return raw if alpha is None else ewma_by_key(raw, (thinning or Thinning.unthinned()).streams(windows)[0], alpha)


# -- reading back ----------------------------------------------------------------------------------------------------
@dataclass
class RecentData:
    """The windows of one group cut from the readings read back, and how many records were read and rejected."""

    windows: list[Window]
    records: int
    rejected: int
    thinning: Thinning | None = None  # how the windows were thinned (the reader's final choice)


def read_recent_windows(config: Config, group: GroupConfig, *, since_ms: int, thinning: Thinning | None = None,
                        max_windows: int | None = None, keep: Callable[[Window], bool] | None = None) -> RecentData:
    """Read the topic back from ``since_ms`` (record timestamps) to its current end and cut ``group``'s windows with
    the pipeline's Decoder and Windower. A record is validated against its own timestamp as the arrival time, as the
    pipeline did when it consumed it live; rejected records are counted, not used.

    The windows ``thinning`` keeps, and all those ``keep`` says must stay (e.g. near an alert), are kept; whenever
    more than ``max_windows`` are held, the thinning becomes ``coarser`` (``thin_to``: unless only windows that must
    stay are left, or no coarser thinning keeps fewer but some: then a warning says so). The result's ``thinning``
    is the final one.
    """
    thin = thinning or Thinning(group.window.stride * group.period_ms)
    must = keep or (lambda _w: False)
    warned = False
    decoder = Decoder(config.groups, config.kafka.max_message_bytes, config.ingest)
    windower = Windower([group])
    assets = set(group.assets)
    data = RecentData([], 0, 0)
    for batch in kafka_io.read_since(config.kafka, since_ms, timeout_s=config.retrain.read_timeout_s,
                                     max_records=config.kafka.max_poll_records):
        readings: list[Reading] = []
        for record in batch:
            data.records += 1
            try:
                r = decoder.decode(record.value, record.key, record.timestamp_ms if record.timestamp_ms >= 0 else None)
            except InvalidReading:
                data.rejected += 1
                continue
            if r.asset in assets:
                readings.append(Reading(r.asset, r.ts_ms, r.values, record.partition, record.offset))
        cut = windower.add(readings)
        data.rejected += len(cut.jumped)
        data.windows += [w for w in cut.windows if thin.keeps(w) or must(w)]
        before, was = len(data.windows), thin
        data.windows, thin = thin_to(data.windows, thin, max_windows, must)
        if thin != was:
            log.info("%s: %d windows read back, over retrain.max_windows = %d: keeping %s of each asset (%d left)",
                     group.name, before, max_windows, thin.kept(), len(data.windows))
        if max_windows is not None and len(data.windows) > max_windows and not warned:
            if all(must(w) for w in data.windows):
                log.warning("%s: %d windows near alerts alone are over retrain.max_windows = %d; keeping them",
                            group.name, len(data.windows), max_windows)
            else:
                log.warning("%s: %d windows of whole blocks (%s of each asset) are over retrain.max_windows = %d, "
                            "and no coarser thinning keeps fewer but some; keeping them", group.name, len(data.windows),
                            thin.kept(), max_windows)
            warned = True
    data.thinning = thin
    return data


# -- one run ---------------------------------------------------------------------------------------------------------
@dataclass
class RetrainResult:
    """How one run of one group ended (``outcome`` is one of OUTCOMES) and its figures."""

    group: str
    outcome: str
    reason: str
    run_id: int | None = None
    candidate_version: str | None = None
    active_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        m = self.metrics
        figures = ""
        if "windows_train" in m:
            figures = (f" [windows read {m['windows_total']}, trained on {m['windows_train']}, held out "
                       f"{m['windows_holdout']}, alert windows {m['windows_alert']}")
            if "threshold_candidate" in m:
                figures += (f"; threshold {m['threshold_candidate']:.4g} vs active {_num(m.get('threshold_active'))}; "
                            f"FAR {_pct(m.get('far_candidate'))} vs {_pct(m.get('far_active'))}")
                if m.get("far_active_bare") is not None:
                    figures += f" (following drift; the active model without its offsets {_pct(m['far_active_bare'])})"
                if m.get("recall_candidate") is not None:
                    figures += f"; alert recall {_pct(m['recall_candidate'])} vs {_pct(m.get('recall_active'))}"
                if m.get("p99_ratio_candidate") is not None:
                    figures += (f"; held-out p99 score/threshold {m['p99_ratio_candidate']:.2f} vs "
                                f"{_num(m.get('p99_ratio_active'))}")
            figures += "]"
        version = f" {self.candidate_version}" if self.candidate_version else ""
        return f"{self.group}: {self.outcome}{version}: {self.reason}{figures}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


@dataclass
class _Progress:
    """What a run has done so far (for recording a failure)."""

    active_version: str | None = None
    candidate_version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _holder() -> str:
    return repo.new_holder()


class _LockKeeper:
    """Renews a retrain lock every third of its time to live from a background thread while a run lasts, so a run
    longer than ``lock_ttl_s`` keeps it; ``lost`` turns True when a renewal finds another holder. Database errors
    are logged and retried at the next renewal."""

    def __init__(self, sessions: sessionmaker[Session], group: str, holder: str, ttl_s: float,
                 clock: Callable[[], datetime]) -> None:
        self._sessions, self._group, self._holder, self._ttl_s, self._clock = sessions, group, holder, ttl_s, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"retrain-lock-{group}", daemon=True)
        self.lost = False

    def __enter__(self) -> _LockKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)  # a renewal stuck on a dead connection must not hold up the run's end

    def check(self) -> None:
        """RuntimeError when a renewal found that another run holds the lock now (stop before wasting work)."""
        if self.lost:
            raise RuntimeError("this run lost the retrain lock (it expired and another run took it over)")

    def _loop(self) -> None:
        interval = self._ttl_s / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                with self._sessions.begin() as session:
                    held = repo.renew_retrain_lock(session=session, group=self._group, holder=self._holder,
                                                   now=self._clock(), ttl_s=self._ttl_s)
            except Exception as exc:  # the database is down or the connection broke: try again soon
                wait = min(interval, 30.0)
                log.warning("%s: could not renew the retrain lock (%s); retrying in %.0fs", self._group,
                            type(exc).__name__, wait)
                continue
            wait = interval
            if not held:
                self.lost = True
                log.error("%s: the retrain lock was taken over by another run; this run will not promote",
                          self._group)
                return


def retrain_group(config: Config, group_name: str, *, sessions: sessionmaker[Session], trigger: str = "manual",
                  clock: Callable[[], datetime] = _utcnow, firing: datetime | None = None) -> RetrainResult:
    """One retrain run of one group, recorded in ``retrain_runs`` whatever happens.

    Refused (nothing else done) when another run holds the group's lock. ``firing``: the scheduled time this run is
    for (a scheduler's); skipped when a run for that firing was already started (by another scheduler on the same
    database: each fires the job). Never raises for a failure inside the run: the active model stays as it was, the
    run (and a registered candidate) is recorded as failed. ConfigError for an unknown group; database errors while
    taking the lock propagate (nothing was started).
    """
    group = config.group(group_name)
    rc = config.retrain
    holder = _holder()
    started = clock()
    with sessions.begin() as session:
        locked = repo.acquire_retrain_lock(session=session, group=group.name, holder=holder, now=started,
                                           ttl_s=rc.lock_ttl_s)
        taken = None if firing is None else repo.scheduled_run_since(session=session, group=group.name, since=firing)
        if taken is not None:
            if locked:
                repo.release_retrain_lock(session=session, group=group.name, holder=holder)
            reason = (f"the run scheduled for {firing:%Y-%m-%d %H:%M:%S}Z was already started by {taken.holder} "
                      f"(run {taken.id}): another scheduler on this database")
            run = repo.start_retrain_run(session=session, group=group.name, trigger=trigger, holder=holder,
                                         now=started, outcome="skipped", reason=reason)
        elif locked:
            abandoned = repo.abandon_retrain_runs(
                session=session, group=group.name, now=started,
                reason="abandoned: its process ended without recording an outcome (its lock expired)")
            if abandoned:
                log.warning("%s: %d earlier run(s) never finished; recorded as failed", group.name, abandoned)
            run = repo.start_retrain_run(session=session, group=group.name, trigger=trigger, holder=holder,
                                         now=started)
        else:
            lock = repo.retrain_lock(session=session, group=group.name)
            since = f"since {lock.acquired_at:%Y-%m-%d %H:%M:%S}Z by {lock.holder}" if lock else "just now"
            reason = f"another retrain of group {group.name!r} holds the lock ({since})"
            run = repo.start_retrain_run(session=session, group=group.name, trigger=trigger, holder=holder,
                                         now=started, outcome="refused", reason=reason)
    if taken is not None:
        log.info("%s: retrain skipped: %s", group.name, reason)
        return RetrainResult(group.name, "skipped", reason, run.id)
    if not locked:
        log.warning("%s: retrain refused: %s", group.name, reason)
        return RetrainResult(group.name, "refused", reason, run.id)
    progress = _Progress()
    try:
        with _LockKeeper(sessions, group.name, holder, rc.lock_ttl_s, clock) as keeper:
            return _run_locked(config, group, sessions=sessions, run_id=run.id, holder=holder, keeper=keeper,
                               progress=progress, clock=clock)
    except Exception as exc:
        return _record_failure(group.name, sessions=sessions, run_id=run.id, progress=progress, exc=exc, clock=clock)
    finally:
        try:
            with sessions.begin() as session:
                repo.release_retrain_lock(session=session, group=group.name, holder=holder)
        except SQLAlchemyError as exc:  # the lock expires after lock_ttl_s anyway
            log.error("%s: could not release the retrain lock (%s); it expires after %.0fs", group.name,
                      type(exc).__name__, rc.lock_ttl_s)


def _spans(alerts: Iterable[Any]) -> list[Span]:
    return [Span(a.asset, datetime_to_ms(a.opened_at), datetime_to_ms(max(a.closed_at or a.last_seen_at,
                                                                          a.last_seen_at))) for a in alerts]


def _recent_split(config: Config, group: GroupConfig, active: Detector | None, *, sessions: sessionmaker[Session],
                  now: datetime, metrics: dict[str, Any]
                  ) -> tuple[WindowSplit, Thinning, dict[tuple[str, int], float] | None] | None:
    """Read the lookback back from Kafka (thinned to ``retrain.max_windows``, keeping every window near an alert),
    look up its alerts and flagged windows, and split it (figures go into ``metrics``). Also returns the active
    model's bare levels over the windows. None when the lookback holds no complete window."""
    rc = config.retrain
    since_ms = datetime_to_ms(now) - round(rc.lookback_days * DAY_MS)
    margin_ms = round(rc.alert_margin_s * 1000)
    # the alerts the lookback's windows can meet (readings may be as old as ingest.max_age_s when they arrive): they
    # decide which windows thinning must keep, and which are near an alert in the split. The group's assets' alerts,
    # whichever group raised them: after a rename (or a move) the resolved ones keep the group they were raised in
    max_age_ms = round(config.ingest.max_age_s * 1000) if config.ingest.max_age_s is not None else None
    alerts_since = ms_to_datetime(since_ms - max_age_ms - margin_ms) if max_age_ms is not None else None
    with sessions() as session:
        spans = _spans(repo.list_alerts(session=session, assets=group.assets, since=alerts_since, limit=None))
    near = near_alerts(spans, margin_ms)
    alphas = [group.threshold.ewma_alpha, active.ewma_alpha if active is not None else None]
    data = read_recent_windows(config, group, since_ms=since_ms, max_windows=rc.max_windows,
                               thinning=Thinning.for_smoothing(group.window.stride * group.period_ms, alphas),
                               keep=near)
    thinning = data.thinning or Thinning.unthinned()
    metrics.update(records_read=data.records, records_rejected=data.rejected, window_thinning=thinning.keep_every,
                   window_thinning_block=thinning.block)
    if not data.windows:
        return None
    first_ms, last_ms = min(w.start_ms for w in data.windows), max(w.end_ms for w in data.windows)
    with sessions() as session:  # the alerts were read above: every one the lookback's windows can meet
        assets = sorted({w.asset for w in data.windows})
        flagged = repo.flagged_windows(session=session, group=group.name, assets=assets,
                                       start=ms_to_datetime(first_ms), end=ms_to_datetime(last_ms))
        last_scored = repo.last_scored_windows(session=session, group=group.name, assets=assets) \
            if group.drift else {}
    levels = None
    if active is not None:
        levels = dict(zip(((w.asset, w.end_ms) for w in data.windows), _scores(active, data.windows, thinning),
                          strict=True))
        # windows the pipeline has not scored (yet), or scored with an older version, count by the active model's
        # bare levels. A drift-following group's scored windows count only as the pipeline judged them (relative to
        # its followed offsets): the bare levels would flag the very drift it followed and leave it out of training.
        flagged |= {key for key, level in levels.items() if level > active.threshold
                    and (group.drift is None or key[0] not in last_scored or key[1] > last_scored[key[0]])}
    split = split_windows(data.windows, alerts=spans, flagged=flagged, margin_ms=margin_ms,
                          holdout_fraction=rc.holdout_fraction, counted=thinning.keeps)
    metrics.update(windows_total=split.total, windows_train=len(split.train), windows_holdout=len(split.holdout),
                   windows_alert=len(split.alert_windows), windows_near_alert=split.near_alert,
                   windows_flagged=split.flagged, anomalous_fraction=round(split.anomalous_fraction, 4),
                   alerts=len(spans), data_start=ms_to_datetime(first_ms).isoformat(),
                   data_end=ms_to_datetime(last_ms).isoformat())
    log.info("%s: %d windows read back (%d records), %d for training, %d held out, %d alert windows", group.name,
             split.total, data.records, len(split.train), len(split.holdout), len(split.alert_windows))
    return split, thinning, levels


def _run_locked(config: Config, group: GroupConfig, *, sessions: sessionmaker[Session], run_id: int, holder: str,
                keeper: _LockKeeper, progress: _Progress, clock: Callable[[], datetime]) -> RetrainResult:
    rc = config.retrain
    with sessions() as session:
        active_row = repo.active_model_versions(session=session).get(group.name)
    active, unusable = None, None
    if active_row is not None:
        try:
            active = load_version(active_row, group, config.model_dir)
        except ModelMismatch as exc:  # a sensor, window or grid change: the pipeline refuses it too (a bundle that
            # is missing or fails its checksum fails the run instead: the volume may only be unmounted)
            unusable = f"the active model {active_row.version} cannot serve this configuration ({exc})"
            log.warning("%s: %s; training a new model from the recent data alone", group.name, unusable)
    progress.active_version = active_row.version if active_row is not None else None
    m = progress.metrics
    m.update(active_version=progress.active_version, active_unusable=unusable)
    recent = _recent_split(config, group, active, sessions=sessions, now=clock(), metrics=m)
    if recent is None:
        return _finish(group.name, "skipped", f"no complete windows in the last {rc.lookback_days:g} days "
                       f"({m['records_read']} records read)", sessions=sessions, run_id=run_id, progress=progress,
                       clock=clock)
    split, thinning, active_levels = recent
    if len(split.train) < rc.min_windows:
        thinned = (f"; the lookback was thinned to {thinning.kept()} by retrain.max_windows = {rc.max_windows}"
                   if thinning.keep_every > 1 else "")
        return _finish(group.name, "skipped", f"only {len(split.train)} normal windows to train on (need "
                       f"retrain.min_windows = {rc.min_windows}){thinned}", sessions=sessions, run_id=run_id,
                       progress=progress, clock=clock)
    if not split.holdout:
        return _finish(group.name, "skipped", "no held-out normal windows to validate on", sessions=sessions,
                       run_id=run_id, progress=progress, clock=clock)

    keeper.check()
    trained = train_group(split.train, group, progress=False, warm_start=active if rc.warm_start else None,
                          epochs=rc.epochs, thinning=thinning)
    keeper.check()
    candidate = trained.detector
    with sessions.begin() as session:
        register(session=session, detector=candidate, group=group, model_dir=config.model_dir, status="candidate",
                 data_range=(ms_to_datetime(trained.data_start_ms), ms_to_datetime(trained.data_end_ms)),
                 windows_used=trained.windows_used, metrics={**trained.metrics, **m})
        repo.update_retrain_run(session=session, run_id=run_id, candidate_version=candidate.version)
    progress.candidate_version = candidate.version

    # a drift-following group's levels carry offsets the synthetic faults do not: not measured there
    faults = synthetic_faults(split.holdout) if group.drift_weight is None else None
    cand_eval = evaluate(candidate, split.holdout, split.alert_windows, split.windows, thinning,
                         drift_levels(candidate, group, split.windows, thinning), faults)
    active_eval = None
    if active is not None:
        followed = drift_levels(active, group, split.windows, thinning)
        active_eval = evaluate(active, split.holdout, split.alert_windows, split.windows, thinning,
                               followed if followed is not None else active_levels, faults)
        if followed is not None:  # how much drift its offsets carry: its bare levels, as a report figure
            m.update(far_active_bare=evaluate(active, split.holdout, [], split.windows, thinning, active_levels).far)
    decision = gate(cand_eval, active_eval, anomalous_fraction=split.anomalous_fraction,
                    max_anomalous_fraction=rc.max_anomalous_fraction, tolerance=rc.tolerance,
                    design=design_rate(candidate))
    if unusable is not None:
        decision = GateDecision(decision.promote, (f"{unusable}; nothing to compare with",
                                                   *(r.removeprefix("no active model; ") for r in decision.reasons)))
    m.update(trained.metrics)
    m.update(threshold_candidate=cand_eval.threshold, far_candidate=cand_eval.far, recall_candidate=cand_eval.recall,
             p99_ratio_candidate=cand_eval.p99_ratio, threshold_active=active_eval.threshold if active_eval else None,
             far_active=active_eval.far if active_eval else None,
             recall_active=active_eval.recall if active_eval else None,
             p99_ratio_active=active_eval.p99_ratio if active_eval else None, tolerance=rc.tolerance,
             sensitivity_candidate=cand_eval.sensitivity,
             sensitivity_active=active_eval.sensitivity if active_eval else None)
    with sessions.begin() as session:
        # fencing: still holding the lock (renewed here, in the promoting transaction), and nobody else promoted
        held = repo.renew_retrain_lock(session=session, group=group.name, holder=holder, now=clock(),
                                       ttl_s=rc.lock_ttl_s)
        current = repo.active_model_versions(session=session).get(group.name)
        if not held:
            decision = GateDecision(False, ("this run lost the retrain lock (it expired and another run took it "
                                            "over): not promoting",))
        elif decision.promote and (current.version if current else None) != progress.active_version:
            decision = GateDecision(False, (f"the active model changed during the run (now "
                                            f"{current.version if current else 'none'}): not overriding it",))
        outcome = "promoted" if decision.promote else "rejected"
        if decision.promote:
            repo.activate_model_version(session=session, version=candidate.version)
        else:
            repo.set_model_status(session=session, version=candidate.version, status="rejected",
                                  reason=decision.reason, only_from="candidate")
        row = repo.get_model_version(session=session, version=candidate.version)
        if row is not None:
            row.metrics = {**row.metrics, **m, "gate": outcome, "gate_reason": decision.reason}
        repo.finish_retrain_run(session=session, run_id=run_id, outcome=outcome, reason=decision.reason,
                                now=clock(), active_version=progress.active_version,
                                candidate_version=candidate.version, windows_used=trained.windows_used,
                                data_start=ms_to_datetime(trained.data_start_ms),
                                data_end=ms_to_datetime(trained.data_end_ms), metrics=_jsonable(m))
    result = RetrainResult(group.name, outcome, decision.reason, run_id, candidate.version, progress.active_version,
                           dict(m))
    log.info("retrain %s", result.summary())
    return result


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in metrics.items()}


def _finish(group: str, outcome: str, reason: str, *, sessions: sessionmaker[Session], run_id: int,
            progress: _Progress, clock: Callable[[], datetime]) -> RetrainResult:
    with sessions.begin() as session:
        repo.finish_retrain_run(session=session, run_id=run_id, outcome=outcome, reason=reason, now=clock(),
                                active_version=progress.active_version, metrics=_jsonable(progress.metrics))
    result = RetrainResult(group, outcome, reason, run_id, None, progress.active_version, dict(progress.metrics))
    log.info("retrain %s", result.summary())
    return result


def _record_failure(group: str, *, sessions: sessionmaker[Session], run_id: int, progress: _Progress,
                    exc: Exception, clock: Callable[[], datetime]) -> RetrainResult:
    reason = f"{type(exc).__name__}: {exc}"[:1000]
    expected = isinstance(exc, TransientError | ModelError)  # a dependency or bundle problem: no traceback
    log.error("%s: retrain failed, the active model keeps serving: %s", group, reason,
              exc_info=None if expected else exc)
    try:
        with sessions.begin() as session:
            if progress.candidate_version:
                with contextlib.suppress(KeyError):
                    repo.set_model_status(session=session, version=progress.candidate_version, status="failed",
                                          reason=reason, only_from="candidate")
            repo.finish_retrain_run(session=session, run_id=run_id, outcome="failed", reason=reason, now=clock(),
                                    active_version=progress.active_version,
                                    candidate_version=progress.candidate_version,
                                    metrics=_jsonable(progress.metrics))
    except SQLAlchemyError as db_exc:  # the next run that takes the lock records this one as abandoned
        log.error("%s: could not record the failed run (%s)", group, type(db_exc).__name__)
    return RetrainResult(group, "failed", reason, run_id, progress.candidate_version, progress.active_version,
                         dict(progress.metrics))


def retrain_all(config: Config, *, group: str | None = None, trigger: str = "manual",
                firing: datetime | None = None) -> list[RetrainResult]:
    """Run ``retrain_group`` for one group or every configured group, one after another (``firing``: the
    scheduled time the runs are for, when a scheduler started them).

    ConfigError for an unknown group; TransientError when the database schema is not up to date.
    """
    names = [config.group(group).name] if group else [g.name for g in config.groups]
    engine = make_engine(config.database.url)
    try:
        problem = schema_problem(engine)
        if problem:
            raise TransientError(problem)
        sessions = make_sessionmaker(engine)
        return [retrain_group(config, name, sessions=sessions, trigger=trigger, firing=firing) for name in names]
    finally:
        engine.dispose()
