"""alert off training: alerts.off_training keeps the sensors that were far outside their training data during the
incident (window mean at least 4 training standard deviations from the training mean; the farthest seen, signed).
A model may reconstruct such a shift and put its error on other sensors, so the top sensors alone can miss them.
NULL for alerts written before this revision.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("alerts", sa.Column("off_training", sa.JSON(), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+), not a batch rebuild of ``alerts``, which the views of 0002 would block
    op.drop_column("alerts", "off_training")
