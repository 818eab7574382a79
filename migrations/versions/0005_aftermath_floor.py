"""aftermath floors: window_scores.aftermath_floor holds the raised bar a window's level had to exceed after a recent
larger excursion of its asset (alert.aftermath); NULL when the threshold alone applied, and for rows written before
this revision.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("window_scores", sa.Column("aftermath_floor", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("window_scores") as batch:
        batch.drop_column("aftermath_floor")
