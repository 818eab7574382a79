"""model bundle retention: model_versions.bundle_deleted_at records when retention deleted a version's bundle
(``retention.model_bundles``); the row stays as the version's history, and a version without its bundle cannot be
activated. NULL for every bundle still on disk, and for rows written before this revision.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("bundle_deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("bundle_deleted_at")
