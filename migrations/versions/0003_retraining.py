"""retraining: run log, per-group retrain locks, the scheduler's job store, one active model per group

  retrain_runs      every retrain attempt: group, trigger, start/end, outcome, reason, versions, data range, figures
  retrain_locks     one row per group while a retrain holds it (taken with an atomic upsert, expires)
  scheduler_jobs    APScheduler's SQLAlchemyJobStore table (same layout as APScheduler creates), so the schedule
                    survives restarts and the table is owned by migrations
  model_versions    a partial unique index: at most one active version per group (PostgreSQL and SQLite both
                    support partial indexes)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ONE_ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("group_name", sa.String(length=120), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("active_version", sa.String(length=80), nullable=True),
        sa.Column("candidate_version", sa.String(length=80), nullable=True),
        sa.Column("data_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("data_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("windows_used", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrain_runs")),
    )
    op.create_index("ix_retrain_runs_group_started", "retrain_runs", ["group_name", "started_at"], unique=False)
    op.create_index(op.f("ix_retrain_runs_outcome"), "retrain_runs", ["outcome"], unique=False)

    op.create_table(
        "retrain_locks",
        sa.Column("group_name", sa.String(length=120), nullable=False),
        sa.Column("holder", sa.String(length=120), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group_name", name=op.f("pk_retrain_locks")),
    )

    op.create_table(
        "scheduler_jobs",
        sa.Column("id", sa.Unicode(length=191), nullable=False),
        sa.Column("next_run_time", sa.Float(precision=25), nullable=True),
        sa.Column("job_state", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scheduler_jobs")),
    )
    op.create_index(op.f("ix_scheduler_jobs_next_run_time"), "scheduler_jobs", ["next_run_time"], unique=False)

    op.create_index("uq_model_versions_one_active", "model_versions", ["group_name"], unique=True,
                    postgresql_where=_ONE_ACTIVE, sqlite_where=_ONE_ACTIVE)


def downgrade() -> None:
    op.drop_index("uq_model_versions_one_active", table_name="model_versions")
    op.drop_index(op.f("ix_scheduler_jobs_next_run_time"), table_name="scheduler_jobs")
    op.drop_table("scheduler_jobs")
    op.drop_table("retrain_locks")
    op.drop_index(op.f("ix_retrain_runs_outcome"), table_name="retrain_runs")
    op.drop_index("ix_retrain_runs_group_started", table_name="retrain_runs")
    op.drop_table("retrain_runs")
