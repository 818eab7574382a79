"""The consume loop: poll -> decode -> window -> score -> decide -> persist (one transaction) -> commit offsets.

Offsets are committed only after the transaction holding the batch's results has committed, and never past the oldest
record an open window still needs, so a crash at any point loses nothing: the replay rebuilds the open windows. The same
transaction records, per asset, where its next window starts and, per partition, which offsets are processed; a
restarted or newly assigned consumer resumes from there, so every window is scored exactly once and replayed rejects
are not sent to the dead-letter topic again. A database or broker outage stops progress (no commits) and is retried
with backoff; a bad message never stops the loop, it goes to the dead-letter topic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.bundle import METADATA, WEIGHTS
from models.detector import Detector
from pipeline import kafka_io
from pipeline.alert_format import duration_text, off_training_text, sensors_text
from pipeline.alerting import AlertEngine
from pipeline.config import Config, GroupConfig, KafkaConfig
from pipeline.decode import Decoder
from pipeline.drift import DriftTracker, ForwardPass, forward_pass, judge
from pipeline.errors import ModelError, ModelMismatch, TransientError
from pipeline.metrics import PipelineMetrics, serve
from pipeline.registry import bundle_path, load_servable, load_version
from pipeline.sinks import AlertSinks, build_sinks
from pipeline.store import repo
from pipeline.store.db import describe_error, make_engine, make_sessionmaker, schema_problem
from pipeline.store.tables import ModelVersion, WindowScore
from pipeline.types import AlertEvent, Reading, Rejected, Score, SkippedWindow, Window, ms_to_iso
from pipeline.windowing import WindowBatch, Windower

log = logging.getLogger(__name__)
T = TypeVar("T")
STATUS_EVERY_S = 300.0  # the loop logs what it did this often (readings, windows, alerts, rejects by reason)
REFUSED_RETRY_S = 60.0  # a refused bundle (missing, unreadable, failing its checksum) is tried again this often
BUNDLE_REMIND_S = 3600.0  # a served model's bundle gone or damaged on disk is reported again this often
BROKER_PROBE_S = 10.0  # empty polls for this long: ask whether a broker still answers (at most this often)
BROKER_PROBE_TIMEOUT_MS = 5000


class Fenced(Exception):
    """Another consumer owns these partitions now; this one's results for them must not be written."""

    def __init__(self, partitions: set[int]) -> None:
        super().__init__(f"partitions {sorted(partitions)} are owned by another consumer")
        self.partitions = partitions


@dataclass
class RunStats:
    """Running totals of one pipeline process."""

    batches: int = 0
    readings: int = 0  # valid readings placed on a grid (not late, not duplicate, not replayed)
    rejected: Counter[str] = field(default_factory=Counter)
    replayed: int = 0
    windows_scored: int = 0
    windows_skipped: int = 0
    alerts_opened: int = 0
    alerts_resolved: int = 0
    commits: int = 0
    last_batch_s: float = 0.0

    def snapshot(self) -> RunStats:
        """A copy that later batches do not change."""
        return replace(self, rejected=Counter(self.rejected))

    def since(self, before: RunStats, seconds: float) -> str | None:
        """One line on what happened since ``before`` (a snapshot ``seconds`` ago), for the log; None when nothing
        arrived."""
        rejected = self.rejected - before.rejected
        readings = self.readings - before.readings
        replayed = self.replayed - before.replayed
        if not readings and not rejected and not replayed and self.windows_scored == before.windows_scored:
            return None
        line = (f"last {seconds:.0f} s: {readings:,} readings, {self.windows_scored - before.windows_scored:,} "
                f"windows scored, {self.windows_skipped - before.windows_skipped:,} skipped, "
                f"{self.alerts_opened - before.alerts_opened} alert(s) opened, "
                f"{self.alerts_resolved - before.alerts_resolved} resolved, "
                f"{sum(rejected.values()):,} rejected")
        if rejected:
            line += " (" + ", ".join(f"{reason} {n:,}" for reason, n in rejected.most_common()) + ")"
        if replayed:  # a re-read of what this database has (a restart, a new group_id): its progress shows
            line += f"; {replayed:,} records replayed (processed before)"
        return line


@dataclass
class _BundleLook:
    """The last look at the bundle of a model served from memory: its files' sizes and times (None: gone; text:
    unreadable), what is wrong with it, and when that was last reported (monotonic)."""

    version: str
    files: tuple[tuple[int, int], ...] | str | None = ()
    problem: str | None = None
    reported: float = -math.inf


class Runner:
    """Composes the steps over injected clients; owns the transaction and the offset commit."""

    def __init__(self, config: Config, *, sessions: sessionmaker[Session], detectors: dict[str, Detector],
                 producer: KafkaProducer, stop: threading.Event, metrics: PipelineMetrics | None = None,
                 sinks: AlertSinks | None = None, reported: Mapping[str, str] | None = None) -> None:
        """``reported``: group -> why it has no usable model, for the groups whose missing or refused model the
        caller has logged already (the first reload does not log their refusal again)."""
        self.config = config
        self.stats = RunStats()
        self.metrics = metrics or PipelineMetrics(config.metrics.unhealthy_after_s)
        self._sessions = sessions
        self._detectors = detectors
        self._producer = producer
        self._stop = stop
        self._sinks = sinks  # alert events for Kafka/webhook: queued in the outbox, delivered by their threads
        self._decoder = Decoder(config.groups, config.kafka.max_message_bytes, config.ingest)
        self._windower = Windower(config.groups)
        self._alerts = AlertEngine(config.groups)
        self._drift = DriftTracker(config.groups)
        self._groups = config.asset_groups()
        self._history = self._alerts.history_windows()
        self._next_offset: dict[int, int] = {}
        self._processed_before: dict[int, int] = {}  # partition -> processed_upto left by a previous owner
        self._consumer: KafkaConsumer | None = None  # set by run(); the lag is followed through it while waiting
        self._in_hand: dict[int, int] = {}  # partition -> first offset of the batch being processed (lag counts it)
        self._saved_starts: dict[str, int] = {}
        self._revoked: set[int] = set()
        self._owner = repo.new_holder()
        self._joined = False  # the consumer completed a join of its group (an assignment, possibly empty)
        self.metrics.set_models({g: d.version for g, d in detectors.items()})
        self._reload_every = config.retrain.reload_interval_s
        self._next_reload = time.monotonic() + self._reload_every
        # (version, activated_at) whose bundle was refused -> when to try it again (monotonic; inf: not before it is
        # activated again)
        self._refused_models: dict[tuple[str, datetime | None], float] = {}
        self._bundles_seen: dict[str, _BundleLook] = {}  # group -> the last look at its served model's bundle
        self._reported = set(reported or {})
        self._unserved = dict(reported or {})  # group -> why its active model is not served (pipeline_instances)
        self._started = time.monotonic()  # reported as a time on the database's clock (``report_serving``)
        self._held_raw: dict[tuple[int, int], kafka_io.RawRecord] = {}  # raw records of held readings
        self._heard_at = time.monotonic()  # the last news of the broker: records, a probe, an idle-close query
        self._broker_down = False  # the broker did not answer a probe or an idle-close query (/healthz: 503)
        self._unserved_logged: dict[str, int] = {}  # group without a model -> when its dropped windows were logged
        self._unserved_dropped: Counter[str] = Counter()  # group -> windows dropped unscored since the start

    # -- rebalance hooks (called from inside poll) ---------------------------------------------------------------
    def partitions_revoked(self, partitions: set[int]) -> None:
        """Remember what was revoked; state is dropped once the new assignment shows what was really lost.

        kafka-python keeps the fetch position of a partition that is revoked and assigned again in the same
        rebalance, so its open windows must be kept too (they are not replayed).
        """
        self._revoked |= partitions

    def partitions_assigned(self, partitions: set[int]) -> None:
        """Drop the state of partitions that went to another consumer (the new owner resumes them)."""
        self._joined = True  # called at the end of every join, with an empty set too: a member that got nothing
        lost, self._revoked = self._revoked - partitions, set()
        self._drop_partitions(lost)
        if partitions or lost:
            log.info("partitions assigned: %s, handed over: %s", sorted(partitions), sorted(lost))

    def partitions_lost(self, partitions: set[int]) -> None:
        """The group evicted us (e.g. after a pause beyond max.poll.interval.ms): positions are gone, so is the state.
        When the partitions come back they are replayed from the committed offsets and resumed from the database."""
        log.warning("partitions lost without a clean hand-over: %s", sorted(partitions))
        self._drop_partitions(partitions)
        self._revoked -= partitions

    def _drop_partitions(self, partitions: set[int]) -> None:
        assets = self._windower.forget_partitions(partitions)
        self._alerts.forget(assets)
        self._drift.forget(assets)
        for asset in assets:
            self._saved_starts.pop(asset, None)
        for p in partitions:
            self._next_offset.pop(p, None)
            self._processed_before.pop(p, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(p))

    # -- one batch -------------------------------------------------------------------------------------------------
    def process(self, records: Sequence[kafka_io.RawRecord], now_ms: int, idle_partitions: set[int] | None = None
                ) -> dict[int, int]:
        """Run one polled batch (possibly empty: then only idle windows close) through every step.

        Returns the offsets that are now safe to commit. Raises TransientError when the stop flag is set while the
        database or broker is unavailable (nothing of this batch is committed then; a restart replays it).
        """
        started = time.perf_counter()
        self._in_hand = {}
        for r in records:  # in offset order per partition: the first is the least
            self._in_hand.setdefault(r.partition, r.offset)
        readings, rejected = self._decoder.decode_batch(
            ((r.topic, r.partition, r.offset, r.key, r.value, r.timestamp_ms) for r in records), now_ms
        )
        if records:
            self._retry(lambda: self._load_restart_state(records, readings))
        batch = self._windower.add(readings, now_ms)
        idle = self._windower.close_idle(now_ms, idle_partitions)
        batch.windows += idle.windows
        batch.skipped += idle.skipped
        batch.jumped += idle.jumped
        if len(self._detectors) < len(self.config.groups):
            batch.windows = self._drop_unserved(batch.windows, now_ms)
        rejected += self._rejects_from(records, batch)
        self._keep_held_bytes(records)
        # a held reading is decided only later, possibly by a new owner after a restart: its verdict is always sent
        fresh = [r for r in rejected
                 if r.reason == "ts_jump" or r.offset >= self._processed_before.get(r.partition, -1)]
        processed = {r.partition: r.offset + 1 for r in records}  # records are in offset order per partition
        starts = self._windower.unsaved_window_starts()
        moved = {a: (self._groups[a].name, ms) for a, ms in starts.items() if self._saved_starts.get(a) != ms}
        if not (fresh or batch.windows or batch.skipped or processed or moved):
            self._windower.mark_saved(starts)  # unchanged since they were saved
            return {}
        self._retry(lambda: kafka_io.send_dead_letters(self._producer, self.config.kafka.dead_letter_topic, fresh))
        forward = forward_pass(batch.windows, self._detectors, self._drift)  # outside the transaction, once
        scores, events, batch.skipped, moved, processed = self._persist_owned(forward, batch.skipped, moved,
                                                                              processed)
        if self._sinks is not None and events:
            self._sinks.notify()  # the transaction holding the alerts and their outbox rows has committed
        self._saved_starts.update({a: ms for a, (_, ms) in moved.items()})
        self._windower.mark_saved(starts)  # stored, or equal to what was (or, fenced off, forgotten)
        self._next_offset.update(processed)
        self._in_hand = {}  # processed: the lag counts from the position again
        self._account(rejected, fresh, batch, scores, events, time.perf_counter() - started)
        _log_alerts(events)
        safe = self._windower.safe_offsets()
        return {p: min(nxt, safe.get(p, nxt)) for p, nxt in self._next_offset.items()}

    def _drop_unserved(self, windows: list[Window], now_ms: int) -> list[Window]:
        """The windows whose group has a model; the others are counted and dropped (logged once a minute per
        group), and their groups' stretches stay unmonitored until a model is activated (``reload_models``)."""
        served = [w for w in windows if w.group in self._detectors]
        dropped = Counter(w.group for w in windows if w.group not in self._detectors)
        self._unserved_dropped.update(dropped)
        for group, count in dropped.items():
            self.metrics.windows_unscored.labels(group=group).inc(count)
            if now_ms >= self._unserved_logged.get(group, 0) + 60_000:
                self._unserved_logged[group] = now_ms
                log.error("group %s has no usable model: %d window(s) dropped unscored, %d since the start "
                          "(activate one: 'sensorwatch train' or 'sensorwatch models activate')", group, count,
                          self._unserved_dropped[group])
        return served

    def _persist_owned(self, forward: ForwardPass, skipped: list[SkippedWindow], moved: dict[str, tuple[str, int]],
                       processed: dict[int, int]) -> tuple[list[Score], list[AlertEvent], list[SkippedWindow],
                                                           dict[str, tuple[str, int]], dict[int, int]]:
        """Judge and persist the batch's forward pass; when another consumer owns some of its partitions now (we lost
        them without noticing, e.g. after a long pause), drop their results and state and persist the rest. Returns
        what was written."""
        while True:
            try:
                scores, events = self._retry(functools.partial(self._persist, forward, skipped, moved, processed))
                return scores, events, skipped, moved, processed
            except Fenced as fenced:
                lost = fenced.partitions
                log.warning("partitions %s are owned by another consumer: dropping their results and state",
                            sorted(lost))
                partition_of = self._windower.partition_of  # used before _drop_partitions forgets them
                forward = forward.without({a for a in forward.assets if partition_of(a) in lost})
                skipped = [x for x in skipped if partition_of(x.asset) not in lost]
                moved = {a: v for a, v in moved.items() if partition_of(a) not in lost}
                processed = {p: o for p, o in processed.items() if p not in lost}
                self._drop_partitions(lost)

    def _rejects_from(self, records: Sequence[kafka_io.RawRecord], batch: WindowBatch) -> list[Rejected]:
        """Late, duplicate and jumped readings (and readings with some duplicate values) as dead-letter records with
        the original bytes."""
        if not (batch.late or batch.duplicates or batch.partial_duplicates or batch.jumped):
            return []
        raw = {(r.partition, r.offset): r for r in records}

        def source(reading: Reading) -> tuple[bytes | None, bytes | None, str]:
            """The reading's record: from this batch, or kept since it was held in an earlier one."""
            rec = raw.get((reading.partition, reading.offset))
            return (rec.value, rec.key, rec.topic) if rec else self._held_bytes(reading)

        out: list[Rejected] = []
        details = {"late": "window already closed", "duplicate": "sensor value already received for this grid step",
                   "ts_jump": "far ahead of the asset's stream, and its next reading did not follow"}
        for reason, readings in (("late", batch.late), ("duplicate", batch.duplicates), ("ts_jump", batch.jumped)):
            for reading in readings:
                value, key, topic = source(reading)
                detail = f"{reading.asset} at {ms_to_iso(reading.ts_ms)}: {details[reason]}"
                out.append(Rejected(reason, detail, value, key, topic, reading.partition, reading.offset))
        for reading, taken in batch.partial_duplicates:
            value, key, topic = source(reading)
            detail = (f"{reading.asset} at {ms_to_iso(reading.ts_ms)}: {', '.join(taken)[:200]} already received for "
                      f"this grid step (used: {', '.join(s for s in reading.values if s not in taken)[:80]})")
            out.append(Rejected("duplicate", detail, value, key, topic, reading.partition, reading.offset,
                                partial=True))
        return out

    def _held_bytes(self, reading: Reading) -> tuple[bytes | None, bytes | None, str]:
        """(value, key, topic) of a held reading that arrived in an earlier batch."""
        rec = self._held_raw.get((reading.partition, reading.offset))
        return (rec.value, rec.key, rec.topic) if rec else (None, None, self.config.kafka.topic)

    def _keep_held_bytes(self, records: Sequence[kafka_io.RawRecord]) -> None:
        """Keep the raw records of the readings the windower holds (for their dead-letter record, should they turn
        out to be glitches in a later batch); forget the others."""
        held = self._windower.held_keys()
        if not held and not self._held_raw:
            return
        current = {(r.partition, r.offset): r for r in records}
        self._held_raw = {k: raw for k in held if (raw := self._held_raw.get(k) or current.get(k)) is not None}

    def _load_restart_state(self, records: Sequence[kafka_io.RawRecord], readings: Sequence[Reading]) -> None:
        """Read where the previous owner stopped: per new partition its processed offsets, per new asset its next
        window. One query each, and only when a batch brings partitions or assets this process has not seen."""
        partitions = {r.partition for r in records} - set(self._processed_before) - set(self._next_offset)
        assets = self._windower.unseen({r.asset for r in readings})
        if not partitions and not assets:
            return
        k = self.config.kafka
        ends = self._log_ends(partitions)
        topic_id = kafka_io.topic_id(self._consumer, k.topic) if partitions and self._consumer is not None else None
        with self._sessions.begin() as session:
            if partitions:
                # claim first: a previous owner that has not noticed the rebalance can no longer write them
                repo.claim_partitions(session=session, consumer_group=k.group_id, topic=k.topic,
                                      partitions=sorted(partitions), owner=self._owner, topic_id=topic_id)
                unsure = partitions  # partitions whose recorded progress only the log end can tell apart
                if topic_id is not None:
                    forgotten, unsure = repo.reconcile_topic_id(session=session, topic=k.topic, topic_id=topic_id,
                                                                partitions=sorted(partitions))
                    if forgotten:
                        log.warning("%s was deleted and re-created (its id is now %s): the progress recorded for "
                                    "the earlier topic (%s) is forgotten and these records are processed as new",
                                    k.topic, topic_id, ", ".join(f"partition {p} up to offset {upto}"
                                                                  for p, upto in sorted(forgotten.items())))
                # any group's: after a change of group_id the records the old group processed are not dead-lettered
                # again, nor their readings reported late (their windows are stored)
                stored = repo.load_topic_progress(session=session, topic=k.topic)
                stale = {p: stored[p] for p in sorted(unsure) if p in ends and stored.get(p, -1) > ends[p]}
                if stale:  # offsets only grow: progress past a log's end was recorded for an earlier topic
                    log.warning("%s: %s: the topic was re-created, or its log truncated; that progress is "
                                "forgotten and these records are processed as new", k.topic, "; ".join(
                                    f"partition {p} ends at offset {ends[p]}, before the {upto} recorded as processed"
                                    for p, upto in stale.items()))
                    repo.forget_progress_beyond(session=session, topic=k.topic, ends={p: ends[p] for p in stale})
                    stored = repo.load_topic_progress(session=session, topic=k.topic)
                for p in partitions:
                    self._processed_before[p] = stored.get(p, -1)
                    self._windower.set_replay_boundary(p, stored.get(p, -1))
            for asset, start_ms in repo.load_asset_progress(session=session, assets=sorted(assets)).items():
                self._windower.resume(asset, start_ms)
                self._saved_starts[asset] = start_ms

    def _log_ends(self, partitions: set[int]) -> dict[int, int]:
        """Per partition, its log end as the fetch that brought its records reported it (the high watermark: no
        broker call); partitions without one are left out, all of them before ``run`` (no consumer)."""
        out: dict[int, int] = {}
        if self._consumer is None:
            return out
        for p in partitions:
            with contextlib.suppress(KafkaError):  # no longer assigned: nothing to tell
                end = self._consumer.highwater(TopicPartition(self.config.kafka.topic, p))
                if end is not None:
                    out[p] = end
        return out

    def _persist(self, forward: ForwardPass, skipped: list[SkippedWindow], moved: dict[str, tuple[str, int]],
                 processed: dict[int, int]) -> tuple[list[Score], list[AlertEvent]]:
        assets = sorted(forward.assets)
        k = self.config.kafka
        try:
            with self._sessions.begin() as session:
                self._restore(session, assets)
                scores, events = judge(forward, self._detectors, self._alerts, self._drift)
                repo.insert_scores(session=session, scores=scores)
                written = repo.upsert_alerts(session=session, alerts=[e.alert for e in events])
                events = self._resolved_elsewhere(events, written)
                if self._sinks is not None:
                    repo.enqueue_outbox(session=session, rows=self._sinks.outbox_rows(events),
                                        now=datetime.now(UTC))
                repo.insert_skipped(session=session, skipped=skipped)
                repo.save_asset_progress(session=session, progress=moved)
                touched = {self._windower.partition_of(a) for a in
                           [*assets, *(x.asset for x in skipped), *moved]} - {None}
                fenced = repo.save_consumer_progress(session=session, consumer_group=k.group_id, topic=k.topic,
                                                     processed=processed, owner=self._owner,
                                                     also_owned=sorted(p for p in touched if p is not None))
                if fenced:
                    raise Fenced(fenced)
        except BaseException:
            self._alerts.forget(assets)  # the transaction did not commit: rebuild from the database next time
            self._drift.forget(assets)
            raise
        return scores, events

    def _resolved_elsewhere(self, events: list[AlertEvent], written: set[tuple[str, int]]) -> list[AlertEvent]:
        """The events whose alert the upsert wrote. An alert it left alone was resolved meanwhile (``sensorwatch
        alerts resolve``): its events are not sent, and the asset's alert state is rebuilt from the database at its
        next window, so a new incident can open."""
        stale = {e.alert.asset for e in events if (e.alert.asset, e.alert.opened_ms) not in written}
        if not stale:
            return events
        log.warning("alerts of %s were resolved outside this pipeline: their state is read again from the database",
                    ", ".join(sorted(stale)))
        self._alerts.forget(stale)
        self._drift.forget(stale)
        return [e for e in events if (e.alert.asset, e.alert.opened_ms) in written]

    def _restore(self, session: Session, assets: list[str]) -> None:
        todo = self._alerts.unrestored(assets)  # drift state is forgotten and restored together with it
        if not todo:
            return
        opened = {row.asset: repo.alert_record(row) for row in repo.open_alerts(session=session, assets=todo)}
        recent = repo.recent_scores(session=session, assets=todo, limit=self._history)
        closed = repo.last_resolved_alerts(session=session, assets=todo)
        resolved = {row.asset: repo.alert_record(row) for row in closed}
        excursions = self._stored_excursions(session, {a: recent[a] for a in todo if recent.get(a)})
        for asset in todo:
            self._drift.restore(asset, repo.score_of(recent[asset][-1]) if recent.get(asset) else None)
            self._alerts.restore(
                asset, self._groups[asset].name, open_alert=opened.get(asset),
                recent=[repo.score_of(row) for row in recent.get(asset, [])], last_resolved=resolved.get(asset),
                excursions=excursions.get(asset, []),
            )

    def _stored_excursions(self, session: Session, recent: dict[str, list[WindowScore]]) -> dict[str, list[Score]]:
        """Per asset with stored scores whose group has an aftermath rule: the stored incident windows that can still
        raise its bar (those within ``aftermath_lookback_ms`` of its latest stored window; one query per group)."""
        by_group: dict[str, dict[str, datetime]] = defaultdict(dict)
        for asset, series in recent.items():
            group = self._groups[asset]
            lookback = self._alerts.aftermath_lookback_ms(group.name)
            if lookback is not None:
                by_group[group.name][asset] = series[-1].window_end - timedelta(milliseconds=lookback)
        out: dict[str, list[Score]] = {}
        for name, since in by_group.items():
            aftermath = self.config.group(name).alert.aftermath
            assert aftermath is not None  # a lookback exists only with an aftermath rule
            rows = repo.excursions(session=session, since=since, relative=aftermath.relative)
            out.update({a: [repo.score_of(r) for r in series] for a, series in rows.items()})
        return out

    def _account(self, rejected: list[Rejected], fresh: list[Rejected], batch: WindowBatch, scores: list[Score],
                 events: list[AlertEvent], seconds: float) -> None:
        s, m = self.stats, self.metrics
        placed = batch.placed
        s.batches += 1
        s.readings += placed
        # replayed rejects, except partial ones: their record is counted already, as a replayed or rebuilt reading
        stale = sum(not r.partial for r in rejected) - sum(not r.partial for r in fresh)
        s.replayed += batch.replayed + batch.rebuilt + stale
        s.rejected.update(r.reason for r in fresh)
        s.windows_scored += len(scores)
        s.windows_skipped += len(batch.skipped)
        s.alerts_opened += sum(e.kind == "opened" for e in events)
        s.alerts_resolved += sum(e.kind == "resolved" for e in events)
        s.last_batch_s = seconds
        m.readings.inc(placed)
        for reason, count in Counter(r.reason for r in fresh).items():
            m.rejects.labels(reason=reason).inc(count)
        m.late.inc(len(batch.late))
        for group, count in Counter(x.group for x in scores).items():
            m.windows_scored.labels(group=group).inc(count)
        for group, count in Counter(x.group for x in batch.skipped).items():
            m.windows_skipped.labels(group=group).inc(count)
        for kind, count in Counter(e.kind for e in events).items():
            m.alerts.labels(kind=kind).inc(count)
        m.batch_seconds.observe(seconds)

    def _retry(self, step: Callable[[], T], *, watched: bool = True) -> T:
        """Run ``step`` until it succeeds, backing off on database/broker failures; give up only when stopping. While
        it waits, ``/healthz`` gives the failure and the lag gauges keep following the log end (``_stalled_lag``); a
        line says when the dependency is back. A ``watched`` step that has not returned for ``BLOCKED_CALL_S``
        shows on ``/healthz`` and ``/readyz`` before it fails (not a poll, which waits for records by design)."""
        delay, since = 0.5, None
        while True:
            try:
                with self.metrics.dependency_call() if watched else contextlib.nullcontext():
                    result = step()
            except (OperationalError, InterfaceError, TransientError, KafkaError) as exc:
                if isinstance(exc, (OperationalError, InterfaceError)):  # the database: URL masked, password scrubbed
                    text = describe_error(exc, self.config.database.url)
                else:
                    text = str(exc).splitlines()[0] if str(exc) else ""
                why = kafka_io.hint(text, sasl=self.config.kafka.security.sasl)
                reason = f"{type(exc).__name__}: {text[:300]}{why}"
                self.metrics.set_degraded(True, reason)
                if self._stop.is_set():
                    raise TransientError(f"stopping while a dependency is down: {exc}") from exc
                since = time.monotonic() if since is None else since
                log.warning("dependency unavailable (%s); retrying in %.1fs", reason, delay)
                self._stop.wait(delay)
                self.metrics.beat()  # waiting on a dependency is not a hung loop; /healthz reports the outage
                self._stalled_lag()
                delay = min(delay * 2, 30.0)
                continue
            self.metrics.set_degraded(False)
            if since is not None:
                log.info("dependency available again after %.0f s; going on", time.monotonic() - since)
            return result

    def _stalled_lag(self) -> None:
        """Refresh the lag gauges from the log end while the loop waits (they are otherwise set between batches),
        counting the batch it holds."""
        if self._consumer is not None and not self._stop.is_set():
            try:
                self._set_lag(kafka_io.lag_to_end(self._consumer, in_hand=self._in_hand))
            except Exception as exc:  # a look at the lag must never stop the pipeline
                log.debug("lag while waiting: %s", exc)

    def _set_lag(self, lags: dict[int, int]) -> None:
        for partition, lag in lags.items():
            self.metrics.lag.labels(partition=str(partition)).set(lag)

    # -- hot reload -------------------------------------------------------------------------------------------------
    def reload_models(self) -> dict[str, str]:
        """Swap in each group's newly active model version (call between batches). Returns ``group -> new version``.

        Open windows stay in the windower and are scored by the new model when they close, so no window is lost or
        scored twice. A bundle that fails verification is refused (logged once per activation) and the current model
        keeps serving; so does every model while the database cannot be read. A refused bundle is tried again every
        ``REFUSED_RETRY_S`` (it may have been missing only for a while, or put back) and at once when it is activated
        again, except one trained for another configuration (``ModelMismatch``), which waits for a new activation.
        """
        try:
            with self._sessions() as session:
                active = repo.active_model_versions(session=session)
        except DBAPIError as exc:
            log.warning("cannot check for newly active models (%s); the current ones keep serving", type(exc).__name__)
            # a process without readings (its assets quiet, no partition) finds a database outage only here: the
            # probes and sensorwatch_dependency_down say so, as for a failing batch, until a reload reads it again
            self.metrics.set_database_unread(f"{type(exc).__name__}: "
                                             f"{describe_error(exc, self.config.database.url)[:300]}")
            return {}
        if self.metrics.database_unread:
            self.metrics.set_database_unread("")
            log.info("the database answers model reloads again")
        swapped: dict[str, str] = {}
        for group in self.config.groups:
            row, current = active.get(group.name), self._detectors.get(group.name)
            if row is not None and current and current.version == row.version:
                self._unserved.pop(group.name, None)  # e.g. activated again after a refused newer one
                try:
                    self._watch_bundle(group, row)
                except Exception:  # a look at the disk must never stop the pipeline
                    log.exception("group %s: checking the bundle of model %s failed", group.name, row.version)
                continue
            if row is None:
                continue
            activation = (row.version, row.activated_at)
            if time.monotonic() < self._refused_models.get(activation, 0.0):
                continue
            reported = group.name in self._reported
            self._reported.discard(group.name)
            try:
                detector = load_version(row, group, self.config.model_dir)
            except (ModelError, OSError) as exc:
                self._unserved[group.name] = f"model {row.version} refused: {exc}"[:300]
                if activation not in self._refused_models and not reported:
                    log.error("group %s: refusing model %s, %s: %s", group.name, row.version,
                              f"{current.version} keeps serving" if current else "the group stays unmonitored", exc)
                self._refused_models[activation] = math.inf if isinstance(exc, ModelMismatch) \
                    else time.monotonic() + REFUSED_RETRY_S
                continue
            self._detectors[group.name] = detector
            self._unserved.pop(group.name, None)
            swapped[group.name] = row.version
            log.info("group %s: now scoring with model %s (was %s)", group.name, row.version,
                     current.version if current else None)
        if swapped:
            self.metrics.set_models({g: d.version for g, d in self._detectors.items()})
        return swapped

    def waiting_for_topic(self) -> None:
        """Called while the start waits for the readings topic to have partitions: ``/readyz`` says so, and the
        ``pipeline_instances`` row stays fresh (the process is alive)."""
        self.metrics.starting(f"waiting for topic {self.config.kafka.topic} to exist (the broker reports no "
                              "partitions of it)")
        self.report_serving()

    def report_serving(self) -> None:
        """Write this process's ``pipeline_instances`` row: the version it serves per group and why it does not serve
        a group's active model (read by ``models serving``, ``models list`` and ``check``). At start and at each
        model reload; a database failure is logged, and the next reload tries again. Skipped while the reloads
        cannot read the database (they log that already)."""
        if self.metrics.database_unread:
            return
        try:
            with self._sessions.begin() as session:
                now = repo.database_now(session=session)
                started_at = now - timedelta(seconds=time.monotonic() - self._started)  # on the database's clock too
                repo.report_instance(session=session, instance=self._owner, consumer_group=self.config.kafka.group_id,
                                     started_at=started_at, now=now,
                                     serving={g: d.version for g, d in self._detectors.items()},
                                     unserved=self._unserved)
        except DBAPIError as exc:
            log.warning("cannot record the models this process serves (%s); trying again at the next reload",
                        type(exc).__name__)

    def forget_serving(self) -> None:
        """Delete this process's ``pipeline_instances`` row (it stops); on a database failure the row is left to go
        stale, and so it is, untried, when stopping while a dependency is down (a stop must not wait on it)."""
        if self.metrics.degraded or self.metrics.database_unread:
            log.info("stopping while a dependency is down: this process's pipeline_instances row goes stale")
            return
        try:
            with self._sessions.begin() as session:
                repo.remove_instance(session=session, instance=self._owner)
        except DBAPIError as exc:
            log.warning("cannot remove this process from pipeline_instances (%s); its row goes stale",
                        type(exc).__name__)

    def _watch_bundle(self, group: GroupConfig, row: ModelVersion) -> None:
        """Tell the operator when the bundle of the model served from memory goes missing or changes on disk and
        no longer verifies (a volume unmounted, a file damaged): serving goes on, but a restart would refuse to
        start. Verified again only when its files' sizes or times change; reported then, and hourly while it lasts;
        its return is logged too."""
        path: Path | str = row.artifact_path
        files: tuple[tuple[int, int], ...] | str | None
        try:
            path = bundle_path(row, self.config.model_dir)
            files = tuple((s.st_size, s.st_mtime_ns) for s in ((path / n).stat() for n in (METADATA, WEIGHTS)))
        except FileNotFoundError:
            files = None
        except OSError as exc:  # an I/O error, a stale network handle, a permission taken away
            files = f"unreadable ({type(exc).__name__}: {exc.strerror or exc})"
        look = self._bundles_seen.get(group.name)
        if look is None or look.version != row.version:  # first look: verified now (it may have changed since load)
            look = self._bundles_seen[group.name] = _BundleLook(row.version)
        if files != look.files:
            was, look.files, look.reported = look.problem, files, -math.inf
            look.problem = f"gone from {path}" if files is None else files if isinstance(files, str) else None
            if look.problem is None:
                try:
                    load_version(row, group, self.config.model_dir)
                except (ModelError, OSError) as exc:
                    look.problem = f"changed on disk and refused: {exc}"
            if look.problem is None and was is not None:
                log.info("group %s: the bundle of model %s verifies again", group.name, row.version)
        if look.problem is not None and time.monotonic() >= look.reported + BUNDLE_REMIND_S:
            log.error("group %s: the bundle of model %s, served from memory, is %s; serving goes on, but a restart "
                      "would refuse to start: restore it, or 'sensorwatch models activate' another version",
                      group.name, row.version, look.problem)
            look.reported = time.monotonic()

    # -- the loop --------------------------------------------------------------------------------------------------
    def _commit(self, consumer: KafkaConsumer, offsets: dict[int, int]) -> None:
        try:
            kafka_io.commit(consumer, self.config.kafka.topic, offsets)
            self.stats.commits += 1
        except CommitFailedError as exc:
            # The group rebalanced under us; the new owner resumes from the stored progress.
            log.warning("offset commit refused after a rebalance: %s", exc)

    def _watch_broker(self, consumer: KafkaConsumer, got_records: bool, now_ms: int) -> None:
        """After ``BROKER_PROBE_S`` without news of the broker (empty polls; an idle-close query counts as news), ask
        it whether it still answers: a poll does not raise while none does. One probe per ``BROKER_PROBE_S`` at most,
        each waiting at most ``BROKER_PROBE_TIMEOUT_MS``."""
        if got_records:
            self._heard_from_broker(True, now_ms)
        elif time.monotonic() - self._heard_at >= BROKER_PROBE_S:
            answered = kafka_io.broker_answers(consumer, BROKER_PROBE_TIMEOUT_MS)
            if answered is None:  # no partition to ask about: nothing to tell
                self._heard_at = time.monotonic()
            else:
                self._heard_from_broker(answered, now_ms)

    def _heard_from_broker(self, answered: bool, now_ms: int) -> bool:
        """Record whether the broker answered (records, a probe or an idle-close query). While it does not, /healthz
        and ``sensorwatch_dependency_down`` report the outage; when it answers again, silent assets' idleness counts
        anew from ``now_ms`` (devices could not publish either), and this returns True."""
        self._heard_at = time.monotonic()
        if not answered:
            if not self._broker_down:
                self._broker_down = True
                self.metrics.set_broker_silent(True)
                log.warning("no Kafka broker answers: /readyz and /healthz report 503 (/livez stays 200), and silent "
                            "assets' windows stay open, until one does")
            return False
        if not self._broker_down:
            return False
        self._broker_down = False
        self.metrics.set_broker_silent(False)
        self._windower.restart_idle_clocks(now_ms)
        log.info("a Kafka broker answers again")
        return True

    def _idle_partitions(self, consumer: KafkaConsumer, now_ms: int) -> set[int]:
        """Partitions whose silent assets' windows may close now: read to the end, asked of the broker (not during
        a backlog). While the broker does not answer, none; when it answers again, silence starts counting anew, so
        readings the devices publish once it is back still find their windows open."""
        idle = self._windower.idle_partitions(now_ms)
        if not idle:
            return set()
        done = kafka_io.caught_up(consumer, idle)
        if self._heard_from_broker(done is not None, now_ms) or done is None:
            return set()
        return done

    def run(self, consumer: KafkaConsumer, *, idle_stop_s: float | None = None,
            on_batch: Callable[[RunStats], None] | None = None, clock: Callable[[], float] = time.time) -> RunStats:
        """Consume until the stop flag is set (or nothing arrives for ``idle_stop_s``). Commits after each batch."""
        k = self.config.kafka
        self._consumer = consumer
        idle_since = time.monotonic()
        last_lag = 0.0
        status_at, status_from = time.monotonic(), self.stats.snapshot()
        while not self._stop.is_set():
            # a poll waits for records as long as its timeout: not a blocked call (BROKER_PROBE_S covers silence)
            records = self._retry(lambda: kafka_io.poll(consumer, k.poll_timeout_ms, k.max_poll_records),
                                  watched=False)
            self.metrics.mark_polling()  # /livez: a silent loop is hung from here
            if self._joined:  # a poll returns empty while the join is still in flight (seconds, or minutes while
                self.metrics.mark_started()  # a busy member holds up the rebalance): not ready before it completes
            now_ms = round(clock() * 1000)
            self._watch_broker(consumer, bool(records), now_ms)
            self.metrics.beat()
            offsets = self.process(records, now_ms, self._idle_partitions(consumer, now_ms))
            if offsets:
                self._retry(lambda o=offsets: self._commit(consumer, o))
            if time.monotonic() >= self._next_reload:  # between batches: this batch is committed, the next not read
                self._next_reload = time.monotonic() + self._reload_every
                self.reload_models()
                self.report_serving()
            if records:
                idle_since = time.monotonic()
                if on_batch is not None:
                    on_batch(self.stats)
            elif idle_stop_s is not None and time.monotonic() - idle_since >= idle_stop_s:
                break
            if time.monotonic() - last_lag > 5:
                last_lag = time.monotonic()
                self._set_lag(kafka_io.lag(consumer))
            if time.monotonic() - status_at >= STATUS_EVERY_S:
                line = self.stats.since(status_from, time.monotonic() - status_at)
                if line is not None:
                    log.info("%s", line)
                status_at, status_from = time.monotonic(), self.stats.snapshot()
        return self.stats


def run_pipeline(config: Config, *, stop: threading.Event, idle_stop_s: float | None = None,
                 on_batch: Callable[[RunStats], None] | None = None, serve_metrics: bool = False) -> RunStats:
    """Build the clients from ``config`` and run the loop until stopped (or, with ``idle_stop_s``, until nothing
    arrived for that long, waiting for the topic included). The caller installs signal handlers.

    ConfigError when a TLS file of ``kafka.security`` does not load (``kafka_io.tls_problems``); TransientError, with
    one line saying what to do, when the database schema is not up to date, the metrics port
    is taken, or Kafka cannot be reached; ModelError when no group has a usable active model, or when a group's
    active model has a bundle that is missing, unreadable or corrupt (it would be back once the volume is mounted or
    the file restored, and meanwhile the group's readings would be consumed unscored). A group without a model (a
    new group) or whose model was trained for another configuration (sensors, window) is logged and not monitored,
    the others are: its windows are dropped, counted (``sensorwatch_windows_unscored_total``), until a model of it is
    activated and picked up by ``reload_models``."""
    kafka_io.client_kwargs(config.kafka)  # a TLS file that does not load: ConfigError before anything starts
    with contextlib.ExitStack() as stack:
        engine = make_engine(config.database.url)
        stack.callback(engine.dispose)
        problem = schema_problem(engine)
        if problem:
            raise TransientError(problem)
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            detectors, problems, broken = load_servable(session=session, config=config)
        if not detectors:
            raise ModelError("; ".join(f"group {g}: {why}" for g, why in problems.items()))
        if broken:  # nothing is consumed: once the bundle is back, every reading is scored
            raise ModelError("; ".join(f"group {g}: the active model cannot be loaded: {problems[g]}" for g in sorted(
                broken)) + ". Not starting, so that none of its readings are consumed unscored: restore the bundle (is "
                "model_dir mounted?), 'sensorwatch models activate' an earlier version, or train a new one")
        for group, why in problems.items():  # the other groups are monitored; this one once a model is activated
            log.error("group %s is not monitored: %s; its windows are dropped until a usable model is active", group,
                      why)
        metrics = PipelineMetrics(config.metrics.unhealthy_after_s)
        if serve_metrics and config.metrics.enabled:
            server = _serve_metrics(metrics, config)
            stack.callback(server.server_close)  # the listening socket too, not only the serving thread
            stack.callback(server.shutdown)
        producer = _connect(kafka_io.make_producer, config.kafka)
        stack.callback(producer.close, timeout=10)
        sinks = build_sinks(config, sessions)
        stack.callback(sinks.close, timeout_s=10)
        metrics.watch_sinks(sinks.stats)
        runner = Runner(config, sessions=sessions, detectors=detectors, producer=producer, stop=stop, metrics=metrics,
                        sinks=sinks, reported=problems)
        runner.report_serving()
        stack.callback(runner.forget_serving)  # however it stops (a failed start included); a kill leaves it stale
        waited_too_long = threading.Event()
        if idle_stop_s is not None:  # waiting for a topic that does not exist yet is idle time too
            def give_up() -> None:
                waited_too_long.set()
                stop.set()

            timer = threading.Timer(idle_stop_s, give_up)
            timer.daemon = True
            timer.start()
            stack.callback(timer.cancel)
        consumer = _connect(functools.partial(
            kafka_io.make_consumer, on_revoked=runner.partitions_revoked, on_assigned=runner.partitions_assigned,
            on_lost=runner.partitions_lost, stop=stop, while_waiting=runner.waiting_for_topic,
        ), config.kafka, explain=False)  # the producer's start already showed the brokers answer
        metrics.starting("joining the consumer group")
        stack.callback(consumer.close, autocommit=False)
        if idle_stop_s is not None:
            timer.cancel()
            if waited_too_long.is_set():
                log.warning("topic %s had no partitions within the idle stop (%gs): stopping", config.kafka.topic,
                            idle_stop_s)
        if not stop.is_set():
            _warn_of_missing_dead_letter_topic(consumer, config.kafka.dead_letter_topic)
            log.info("consuming %s as group %s; database %s; models %s", config.kafka.topic, config.kafka.group_id,
                     config.database.safe_url, {g: d.version for g, d in detectors.items()})
        return runner.run(consumer, idle_stop_s=idle_stop_s, on_batch=on_batch)


def _log_alerts(events: Sequence[AlertEvent]) -> None:
    """One line per alert opened, escalated or resolved (stored already): what an operator watching ``run`` would
    otherwise learn only from the 5-minute summary. Updates that do not escalate are left out."""
    for event in events:
        a = event.alert
        if event.kind == "opened" or event.escalated:
            far = off_training_text(a.off_training)
            log.info("alert %s: %s (group %s) %s since %s, peak %.3g x threshold; top sensors %s%s",
                     "opened" if event.kind == "opened" else f"escalated from {event.previous_severity}", a.asset,
                     a.group, a.severity, ms_to_iso(a.opened_ms), a.peak_score / a.threshold if a.threshold > 0
                     else math.inf, sensors_text(a.top_sensors), f"; far outside training: {far}" if far else "")
        elif event.kind == "resolved" and a.closed_ms is not None:
            log.info("alert resolved: %s (group %s) after %s, %d windows", a.asset, a.group,
                     duration_text((a.closed_ms - a.opened_ms) / 1000), a.window_count)


def _warn_of_missing_dead_letter_topic(consumer: KafkaConsumer, topic: str) -> None:
    """A warning at start when the dead-letter topic does not exist: the first rejected reading would stall the
    pipeline until it does, unless the brokers create topics on first use."""
    with contextlib.suppress(KafkaError):
        if topic not in consumer.topics():
            log.warning("dead-letter topic %s does not exist: unless the brokers create topics on first use, the first "
                        "rejected reading stalls the pipeline until it is created (`sensorwatch check` tells)", topic)


def _serve_metrics(metrics: PipelineMetrics, config: Config) -> ThreadingHTTPServer:
    """The metrics and health endpoint; TransientError when its port is taken (another process on the host)."""
    host, port = config.metrics.host, config.metrics.port
    try:
        server = serve(metrics, host, port)
    except OSError as exc:
        raise TransientError(f"metrics endpoint: cannot listen on {host}:{port} ({exc.strerror}); give each pipeline "
                             f"process on a host its own metrics.port (for example port: ${{METRICS_PORT:-9464}}), "
                             f"or set metrics.enabled: false") from None
    log.info("metrics on http://%s:%d/metrics, health on /healthz (liveness /livez, readiness /readyz)",
             *server.server_address[:2])
    return server


def _connect(make: Callable[[KafkaConfig], T], kafka: KafkaConfig, *, explain: bool = True) -> T:
    """``make(kafka)``, a Kafka client; TransientError naming the brokers when none can be reached (or the security
    settings do not match them), with the last connection error when ``explain`` (the client's network log is then
    held back while it starts: not for a client whose start waits for a topic)."""
    with kafka_io.connection_errors() if explain else contextlib.nullcontext([]) as seen:
        try:
            return make(kafka)
        except KafkaError as exc:
            why = kafka_io.last_failure(seen, sasl=kafka.security.sasl)
            raise TransientError(f"cannot connect to Kafka at {kafka.bootstrap_servers} ({exc}{why}); check "
                                 "kafka.bootstrap_servers and kafka.security") from None
