"""Claims on the job queue and the outbox, one statement each, on SQLite and PostgreSQL.

Workers take jobs and senders take deliveries from the index, never from a
coordinator of ours, so any number of them, in any number of processes and on
any number of machines sharing one PostgreSQL, work one queue without doing
the same work twice. Each claim is a single statement::

    UPDATE jobs SET state = 'running', ...
     WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND <due>
                  ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
       AND state = 'queued'
    RETURNING id, series_id, attempts

On PostgreSQL ``FOR UPDATE SKIP LOCKED`` makes concurrent claimers pass over
a row another transaction is taking and take the next one, so N claimers at
the same moment get N different jobs (without it they would all pick the same
row, one would win and the others come back empty-handed although work is
waiting). The repeated ``state = 'queued'`` keeps the statement atomic on its
own. SQLite has no row locks and ignores the clause: its write transactions
start with ``BEGIN IMMEDIATE`` (:mod:`storage.index`), so claims are
serialised by the database lock and the same statement is just as safe.

A delivery is claimed by moving its ``next_attempt_at`` forward by a lease:
other senders leave it alone until then, and the claimant replaces the lease
with the outcome (``sent``, a backoff, ``dead``). When a sender dies in the
middle, the delivery becomes due again when the lease runs out and another
sender takes it (at least once delivery; the destination keeps one copy of a
SOP Instance UID).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ResultKind,
    Series,
    SeriesStatus,
    utcnow,
)

#: Within one job the SR (the finding) goes first, then the SEG, then key images.
RESULT_KIND_ORDER = case(
    (Result.kind == ResultKind.SR, 0), (Result.kind == ResultKind.SEG, 1), else_=2
)


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now owns."""

    id: int
    series_id: int
    attempts: int


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery a sender now owns until ``lease_until``."""

    id: int
    destination: str
    path: str
    superseded: bool
    lease_until: dt.datetime
    result_id: int = 0


def claim_job(
    session: Session, claimed_by: str, now: dt.datetime | None = None
) -> ClaimedJob | None:
    """Take the oldest due queued job in one statement; ``None`` when there is none.

    The job becomes ``running`` with ``claimed_by``, ``claimed_at`` and
    ``heartbeat_at`` set and one more attempt counted; its series becomes
    ``running``. Two claimers never get the same job, and on PostgreSQL
    concurrent claimers get different jobs (``FOR UPDATE SKIP LOCKED``). The
    caller commits (``with index.session() as session``).
    """
    now = now or utcnow()
    due = (
        select(Job.id)
        .where(
            Job.state == JobState.QUEUED,
            or_(Job.not_before.is_(None), Job.not_before <= now),
        )
        .order_by(Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Job)
        .where(Job.id == due, Job.state == JobState.QUEUED)
        .values(
            state=JobState.RUNNING,
            claimed_by=claimed_by,
            claimed_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
        )
        .returning(Job.id, Job.series_id, Job.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    session.execute(
        update(Series)
        .where(Series.id == row.series_id)
        .values(status=SeriesStatus.RUNNING, reason=None)
        .execution_options(synchronize_session=False)
    )
    return ClaimedJob(id=int(row.id), series_id=int(row.series_id), attempts=int(row.attempts))


def claim_delivery(
    session: Session,
    lease_seconds: float,
    now: dt.datetime | None = None,
    *,
    due_at: dt.datetime | None = None,
) -> ClaimedDelivery | None:
    """Take the next due pending delivery for ``lease_seconds``; ``None`` when there is none.

    Order: oldest job first, and within a job SR, SEG, then key images. The
    row stays ``pending`` with ``next_attempt_at`` moved to ``now`` plus the
    lease, so no other sender takes it meanwhile; the claimant records the
    outcome, which replaces the lease. ``due_at`` (default ``now``) is the
    time a row must be due by: a sender passes the start of its pass, so a
    row it retried during the pass is not taken again in the same pass. The
    caller commits.
    """
    now = now or utcnow()
    due_by = due_at or now
    is_due = or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= due_by)
    due = (
        select(Delivery.id)
        .join(Result, Result.id == Delivery.result_id)
        .where(Delivery.state == DeliveryState.PENDING, is_due)
        .order_by(Result.job_id, RESULT_KIND_ORDER, Delivery.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=Delivery)
        .scalar_subquery()
    )
    lease_until = now + dt.timedelta(seconds=lease_seconds)
    row = session.execute(
        update(Delivery)
        .where(Delivery.id == due, Delivery.state == DeliveryState.PENDING, is_due)
        .values(next_attempt_at=lease_until)
        .returning(Delivery.id, Delivery.destination, Delivery.result_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    path, superseded = session.execute(
        select(Result.path, Result.superseded).where(Result.id == row.result_id)
    ).one()
    return ClaimedDelivery(
        id=int(row.id),
        destination=str(row.destination),
        path=str(path),
        superseded=bool(superseded),
        lease_until=lease_until,
        result_id=int(row.result_id),
    )
