"""The outbox's state machine: every delivery transition, in one place.

A delivery is one result object (or one notification of it) towards one
destination::

    pending --claim--> pending (leased) --acknowledged--> sent
                                        --failed--------> pending (backoff) | dead
                                        --superseded----> dead
    dead --retry--> pending          pending (not sent yet) --retry--> pending, due now

Only this module writes ``deliveries.state``; the sender, the worker (through
:mod:`storage.jobs`), the notification queue and ``ichnode outbox retry`` call
it. Times come from :func:`storage.runtime.utcnow` unless the caller passes
one (tests), and the wait after a failure is :func:`storage.runtime.backoff_seconds`
with ``[delivery]`` ``backoff_initial_seconds`` and ``backoff_max_seconds``; a
delivery whose first try (or last ``ichnode outbox retry``) is older than
``max_age_hours`` becomes ``dead`` at its next failure.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config.settings import DeliverySettings
from storage.index import Index
from storage.models import Delivery, DeliveryState
from storage.queue import ClaimedDelivery, claim_delivery
from storage.runtime import as_utc, backoff_seconds, utcnow

logger = logging.getLogger(__name__)

__all__ = ["ClaimedDelivery", "Outbox", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """What a recorded try did to a delivery: ``sent``, ``retry`` (in ``wait`` s), ``dead``,
    or ``gone`` (the row was no longer pending: another sender or a person changed it)."""

    state: str
    wait: float = 0.0


class Outbox:
    """Deliveries of one index under one ``[delivery]`` policy.

    Parameters
    ----------
    index : Index
        The index (this process's engine).
    policy : DeliverySettings
        Backoff and age limit.
    """

    def __init__(self, index: Index, policy: DeliverySettings) -> None:
        self.index = index
        self.policy = policy

    # -- create --------------------------------------------------------------
    @staticmethod
    def add(
        session: Session, result_id: int, destinations: Sequence[str], now: dt.datetime
    ) -> list[Delivery]:
        """New ``pending`` rows of ``result_id``, one per destination, in the caller's transaction."""
        rows = [
            Delivery(
                result_id=result_id,
                destination=name,
                state=DeliveryState.PENDING,
                attempts=0,
                created_at=now,
            )
            for name in destinations
        ]
        session.add_all(rows)
        return rows

    def add_once(self, result_id: int, destination: str, now: dt.datetime | None = None) -> int | None:
        """One ``pending`` row in its own transaction; ``None`` when it exists already.

        The unique (result, destination) constraint decides between processes
        adding the same row at once (notifications).
        """
        try:
            with self.index.session() as session:
                (row,) = self.add(session, result_id, [destination], now or utcnow())
                session.flush()
                return int(row.id)
        except IntegrityError:
            return None

    # -- claim ---------------------------------------------------------------
    def claim(
        self, lease_seconds: float, now: dt.datetime | None = None, *, due_at: dt.datetime | None = None
    ) -> ClaimedDelivery | None:
        """Lease the next due delivery (:func:`storage.queue.claim_delivery`); ``None`` if none."""
        with self.index.session() as session:
            return claim_delivery(session, lease_seconds, now or utcnow(), due_at=due_at)

    def next_due_in(self, now: dt.datetime | None = None) -> float | None:
        """Seconds until the next pending delivery is due (0 when one is); ``None`` if none."""
        now = now or utcnow()
        with self.index.session(readonly=True) as session:
            rows = session.execute(
                select(Delivery.next_attempt_at)
                .where(Delivery.state == DeliveryState.PENDING)
                .order_by(Delivery.next_attempt_at.is_not(None), Delivery.next_attempt_at)
                .limit(1)
            ).all()
        if not rows:
            return None
        due = rows[0][0]
        return 0.0 if due is None else max(0.0, (as_utc(due) - now).total_seconds())

    # -- outcomes ------------------------------------------------------------
    def _pending(self, session: Session, delivery_id: int) -> Delivery | None:
        row = session.get(Delivery, delivery_id)
        if row is None or row.state != DeliveryState.PENDING:
            return None
        return row

    def acknowledged(self, delivery_id: int, now: dt.datetime | None = None) -> Outcome:
        """The destination has the object: ``sent``."""
        now = now or utcnow()
        with self.index.session() as session:
            row = self._pending(session, delivery_id)
            if row is None:
                return Outcome("gone")
            row.attempts += 1
            row.state = DeliveryState.SENT
            row.acked_at = now
            row.last_error = None
            row.next_attempt_at = None
        return Outcome("sent")

    def failed(self, delivery_id: int, error: str, now: dt.datetime | None = None) -> Outcome:
        """A try failed: back off, or ``dead`` once the delivery is older than ``max_age_hours``."""
        now = now or utcnow()
        with self.index.session() as session:
            row = self._pending(session, delivery_id)
            if row is None:
                return Outcome("gone")
            row.attempts += 1
            row.last_error = error
            started = as_utc(row.retried_at or row.created_at)
            if now - started >= dt.timedelta(hours=self.policy.max_age_hours):
                row.state = DeliveryState.DEAD
                row.next_attempt_at = None
                logger.error(
                    "delivery %s to %s is dead after %d tries: %s",
                    delivery_id,
                    row.destination,
                    row.attempts,
                    error,
                )
                return Outcome("dead")
            wait = backoff_seconds(
                row.attempts, self.policy.backoff_initial_seconds, self.policy.backoff_max_seconds
            )
            row.next_attempt_at = now + dt.timedelta(seconds=wait)
            logger.warning(
                "delivery %s to %s failed (try %d, next in %.1f s): %s",
                delivery_id,
                row.destination,
                row.attempts,
                wait,
                error,
            )
        return Outcome("retry", wait)

    def dead(self, delivery_id: int, error: str) -> Outcome:
        """Never to be sent (its result was superseded): ``dead`` at once."""
        with self.index.session() as session:
            row = self._pending(session, delivery_id)
            if row is None:
                return Outcome("gone")
            row.state = DeliveryState.DEAD
            row.last_error = error
            row.next_attempt_at = None
        return Outcome("dead")

    # -- by hand -------------------------------------------------------------
    def retry(self, delivery_id: int | None = None, now: dt.datetime | None = None) -> list[int]:
        """Make one delivery (or every dead one) due now, its tries and age counted afresh.

        Returns the ids changed.

        Raises
        ------
        LookupError
            When ``delivery_id`` names no delivery, or one already acknowledged.
        """
        now = now or utcnow()
        with self.index.session() as session:
            if delivery_id is not None:
                row = session.get(Delivery, delivery_id)
                if row is None:
                    raise LookupError(f"no delivery with id {delivery_id}")
                if row.state == DeliveryState.SENT:
                    raise LookupError(f"delivery {delivery_id} was already acknowledged")
                where = [Delivery.id == delivery_id]
            else:
                where = [Delivery.state == DeliveryState.DEAD]
            ids = [int(i) for i in session.execute(select(Delivery.id).where(*where)).scalars()]
            if ids:
                session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(ids))
                    .values(
                        state=DeliveryState.PENDING,
                        next_attempt_at=now,
                        retried_at=now,
                        attempts=0,
                    )
                )
        return ids
