"""The alert state machine: scores in, alert events out. Pure: no I/O, no clocks; all times are window event times.

Per asset, following its group's ``AlertConfig``:

- **open**: ``k`` of the last ``n`` windows exceed the threshold, and that condition has held continuously for
  ``min_duration_s`` (between window ends), outside the ``cooldown_s`` after the previous alert's resolution (windows in
  a cooldown still fill the k-of-n history, but the time pending starts only after it). The alert opens on an exceeding
  window and covers every exceeding window gathered while the condition held (``opened`` is the start of the first).
- **update**: while open, each exceeding window updates the same incident in place (last seen, peak score, window
  count, severity, top sensors with their share of the accumulated error). Severity is the highest tier whose
  multiple of the threshold a window reached; it never falls during an incident.
- **resolve** (hysteresis): ``clear_after`` consecutive windows at or below ``exit_level`` x threshold. A window
  between the exit level and the threshold keeps the alert open (resets the count) without updating it.
- **maintenance**: windows overlapping one of the asset's maintenance windows are ignored and the evidence gathered
  before it (k-of-n history, time pending, resolve count) is dropped; an open alert stays open, unchanged.
- **smoothing**: when the model's threshold applies to smoothed scores, ``smooth`` sets each score's EWMA
  (``Score.smoothed``) first and every rule above compares that level (``Score.level``) instead of the raw score.
- **aftermath** (optional): after an incident that reached a large multiple of the threshold, the asset's windows are
  held to a raised bar (``Score.aftermath_floor``): ``relative`` x the decayed peak ratio of the windows of its
  incidents so far, at most the top severity tier's multiple. Every rule above (k-of-n, the exit level) compares
  the level with that bar (``Score.bar``) instead of the threshold; severity stays relative to the threshold.
- **restart**: ``restore`` rebuilds an asset from its stored open alert (optionally the last resolved one, for the
  cooldown), its latest stored scores, replayed without opening anything, and its stored incident windows (aftermath);
  transitions the replay implies for the open alert are returned by the next ``process`` call. Windows at or before
  the last one processed are ignored, which makes replays harmless.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from pipeline.config import AlertConfig, GroupConfig, MaintenanceWindow
from pipeline.cron import CronSchedule
from pipeline.types import AlertEvent, AlertRecord, Score, datetime_to_ms, ms_to_datetime, significant

_REST = "\x00rest"  # restored error of the sensors beyond the stored top list: counts in the total, never ranked
_NEVER = -(2**62)


def _ratio(score: float, threshold: float) -> float:
    return score / threshold if threshold > 0 else math.inf


def _tier_rank(ratio: float, rule: AlertConfig) -> int:
    rank = 0
    for i, tier in enumerate(rule.tiers):
        if ratio >= tier.multiple:
            rank = i
    return rank


def severity_of(peak: float, threshold: float, rule: AlertConfig) -> str:
    """The highest severity tier whose multiple of ``threshold`` the ``peak`` reaches (the lowest tier otherwise)."""
    return rule.tiers[_tier_rank(_ratio(peak, threshold), rule)].name


def top_sensors(error_sums: Mapping[str, float], count: int) -> list[dict[str, float | str]]:
    """The ``count`` sensors with the largest share of the accumulated error: name, share (0..1), summed error."""
    total = sum(error_sums.values()) or 1.0
    named = [(k, v) for k, v in error_sums.items() if k != _REST]
    ranked = sorted(named, key=lambda kv: kv[1], reverse=True)[:count]
    return [{"sensor": name, "share": round(value / total, 4), "error": significant(value)} for name, value in ranked]


Excursion = tuple[float, int]  # (ratio to the threshold, capped at top tier / relative; window end ms)


def _decayed(excursion: Excursion, end_ms: int, half_life_s: float) -> float:
    ratio, at_ms = excursion
    return ratio * 0.5 ** ((end_ms - at_ms) / (half_life_s * 1000))


def _larger(a: Excursion | None, b: Excursion | None, half_life_s: float) -> Excursion | None:
    """Of two excursions, the one whose decayed ratio is larger from now on (the order of ``r * 2^-((t - t_i) / h)``
    does not depend on ``t``, so one comparison settles it for good)."""
    if a is None or b is None:
        return b if a is None else a
    at = max(a[1], b[1])
    return a if _decayed(a, at, half_life_s) >= _decayed(b, at, half_life_s) else b


def _excursion_of(score: Score, rule: AlertConfig) -> Excursion | None:
    """A window's excursion: its ratio to the threshold, capped where the bar would reach the top severity tier
    (``top / relative``), so a spike of any size holds a level L back for at most ``half_life_s`` x log2(top / L).
    None when it could never raise the bar (ratio at most ``1 / relative``, no positive threshold, no rule)."""
    cfg = rule.aftermath
    if cfg is None or score.threshold <= 0:
        return None
    ratio = min(score.level / score.threshold, rule.tiers[-1].multiple / cfg.relative)
    return (ratio, score.end_ms) if ratio * cfg.relative > 1.0 else None


def _aftermath_floor(excursion: Excursion | None, score: Score, rule: AlertConfig) -> float | None:
    """The raised bar for ``score`` (score units) after ``excursion``: ``relative`` x its decayed ratio (at most the
    top severity tier's multiple, by the cap) x the threshold; None when that is not above the threshold."""
    cfg = rule.aftermath
    if cfg is None or excursion is None or score.threshold <= 0:
        return None
    bar = cfg.relative * _decayed(excursion, score.end_ms, cfg.half_life_s)
    return bar * score.threshold if bar > 1.0 else None


@dataclass(frozen=True, slots=True)
class _Maintenance:
    assets: frozenset[str] | None
    start_ms: int
    end_ms: int
    cron: CronSchedule | None
    duration_ms: int

    @classmethod
    def of(cls, window: MaintenanceWindow) -> _Maintenance:
        assets = frozenset(window.assets) if window.assets is not None else None
        if window.cron is not None:
            return cls(assets, 0, 0, CronSchedule.parse(window.cron), (window.duration_minutes or 0) * 60_000)
        assert window.start is not None and window.end is not None  # the config validator guarantees it
        return cls(assets, datetime_to_ms(window.start), datetime_to_ms(window.end), None, 0)

    def overlaps(self, asset: str, start_ms: int, end_ms: int) -> bool:
        """True when ``[start_ms, end_ms)`` of ``asset`` intersects this maintenance window."""
        if self.assets is not None and asset not in self.assets:
            return False
        if self.cron is None:
            return self.start_ms < end_ms and start_ms < self.end_ms
        # an occurrence [s, s + d) intersects the window iff some firing s lies in (start - d, end)
        earliest = ms_to_datetime(start_ms - self.duration_ms + 1)
        return self.cron.latest_at_or_before(ms_to_datetime(end_ms - 1), earliest) is not None


@dataclass(frozen=True, slots=True)
class _Rule:
    config: AlertConfig
    maintenance: tuple[_Maintenance, ...]

    def in_maintenance(self, score: Score) -> bool:
        return any(m.overlaps(score.asset, score.start_ms, score.end_ms) for m in self.maintenance)


def in_maintenance(rule: AlertConfig, asset: str, start_ms: int, end_ms: int) -> bool:
    """True when ``[start_ms, end_ms)`` of ``asset`` overlaps one of the rule's maintenance windows."""
    return any(_Maintenance.of(m).overlaps(asset, start_ms, end_ms) for m in rule.maintenance)


@dataclass
class _Evidence:
    """Exceeding windows gathered for one incident."""

    first_start_ms: int
    peak: float
    ratio: float
    count: int
    sums: dict[str, float]
    excursion: Excursion | None = None  # the windows' largest (aftermath), counted once the incident opens
    off: dict[str, float] = field(default_factory=dict)  # sensors far outside training: the farthest (farther)

    @classmethod
    def of(cls, scores: Sequence[Score], rule: AlertConfig) -> _Evidence:
        evidence = cls(scores[0].start_ms, -math.inf, 0.0, 0, {})
        for score in scores:
            evidence.add(score, rule)
        return evidence

    def add(self, score: Score, rule: AlertConfig) -> None:
        if rule.aftermath is not None:
            self.excursion = _larger(self.excursion, _excursion_of(score, rule), rule.aftermath.half_life_s)
        self.first_start_ms = min(self.first_start_ms, score.start_ms)
        self.peak = max(self.peak, score.level)
        self.ratio = max(self.ratio, _ratio(score.level, score.threshold))
        self.count += 1
        for sensor, err in score.sensor_errors.items():
            self.sums[sensor] = self.sums.get(sensor, 0.0) + err
        self.off = farther(self.off, score.off_training)


def farther(kept: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
    """Per sensor, the signed distance from training (``Score.off_training``) farther from 0 of the two."""
    out = dict(kept)
    for sensor, distance in new.items():
        if abs(distance) > abs(out.get(sensor, 0.0)):
            out[sensor] = distance
    return out


@dataclass
class _Pending:
    since_ms: int  # end of the window at which k-of-n first held (continuously since)
    evidence: _Evidence


def _listed_sums(record: AlertRecord, sensors: Sequence[str]) -> dict[str, float]:
    """The listed sensors' errors of a record without ``error_sums``, plus the unlisted sensors' remainder."""
    sums = {str(e["sensor"]): float(e["error"]) for e in record.top_sensors}
    largest = max(record.top_sensors, key=lambda e: float(e["share"]), default=None)
    if largest is not None and float(largest["share"]) > 0 and not set(sensors) <= set(sums):
        rest = float(largest["error"]) / float(largest["share"]) - sum(sums.values())
        if rest > 0:
            sums[_REST] = rest
    return sums


@dataclass
class _Open:
    record: AlertRecord
    error_sums: dict[str, float]
    ratio: float
    rank: int
    below: int = 0
    exact: bool = True  # error_sums are every sensor's, unrounded (not rebuilt from a record stored without them)

    def stored_sums(self) -> dict[str, float] | None:
        """What the record keeps as ``error_sums``: None for an incident rebuilt from a record stored without them
        (its sums are rounded, and its unlisted sensors one remainder), so they never pass for exact."""
        return dict(self.error_sums) if self.exact else None

    @classmethod
    def restore(cls, record: AlertRecord, rule: AlertConfig, sensors: Sequence[str]) -> _Open:
        """From a stored record: its every sensor's error sums, so the ranking goes on as if there had been no
        restart. A record stored before those were kept gives the listed sensors' (rounded) errors, plus (when the
        group has sensors beyond the list) their remainder, estimated from the largest listed share, so shares stay
        right; a sensor beyond the list can then never enter it."""
        exact = record.error_sums is not None
        sums = dict(record.error_sums) if exact else _listed_sums(record, sensors)
        names = [t.name for t in rule.tiers]
        if record.severity in names:
            # the ratio only decides the rank, and the largest per-window ratio is not stored (peak / the opening
            # threshold is not it when a model swap changed the threshold mid-incident): the stored tier's multiple
            rank = names.index(record.severity)
            return cls(record, sums, rule.tiers[rank].multiple, rank, exact=exact)
        ratio = _ratio(record.peak_score, record.threshold)  # the tiers changed: rank the peak afresh
        return cls(record, sums, ratio, _tier_rank(ratio, rule), exact=exact)


@dataclass
class _AssetAlerts:
    recent: deque[Score]
    last_end_ms: int = _NEVER
    current: _Open | None = None
    pending: _Pending | None = None
    cooldown_until_ms: int = _NEVER
    restored: bool = False
    backlog: list[AlertEvent] = field(default_factory=list)
    ewma: float | None = None  # the smoothed score after the window ending at ewma_end_ms, by model ewma_version
    ewma_end_ms: int = _NEVER
    ewma_version: str | None = None
    ewma_threshold: float = 0.0  # that model's threshold
    excursion: Excursion | None = None  # aftermath: of the windows of its incidents, the largest decayed ratio
    maintenance: bool = False  # whether the last window judged lay in a maintenance window


@dataclass
class AlertEngine:
    """Holds the alert state of every asset seen so far; one rule per group."""

    groups: Iterable[GroupConfig]
    _rules: dict[str, _Rule] = field(init=False)
    _strides_ms: dict[str, int] = field(init=False)
    _sensors: dict[str, list[str]] = field(init=False)
    _assets: dict[str, _AssetAlerts] = field(init=False, default_factory=dict)
    _backlogged: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        groups = list(self.groups)
        self._rules = {g.name: _Rule(g.alert, tuple(_Maintenance.of(m) for m in g.alert.maintenance)) for g in groups}
        self._strides_ms = {g.name: g.window.stride * g.period_ms for g in groups}
        self._sensors = {g.name: g.sensor_names for g in groups}

    def history_windows(self) -> int:
        """How many latest scores per asset ``restore`` needs to rebuild the state exactly (k-of-n history, the
        resolve count, and the time pending towards ``min_duration_s``)."""
        needed = 1
        for name, rule in self._rules.items():
            c = rule.config
            # a pending incident's evidence reaches n - 1 windows before k-of-n first held, which can be up to
            # min_duration_s plus n windows (the next exceeding window) before the incident opens
            pending = 2 * c.n + math.ceil(c.min_duration_s * 1000 / max(self._strides_ms[name], 1))
            needed = max(needed, c.n, c.clear_after, pending)
        return needed

    def aftermath_lookback_ms(self, group: str) -> int | None:
        """How far before an asset's latest window its stored incident windows can still raise the bar (None: the
        group has no aftermath rule): the highest bar, the top tier's multiple, decays to 1 by then."""
        rule = self._rules[group].config
        if rule.aftermath is None:
            return None
        return math.ceil(rule.aftermath.half_life_s * 1000 * math.log2(rule.tiers[-1].multiple))

    def unrestored(self, assets: Iterable[str]) -> list[str]:
        """Assets whose state has not been loaded from the database yet in this process."""
        return sorted({a for a in assets if a not in self._assets or not self._assets[a].restored})

    def restore(self, asset: str, group: str, *, open_alert: AlertRecord | None, recent: Sequence[Score],
                last_resolved: AlertRecord | None = None, excursions: Sequence[Score] = ()) -> None:
        """Rebuild an asset's state from its stored open alert, its latest scores (any order) and, when given, its
        latest resolved alert (restores the cooldown and keeps that incident's windows out of the next one) and,
        for the aftermath peak, the exceeding windows of its stored incidents whose level exceeded ``1 / relative`` x
        their threshold within ``aftermath_lookback_ms`` of its latest window (older or smaller ones cannot raise the
        bar; ``repo.excursions``).

        The scores are replayed without opening an alert; updates or a resolution of ``open_alert`` that they imply
        (e.g. after a configuration change) are returned by the next ``process`` call.
        """
        rule = self._rules[group]
        state = _AssetAlerts(recent=deque(maxlen=rule.config.n), restored=True)
        floor = _NEVER
        if last_resolved is not None and last_resolved.closed_ms is not None:
            state.cooldown_until_ms = last_resolved.closed_ms + round(rule.config.cooldown_s * 1000)
            floor = last_resolved.closed_ms
        if open_alert is not None:
            state.current = _Open.restore(open_alert, rule.config, self._sensors[group])
            floor = max(floor, open_alert.last_seen_ms)
        state.last_end_ms = floor  # windows up to here are in the stored alerts already
        if recent:
            latest = max(recent, key=lambda s: s.end_ms)
            state.ewma, state.ewma_end_ms, state.ewma_version = latest.smoothed, latest.end_ms, latest.model_version
            state.ewma_threshold = latest.threshold
        aftermath = rule.config.aftermath
        if aftermath is not None:
            for score in excursions:
                if not rule.in_maintenance(score):
                    state.excursion = _larger(state.excursion, _excursion_of(score, rule.config),
                                              aftermath.half_life_s)
        for score in sorted(recent, key=lambda s: s.end_ms):
            if score.end_ms <= state.last_end_ms:
                continue
            state.last_end_ms = score.end_ms
            state.maintenance = rule.in_maintenance(score)
            event = self._step(state, score, rule, replay=True, maintenance=state.maintenance)
            if event is not None:
                state.backlog.append(event)
        self._assets[asset] = state
        if state.backlog:
            self._backlogged.add(asset)

    def quiet(self, score: Score) -> bool:
        """Whether ``score``'s asset is quiet right after its window was judged (the asset's latest): the window's
        score and level (smoothed, which lags) are at or below the bare threshold (a level the aftermath rule holds
        back is not quiet), it is outside maintenance, and the asset has no open alert and no exceeding window in its
        k-of-n history. What drift following may learn from."""
        state = self._assets.get(score.asset)
        if state is None or max(score.score, score.level) > score.threshold or state.current is not None:
            return False
        return not state.maintenance and not any(s.is_anomaly for s in state.recent)

    def forget(self, assets: Iterable[str]) -> None:
        """Drop in-memory state (e.g. after a partition moved away); it is restored from the database if needed."""
        for asset in assets:
            self._assets.pop(asset, None)
            self._backlogged.discard(asset)

    def smooth(self, scores: Iterable[Score], alphas: Mapping[str, float | None]) -> list[Score]:
        """The scores (sorted by asset and window end) with ``smoothed`` set where their group's ``alphas`` entry is
        not None: ``alpha * score + (1 - alpha) * previous smoothed`` of the asset. The stream starts again from the
        raw score at an asset's first window and after a maintenance window. When the model version changes, the
        previous level is carried over as a fraction of the threshold (``previous / old threshold x new
        threshold``): a new model's scores are on its own scale, and starting its stream from a raw score would
        judge the first windows after every retrain almost unsmoothed against a threshold fitted on smoothed ones.

        The state continues across calls and, through ``restore`` (the latest stored smoothed score), across
        restarts; windows at or before the last one smoothed (replays) and maintenance windows are returned
        unchanged. Call ``restore`` first for assets the process has not seen, and ``forget`` when the transaction
        storing the result fails.
        """
        out: list[Score] = []
        for score in sorted(scores, key=lambda s: (s.asset, s.end_ms)):
            state = self._state_of(score)
            alpha = alphas.get(score.group)
            if score.end_ms <= state.ewma_end_ms:
                out.append(score)
                continue
            if alpha is None or self._rules[score.group].in_maintenance(score):
                state.ewma, state.ewma_end_ms = None, score.end_ms
                out.append(score)
                continue
            previous = state.ewma
            if previous is not None and state.ewma_version != score.model_version:
                previous = previous / state.ewma_threshold * score.threshold if state.ewma_threshold > 0 else None
            level = score.score if previous is None else alpha * score.score + (1.0 - alpha) * previous
            state.ewma, state.ewma_end_ms, state.ewma_version = level, score.end_ms, score.model_version
            state.ewma_threshold = score.threshold
            out.append(replace(score, smoothed=level))
        return out

    def _state_of(self, score: Score) -> _AssetAlerts:
        n = self._rules[score.group].config.n
        return self._assets.setdefault(score.asset, _AssetAlerts(recent=deque(maxlen=n)))

    def process(self, scores: Iterable[Score]) -> list[AlertEvent]:
        """Feed scores (any order across assets; sorted by window end per asset here) and return alert events."""
        return self.judge(scores)[1]

    def judge(self, scores: Iterable[Score]) -> tuple[list[Score], list[AlertEvent]]:
        """Feed scores (any order across assets) and return them, sorted by asset and window end, with their
        ``aftermath_floor`` set where the group's rule has an ``aftermath`` and an earlier incident raised the bar
        (store these: their ``is_anomaly`` is what the rules judged), and the alert events.

        Windows at or before the last one judged (replays) are returned unchanged and judged no further. Floors are
        exact in any batching and, through ``restore``, across restarts: the largest decayed ratio of past incident
        windows has the same arg max at every later time, so one (ratio, time) pair per asset carries it.
        """
        events: list[AlertEvent] = []
        for asset in sorted(self._backlogged):
            events.extend(self._assets[asset].backlog)
            self._assets[asset].backlog.clear()
        self._backlogged.clear()
        judged: list[Score] = []
        for score in sorted(scores, key=lambda s: (s.asset, s.end_ms)):
            rule = self._rules[score.group]
            state = self._state_of(score)
            if score.end_ms <= state.last_end_ms:
                judged.append(score)
                continue
            state.last_end_ms = score.end_ms
            state.maintenance = rule.in_maintenance(score)
            floor = None if state.maintenance else _aftermath_floor(state.excursion, score, rule.config)
            if floor is not None:
                score = replace(score, aftermath_floor=floor)
            judged.append(score)
            event = self._step(state, score, rule, replay=False, maintenance=state.maintenance)
            if event is not None:
                events.append(event)
        return judged, events

    @staticmethod
    def _step(state: _AssetAlerts, score: Score, rule: _Rule, *, replay: bool, maintenance: bool) -> AlertEvent | None:
        if maintenance:
            state.recent.clear()
            state.pending = None
            if state.current is not None:
                state.current.below = 0
            return None
        state.recent.append(score)
        if state.current is not None:
            return AlertEngine._step_open(state, state.current, score, rule.config)
        return AlertEngine._step_closed(state, score, rule.config, replay=replay)

    @staticmethod
    def _step_closed(state: _AssetAlerts, score: Score, cfg: AlertConfig, *, replay: bool) -> AlertEvent | None:
        flagged = [s for s in state.recent if s.is_anomaly]
        if len(flagged) < cfg.k or score.end_ms < state.cooldown_until_ms:
            state.pending = None  # in a cooldown the time pending does not run (k-of-n history still fills)
            return None
        if state.pending is None:
            state.pending = _Pending(score.end_ms, _Evidence.of(flagged, cfg))
        elif score.is_anomaly:
            state.pending.evidence.add(score, cfg)
        if replay or not score.is_anomaly:
            return None
        if score.end_ms - state.pending.since_ms < cfg.min_duration_s * 1000:
            return None
        evidence = state.pending.evidence
        rank = _tier_rank(evidence.ratio, cfg)
        record = AlertRecord(
            asset=score.asset, group=score.group, opened_ms=evidence.first_start_ms, last_seen_ms=score.end_ms,
            closed_ms=None, peak_score=evidence.peak, threshold=score.threshold, severity=cfg.tiers[rank].name,
            status="open", window_count=evidence.count, top_sensors=top_sensors(evidence.sums, cfg.top_sensors),
            model_version=score.model_version, error_sums=dict(evidence.sums), off_training=dict(evidence.off),
        )
        state.current = _Open(record, dict(evidence.sums), evidence.ratio, rank)
        state.pending = None
        if cfg.aftermath is not None:  # the incident's windows count towards the aftermath from now on
            state.excursion = _larger(state.excursion, evidence.excursion, cfg.aftermath.half_life_s)
        return AlertEvent("opened", record)

    @staticmethod
    def _step_open(state: _AssetAlerts, current: _Open, score: Score, cfg: AlertConfig) -> AlertEvent | None:
        previous = current.record
        if score.is_anomaly:
            current.below = 0
            if cfg.aftermath is not None:
                state.excursion = _larger(state.excursion, _excursion_of(score, cfg), cfg.aftermath.half_life_s)
            for sensor, err in score.sensor_errors.items():
                current.error_sums[sensor] = current.error_sums.get(sensor, 0.0) + err
            current.ratio = max(current.ratio, _ratio(score.level, score.threshold))
            current.rank = max(current.rank, _tier_rank(current.ratio, cfg))
            current.record = replace(
                previous, last_seen_ms=score.end_ms, peak_score=max(previous.peak_score, score.level),
                window_count=previous.window_count + 1, severity=cfg.tiers[current.rank].name,
                top_sensors=top_sensors(current.error_sums, cfg.top_sensors), model_version=score.model_version,
                error_sums=current.stored_sums(), off_training=farther(previous.off_training or {}, score.off_training),
                group=score.group,  # the asset's group now (renamed, or the asset moved, while the alert was open)
            )
            return AlertEvent("updated", current.record, previous_severity=previous.severity)
        if score.level > cfg.exit_level * score.bar:
            current.below = 0  # between the exit level and the threshold: still inside the incident
            return None
        current.below += 1
        if current.below < cfg.clear_after:
            return None
        record = replace(previous, closed_ms=score.end_ms, status="resolved", group=score.group)
        state.current = None
        state.pending = None
        state.recent.clear()
        state.cooldown_until_ms = score.end_ms + round(cfg.cooldown_s * 1000)
        return AlertEvent("resolved", record)
