"""alert acknowledgement columns and SQL views for people who query the database directly

Views (documented in docs/alerts.md):
  open_alerts           one row per open alert: duration, peak as a multiple of the threshold, top sensor, ack state
  alerts_per_asset_day  per asset and UTC day (of opening): alerts, still open, acknowledged, critical, alert time,
                        worst peak (durations run from opening to the close, or to the last window seen while open)
  alert_top_sensors     one row per alert and top sensor: rank, sensor, share of the error

The SQL differs per dialect only where it must (JSON access, date and interval arithmetic); the columns are the same.
A later migration that rebuilds ``alerts`` in batch mode on SQLite must drop these views first and create them again.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = ("alert_top_sensors", "alerts_per_asset_day", "open_alerts")

_POSTGRESQL = {
    "duration_s": "CAST(EXTRACT(EPOCH FROM (COALESCE(a.closed_at, a.last_seen_at) - a.opened_at)) AS DOUBLE PRECISION)",
    "day": "CAST((a.opened_at AT TIME ZONE 'UTC') AS DATE)",
    "top_sensor": "(a.top_sensors -> 0 ->> 'sensor')",
    "top_share": "CAST(a.top_sensors -> 0 ->> 'share' AS DOUBLE PRECISION)",
    "sensors_from": "alerts a CROSS JOIN LATERAL json_array_elements(a.top_sensors) WITH ORDINALITY AS t(item, rank)",
    "rank": "CAST(t.rank AS INTEGER)",
    "sensor": "(t.item ->> 'sensor')",
    "share": "CAST(t.item ->> 'share' AS DOUBLE PRECISION)",
    "error": "CAST(t.item ->> 'error' AS DOUBLE PRECISION)",
}
_SQLITE = {
    "duration_s": "ROUND((julianday(COALESCE(a.closed_at, a.last_seen_at)) - julianday(a.opened_at)) * 86400.0, 3)",
    "day": "date(a.opened_at)",
    "top_sensor": "json_extract(a.top_sensors, '$[0].sensor')",
    "top_share": "CAST(json_extract(a.top_sensors, '$[0].share') AS REAL)",
    "sensors_from": "alerts a, json_each(a.top_sensors) t",
    "rank": "CAST(t.key AS INTEGER) + 1",
    "sensor": "json_extract(t.value, '$.sensor')",
    "share": "CAST(json_extract(t.value, '$.share') AS REAL)",
    "error": "CAST(json_extract(t.value, '$.error') AS REAL)",
}


def _view_sql(dialect: str) -> dict[str, str]:
    if dialect not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"database dialect {dialect!r} is not supported (use PostgreSQL or SQLite)")
    d = _POSTGRESQL if dialect == "postgresql" else _SQLITE
    return {
        "open_alerts": f"""
            CREATE VIEW open_alerts AS
            SELECT a.id, a.asset, a.group_name, a.severity, a.opened_at, a.last_seen_at,
                   {d['duration_s']} AS duration_s,
                   a.peak_score, a.threshold,
                   CASE WHEN a.threshold > 0 THEN a.peak_score / a.threshold END AS peak_ratio,
                   a.window_count, {d['top_sensor']} AS top_sensor, {d['top_share']} AS top_share,
                   a.model_version,
                   CASE WHEN a.acknowledged_at IS NULL THEN 0 ELSE 1 END AS acknowledged,
                   a.acknowledged_by, a.acknowledged_at, a.ack_comment
            FROM alerts a
            WHERE a.status = 'open'
        """,
        "alerts_per_asset_day": f"""
            CREATE VIEW alerts_per_asset_day AS
            SELECT a.asset, a.group_name, {d['day']} AS day,
                   COUNT(*) AS alerts,
                   SUM(CASE WHEN a.status = 'open' THEN 1 ELSE 0 END) AS still_open,
                   SUM(CASE WHEN a.acknowledged_at IS NOT NULL THEN 1 ELSE 0 END) AS acknowledged,
                   SUM(CASE WHEN a.severity = 'critical' THEN 1 ELSE 0 END) AS critical,
                   SUM(a.window_count) AS windows,
                   SUM({d['duration_s']}) AS alert_seconds,
                   MAX(a.peak_score) AS max_peak_score,
                   MAX(CASE WHEN a.threshold > 0 THEN a.peak_score / a.threshold END) AS max_peak_ratio
            FROM alerts a
            GROUP BY a.asset, a.group_name, {d['day']}
        """,
        "alert_top_sensors": f"""
            CREATE VIEW alert_top_sensors AS
            SELECT a.id AS alert_id, a.asset, a.group_name, a.opened_at, a.status, a.severity,
                   {d['rank']} AS rank, {d['sensor']} AS sensor, {d['share']} AS share, {d['error']} AS error
            FROM {d['sensors_from']}
        """,
    }


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("acknowledged_by", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("ack_comment", sa.Text(), nullable=True))
    for sql in _view_sql(op.get_context().dialect.name).values():
        op.execute(sql)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("ack_comment")
        batch_op.drop_column("acknowledged_at")
        batch_op.drop_column("acknowledged_by")
