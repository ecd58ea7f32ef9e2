"""Processing loop: stage timings on jobs, manual retry time on deliveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

``jobs.received_at`` is the series' last instance time when the job was
queued; ``jobs.inference_seconds``/``encoding_seconds`` are measured by the
worker process. With ``claimed_at``, ``created_at`` and ``finished_at`` they let
the main process observe every stage (``node.metrics``) without sharing memory
with the workers. ``deliveries.retried_at`` is when ``ichnode outbox retry``
gave a delivery a new life: its age limit counts from then.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("received_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("inference_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("encoding_seconds", sa.Float(), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retried_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("retried_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("encoding_seconds")
        batch_op.drop_column("inference_seconds")
        batch_op.drop_column("received_at")
