"""smoothed scores: window_scores.smoothed_score holds the EWMA of the asset's scores when the model's threshold
applies to the smoothed stream (threshold.ewma_alpha); NULL otherwise and for rows written before this revision.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("window_scores", sa.Column("smoothed_score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("window_scores") as batch:
        batch.drop_column("smoothed_score")
