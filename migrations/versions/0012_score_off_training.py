"""score off training: window_scores.off_training keeps a window's sensors far outside their training data
(``Score.off_training``; NULL when none, and for rows written before this revision). A restarted pipeline rebuilds a
pending incident's evidence from its stored scores, and so its alert's off_training, as an unbroken one would.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("window_scores", sa.Column("off_training", sa.JSON(), nullable=True))


def downgrade() -> None:
    # a plain DROP COLUMN (SQLite 3.35+) as in 0011, not a batch rebuild of the largest table
    op.drop_column("window_scores", "off_training")
