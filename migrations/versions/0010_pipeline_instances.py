"""pipeline instances: each running `sensorwatch run` process writes which model version it serves per group,
and why it does not serve a group's active model, at start and at every model reload, and deletes its row when it
stops; `sensorwatch models serving`, `models list` and `check` read it to tell whether an activated model is live.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pipeline_instances",
        sa.Column("instance", sa.String(length=120), nullable=False),
        sa.Column("consumer_group", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("serving", sa.JSON(), nullable=False),
        sa.Column("unserved", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("instance", name=op.f("pk_pipeline_instances")),
    )


def downgrade() -> None:
    op.drop_table("pipeline_instances")
