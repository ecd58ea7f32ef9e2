"""``ichnode outbox list|retry [ID]``: the deliveries of result objects and their state.

``list`` prints one line per delivery (newest first); a triage notification
(``[[notifications]]``, a row of the same outbox) shows its kind as ``HOOK``
(webhook) or ``HL7`` instead of the result kind. ``retry ID`` makes one
delivery due now (a ``dead`` one comes back to ``pending`` with a fresh age
limit); ``retry`` without an ID does so for every dead delivery. A running
node picks the rows up at its next pass; nothing here speaks DICOM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from dataclasses import dataclass

from sqlalchemy import select

from config import load_settings
from config.settings import DeliverySettings
from storage.index import Index
from storage.models import Delivery, DeliveryState, Result, ResultKind, Series
from storage.outbox import Outbox

logger = logging.getLogger(__name__)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@dataclass(frozen=True)
class OutboxRow:
    """One delivery as ``ichnode outbox list`` shows it."""

    id: int
    state: str
    destination: str
    kind: str
    superseded: bool
    series_instance_uid: str
    attempts: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None
    acked_at: dt.datetime | None
    last_error: str | None


def list_deliveries(index: Index) -> list[OutboxRow]:
    """Every delivery with its result and series, newest first."""
    with index.session(readonly=True) as session:
        rows = session.execute(
            select(Delivery, Result.kind, Result.superseded, Series.series_instance_uid)
            .join(Result, Result.id == Delivery.result_id)
            .join(Series, Series.id == Result.series_id)
            .order_by(Delivery.id.desc())
        ).all()
        return [
            OutboxRow(
                id=d.id,
                state=DeliveryState(d.state).value,
                destination=d.destination,
                kind=ResultKind(kind).value,
                superseded=bool(superseded),
                series_instance_uid=series_uid,
                attempts=d.attempts,
                created_at=d.created_at,
                next_attempt_at=d.next_attempt_at,
                acked_at=d.acked_at,
                last_error=d.last_error,
            )
            for d, kind, superseded, series_uid in rows
        ]


def retry(index: Index, delivery_id: int | None, now: dt.datetime | None = None) -> list[int]:
    """Make a delivery (or every dead one) due now; return the ids changed.

    The transition is :meth:`storage.outbox.Outbox.retry`.

    Raises
    ------
    LookupError
        When ``delivery_id`` names no delivery, or one already acknowledged.
    """
    return Outbox(index, DeliverySettings()).retry(delivery_id, now)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ichnode outbox``."""
    settings = load_settings(args.config)
    index = Index(settings.storage.effective_database_url)
    if index.current_revision() is None:
        print(
            f"ichnode outbox: no index at {settings.storage.effective_database_url} "
            "(has `ichnode serve` run with this configuration?)",
            file=sys.stderr,
        )
        return 1
    if index.current_revision() != index.head_revision():
        index.upgrade()
    if args.action == "retry":
        try:
            ids = Outbox(index, settings.delivery).retry(args.id)
        except LookupError as exc:
            print(f"ichnode outbox: {exc}", file=sys.stderr)
            return 1
        if not ids:
            print("nothing to retry")
        else:
            print(f"queued again: {', '.join(str(i) for i in ids)}")
        return 0
    if args.id is not None:
        print("ichnode outbox: list takes no ID", file=sys.stderr)
        return 2
    rows = list_deliveries(index)
    notification_kinds = {
        n.name: ("HL7" if n.kind == "hl7" else "HOOK") for n in settings.notifications
    }
    if not rows:
        print("outbox is empty")
        return 0
    print(
        f"{'ID':>6}  {'STATE':<8} {'DESTINATION':<16} {'KIND':<4} {'TRIES':>5}  "
        f"{'NEXT/ACKED':<19}  SERIES / LAST ERROR"
    )
    for r in rows:
        when = r.acked_at if r.state == "sent" else r.next_attempt_at
        note = r.last_error or ""
        if r.superseded:
            note = ("superseded; " + note).rstrip("; ")
        kind = notification_kinds.get(r.destination, r.kind)
        print(
            f"{r.id:>6}  {r.state:<8} {r.destination[:16]:<16} {kind:<4} "
            f"{r.attempts:>5}  {_when(when):<19}  {r.series_instance_uid}"
            + (f"  {note}" if note else "")
        )
    return 0
