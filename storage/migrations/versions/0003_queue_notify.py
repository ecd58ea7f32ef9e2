"""Wake-ups on PostgreSQL: a NOTIFY when a job is queued or a delivery becomes pending.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Row triggers call ``pg_notify('ichnode_jobs', '')`` when a ``jobs`` row is
inserted as, or changes to, ``queued``, and ``pg_notify('ichnode_deliveries',
'')`` when a ``deliveries`` row is inserted as, or changes back to,
``pending``. PostgreSQL delivers the notifications at commit, one per channel
and transaction, so a worker or sender that LISTENs (:mod:`storage.notify`)
wakes when work is there instead of at its next poll. A delivery's lease or
backoff (``next_attempt_at``) does not notify. SQLite has no NOTIFY: this
revision changes nothing there, and its processes keep polling.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, trigger name prefix, state that means "there is work", channel)
_TRIGGERS = (
    ("jobs", "jobs_queued", "queued", "ichnode_jobs"),
    ("deliveries", "deliveries_pending", "pending", "ichnode_deliveries"),
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgresql():
        return
    op.execute(
        "CREATE FUNCTION ichnode_notify() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$"
    )
    for table, name, state, channel in _TRIGGERS:
        op.execute(
            f"CREATE TRIGGER {name}_insert AFTER INSERT ON {table} FOR EACH ROW"
            f" WHEN (NEW.state = '{state}') EXECUTE FUNCTION ichnode_notify('{channel}')"
        )
        op.execute(
            f"CREATE TRIGGER {name}_update AFTER UPDATE OF state ON {table} FOR EACH ROW"
            f" WHEN (NEW.state = '{state}' AND OLD.state IS DISTINCT FROM NEW.state)"
            f" EXECUTE FUNCTION ichnode_notify('{channel}')"
        )


def downgrade() -> None:
    if not _postgresql():
        return
    for table, name, _state, _channel in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name}_update ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {name}_insert ON {table}")
    op.execute("DROP FUNCTION IF EXISTS ichnode_notify()")
