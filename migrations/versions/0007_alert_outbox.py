"""alert outbox: alert events for the Kafka and webhook sinks are written in the transaction that writes their
alert (alert_outbox) and delivered from there, at least once and in order, by the pipeline holding the sink's lease
(sink_leases). Before this revision they were queued in memory and lost when a process died.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alert_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("sink", sa.String(length=40), nullable=False),
        sa.Column("event_key", sa.String(length=300), nullable=False),
        sa.Column("asset", sa.String(length=120), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=300), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_outbox")),
        sa.UniqueConstraint("sink", "event_key", name=op.f("uq_alert_outbox_sink_event_key")),
    )
    op.create_index("ix_alert_outbox_sink_status_id", "alert_outbox", ["sink", "status", "id"], unique=False)
    op.create_table(
        "sink_leases",
        sa.Column("sink", sa.String(length=40), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sink", name=op.f("pk_sink_leases")),
    )


def downgrade() -> None:
    op.drop_table("sink_leases")
    op.drop_index("ix_alert_outbox_sink_status_id", table_name="alert_outbox")
    op.drop_table("alert_outbox")
