"""Which receiver process holds an association: several receivers share one index.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

``associations.receiver`` is ``host:pid`` of the receiver process that accepted
the association. A receiver starting up marks ``interrupted`` only the open
rows of receivers that are gone (a dead pid on its own host, or rows from
before this column), never the live associations of another receiver on the
same index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("receiver", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.drop_column("receiver")
