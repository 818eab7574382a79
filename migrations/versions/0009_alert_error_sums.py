"""alert error sums: alerts.sensor_error_sums keeps every sensor's error summed over the incident's windows,
unrounded, so a pipeline that restarts during an incident ranks its top sensors exactly as an unbroken one would
(a sensor beyond the listed ones may overtake them). NULL for alerts written before this revision: those resume from
their listed sensors.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("alerts", sa.Column("sensor_error_sums", sa.JSON(), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+), not a batch rebuild of ``alerts``, which the views of 0002 would block
    op.drop_column("alerts", "sensor_error_sums")
