"""drift baselines: window_scores.drift_baseline holds the asset's drift-following baseline (per sensor, in reading
units) after the window, for groups that follow drift (groups[].drift); NULL otherwise, and for rows written before
this revision. A restarted pipeline resumes each asset's baseline from its latest row.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("window_scores", sa.Column("drift_baseline", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("window_scores") as batch:
        batch.drop_column("drift_baseline")
