"""The outbox sender: delivers result objects to the configured destinations.

Each ``deliveries`` row is one result object towards one destination. The
sender keeps one association per DIMSE destination, sends every due delivery
with C-STORE, checks every response status (an empty response is a timeout or
an abort, never a success) and marks a row ``sent`` only on an acknowledgement.
A ``kind = "dicomweb"`` destination gets the same rows by STOW-RS
(:mod:`node.dicomweb`): sent only when the response dataset lists the instance
as stored.
Triage notifications (:mod:`node.notify`, ``[[notifications]]``) are rows of
the same outbox: the sender adds one for each new SR whose finding a
notification asks for, then sends it by webhook or HL7 MLLP with the same
backoff, dead letter and ``ichnode outbox retry``; the worker never waits
for them.
A failed try is retried with exponential backoff (``[delivery]``
``backoff_initial_seconds`` doubling up to ``backoff_max_seconds``); a delivery
older than ``max_age_hours`` becomes ``dead`` until ``ichnode outbox retry``.
Everything it knows lives in the index, so a restart loses nothing; every
state it records (sent, backoff, dead) is a transition of
:class:`storage.outbox.Outbox`, the one owner of delivery states. Each
delivery is claimed just before it is sent (:func:`storage.queue.claim_delivery`:
a lease on ``next_attempt_at``, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so
several senders sharing one index never send the same row at once; the lease
of a sender that died runs out after three delivery timeouts and 30 seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy.exc import SQLAlchemyError

from config.settings import DeliverySettings, DestinationSettings, NotificationSettings
from node.dicomweb import DicomWebLink
from node.notify import (
    Hl7Link,
    NotificationQueue,
    WebhookLink,
    notification_id,
    read_notice,
    source_series_uid,
)
from node.tls import client_tls_args
from storage.index import Index
from storage.notify import DELIVERIES, Wakeups
from storage.outbox import Outbox
from storage.runtime import backoff_seconds, utcnow

if TYPE_CHECKING:
    from node.service import NodeService

logger = logging.getLogger(__name__)

# C-STORE statuses that mean the destination has the object (PS3.4 B.2.3):
# success and the three warnings (coercion, elements discarded, no validation).
ACKNOWLEDGED = {0x0000, 0xB000, 0xB006, 0xB007}

# The SOP classes ichnode produces; requested on every association so one
# association carries a whole result set.
_RESULT_SOP_CLASSES = (
    SegmentationStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


# An idle association is released after this many seconds.
IDLE_RELEASE_SECONDS = 10.0
# New SRs are looked at for notifications at most this often.
NOTIFY_SCAN_SECONDS = 0.5
# With LISTEN/NOTIFY (PostgreSQL) an idle sender looks at the outbox this often
# even without a notification (one lost while reconnecting).
NOTIFIED_POLL_SECONDS = 1.0


__all__ = ["DestinationLink", "SendOutcome", "Sender", "backoff_seconds", "component"]


@dataclass
class SendOutcome:
    """What one pass of the sender did (for logs and tests)."""

    sent: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)


class DestinationLink:
    """One destination and its (at most one) open association."""

    def __init__(self, destination: DestinationSettings, calling_ae: str, timeout: float) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout = timeout
        self.assoc: Association | None = None
        self.last_used = 0.0
        self._extra_contexts: set[tuple[str, str]] = set()
        # DICOM TLS towards this destination (its files are checked here, at start-up).
        self.tls_args = client_tls_args(destination)

    def _contexts(self) -> list[tuple[str, list[str]]]:
        wanted: dict[str, list[str]] = {
            str(uid): list(_UNCOMPRESSED) for uid in _RESULT_SOP_CLASSES
        }
        for sop_class_uid, ts in sorted(self._extra_contexts):
            syntaxes = wanted.setdefault(sop_class_uid, list(_UNCOMPRESSED))
            if ts not in syntaxes:
                syntaxes.insert(0, ts)
        return list(wanted.items())

    def _accepts(self, sop_class_uid: str, transfer_syntax: str) -> bool:
        if self.assoc is None:  # no association: nothing can carry the object
            return False
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax != sop_class_uid:
                continue
            if cx.transfer_syntax and (
                cx.transfer_syntax[0] == transfer_syntax or transfer_syntax in _UNCOMPRESSED
            ):
                return True
        return False

    def open(self, sop_class_uid: str, transfer_syntax: str) -> Association | None:
        """Return an established association able to carry this object, or None."""
        if self.assoc is not None and self.assoc.is_established:
            if self._accepts(sop_class_uid, transfer_syntax):
                return self.assoc
            self.release()
        key = (sop_class_uid, transfer_syntax)
        if key not in {(str(u), str(t)) for u in _RESULT_SOP_CLASSES for t in _UNCOMPRESSED}:
            self._extra_contexts.add(key)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for abstract, syntaxes in self._contexts():
            ae.add_requested_context(abstract, syntaxes)
        dest = self.destination
        assert dest.port is not None  # a dimse destination has one (settings validate it)
        assoc = ae.associate(
            dest.host, dest.port, ae_title=dest.ae_title, tls_args=self.tls_args
        )
        if not assoc.is_established:
            logger.warning(
                "destination %s (%s@%s:%s): association not established",
                dest.name,
                dest.ae_title,
                dest.host,
                dest.port,
            )
            self.assoc = None
            return None
        self.assoc = assoc
        if not self._accepts(sop_class_uid, transfer_syntax):
            logger.warning(
                "destination %s accepts no presentation context for %s / %s",
                dest.name,
                sop_class_uid,
                transfer_syntax,
            )
            return None
        return assoc

    def release(self) -> None:
        """Release the association if one is open."""
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None

    def drop(self) -> None:
        """Abort the association after an error (it is not trusted any more)."""
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.abort()
            self.assoc = None


def _store(link: DestinationLink, path: Path) -> tuple[bool, str]:
    """Send one file; return (acknowledged, error text).

    When a kept-open association turns out to be gone (the peer closed it
    while idle), the object is sent once more on a fresh association before
    the try counts as failed.
    """
    try:
        meta = dcmread(path, stop_before_pixels=True)
    except (OSError, ValueError) as exc:
        return False, f"cannot read result file {path}: {exc}"
    sop_class_uid = str(meta.SOPClassUID)
    transfer_syntax = str(meta.file_meta.TransferSyntaxUID)
    for reused in (link.assoc is not None and link.assoc.is_established, False):
        assoc = link.open(sop_class_uid, transfer_syntax)
        if assoc is None:
            return False, "association not established or context rejected"
        link.last_used = time.monotonic()
        try:
            status = assoc.send_c_store(path)
        except (OSError, ValueError, RuntimeError) as exc:
            link.drop()
            error = f"C-STORE failed: {exc}"
        else:
            if "Status" in status:
                code = int(status.Status)
                if code in ACKNOWLEDGED:
                    return True, ""
                comment = status.get("ErrorComment", "")
                return False, f"C-STORE status 0x{code:04X}{' ' + str(comment) if comment else ''}"
            # pynetdicom: an empty Dataset is a timeout, an abort or an invalid response.
            link.drop()
            error = "no C-STORE response (timeout or abort)"
        if not reused:
            break
        logger.info("association to %s was gone; trying a new one", link.destination.name)
    return False, error


class Sender:
    """Deliver due rows of the outbox, one association per destination.

    Parameters
    ----------
    index : storage.index.Index
        The index holding the outbox.
    destinations : list of DestinationSettings
        The configured destinations (deliveries name them).
    delivery : DeliverySettings
        Backoff and age limits.
    calling_ae : str
        Our AE title as the calling AE.
    notifications : list of NotificationSettings
        Triage notifications (webhook, HL7), sent through the same outbox.
    """

    def __init__(
        self,
        index: Index,
        destinations: list[DestinationSettings],
        delivery: DeliverySettings,
        calling_ae: str,
        poll_seconds: float = 0.1,
        notifications: list[NotificationSettings] | None = None,
    ) -> None:
        self.index = index
        self.delivery = delivery
        self.outbox = Outbox(index, delivery)
        self.poll_seconds = poll_seconds
        self.links: dict[str, DestinationLink | DicomWebLink | WebhookLink | Hl7Link] = {
            d.name: (
                DicomWebLink(d, delivery.timeout_seconds)
                if d.kind == "dicomweb"
                else DestinationLink(d, calling_ae, delivery.timeout_seconds)
            )
            for d in destinations
        }
        dicomweb_urls = [d.url for d in destinations if d.kind == "dicomweb"]
        for n in notifications or []:
            self.links[n.name] = (
                WebhookLink(n, delivery.timeout_seconds, dicomweb_urls)
                if n.kind == "webhook"
                else Hl7Link(n, delivery.timeout_seconds)
            )
        self.notify_queue = NotificationQueue(
            self.outbox, notifications or [], dt.timedelta(hours=delivery.max_age_hours)
        )
        self._last_scan = float("-inf")
        self._stop = threading.Event()
        # On PostgreSQL a new pending delivery wakes the sender at once, whichever
        # process or machine added it (LISTEN/NOTIFY); on SQLite it polls.
        self.wakeups = Wakeups(index.url, [DELIVERIES])
        self._thread: threading.Thread | None = None

    name = "sender"

    # -- one pass ---------------------------------------------------------
    def _due(self, now: dt.datetime, limit: int) -> Iterator[tuple[int, str, str, bool, int]]:
        """Claim the deliveries due at ``now`` one at a time, at most ``limit``.

        Each is leased to this sender (:func:`storage.queue.claim_delivery`,
        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL) just before it is sent, so
        senders in other processes sharing the index never send it as well;
        :meth:`_record` or :meth:`_mark_dead` replaces the lease with the outcome.
        """
        lease = 3 * self.delivery.timeout_seconds + 30.0
        for _ in range(limit):
            claimed = self.outbox.claim(lease, due_at=now)
            if claimed is None:
                return
            yield (
                claimed.id,
                claimed.destination,
                claimed.path,
                claimed.superseded,
                claimed.result_id,
            )

    def _record(self, delivery_id: int, ok: bool, error: str, outcome: SendOutcome) -> None:
        recorded = (
            self.outbox.acknowledged(delivery_id) if ok else self.outbox.failed(delivery_id, error)
        )
        if recorded.state == "sent":
            outcome.sent.append(delivery_id)
        elif recorded.state == "retry":
            outcome.retried.append(delivery_id)
        elif recorded.state == "dead":
            outcome.dead.append(delivery_id)

    def _mark_dead(self, delivery_id: int, error: str, outcome: SendOutcome) -> None:
        if self.outbox.dead(delivery_id, error).state == "dead":
            outcome.dead.append(delivery_id)

    def send_once(self, limit: int = 200) -> SendOutcome:
        """Try every due delivery once; return what happened."""
        outcome = SendOutcome()
        if self.notify_queue.notifications and (
            time.monotonic() - self._last_scan >= NOTIFY_SCAN_SECONDS
        ):
            self._last_scan = time.monotonic()
            self.notify_queue.enqueue(utcnow())
        # Destinations whose try failed for all of them in this pass, with why.
        broken: dict[str, str] = {}
        for delivery_id, destination, path, superseded, result_id in self._due(utcnow(), limit):
            if superseded:
                self._mark_dead(delivery_id, "result superseded by a newer analysis", outcome)
                continue
            link = self.links.get(destination)
            if link is None:
                self._record(
                    delivery_id, False, f"destination {destination!r} is not configured", outcome
                )
                continue
            if destination in broken:
                # Its association just failed: do not hammer it within this pass.
                error = f"destination unreachable: {broken[destination]}"
                self._record(delivery_id, False, error, outcome)
                continue
            if isinstance(link, DicomWebLink):
                ok, error = link.store(Path(path))
                if not ok and not link.reachable:
                    broken[destination] = error
            elif isinstance(link, WebhookLink | Hl7Link):
                try:
                    notice = read_notice(Path(path), source_series_uid(self.index, result_id))
                except ValueError as exc:
                    ok, error = False, str(exc)
                else:
                    ok, error = link.send(notice, notification_id(delivery_id))
                    if not ok and not link.reachable:
                        broken[destination] = error
            else:
                ok, error = _store(link, Path(path))
                if not ok and link.assoc is None:
                    broken[destination] = error
            self._record(delivery_id, ok, error, outcome)
            if ok:
                logger.info("delivery %s acknowledged by %s", delivery_id, destination)
        self._release_idle()
        return outcome

    def _next_due_in(self) -> float:
        """Seconds until the outbox's next backoff or lease ends (long when nothing waits)."""
        try:
            due = self.outbox.next_due_in()
        except SQLAlchemyError:
            return self.poll_seconds
        return float("inf") if due is None else max(due, 0.05)

    def _release_idle(self) -> None:
        now = time.monotonic()
        for link in self.links.values():
            if (
                isinstance(link, DestinationLink)
                and link.assoc is not None
                and now - link.last_used > IDLE_RELEASE_SECONDS
            ):
                link.release()

    # -- thread -----------------------------------------------------------
    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self.wakeups.wake()

    def _loop(self) -> None:
        wait = self.poll_seconds
        if self.wakeups.listens:
            wait = max(wait, NOTIFIED_POLL_SECONDS)
        while not self._stop.is_set():
            try:
                outcome = self.send_once()
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("sender pass failed (%s); retrying", exc)
                outcome = SendOutcome()
            if outcome.sent or outcome.retried or outcome.dead:
                continue
            if self.wakeups.listens:
                # Backoffs and leases end without a notification: wait no longer
                # than until the next of them is due. (Polling SQLite every
                # poll_seconds needs no such look.)
                self.wakeups.wait(min(wait, self._next_due_in()))
            else:
                self.wakeups.wait(wait)

    def start(self) -> None:
        """Run the sender in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="ichnode-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and release every association."""
        self._stop.set()
        self.wakeups.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self.wakeups.close()
        for link in self.links.values():
            link.release()


def component(service: NodeService) -> Sender:
    """The outbox sender of ``ichnode serve`` (see :mod:`node.service`)."""
    settings = service.settings
    return Sender(
        service.index,
        list(settings.destinations),
        settings.delivery,
        settings.node.ae_title,
        notifications=list(settings.notifications),
    )
