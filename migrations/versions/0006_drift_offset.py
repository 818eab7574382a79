"""drift offsets: window_scores.drift_offset holds the asset's residual offsets (per sensor, in the model's
standardised units) after the window, for groups that follow drift (groups[].drift); NULL otherwise, and for rows
written before this revision. A restarted pipeline resumes each asset's offsets from its latest row.

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
    op.add_column("window_scores", sa.Column("drift_offset", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("window_scores") as batch:
        batch.drop_column("drift_offset")
