"""SQLAlchemy 2 declarative tables.

Migrations in ``migrations/`` create them; nothing calls ``create_all`` in production.

All times are stored as timezone-aware UTC (``UTCDateTime`` restores the zone on databases that drop it, like SQLite).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    Unicode,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations are deterministic."""

    metadata = MetaData(naming_convention=NAMING)


class ModelVersion(Base):
    """A trained model bundle and its lifecycle status (candidate, active, retired, rejected, failed).

    At most one version per group is active (a partial unique index from migration 0003). ``bundle_deleted_at``:
    when retention deleted the bundle (``retention.model_bundles``); such a version cannot be activated again.
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        Index("uq_model_versions_one_active", "group_name", unique=True,
              postgresql_where=text("status = 'active'"), sqlite_where=text("status = 'active'")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(80), unique=True)
    group_name: Mapped[str] = mapped_column(String(120), index=True)
    model_type: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    artifact_path: Mapped[str] = mapped_column(String(500))
    checksum: Mapped[str] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    threshold_method: Mapped[str] = mapped_column(String(40))
    data_start: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    data_end: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    windows_used: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    bundle_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WindowScore(Base):
    """One scored window. Unique on (asset, window_end, model_version) so a replay inserts nothing twice."""

    __tablename__ = "window_scores"
    __table_args__ = (
        UniqueConstraint("asset", "window_end", "model_version"),
        Index("ix_window_scores_asset_end", "asset", "window_end"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    asset: Mapped[str] = mapped_column(String(120))
    group_name: Mapped[str] = mapped_column(String(120))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    window_end: Mapped[datetime] = mapped_column(UTCDateTime())
    score: Mapped[float] = mapped_column(Float)
    smoothed_score: Mapped[float | None] = mapped_column(Float, nullable=True)  # EWMA, when the model smooths
    aftermath_floor: Mapped[float | None] = mapped_column(Float, nullable=True)  # raised bar after an excursion
    threshold: Mapped[float] = mapped_column(Float)
    is_anomaly: Mapped[bool] = mapped_column()
    sensor_errors: Mapped[dict[str, float]] = mapped_column(JSON)
    drift_offset: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)  # after this window (drift)
    off_training: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)  # None: none (Score)
    model_version: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Alert(Base):
    """One incident of one asset, updated in place while it lasts. Unique on (asset, opened_at).

    The pipeline never writes the ``acknowledged_*``/``ack_comment`` columns; ``sensorwatch alerts ack`` does.
    Views over this table (``open_alerts``, ``alerts_per_asset_day``, ``alert_top_sensors``) come from migration 0002.
    """

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("asset", "opened_at"),
        Index("ix_alerts_status_opened", "status", "opened_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    asset: Mapped[str] = mapped_column(String(120))
    group_name: Mapped[str] = mapped_column(String(120))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    peak_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    severity: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    window_count: Mapped[int] = mapped_column(Integer)
    top_sensors: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    sensor_error_sums: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    off_training: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    model_version: Mapped[str] = mapped_column(String(80))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    acknowledged_by: Mapped[str | None] = mapped_column(String(120), nullable=True)
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    ack_comment: Mapped[str | None] = mapped_column(Text, nullable=True)


class SkippedWindowRow(Base):
    """A window not scored because gaps exceeded the fill limit (or a silent stretch). Unique on (asset, window_end)."""

    __tablename__ = "skipped_windows"
    __table_args__ = (UniqueConstraint("asset", "window_end"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    asset: Mapped[str] = mapped_column(String(120))
    group_name: Mapped[str] = mapped_column(String(120))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    window_end: Mapped[datetime] = mapped_column(UTCDateTime())
    missing_steps: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AssetProgress(Base):
    """Per asset, the start of the first window not closed yet: where a restarted consumer resumes."""

    __tablename__ = "asset_progress"

    asset: Mapped[str] = mapped_column(String(120), primary_key=True)
    group_name: Mapped[str] = mapped_column(String(120))
    next_window_start: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsumerProgress(Base):
    """Per consumer group and partition, the offset below which every record has been processed and stored.

    Written in the same transaction as the results, so after a crash the next owner knows which replayed records
    were already handled (their rejects are not sent again, their readings are not reported late again). ``owner``
    fences out a consumer that lost the partition but does not know yet: its writes no longer match the owner.
    ``topic_id``: the broker's id of the topic the progress was recorded for (a re-created topic has a new one);
    NULL when unknown (rows written before migration 0013, brokers without topic ids).
    """

    __tablename__ = "consumer_progress"

    consumer_group: Mapped[str] = mapped_column(String(200), primary_key=True)
    topic: Mapped[str] = mapped_column(String(250), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    processed_upto: Mapped[int] = mapped_column(BigInteger)
    owner: Mapped[str] = mapped_column(String(120))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    topic_id: Mapped[str | None] = mapped_column(String(36), nullable=True)


class RetrainRun(Base):
    """One retraining attempt of one group, from start to outcome.

    ``outcome``: ``running`` until it ends, then ``promoted``, ``rejected``, ``skipped`` (too little normal data),
    ``failed`` (an exception or a crash; the active model kept serving) or ``refused`` (another retrain of the group
    held the lock). ``metrics`` holds the figures: windows read/used/held out, thresholds, false-alarm rates and
    alert-window recall of candidate and active model.
    """

    __tablename__ = "retrain_runs"
    __table_args__ = (Index("ix_retrain_runs_group_started", "group_name", "started_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    group_name: Mapped[str] = mapped_column(String(120))
    trigger: Mapped[str] = mapped_column(String(20))
    holder: Mapped[str] = mapped_column(String(120))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    outcome: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    active_version: Mapped[str | None] = mapped_column(String(80), nullable=True)
    candidate_version: Mapped[str | None] = mapped_column(String(80), nullable=True)
    data_start: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    data_end: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    windows_used: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)


class RetrainLock(Base):
    """Per group, who is retraining it and until when the claim holds (a crashed holder's claim expires)."""

    __tablename__ = "retrain_locks"

    group_name: Mapped[str] = mapped_column(String(120), primary_key=True)
    holder: Mapped[str] = mapped_column(String(120))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AlertOutbox(Base):
    """One alert event waiting for (or done with) one sink: written in the transaction that writes its alert, so an
    event is queued exactly when its alert is stored, and delivered from here (at least once, in ``id`` order per
    sink) by whichever pipeline holds the sink's lease. Unique on (sink, event_key) so a replay queues nothing twice.

    ``status``: pending (``next_attempt_at`` says when it is due), delivered, or failed (refused by the receiver, or
    still undelivered after the sink's ``max_age_h``; ``last_error`` says why). ``created_at`` is when it was queued,
    or queued again by ``sensorwatch sinks retry``.
    """

    __tablename__ = "alert_outbox"
    __table_args__ = (
        UniqueConstraint("sink", "event_key"),
        Index("ix_alert_outbox_sink_status_id", "sink", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sink: Mapped[str] = mapped_column(String(40))
    event_key: Mapped[str] = mapped_column(String(300))
    asset: Mapped[str] = mapped_column(String(120))
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)


class SinkLease(Base):
    """Per sink, which pipeline process delivers its outbox and until when (a crashed holder's lease expires)."""

    __tablename__ = "sink_leases"

    sink: Mapped[str] = mapped_column(String(40), primary_key=True)
    holder: Mapped[str] = mapped_column(String(120))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PipelineInstance(Base):
    """One running pipeline process (``sensorwatch run``): the model version it serves per group, and why it does not
    serve a group's active model (group -> reason: no active model, its bundle refused, ...). Written at start and at
    each model reload (``seen_at``), deleted when the process stops cleanly: a row not seen for a few reload intervals
    is a process that died or hangs."""

    __tablename__ = "pipeline_instances"

    instance: Mapped[str] = mapped_column(String(120), primary_key=True)
    consumer_group: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    serving: Mapped[dict[str, str]] = mapped_column(JSON)
    unserved: Mapped[dict[str, str]] = mapped_column(JSON)


# APScheduler's SQLAlchemyJobStore table (its own layout; the scheduler reads and writes it, migration 0003 creates it).
scheduler_jobs = Table(
    "scheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)
