"""The consume loop: poll -> decode -> window -> score -> decide -> persist (one transaction) -> commit offsets.

Offsets are committed only after the transaction holding the batch's results has committed, and never past the oldest
record an open window still needs, so a crash at any point loses nothing: the replay rebuilds the open windows and the
idempotent writes absorb what was already stored. A database outage stops progress (no commits) and is retried with
backoff; a bad message never stops the loop, it goes to the dead-letter topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import CommitFailedError, KafkaError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models.detector import Detector
from pipeline import kafka_io
from pipeline.alerting import AlertEngine
from pipeline.config import Config
from pipeline.decode import Decoder
from pipeline.errors import TransientError
from pipeline.registry import load_active
from pipeline.scoring import score_windows
from pipeline.store import repo
from pipeline.store.db import make_engine, make_sessionmaker, pending_migrations
from pipeline.types import AlertEvent, Rejected, Score
from pipeline.windowing import Windower

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunStats:
    """Running totals of one pipeline process."""

    batches: int = 0
    readings: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    windows_scored: int = 0
    windows_skipped: int = 0
    alerts_opened: int = 0
    alerts_resolved: int = 0
    commits: int = 0
    last_batch_s: float = 0.0


class Runner:
    """Composes the steps over injected clients; owns the transaction and the offset commit."""

    def __init__(self, config: Config, *, sessions: sessionmaker[Session], detectors: dict[str, Detector],
                 producer: KafkaProducer, stop: threading.Event) -> None:
        self.config = config
        self.stats = RunStats()
        self._sessions = sessions
        self._detectors = detectors
        self._producer = producer
        self._stop = stop
        self._decoder = Decoder(config.groups, config.kafka.max_message_bytes)
        self._windower = Windower(config.groups)
        self._alerts = AlertEngine(config.groups)
        self._groups = config.asset_groups()
        self._history = max(max(g.alert.n, g.alert.clear_after) for g in config.groups)
        self._next_offset: dict[int, int] = {}

    # -- rebalance hooks -------------------------------------------------------------------------------------------
    def partitions_revoked(self, partitions: set[int]) -> None:
        """Forget the state tied to partitions this consumer no longer owns (the new owner replays them)."""
        assets = self._windower.open_assets()
        self._windower.forget_partitions(partitions)
        still = set(self._windower.open_assets())
        self._alerts.forget(a for a in assets if a not in still)
        for p in partitions:
            self._next_offset.pop(p, None)
        if partitions:
            log.info("partitions revoked: %s", sorted(partitions))

    def partitions_assigned(self, partitions: set[int]) -> None:
        """Log new assignments (state is rebuilt lazily from replayed records and the database)."""
        if partitions:
            log.info("partitions assigned: %s", sorted(partitions))

    # -- one batch -------------------------------------------------------------------------------------------------
    def process(self, records: Sequence[kafka_io.RawRecord]) -> dict[int, int]:
        """Run one polled batch through every step; returns the offsets that are now safe to commit.

        Raises TransientError when the stop flag is set while the database or broker is unavailable (nothing of
        this batch is committed then; a restart replays it).
        """
        started = time.perf_counter()
        readings, rejected = self._decoder.decode_batch(
            (r.topic, r.partition, r.offset, r.key, r.value) for r in records
        )
        batch = self._windower.add(readings)
        if batch.late:
            raw = {(r.partition, r.offset): r for r in records}
            for reading in batch.late:
                rec = raw[(reading.partition, reading.offset)]
                rejected.append(
                    Rejected("late", f"slot already closed for {reading.asset}", rec.value, rec.key, rec.topic,
                             rec.partition, rec.offset)
                )
        scores = score_windows(batch.windows, self._detectors)
        self._retry(lambda: kafka_io.send_dead_letters(self._producer, self.config.kafka.dead_letter_topic, rejected))
        events = self._retry(lambda: self._persist(scores))

        for r in records:
            self._next_offset[r.partition] = max(self._next_offset.get(r.partition, 0), r.offset + 1)
        safe = self._windower.safe_offsets()
        s = self.stats
        s.batches += 1
        s.readings += len(readings)
        s.rejected.update(r.reason for r in rejected)
        s.windows_scored += len(scores)
        s.windows_skipped += len(batch.skipped)
        s.alerts_opened += sum(e.kind == "opened" for e in events)
        s.alerts_resolved += sum(e.kind == "resolved" for e in events)
        s.last_batch_s = time.perf_counter() - started
        return {p: min(nxt, safe.get(p, nxt)) for p, nxt in self._next_offset.items()}

    def _persist(self, scores: list[Score]) -> list[AlertEvent]:
        assets = sorted({s.asset for s in scores})
        try:
            with self._sessions.begin() as session:
                self._restore(session, assets)
                events = self._alerts.process(scores)
                repo.insert_scores(session=session, scores=scores)
                repo.upsert_alerts(session=session, alerts=[e.alert for e in events])
        except BaseException:
            self._alerts.forget(assets)  # the transaction did not commit: rebuild from the database next time
            raise
        return events

    def _restore(self, session: Session, assets: list[str]) -> None:
        todo = self._alerts.unrestored(assets)
        if not todo:
            return
        opened = {row.asset: repo.alert_record(row) for row in repo.open_alerts(session=session, assets=todo)}
        recent = repo.recent_scores(session=session, assets=todo, limit=self._history)
        for asset in todo:
            self._alerts.restore(
                asset, self._groups[asset].name, open_alert=opened.get(asset),
                recent=[repo.score_of(row) for row in recent.get(asset, [])],
            )

    def _retry(self, step: Callable[[], T]) -> T:
        """Run ``step`` until it succeeds, backing off on database/broker failures; give up only when stopping."""
        delay = 0.5
        while True:
            try:
                return step()
            except (DBAPIError, TransientError, KafkaError) as exc:
                if self._stop.is_set():
                    raise TransientError(f"stopping while a dependency is down: {exc}") from exc
                log.warning("dependency unavailable (%s: %s); retrying in %.1fs", type(exc).__name__,
                            str(exc).splitlines()[0][:200], delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    # -- the loop --------------------------------------------------------------------------------------------------
    def run(self, consumer: KafkaConsumer, *, idle_stop_s: float | None = None,
            on_batch: Callable[[RunStats], None] | None = None) -> RunStats:
        """Consume until the stop flag is set (or nothing arrives for ``idle_stop_s``). Commits after each batch."""
        k = self.config.kafka
        idle_since = time.monotonic()
        while not self._stop.is_set():
            records = kafka_io.poll(consumer, k.poll_timeout_ms, k.max_poll_records)
            if not records:
                if idle_stop_s is not None and time.monotonic() - idle_since >= idle_stop_s:
                    break
                continue
            idle_since = time.monotonic()
            offsets = self.process(records)
            try:
                kafka_io.commit(consumer, k.topic, offsets)
                self.stats.commits += 1
            except CommitFailedError as exc:
                # The group rebalanced under us; the new owner replays from the last commit (idempotent writes).
                log.warning("offset commit refused after a rebalance: %s", exc)
            if on_batch is not None:
                on_batch(self.stats)
        return self.stats


def run_pipeline(config: Config, *, stop: threading.Event, idle_stop_s: float | None = None,
                 on_batch: Callable[[RunStats], None] | None = None) -> RunStats:
    """Build the clients from ``config`` and run the loop until stopped. The caller installs signal handlers."""
    engine = make_engine(config.database.url)
    try:
        if pending_migrations(engine):
            raise TransientError("database schema is not up to date: run 'sensorwatch db upgrade --config FILE'")
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            detectors = load_active(session=session, config=config)
        producer = kafka_io.make_producer(config.kafka)
        runner = Runner(config, sessions=sessions, detectors=detectors, producer=producer, stop=stop)
        consumer = kafka_io.make_consumer(
            config.kafka, on_revoked=runner.partitions_revoked, on_assigned=runner.partitions_assigned
        )
        log.info("consuming %s as group %s; database %s; models %s", config.kafka.topic, config.kafka.group_id,
                 config.database.safe_url, {g: d.version for g, d in detectors.items()})
        try:
            return runner.run(consumer, idle_stop_s=idle_stop_s, on_batch=on_batch)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=10)
    finally:
        engine.dispose()
