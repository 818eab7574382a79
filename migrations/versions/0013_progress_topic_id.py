"""progress topic id: consumer_progress.topic_id ties a partition's recorded progress to the broker's id of the topic
it was recorded for (Kafka 2.8+ gives every topic one; a topic deleted and re-created under the same name gets a new
one). Progress recorded under another id belongs to the earlier topic and is forgotten; progress of the same topic is
kept whatever a partition's high watermark says (a new leader's can lag behind it for a moment). NULL for rows
written before this revision (and with brokers that give no ids), judged by the log end as before.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("consumer_progress", sa.Column("topic_id", sa.String(36), nullable=True))


def downgrade() -> None:
    op.drop_column("consumer_progress", "topic_id")
