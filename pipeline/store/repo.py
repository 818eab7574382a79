"""Repository functions. Each takes the session as a keyword and never commits: the caller owns the transaction.

Writes are idempotent (``ON CONFLICT``), so replaying a batch after a crash changes nothing.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, String, and_, delete, exists, func, literal, or_, select, union_all, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased, load_only

from pipeline.store.tables import (
    Alert,
    AlertOutbox,
    AssetProgress,
    ConsumerProgress,
    ModelVersion,
    PipelineInstance,
    RetrainLock,
    RetrainRun,
    SinkLease,
    SkippedWindowRow,
    WindowScore,
)
from pipeline.types import AlertRecord, Score, SkippedWindow, datetime_to_ms, ms_to_datetime

CANDIDATE_GRACE = timedelta(days=1)  # a candidate older than this is not a retrain in progress (retention may go)


def new_holder() -> str:
    """A name for this process in claims and leases (consumer partitions, retrain locks, sink leases): host, pid and
    a random suffix, at most 120 characters (the columns' width) however long the host name."""
    return f"{socket.gethostname()[:100]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def database_now(*, session: Session) -> datetime:
    """The database server's clock (UTC): one clock for times that processes on several hosts write and compare
    (``pipeline_instances.seen_at``, model activation), so that their hosts' clock skew does not count. SQLite is
    embedded: its clock is this host's."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.clock_timestamp())).astimezone(UTC)
    return datetime.now(UTC)


def _insert(session: Session, table: Any) -> Any:
    """A dialect-specific INSERT that supports ``on_conflict_*`` (PostgreSQL and SQLite)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"database dialect {dialect!r} is not supported (use PostgreSQL or SQLite)")


def insert_scores(*, session: Session, scores: Sequence[Score], now: datetime | None = None) -> None:
    """Bulk-insert window scores, ignoring any already stored (same asset, window end, model version)."""
    if not scores:
        return
    created = now or datetime.now(UTC)
    rows = [
        {
            "asset": s.asset, "group_name": s.group, "window_start": ms_to_datetime(s.start_ms),
            "window_end": ms_to_datetime(s.end_ms), "score": s.score, "smoothed_score": s.smoothed,
            "aftermath_floor": s.aftermath_floor, "threshold": s.threshold, "is_anomaly": s.is_anomaly,
            "sensor_errors": s.sensor_errors, "drift_offset": s.drift_offset, "off_training": s.off_training or None,
            "model_version": s.model_version, "created_at": created,
        }
        for s in scores
    ]
    stmt = _insert(session, WindowScore).on_conflict_do_nothing(
        index_elements=["asset", "window_end", "model_version"]
    )
    session.execute(stmt, rows)


def _alert_row(alert: AlertRecord, now: datetime) -> dict[str, Any]:
    return {
        "asset": alert.asset, "group_name": alert.group, "opened_at": ms_to_datetime(alert.opened_ms),
        "last_seen_at": ms_to_datetime(alert.last_seen_ms),
        "closed_at": ms_to_datetime(alert.closed_ms) if alert.closed_ms is not None else None,
        "peak_score": alert.peak_score, "threshold": alert.threshold, "severity": alert.severity,
        "status": alert.status, "window_count": alert.window_count, "top_sensors": alert.top_sensors,
        "sensor_error_sums": alert.error_sums, "off_training": alert.off_training, "model_version": alert.model_version,
        "updated_at": now,
    }


def upsert_alerts(*, session: Session, alerts: Sequence[AlertRecord], now: datetime | None = None
                  ) -> set[tuple[str, int]]:
    """Insert or update alerts by (asset, opened_at); the latest state of each incident wins, except that a resolved
    alert stays as it is (the pipeline never reopens an incident: a new one has a new opening time), so a pipeline
    still running an older configuration cannot undo ``resolve_alert_by_hand``. Returns the (asset, opened ms) of
    the incidents written: the others were resolved already."""
    if not alerts:
        return set()
    stamp = now or datetime.now(UTC)
    latest = {(a.asset, a.opened_ms): a for a in alerts}  # one row per incident per statement
    stmt = _insert(session, Alert)
    mutable = ("group_name", "last_seen_at", "closed_at", "peak_score", "threshold", "severity", "status",
               "window_count", "top_sensors", "sensor_error_sums", "off_training", "model_version", "updated_at")
    stmt = stmt.on_conflict_do_update(
        index_elements=["asset", "opened_at"], set_={c: getattr(stmt.excluded, c) for c in mutable},
        where=Alert.status == "open",
    ).returning(Alert.asset, Alert.opened_at)
    written = session.execute(stmt, [_alert_row(a, stamp) for a in latest.values()])
    return {(asset, datetime_to_ms(opened)) for asset, opened in written}


def open_alerts(*, session: Session, assets: Sequence[str]) -> list[Alert]:
    """Open alerts of the given assets."""
    if not assets:
        return []
    return list(session.scalars(select(Alert).where(Alert.asset.in_(assets), Alert.status == "open")))


def _replayed() -> Any:
    """True for a window score row with an earlier row of the same window (another model version's replay, which the
    alert engine skipped): ``WHERE NOT _replayed()`` keeps the row it judged."""
    earlier = aliased(WindowScore)
    return exists().where(earlier.asset == WindowScore.asset, earlier.window_end == WindowScore.window_end,
                          earlier.id < WindowScore.id)


def _latest_ends(session: Session, assets: Sequence[str], k: int = 1, chunk: int = 200
                 ) -> dict[str, datetime | None]:
    """Per asset, the end of its ``k``-th latest scored window (one per window end, whatever the model versions;
    None when it has fewer): an index look-up on (asset, window_end) each, however long its history, ``chunk``
    assets to a statement."""
    def kth(asset: str) -> Any:
        # GROUP BY, not DISTINCT: SQLite 3.40 answers a DISTINCT ... OFFSET scalar subquery from the index with the
        # oldest end instead of NULL when there are too few windows
        return (select(WindowScore.window_end).where(WindowScore.asset == asset).group_by(WindowScore.window_end)
                .order_by(WindowScore.window_end.desc()).offset(max(k - 1, 0)).limit(1).scalar_subquery())

    out: dict[str, datetime | None] = {}
    names = list(dict.fromkeys(assets))
    for i in range(0, len(names), chunk):
        part = names[i:i + chunk]
        pairs = [select(literal(a, String).label("asset"), kth(a).label("end_at")) for a in part]
        out.update((asset, end_at) for asset, end_at in session.execute(union_all(*pairs) if len(pairs) > 1
                                                                        else pairs[0]))
    return out


def recent_scores(*, session: Session, assets: Sequence[str], limit: int, chunk: int = 200
                  ) -> dict[str, list[WindowScore]]:
    """The latest ``limit`` window scores per asset (newest last), one row per window end: the first stored (the
    one the alert engine judged; a later model version's row for the same window is a replay it skipped).

    Reads only those windows, whatever the length of the history: per asset, an index look-up finds where its latest
    ``limit`` windows start, then one query per ``chunk`` assets reads them."""
    since = _latest_ends(session, assets, limit)  # None: fewer windows than that
    out: dict[str, list[WindowScore]] = {}
    names = sorted(since)
    for i in range(0, len(names), chunk):
        ranges = or_(*(and_(WindowScore.asset == a, WindowScore.window_end >= since[a]) if since[a] is not None
                       else WindowScore.asset == a for a in names[i:i + chunk]))
        rows = session.scalars(select(WindowScore).where(ranges)
                               .order_by(WindowScore.asset, WindowScore.window_end, WindowScore.id))
        for row in rows:  # the first row of each window (here, not a NOT EXISTS the planner may hash the table for)
            series = out.setdefault(row.asset, [])
            if not series or series[-1].window_end != row.window_end:
                series.append(row)
    return out


def excursions(*, session: Session, since: Mapping[str, datetime], relative: float,
               chunk: int = 200) -> dict[str, list[WindowScore]]:
    """Per asset of ``since``: the windows ending at or after its ``since`` that the aftermath rule's peak can come
    from: exceeding windows (``is_anomaly``) inside one of the asset's stored incidents (``opened_at`` to
    ``last_seen_at``) whose level (smoothed score when stored, else the score) exceeds ``1 / relative`` x a positive
    threshold. Of a window scored by several model versions only the first stored row counts (later ones are
    replays the alert engine skipped). Oldest first; ``chunk`` assets per query, and only assets with an incident
    seen since their ``since`` are searched."""
    out: dict[str, list[WindowScore]] = {}
    assets = sorted(since)
    for i in range(0, len(assets), chunk):
        part = assets[i:i + chunk]
        seen = session.execute(select(Alert.asset, func.max(Alert.last_seen_at)).where(Alert.asset.in_(part))
                               .group_by(Alert.asset))
        recent = [a for a, last_seen in seen if last_seen is not None and last_seen >= since[a]]
        if not recent:
            continue
        ranges = or_(*(and_(WindowScore.asset == a, WindowScore.window_end >= since[a]) for a in recent))
        in_incident = exists().where(Alert.asset == WindowScore.asset, Alert.opened_at <= WindowScore.window_start,
                                     WindowScore.window_end <= Alert.last_seen_at)
        level = func.coalesce(WindowScore.smoothed_score, WindowScore.score)
        rows = session.scalars(
            select(WindowScore)
            .where(ranges, WindowScore.is_anomaly.is_(True), WindowScore.threshold > 0,
                   level * relative > WindowScore.threshold, in_incident, ~_replayed())
            .order_by(WindowScore.asset, WindowScore.window_end)
        )
        for row in rows:
            out.setdefault(row.asset, []).append(row)
    return out


def list_alerts(*, session: Session, status: str | None = None, asset: str | None = None, group: str | None = None,
                severity: str | None = None, since: datetime | None = None, until: datetime | None = None,
                acknowledged: bool | None = None, limit: int | None = 50,
                assets: Sequence[str] | None = None) -> list[Alert]:
    """Alerts, newest first, optionally filtered. ``since``/``until`` keep the alerts active in that span (last seen
    at or after ``since``, opened before ``until``); ``assets``: those of these assets, whatever group they were
    raised in; ``limit=None`` returns them all."""
    query: Select[tuple[Alert]] = select(Alert)
    if status:
        query = query.where(Alert.status == status)
    if asset:
        query = query.where(Alert.asset == asset)
    if assets is not None:
        query = query.where(Alert.asset.in_(sorted(assets)))
    if group:
        query = query.where(Alert.group_name == group)
    if severity:
        query = query.where(Alert.severity == severity)
    if since:
        query = query.where(Alert.last_seen_at >= since)
    if until:
        query = query.where(Alert.opened_at < until)
    if acknowledged is not None:
        query = query.where(Alert.acknowledged_at.is_not(None) if acknowledged else Alert.acknowledged_at.is_(None))
    query = query.order_by(Alert.opened_at.desc(), Alert.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def get_alert(*, session: Session, alert_id: int) -> Alert | None:
    """The alert with this id, or None."""
    return session.get(Alert, alert_id)


def acknowledge_alert(*, session: Session, alert_id: int, by: str, comment: str | None = None,
                      now: datetime | None = None) -> Alert:
    """Record who acknowledged an alert (open or resolved), when, and why; a second ack replaces the first.

    KeyError if there is no such alert. The pipeline's upserts never touch these columns.
    """
    row = session.get(Alert, alert_id)
    if row is None:
        raise KeyError(alert_id)
    row.acknowledged_by = by
    row.acknowledged_at = now or datetime.now(UTC)
    row.ack_comment = comment
    session.flush()
    return row


def resolve_alert_by_hand(*, session: Session, alert_id: int, by: str, comment: str, now: datetime | None = None
                          ) -> Alert:
    """Resolve an open alert that no window will resolve (its asset left the configuration): closed at its last
    seen window, acknowledged by ``by`` with ``comment``. KeyError if there is no such alert, ValueError if it is
    not open."""
    row = session.get(Alert, alert_id)
    if row is None:
        raise KeyError(alert_id)
    if row.status != "open":
        raise ValueError(f"alert #{alert_id} is {row.status}, not open")
    stamp = now or datetime.now(UTC)
    row.status, row.closed_at, row.updated_at = "resolved", row.last_seen_at, stamp
    row.acknowledged_by, row.acknowledged_at, row.ack_comment = by, stamp, comment
    session.flush()
    return row


def last_resolved_alerts(*, session: Session, assets: Sequence[str]) -> list[Alert]:
    """The most recently closed resolved alert of each given asset that has one (for restoring the cooldown)."""
    if not assets:
        return []
    ranked = (
        select(
            Alert.id,
            func.row_number()
            .over(partition_by=Alert.asset, order_by=(Alert.closed_at.desc(), Alert.id.desc()))
            .label("rank"),
        )
        .where(Alert.asset.in_(assets), Alert.status == "resolved")
        .subquery()
    )
    query = select(Alert).join(ranked, ranked.c.id == Alert.id).where(ranked.c.rank == 1).order_by(Alert.asset)
    return list(session.scalars(query))


def scores_between(*, session: Session, asset: str, start: datetime, end: datetime) -> list[WindowScore]:
    """Window scores of ``asset`` whose window ends in ``[start, end]``, oldest first, one row per window end (the
    first stored: the one the alert engine judged, when several model versions scored a window)."""
    return list(session.scalars(
        select(WindowScore)
        .where(WindowScore.asset == asset, WindowScore.window_end >= start, WindowScore.window_end <= end,
               ~_replayed())
        .order_by(WindowScore.window_end)
    ))


def latest_score(*, session: Session, asset: str) -> Score | None:
    """The score of ``asset``'s latest window (the first stored for it: the one the alert engine judged, as
    ``scores_between``); None when it has none."""
    row = session.scalars(select(WindowScore).where(WindowScore.asset == asset)
                          .order_by(WindowScore.window_end.desc(), WindowScore.id).limit(1)).first()
    return None if row is None else score_of(row)


def score_span(*, session: Session, asset: str) -> tuple[datetime, datetime] | None:
    """The first and last window end stored for ``asset``; None when it has no window scores."""
    first, last = session.execute(
        select(func.min(WindowScore.window_end), func.max(WindowScore.window_end)).where(WindowScore.asset == asset)
    ).one()
    return None if first is None or last is None else (first, last)


def add_model_version(*, session: Session, version: ModelVersion) -> None:
    """Register a model version row."""
    session.add(version)
    session.flush()


def activate_model_version(*, session: Session, version: str, now: datetime | None = None) -> ModelVersion:
    """Make ``version`` the active model of its group and retire the one it replaces. KeyError if unknown,
    BundleDeleted if retention deleted its bundle (checked in the same statement that activates it, so a prune
    running at the same time cannot delete the bundle of a version being activated: see ``mark_bundle_deleted``)."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise KeyError(version)
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.group_name == row.group_name, ModelVersion.status == "active",
               ModelVersion.version != version)
        .values(status="retired")
    )
    activated = session.execute(
        update(ModelVersion).where(ModelVersion.id == row.id, ModelVersion.bundle_deleted_at.is_(None))
        .values(status="active", activated_at=now or database_now(session=session))
        .execution_options(synchronize_session="fetch")
    )
    if activated.rowcount != 1:
        session.refresh(row)
        raise BundleDeleted(row)
    session.refresh(row)
    return row


class BundleDeleted(Exception):
    """The version's bundle was deleted by retention: it cannot be activated."""

    def __init__(self, row: ModelVersion) -> None:
        when = row.bundle_deleted_at.isoformat(timespec="seconds") if row.bundle_deleted_at else "earlier"
        super().__init__(f"model version {row.version}'s bundle was deleted by retention ({when}; "
                         "retention.model_bundles): retrain, or activate a version that still has its bundle")
        self.version = row.version


def bundle_prune_candidates(*, session: Session, keep: int, now: datetime, groups: Sequence[str] | None = None
                            ) -> list[ModelVersion]:
    """Versions whose bundles retention deletes, oldest first: per group, of the versions whose bundle is still
    there, all but the ``keep`` retired ones active most recently (the rollback targets: a version rolled back to
    and retired again counts from then, not from its training), all but the newest ``keep`` rejected or failed
    candidates (kept to look into) and all but the newest ``keep`` candidates older than ``CANDIDATE_GRACE`` before
    ``now`` (``train --no-activate`` models awaiting an operator, or a retrain that died before deciding: counted
    apart, so nightly rejections never push out an operator's). Active versions and younger candidates (a retrain in
    progress) are never listed. ``groups``: only these (None: all). Reads only the columns it needs."""
    query = (select(ModelVersion)
             .options(load_only(ModelVersion.id, ModelVersion.version, ModelVersion.group_name, ModelVersion.status,
                                ModelVersion.created_at, ModelVersion.activated_at, ModelVersion.artifact_path))
             .where(or_(ModelVersion.status.in_(("retired", "rejected", "failed")),
                        and_(ModelVersion.status == "candidate", ModelVersion.created_at < now - CANDIDATE_GRACE)),
                    ModelVersion.bundle_deleted_at.is_(None)))
    if groups is not None:
        query = query.where(ModelVersion.group_name.in_(groups))
    rows = list(session.scalars(query))
    rows.sort(key=lambda r: (r.activated_at or r.created_at, r.created_at, r.id), reverse=True)
    seen: dict[tuple[str, str], int] = {}
    doomed: list[ModelVersion] = []
    for row in rows:
        key = (row.group_name, row.status if row.status in ("retired", "candidate") else "rejected")
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > keep:
            doomed.append(row)
    return doomed[::-1]


def bundle_deleted_versions(*, session: Session, since: datetime) -> list[ModelVersion]:
    """Versions whose bundle retention marked deleted at or after ``since``."""
    return list(session.scalars(select(ModelVersion).where(ModelVersion.bundle_deleted_at >= since)))


def unmark_bundle_deleted(*, session: Session, version_id: int) -> None:
    """Undo ``mark_bundle_deleted`` (its files could not be deleted: the bundle is whole and may be activated)."""
    session.execute(update(ModelVersion).where(ModelVersion.id == version_id).values(bundle_deleted_at=None))


def mark_bundle_deleted(*, session: Session, version_id: int, now: datetime) -> bool:
    """Record that retention deletes the bundle of version ``version_id``, unless it was activated (or marked)
    meanwhile; True when marked. Commit this before deleting the files: the row lock this takes and the condition
    ``activate_model_version`` checks keep the two from passing each other."""
    result = session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == version_id, ModelVersion.status.in_(("retired", "rejected", "failed", "candidate")),
               ModelVersion.bundle_deleted_at.is_(None))
        .values(bundle_deleted_at=now)
    )
    return result.rowcount == 1


def get_model_version(*, session: Session, version: str) -> ModelVersion | None:
    """The registry row of ``version``, or None."""
    return session.scalar(select(ModelVersion).where(ModelVersion.version == version))


def set_model_status(*, session: Session, version: str, status: str, reason: str | None = None,
                     only_from: str | None = None) -> None:
    """Set a version's status (``rejected``, ``failed``, ...) and why. Not for activation: use
    ``activate_model_version``. ``only_from``: only if its status is this now (a candidate's outcome must never
    overwrite the status of a version that was promoted meanwhile). KeyError if unknown (or not ``only_from``)."""
    query = update(ModelVersion).where(ModelVersion.version == version)
    if only_from is not None:
        query = query.where(ModelVersion.status == only_from)
    result = session.execute(query.values(status=status, reason=reason[:500] if reason else None))
    if result.rowcount != 1:
        raise KeyError(version)


def active_model_versions(*, session: Session) -> dict[str, ModelVersion]:
    """The active model version of each group that has one."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.status == "active"))
    return {row.group_name: row for row in rows}


def list_model_versions(*, session: Session, group: str | None = None) -> list[ModelVersion]:
    """Model versions, newest first."""
    query = select(ModelVersion)
    if group:
        query = query.where(ModelVersion.group_name == group)
    return list(session.scalars(query.order_by(ModelVersion.created_at.desc(), ModelVersion.id.desc())))


def count_scores(*, session: Session, asset: str | None = None) -> int:
    """Number of stored window scores (of one asset, or all)."""
    query = select(func.count()).select_from(WindowScore)
    if asset:
        query = query.where(WindowScore.asset == asset)
    return int(session.scalar(query) or 0)


def score_of(row: WindowScore) -> Score:
    """A stored window score as the pipeline's Score."""
    return Score(
        asset=row.asset, group=row.group_name, start_ms=datetime_to_ms(row.window_start),
        end_ms=datetime_to_ms(row.window_end), score=row.score, threshold=row.threshold,
        sensor_errors=dict(row.sensor_errors), model_version=row.model_version, smoothed=row.smoothed_score,
        aftermath_floor=row.aftermath_floor,
        drift_offset=None if row.drift_offset is None else dict(row.drift_offset),
        off_training={str(k): float(v) for k, v in (row.off_training or {}).items()},
    )


def alert_record(row: Alert) -> AlertRecord:
    """A stored alert as the pipeline's AlertRecord."""
    return AlertRecord(
        asset=row.asset, group=row.group_name, opened_ms=datetime_to_ms(row.opened_at),
        last_seen_ms=datetime_to_ms(row.last_seen_at),
        closed_ms=datetime_to_ms(row.closed_at) if row.closed_at else None, peak_score=row.peak_score,
        threshold=row.threshold, severity=row.severity, status=row.status, window_count=row.window_count,
        top_sensors=list(row.top_sensors), model_version=row.model_version,
        error_sums=None if row.sensor_error_sums is None else {
            str(k): float(v) for k, v in row.sensor_error_sums.items()},
        off_training=None if row.off_training is None else {str(k): float(v) for k, v in row.off_training.items()},
    )


def insert_skipped(*, session: Session, skipped: Sequence[SkippedWindow], now: datetime | None = None) -> None:
    """Record skipped windows, ignoring any already recorded (same asset and window end)."""
    if not skipped:
        return
    created = now or datetime.now(UTC)
    rows = [
        {"asset": s.asset, "group_name": s.group, "window_start": ms_to_datetime(s.start_ms),
         "window_end": ms_to_datetime(s.end_ms), "missing_steps": s.missing, "created_at": created}
        for s in skipped
    ]
    session.execute(_insert(session, SkippedWindowRow).on_conflict_do_nothing(index_elements=["asset", "window_end"]),
                    rows)


def save_asset_progress(*, session: Session, progress: dict[str, tuple[str, int]], now: datetime | None = None
                        ) -> None:
    """Upsert ``asset -> (group, next window start ms)``."""
    if not progress:
        return
    stamp = now or datetime.now(UTC)
    stmt = _insert(session, AssetProgress)
    stmt = stmt.on_conflict_do_update(
        index_elements=["asset"],
        set_={"next_window_start": stmt.excluded.next_window_start, "updated_at": stmt.excluded.updated_at},
    )
    session.execute(stmt, [
        {"asset": a, "group_name": g, "next_window_start": ms_to_datetime(ms), "updated_at": stamp}
        for a, (g, ms) in sorted(progress.items())
    ])


def load_asset_progress(*, session: Session, assets: Sequence[str]) -> dict[str, int]:
    """``asset -> next window start ms`` for the assets that have progress recorded."""
    if not assets:
        return {}
    rows = session.execute(select(AssetProgress.asset, AssetProgress.next_window_start)
                           .where(AssetProgress.asset.in_(assets)))
    return {asset: datetime_to_ms(start) for asset, start in rows}


def claim_partitions(*, session: Session, consumer_group: str, topic: str, partitions: Sequence[int], owner: str,
                     now: datetime | None = None, topic_id: str | None = None) -> None:
    """Make ``owner`` the writer of these partitions' progress (after Kafka assigned them to it); a partition new to
    the group starts at nothing processed, recorded for ``topic_id`` (see ``reconcile_topic_id`` for the others)."""
    if not partitions:
        return
    stamp = now or datetime.now(UTC)
    stmt = _insert(session, ConsumerProgress)
    stmt = stmt.on_conflict_do_update(
        index_elements=["consumer_group", "topic", "partition"],
        set_={"owner": stmt.excluded.owner, "updated_at": stmt.excluded.updated_at},
    )
    session.execute(stmt, [
        {"consumer_group": consumer_group, "topic": topic, "partition": p, "processed_upto": -1, "owner": owner,
         "updated_at": stamp, "topic_id": topic_id}
        for p in sorted(partitions)
    ])


def reconcile_topic_id(*, session: Session, topic: str, topic_id: str, partitions: Sequence[int]
                       ) -> tuple[dict[int, int], set[int]]:
    """Tie every consumer group's progress on these partitions of ``topic`` to the topic's id ``topic_id``: progress
    recorded under another id belongs to an earlier topic of this name (deleted and re-created) and is set back to
    -1 (nothing processed); progress recorded without one (before migration 0013) is stamped with it. Returns the
    progress forgotten (partition -> the furthest offset) and the partitions that had progress without an id (only
    their log end can tell whether it is this topic's)."""
    rows = session.execute(select(ConsumerProgress.partition, ConsumerProgress.processed_upto,
                                  ConsumerProgress.topic_id).where(
        ConsumerProgress.topic == topic, ConsumerProgress.partition.in_(sorted(partitions))))
    forgotten: dict[int, int] = {}
    unstamped: set[int] = set()
    for partition, upto, recorded in rows:
        if recorded is None:
            unstamped.add(int(partition))
        elif recorded != topic_id and upto >= 0:
            forgotten[int(partition)] = max(int(upto), forgotten.get(int(partition), -1))
    if forgotten:
        session.execute(update(ConsumerProgress).where(
            ConsumerProgress.topic == topic, ConsumerProgress.partition.in_(sorted(forgotten)),
            ConsumerProgress.topic_id != topic_id).values(processed_upto=-1))
    session.execute(update(ConsumerProgress).where(
        ConsumerProgress.topic == topic, ConsumerProgress.partition.in_(sorted(partitions)),
        or_(ConsumerProgress.topic_id.is_(None), ConsumerProgress.topic_id != topic_id)).values(topic_id=topic_id))
    return forgotten, unstamped


def save_consumer_progress(*, session: Session, consumer_group: str, topic: str, processed: dict[int, int],
                           owner: str, also_owned: Sequence[int] = (), now: datetime | None = None) -> set[int]:
    """Record ``partition -> offset below which everything is processed`` where ``owner`` still owns the partition,
    and check that it still owns ``also_owned`` (partitions whose assets this transaction writes results for).

    Returns the partitions owned by someone else now (fenced): the caller must roll back and drop them.
    """
    stamp = now or datetime.now(UTC)
    fenced: set[int] = set()
    changes: dict[int, dict[str, Any]] = {p: {"updated_at": stamp} for p in also_owned}
    changes.update({p: {"processed_upto": upto, "updated_at": stamp} for p, upto in processed.items()})
    for partition, values in sorted(changes.items()):
        result = session.execute(
            update(ConsumerProgress)
            .where(ConsumerProgress.consumer_group == consumer_group, ConsumerProgress.topic == topic,
                   ConsumerProgress.partition == partition, ConsumerProgress.owner == owner)
            .values(**values)
        )
        if result.rowcount != 1:
            fenced.add(partition)
    return fenced


def load_consumer_progress(*, session: Session, consumer_group: str, topic: str) -> dict[int, int]:
    """``partition -> processed_upto`` recorded for this consumer group and topic."""
    rows = session.execute(select(ConsumerProgress.partition, ConsumerProgress.processed_upto).where(
        ConsumerProgress.consumer_group == consumer_group, ConsumerProgress.topic == topic))
    return {int(p): int(o) for p, o in rows}


def load_topic_progress(*, session: Session, topic: str) -> dict[int, int]:
    """``partition -> processed_upto`` of ``topic``, the furthest any consumer group recorded: every record below it
    was processed against this database, whichever group did it (a new ``group_id`` takes up where the old one
    stopped)."""
    rows = session.execute(select(ConsumerProgress.partition, func.max(ConsumerProgress.processed_upto))
                           .where(ConsumerProgress.topic == topic).group_by(ConsumerProgress.partition))
    return {int(p): int(o) for p, o in rows}


def forget_progress_beyond(*, session: Session, topic: str, ends: Mapping[int, int]) -> None:
    """Set back to -1 (nothing processed) every consumer group's progress on a partition of ``topic`` that lies beyond
    its log end (``ends``: partition -> log end): offsets only grow, so it was recorded for an earlier topic of this
    name (deleted and re-created, its offsets starting again at 0; or its log truncated), not for its records."""
    for partition, end in sorted(ends.items()):
        session.execute(update(ConsumerProgress).where(
            ConsumerProgress.topic == topic, ConsumerProgress.partition == partition,
            ConsumerProgress.processed_upto > end).values(processed_upto=-1))


def count_skipped(*, session: Session, asset: str | None = None) -> int:
    """Number of recorded skipped windows (of one asset, or all)."""
    query = select(func.count()).select_from(SkippedWindowRow)
    if asset:
        query = query.where(SkippedWindowRow.asset == asset)
    return int(session.scalar(query) or 0)


def flagged_windows(*, session: Session, group: str, assets: Sequence[str], start: datetime, end: datetime
                    ) -> set[tuple[str, int]]:
    """``(asset, window end ms)`` of the group's windows of ``assets`` ending in ``[start, end]`` whose level (the
    smoothed score when stored, else the score) some model version scored above its threshold: every anomalous
    window, and every window the aftermath rule held back (not anomalous, but not normal data either). Reads
    through the (asset, window_end) index: only the range asked for, however long the history."""
    if not assets:
        return set()
    level = func.coalesce(WindowScore.smoothed_score, WindowScore.score)
    rows = session.execute(
        select(WindowScore.asset, WindowScore.window_end).where(
            WindowScore.asset.in_(assets), WindowScore.window_end >= start, WindowScore.window_end <= end,
            WindowScore.group_name == group, level > WindowScore.threshold)
    )
    return {(asset, datetime_to_ms(end_at)) for asset, end_at in rows}


def last_scored_windows(*, session: Session, group: str, assets: Sequence[str]) -> dict[str, int]:
    """Per asset of ``assets`` with stored scores of ``group``: the end (ms) of its latest scored window (an index
    look-up each)."""
    out: dict[str, int] = {}
    for asset in assets:
        end_at = session.scalar(select(func.max(WindowScore.window_end))
                                .where(WindowScore.asset == asset, WindowScore.group_name == group))
        if end_at is not None:
            out[asset] = datetime_to_ms(end_at)
    return out


def _take_lease(session: Session, table: Any, key_column: str, key: str, holder: str, now: datetime,
                ttl_s: float) -> bool:
    """Claim the lease row ``key`` of ``table`` for ``holder`` until ``now + ttl_s``: one atomic upsert that inserts
    the row, or takes it over when the previous claim has expired or is ``holder``'s own. True when ``holder`` got it.

    The caller commits at once (the row is the lease). Concurrent callers: exactly one wins (PostgreSQL re-checks the
    conflict against the committed row; SQLite serialises writers).
    """
    stmt = _insert(session, table).values(
        {key_column: key, "holder": holder, "acquired_at": now, "expires_at": now + timedelta(seconds=ttl_s)})
    stmt = stmt.on_conflict_do_update(
        index_elements=[key_column],
        set_={"holder": stmt.excluded.holder, "acquired_at": stmt.excluded.acquired_at,
              "expires_at": stmt.excluded.expires_at},
        where=or_(table.expires_at < stmt.excluded.acquired_at, table.holder == stmt.excluded.holder),
    )
    session.execute(stmt)
    return session.scalar(select(table.holder).where(getattr(table, key_column) == key)) == holder


def acquire_retrain_lock(*, session: Session, group: str, holder: str, now: datetime, ttl_s: float) -> bool:
    """Claim the retrain lock of ``group`` for ``holder`` until ``now + ttl_s`` (taken over only once the previous
    claim has expired; every run has its own holder). True when ``holder`` got it; the caller commits at once."""
    return _take_lease(session, RetrainLock, "group_name", group, holder, now, ttl_s)


def renew_retrain_lock(*, session: Session, group: str, holder: str, now: datetime, ttl_s: float) -> bool:
    """Extend ``holder``'s lock on ``group`` to ``now + ttl_s``. False when ``holder`` no longer holds it (it expired
    and another run took it over, or it was released)."""
    result = session.execute(update(RetrainLock).where(RetrainLock.group_name == group, RetrainLock.holder == holder)
                             .values(expires_at=now + timedelta(seconds=ttl_s)))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def retrain_lock(*, session: Session, group: str) -> RetrainLock | None:
    """The current lock row of ``group`` (possibly expired), or None."""
    return session.get(RetrainLock, group)


def release_retrain_lock(*, session: Session, group: str, holder: str) -> None:
    """Drop ``holder``'s lock on ``group`` (nothing happens if someone else holds it now)."""
    session.execute(delete(RetrainLock).where(RetrainLock.group_name == group, RetrainLock.holder == holder))


def start_retrain_run(*, session: Session, group: str, trigger: str, holder: str, now: datetime,
                      outcome: str = "running", reason: str | None = None) -> RetrainRun:
    """Record the start of a retrain run (``outcome`` running, or refused for a run that never starts)."""
    row = RetrainRun(group_name=group, trigger=trigger, holder=holder, started_at=now, outcome=outcome,
                     reason=reason, metrics={},
                     finished_at=None if outcome == "running" else now)
    session.add(row)
    session.flush()
    return row


def scheduled_run_since(*, session: Session, group: str, since: datetime) -> RetrainRun | None:
    """The first run of ``group`` that a scheduler started at or after ``since`` (a firing's scheduled time) and
    that was not refused: that firing of the schedule was taken, by this scheduler or another one."""
    return session.scalar(select(RetrainRun).where(
        RetrainRun.group_name == group, RetrainRun.trigger == "schedule", RetrainRun.started_at >= since,
        RetrainRun.outcome != "refused").order_by(RetrainRun.started_at, RetrainRun.id).limit(1))


def abandon_retrain_runs(*, session: Session, group: str, now: datetime, reason: str) -> int:
    """Mark runs of ``group`` still ``running`` as failed, and their registered candidates too (call with the group's
    lock held: no such run can be alive). Returns how many runs."""
    stale = list(session.scalars(select(RetrainRun).where(RetrainRun.group_name == group,
                                                          RetrainRun.outcome == "running")))
    for run in stale:
        run.outcome, run.finished_at, run.reason = "failed", now, reason
        if run.candidate_version:
            session.execute(update(ModelVersion).where(ModelVersion.version == run.candidate_version,
                                                       ModelVersion.status == "candidate")
                            .values(status="failed", reason=reason[:500]))
    session.flush()
    return len(stale)


def update_retrain_run(*, session: Session, run_id: int, **fields: Any) -> None:
    """Set RetrainRun columns of one run (versions, data range, windows, metrics, outcome, reason, finished_at)."""
    session.execute(update(RetrainRun).where(RetrainRun.id == run_id).values(**fields))


def finish_retrain_run(*, session: Session, run_id: int, outcome: str, reason: str | None, now: datetime,
                       **fields: Any) -> None:
    """Record how a run ended; ``fields`` are further RetrainRun columns (versions, data range, windows, metrics)."""
    update_retrain_run(session=session, run_id=run_id, outcome=outcome, reason=reason, finished_at=now, **fields)


def list_retrain_runs(*, session: Session, group: str | None = None, candidate_version: str | None = None,
                      limit: int | None = 50) -> list[RetrainRun]:
    """Retrain runs, newest first (of one group, or the run that produced ``candidate_version``)."""
    query = select(RetrainRun)
    if group:
        query = query.where(RetrainRun.group_name == group)
    if candidate_version:
        query = query.where(RetrainRun.candidate_version == candidate_version)
    query = query.order_by(RetrainRun.started_at.desc(), RetrainRun.id.desc())
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


# -- alert outbox ---------------------------------------------------------------------------------------------------
def enqueue_outbox(*, session: Session, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Queue alert events for their sinks (``rows``: sink, event_key, asset, document), due at once; an event
    already queued for a sink (same event_key) is left as it is, so a replay queues nothing twice."""
    if not rows:
        return
    values = [{**r, "status": "pending", "attempts": 0, "created_at": now, "next_attempt_at": now} for r in rows]
    stmt = _insert(session, AlertOutbox).on_conflict_do_nothing(index_elements=["sink", "event_key"])
    session.execute(stmt, values)  # executemany: no limit on the number of bound parameters


def take_sink_lease(*, session: Session, sink: str, holder: str, now: datetime, ttl_s: float) -> bool:
    """Claim or renew the delivery lease of ``sink`` for ``holder``; True when ``holder`` holds it now."""
    return _take_lease(session, SinkLease, "sink", sink, holder, now, ttl_s)


def release_sink_lease(*, session: Session, sink: str, holder: str) -> None:
    """Drop ``holder``'s lease on ``sink`` (nothing happens if someone else holds it now)."""
    session.execute(delete(SinkLease).where(SinkLease.sink == sink, SinkLease.holder == holder))


def sink_leases(*, session: Session) -> dict[str, SinkLease]:
    """Every sink's lease row (possibly expired), by sink."""
    return {lease.sink: lease for lease in session.scalars(select(SinkLease))}


INSTANCE_KEEP = timedelta(days=7)  # rows of processes not seen for this long (killed, host gone) are deleted


def report_instance(*, session: Session, instance: str, consumer_group: str, started_at: datetime, now: datetime,
                    serving: Mapping[str, str], unserved: Mapping[str, str]) -> None:
    """Write what pipeline process ``instance`` serves (group -> version) and why it serves nothing for the other
    groups of its configuration (group -> reason), seen ``now``: one upsert; rows not seen for ``INSTANCE_KEEP``
    go with it."""
    stmt = _insert(session, PipelineInstance).values(
        instance=instance, consumer_group=consumer_group, started_at=started_at, seen_at=now, serving=dict(serving),
        unserved=dict(unserved))
    session.execute(stmt.on_conflict_do_update(index_elements=["instance"], set_={
        "seen_at": stmt.excluded.seen_at, "serving": stmt.excluded.serving, "unserved": stmt.excluded.unserved}))
    session.execute(delete(PipelineInstance).where(PipelineInstance.seen_at < now - INSTANCE_KEEP))


def remove_instance(*, session: Session, instance: str) -> None:
    """Delete the row of pipeline process ``instance`` (it stops)."""
    session.execute(delete(PipelineInstance).where(PipelineInstance.instance == instance))


def list_instances(*, session: Session) -> list[PipelineInstance]:
    """Every pipeline process's row, most recently seen first."""
    return list(session.scalars(select(PipelineInstance).order_by(PipelineInstance.seen_at.desc(),
                                                                  PipelineInstance.instance)))


def pending_outbox(*, session: Session, sink: str, limit: int) -> list[AlertOutbox]:
    """The oldest ``limit`` pending events of ``sink``, in the order they were queued."""
    return list(session.scalars(select(AlertOutbox).where(AlertOutbox.sink == sink, AlertOutbox.status == "pending")
                                .order_by(AlertOutbox.id).limit(limit)))


def count_outbox(*, session: Session, sink: str | None = None) -> dict[tuple[str, str], int]:
    """Events per (sink, status)."""
    query = select(AlertOutbox.sink, AlertOutbox.status, func.count()).group_by(AlertOutbox.sink, AlertOutbox.status)
    if sink is not None:
        query = query.where(AlertOutbox.sink == sink)
    return {(row[0], row[1]): int(row[2]) for row in session.execute(query)}


def oldest_pending_outbox(*, session: Session) -> dict[str, datetime]:
    """Per sink with pending events: when its oldest one was queued."""
    rows = session.execute(select(AlertOutbox.sink, func.min(AlertOutbox.created_at))
                           .where(AlertOutbox.status == "pending").group_by(AlertOutbox.sink))
    return {sink: created if created.tzinfo else created.replace(tzinfo=UTC) for sink, created in rows}


def outbox_events(*, session: Session, sink: str | None = None, status: str | None = None,
                  limit: int = 50) -> list[AlertOutbox]:
    """The newest ``limit`` outbox events, newest first (optionally of one sink and one status)."""
    query = select(AlertOutbox).order_by(AlertOutbox.id.desc()).limit(limit)
    if sink is not None:
        query = query.where(AlertOutbox.sink == sink)
    if status is not None:
        query = query.where(AlertOutbox.status == status)
    return list(session.scalars(query))


_STILL_PENDING = AlertOutbox.status == "pending"  # outcomes only change pending rows (a process that lost its lease
# meanwhile must not overwrite what the new holder recorded)


def mark_outbox_delivered(*, session: Session, ids: Sequence[int], now: datetime) -> None:
    """Events delivered (their attempt counted)."""
    if ids:
        session.execute(update(AlertOutbox).where(AlertOutbox.id.in_(ids), _STILL_PENDING).values(
            status="delivered", attempts=AlertOutbox.attempts + 1, finished_at=now, last_error=None))


def mark_outbox_failed(*, session: Session, failures: Mapping[int, str], now: datetime, attempted: bool = True
                       ) -> None:
    """Events given up on, each with its reason (``attempted``: this round tried it, so its attempt counts); one
    UPDATE per distinct reason."""
    by_error: dict[str, list[int]] = {}
    for event_id, error in failures.items():
        by_error.setdefault(error[:300], []).append(event_id)
    for error, ids in by_error.items():
        session.execute(update(AlertOutbox).where(AlertOutbox.id.in_(ids), _STILL_PENDING).values(
            status="failed", attempts=AlertOutbox.attempts + int(attempted), finished_at=now, last_error=error))


def retry_outbox_later(*, session: Session, event_id: int, error: str, at: datetime, sink: str, holder: str) -> None:
    """A failed attempt that will be tried again at ``at``: recorded only while ``holder`` still holds ``sink``'s
    lease (a process that lost it must not push back the new holder's next try)."""
    holds = exists().where(SinkLease.sink == sink, SinkLease.holder == holder)
    session.execute(update(AlertOutbox).where(AlertOutbox.id == event_id, _STILL_PENDING, holds).values(
        attempts=AlertOutbox.attempts + 1, next_attempt_at=at, last_error=error[:300]))


def requeue_outbox(*, session: Session, now: datetime, sink: str | None = None,
                   ids: Sequence[int] | None = None) -> int:
    """Failed events back to pending, due at once, attempts from zero, their age (for ``max_age_h``) from ``now``
    (all, one sink's, or ``ids``); their order among pending events stays their original one. Returns how many."""
    query = update(AlertOutbox).where(AlertOutbox.status == "failed")
    if sink is not None:
        query = query.where(AlertOutbox.sink == sink)
    if ids is not None:
        query = query.where(AlertOutbox.id.in_(ids))
    result = session.execute(query.values(status="pending", attempts=0, created_at=now, next_attempt_at=now,
                                          finished_at=None))
    return int(result.rowcount)  # type: ignore[attr-defined]


def prune_outbox(*, session: Session, finished_before: datetime) -> int:
    """Delete delivered and failed events finished before ``finished_before``; returns how many."""
    result = session.execute(delete(AlertOutbox).where(AlertOutbox.status != "pending",
                                                       AlertOutbox.finished_at < finished_before))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _delete_batch(session: Session, table: Any, where: Sequence[Any], limit: int, dry_run: bool) -> int:
    """Delete up to ``limit`` rows of ``table`` matching ``where`` (or count all of them when ``dry_run``); returns
    how many. A bulk delete by id: no loaded objects to keep in sync."""
    if dry_run:
        return int(session.scalar(select(func.count()).select_from(table).where(*where)) or 0)
    ids = select(table.id).where(*where).limit(limit)
    result = session.execute(delete(table).where(table.id.in_(ids)), execution_options={"synchronize_session": False})
    return int(result.rowcount)  # type: ignore[attr-defined]


def history_assets(*, session: Session) -> list[str]:
    """Every asset the pipeline has windowed (``asset_progress``), configured or not any more."""
    return list(session.scalars(select(AssetProgress.asset).order_by(AssetProgress.asset)))


def scores_prune_bound(*, session: Session, asset: str, before: datetime, keep_latest: int,
                       keep_span: timedelta) -> datetime | None:
    """The window end before which ``asset``'s scores may be deleted: ``before``, or earlier so that its latest
    ``keep_latest`` windows, and every window ending within ``keep_span`` of its latest one, stay. None when
    nothing may go (it has no more than ``keep_latest`` windows). Two index look-ups on (asset, window_end)."""
    latest, kept_from = _latest_ends(session, [asset])[asset], _latest_ends(session, [asset], keep_latest)[asset]
    if latest is None or kept_from is None:
        return None
    return min(before, kept_from, latest - keep_span)


def delete_scores_before(*, session: Session, asset: str, before: datetime, limit: int, dry_run: bool = False
                         ) -> int:
    """Delete up to ``limit`` of ``asset``'s window scores ending before ``before`` (all of them, counted only, when
    ``dry_run``); returns how many."""
    return _delete_batch(session, WindowScore, (WindowScore.asset == asset, WindowScore.window_end < before), limit,
                         dry_run)


def delete_skipped_before(*, session: Session, asset: str, before: datetime, limit: int, dry_run: bool = False
                          ) -> int:
    """``delete_scores_before`` for the skipped windows."""
    return _delete_batch(session, SkippedWindowRow,
                         (SkippedWindowRow.asset == asset, SkippedWindowRow.window_end < before), limit, dry_run)


def delete_resolved_alerts_before(*, session: Session, before: datetime, limit: int, dry_run: bool = False) -> int:
    """Delete up to ``limit`` resolved alerts closed before ``before`` (open alerts never; all of them, counted only,
    when ``dry_run``); returns how many."""
    where = (Alert.status == "resolved", Alert.opened_at < before, Alert.closed_at < before)  # opened_at: the index
    return _delete_batch(session, Alert, where, limit, dry_run)
