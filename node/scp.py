"""The DICOM receiver of ichnode: C-ECHO and C-STORE over pynetdicom.

:class:`StorageSCP` owns the pynetdicom AE and its threaded association server.
Each association runs in its own thread; the C-STORE handler only checks the
dataset, writes the file (:class:`storage.archive.Archive`), commits the index
row (:class:`storage.index.Index`) and returns a DICOM status. Success (0x0000)
is returned only after both are durable. The SCP never analyses anything: it
tells its :class:`IngestListener` objects (e.g. the scheduler) when an instance
was stored and when an association ended, with the series it touched.

Statuses returned
-----------------
0x0000 stored and indexed; 0xA700 free disk under ``storage.min_free_disk_mb``,
the file or index could not be written, or the node is shutting down; 0xA900
a required UID is missing or the SOP Class UID disagrees with the request;
0xC000 the dataset cannot be decoded (an element or item runs past the end
of the data, a VR is not one of PS3.5, native Pixel Data is shorter than Rows x
Columns x samples x frames says, an image header comes without Pixel Data, or
the dataset carries File Meta Information),
its SOP Instance UID differs from the request's Affected SOP Instance UID, a
UID breaks PS3.5 9.1 (over 64 characters, characters other than 0-9 and '.',
an empty component; never shortened), the Patient ID or its issuer is over 64
characters, or the SOP Instance UID is already stored under another study or
patient (the stored instance is kept).
0xA700 also: the dataset is larger than ``node.max_instance_mb``; the node
stops keeping its bytes as soon as the limit is crossed, reads the rest of the
message without storing it, then answers.

Hardening
---------
What needs pynetdicom's internals lives in :mod:`node.dimse_internals`, the
only module that reaches into them: the listening server
(:class:`~node.dimse_internals.GuardedAssociationServer`) sets the network
timeout on every accepted socket, so a peer that stalls in the middle of a PDU
is dropped after ``node.network_timeout_seconds``; with ``[node.tls]`` the TLS
handshake runs in the connection's own thread under that timeout (a silent or
failing client never holds the accept loop). A PDU whose declared length is
over :data:`MAX_PDU_LENGTH` closes the connection before anything is buffered.
Only associations hold one of the ``node.max_associations`` slots
(:class:`~node.dimse_internals.AssociationSlots`), from their A-ASSOCIATE-RQ
until they end (:meth:`StorageSCP._handle_requested`): a health check, a port
scan, garbage or a refused caller never holds one, and the thread of a
connection closed before its request ends at once. The DIMSE layer lets any
non-empty UID through (:func:`~node.dimse_internals.lenient_ui`): the handler
refuses a bad one with a status instead of pynetdicom aborting the association.
The received bytes are checked by :mod:`node.dicom_bytes` before pydicom
decodes the header.
Every value from the wire that the node (this module, the scheduler, ...), the
storage layer, pynetdicom or pydicom logs goes through :class:`node.wire.EscapeWireValues` (installed by
:class:`StorageSCP`), so it stays on one printable line.
"""

from __future__ import annotations

import datetime as dt
import logging
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.exc import SQLAlchemyError

from config.settings import NodeSettings, StorageSettings
from node.dicom_bytes import (
    MalformedDatasetError,
    OversizeDatasetError,
    check_encoding,
    expected_pixel_bytes,
    read_header,
)
from node.dimse_internals import (
    MAX_PDU_LENGTH,  # noqa: F401  (part of this module's documented limits)
    MAX_PDU_SIZE,
    AssociationSlots,
    GuardedAssociationServer,
    OversizeDataSet,
    end_wait_for_request,
    install_lenient_uid_validator,
    make_guarded_server,
    pending_end,
)
from node.tls import server_context
from node.wire import escape_wire_logs, uid_problem
from storage.archive import Archive, ArchiveError, UnsafeUIDError
from storage.index import (
    Index,
    InstanceMeta,
    InvalidAttributeError,
    MissingAttributeError,
    UIDConflictError,
)
from storage.models import AssociationOutcome, utcnow

logger = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class, in the node's order
#: of preference: pynetdicom accepts, for each proposed presentation context,
#: the first of these the requestor proposed. Compressed syntaxes come first
#: because a sender that proposes one holds the data in it (storescu -R, a PACS
#: forwarding what it stored), and the node keeps instances exactly as they
#: were; choosing Explicit VR Little Endian would make the sender decompress
#: (DCMTK's storescu cannot, for RLE) and change the bytes. Lossless before
#: lossy; Implicit VR Little Endian, the default every peer supports, last.
TRANSFER_SYNTAXES: list[str] = [
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
]

# What pydicom raises for a stream it cannot parse (truncated, bad lengths, bad
# deflate data, undefined VRs, undecodable text, deep nesting). TypeError,
# KeyError and AttributeError are not here: from this path they would be a bug
# of ichnode's, which pynetdicom answers with 0xC211 and logs with a traceback.
_DECODE_ERRORS = (
    ValueError,
    IndexError,
    OverflowError,
    RecursionError,
    EOFError,
    OSError,
    NotImplementedError,
    InvalidDicomError,
    struct.error,
    zlib.error,
)

#: How long a closed connection's association may take to show its release or abort (s).
CLOSE_SETTLE_SECONDS = 0.5
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class InstanceStored:
    """Told to listeners after an instance is durable and indexed."""

    association_id: int
    calling_ae: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    series_id: int
    resent: bool
    received_at: dt.datetime


@dataclass(frozen=True)
class AssociationClosed:
    """Told to listeners when an association is released, aborted or dropped."""

    association_id: int
    calling_ae: str
    outcome: AssociationOutcome
    instances: int
    series_instance_uids: frozenset[str]
    series_ids: frozenset[int]


class IngestListener(Protocol):
    """What the SCP tells the rest of the node (the scheduler implements it).

    Both methods run in the association's thread: keep them short (write a
    row, set an event), never analyse anything there.
    """

    def instance_stored(self, stored: InstanceStored) -> None:
        """An instance was stored and its row committed."""

    def association_closed(self, closed: AssociationClosed) -> None:
        """An association ended; ``closed.series_instance_uids`` may be complete now."""


@dataclass
class _AssociationState:
    association_id: int
    calling_ae: str
    instances: int = 0
    failures: int = 0
    series: dict[str, int] = field(default_factory=dict)
    busy: bool = False
    closing: bool = False
    closed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)



def _idle(state: _AssociationState) -> Callable[[], bool]:
    return lambda: not state.busy


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    """The C-ECHO/C-STORE service of the node.

    Parameters
    ----------
    node : NodeSettings
        AE title, address, allowed callers, association limit.
    storage : StorageSettings
        Free-disk threshold.
    archive, index
        Where files and rows go; made once by the caller and shared.
    listeners : sequence of IngestListener
        Told about stored instances and ended associations.
    shutdown_grace_s : float
        On :meth:`stop`, how long open associations may go on before the node
        aborts them (never in the middle of a store).
    reuse_port : bool
        Bind with ``SO_REUSEPORT``: several receiver processes accept on one
        port (``node.receivers``).
    """

    name = "scp"

    def __init__(
        self,
        node: NodeSettings,
        storage: StorageSettings,
        archive: Archive,
        index: Index,
        listeners: Sequence[IngestListener] = (),
        *,
        shutdown_grace_s: float = 5.0,
        reuse_port: bool = False,
    ) -> None:
        self.node = node
        self.reuse_port = reuse_port
        self.archive = archive
        self.index = index
        self.listeners = list(listeners)
        self.min_free_bytes = storage.min_free_disk_mb * 1024 * 1024
        self.max_instance_bytes = node.max_instance_mb * 1024 * 1024
        self.shutdown_grace_s = shutdown_grace_s
        self._server: GuardedAssociationServer | None = None
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self._server_thread: threading.Thread | None = None
        # Built now, so a certificate that does not load stops the start-up.
        self.ssl_context = server_context(node.tls) if node.tls.enabled else None
        self.ae = self._make_ae()
        # Associations holding one of node.max_associations slots: from their
        # A-ASSOCIATE-RQ until they are rejected, released, aborted or closed.
        # pynetdicom's own limit counts every acceptor thread, also those of
        # connections that never sent an A-ASSOCIATE-RQ; this puts it out of the way.
        self._slots = AssociationSlots(self.ae, node.max_associations)

    # -- set-up --------------------------------------------------------------

    def _make_ae(self) -> AE:
        escape_wire_logs()
        install_lenient_uid_validator()
        ae = AE(ae_title=self.node.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.node.allowed_calling_aets)
        # Let peers send large PDUs (fewer reads per instance), but bounded.
        ae.maximum_pdu_size = MAX_PDU_SIZE
        ae.network_timeout = self.node.network_timeout_seconds
        ae.dimse_timeout = self.node.dimse_timeout_seconds
        ae.acse_timeout = self.node.acse_timeout_seconds
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        return ae

    def add_listener(self, listener: IngestListener) -> None:
        """Add a listener (before :meth:`start`)."""
        self.listeners.append(listener)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server listens on."""
        if self._server is None:
            return (self.node.host, self.node.port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        """Start listening (non-blocking); each association gets its own thread."""
        # Again: the node's other components have made their loggers by now.
        escape_wire_logs()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store, [self.archive, self.index]),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_conn_close),
            (evt.EVT_DIMSE_SENT, self._handle_dimse_sent),
        ]
        # ae.start_server(..., ssl_context=...) with our server class: the same
        # threaded server, with per-connection timeouts and a PDU length bound.
        server = make_guarded_server(
            self.ae,
            (self.node.host, self.node.port),
            ssl_context=self.ssl_context,
            evt_handlers=handlers,
            network_timeout=self.node.network_timeout_seconds,
            max_instance_bytes=self.max_instance_bytes,
            on_handshake_failed=self._handle_tls_failure,
            reuse_port=self.reuse_port,
        )
        self._server = server
        self._server_thread = threading.Thread(
            target=server.serve_forever, name="AcceptorServer@ichnode", daemon=True
        )
        self._server_thread.start()
        host, port = self.address
        logger.info(
            "listening as %s on %s:%d%s (max %d associations, callers %s)",
            self.node.ae_title,
            host,
            port,
            " with TLS" if self.ssl_context else "",
            self.node.max_associations,
            ", ".join(self.node.allowed_calling_aets) or "any",
        )

    def stop(self) -> None:
        """Stop accepting, let open associations finish, then abort the rest between stores."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        if self._server_thread is not None:
            self._server_thread.join(timeout=5)
            self._server_thread = None
        deadline = time.monotonic() + self.shutdown_grace_s
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self._acceptors():
            state = self._state(assoc)
            if state is not None:
                with state.cond:
                    state.closing = True
                    state.cond.wait_for(_idle(state), timeout=60)
                # The response of the last store is queued right after the
                # EVT_DIMSE_SENT that cleared ``busy``; the abort queues behind it.
                time.sleep(0.05)
            logger.info("assoc %s: aborting at shutdown", state.association_id if state else "?")
            assoc.abort()
        self.ae.shutdown()
        logger.info("stopped listening")

    def _acceptors(self) -> list[Association]:
        return [a for a in self.ae.active_associations if a.is_acceptor and a.is_alive()]

    # -- association bookkeeping -------------------------------------------

    def _state(self, assoc: Association) -> _AssociationState | None:
        with self._states_lock:
            return self._states.get(id(assoc))

    def _handle_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling_ae = str(assoc.requestor.ae_title).strip()
        association_id = self.index.open_association(
            calling_ae=calling_ae,
            called_ae=str(assoc.acceptor.ae_title).strip(),
            peer_address=str(assoc.requestor.address),
            peer_port=int(assoc.requestor.port) if assoc.requestor.port else None,
        )
        with self._states_lock:
            self._states[id(assoc)] = _AssociationState(association_id, calling_ae)
        logger.info(
            "assoc %d: accepted from %s at %s:%s",
            association_id,
            calling_ae,
            assoc.requestor.address,
            assoc.requestor.port,
            extra={"association_id": association_id, "calling_ae": calling_ae},
        )

    def _handle_requested(self, event: evt.Event) -> None:
        """Give the A-ASSOCIATE-RQ a slot, or reject it with "local limit exceeded".

        Only associations hold slots: a connection that never sends a request
        (a health check, a port scan, garbage) never takes one, and every way an
        association ends gives its slot back (:class:`AssociationSlots`); a slot
        whose thread has ended is free whatever happened.
        """
        assoc = event.assoc
        if not self._slots.take(assoc):
            self._audit_rejection(assoc, "local limit exceeded (node.max_associations)")

    def _handle_rejected(self, event: evt.Event) -> None:
        self._slots.release(event.assoc)
        self._audit_rejection(event.assoc)

    def _audit_rejection(self, assoc: Association, detail: str | None = None) -> None:
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        # From the request: on a rejection from _handle_requested, pynetdicom has
        # not copied the calling AE title to assoc.requestor yet.
        calling_ae = str(request.calling_ae_title).strip()
        called_ae = str(request.called_ae_title).strip()
        if detail is None:
            rj = assoc.acceptor.primitive
            if self.node.allowed_calling_aets and calling_ae not in self.node.allowed_calling_aets:
                detail = "calling AE title not recognised"
            elif called_ae != self.node.ae_title:
                detail = "called AE title not recognised"
            elif rj is not None:
                detail = (
                    f"rejected (result {rj.result}, source {rj.result_source},"
                    f" diagnostic {rj.diagnostic})"
                )
            else:
                detail = "rejected"
        association_id = self.index.record_rejected_association(
            calling_ae,
            called_ae,
            str(assoc.requestor.address),
            int(assoc.requestor.port) if assoc.requestor.port else None,
            detail,
        )
        logger.warning(
            "assoc %d: rejected %s -> %s from %s: %s",
            association_id,
            calling_ae,
            called_ae,
            assoc.requestor.address,
            detail,
            extra={"association_id": association_id, "calling_ae": calling_ae},
        )

    def _handle_tls_failure(self, address: tuple[str, int], reason: str) -> None:
        """Audit a connection refused at the TLS handshake (no AE titles known yet)."""
        try:
            association_id = self.index.record_rejected_association(
                "", self.node.ae_title, str(address[0]), int(address[1]),
                f"TLS handshake failed: {reason}"[:255],
            )
        except SQLAlchemyError as exc:
            logger.error("cannot audit the failed TLS handshake of %s: %s", address[0], exc)
            return
        logger.info("assoc %d: TLS handshake from %s failed", association_id, address[0])

    def _finish(self, assoc: Association, outcome: AssociationOutcome) -> None:
        self._slots.release(assoc)
        with self._states_lock:
            state = self._states.pop(id(assoc), None)
        if state is None or state.closed:
            return
        state.closed = True
        detail = "node shutting down" if state.closing else None
        self.index.close_association(
            state.association_id,
            outcome,
            instances=state.instances,
            failures=state.failures,
            detail=detail,
        )
        logger.info(
            "assoc %d: %s by %s after %d instances (%d refused) in %d series",
            state.association_id,
            outcome.value,
            state.calling_ae,
            state.instances,
            state.failures,
            len(state.series),
            extra={"association_id": state.association_id, "calling_ae": state.calling_ae},
        )
        closed = AssociationClosed(
            association_id=state.association_id,
            calling_ae=state.calling_ae,
            outcome=outcome,
            instances=state.instances,
            series_instance_uids=frozenset(state.series),
            series_ids=frozenset(state.series.values()),
        )
        for listener in self.listeners:
            # Runs in the association thread; pynetdicom logs a failing
            # notification handler with its traceback and carries on.
            listener.association_closed(closed)

    def _handle_released(self, event: evt.Event) -> None:
        self._finish(event.assoc, AssociationOutcome.RELEASED)

    def _handle_aborted(self, event: evt.Event) -> None:
        self._finish(event.assoc, AssociationOutcome.ABORTED)

    def _handle_conn_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        # Closed before an A-ASSOCIATE-RQ arrived (a health check, a port scan,
        # garbage): the acceptor thread must not wait acse_timeout_seconds.
        end_wait_for_request(assoc)
        outcome = AssociationOutcome.CLOSED
        if assoc.is_aborted:
            outcome = AssociationOutcome.ABORTED
        elif assoc.is_released:
            outcome = AssociationOutcome.RELEASED
        else:
            # The socket may close before the reactor has seen the A-ABORT or
            # A-RELEASE that preceded it.
            pending = pending_end(assoc)
            if pending == "aborted":
                outcome = AssociationOutcome.ABORTED
            elif pending == "released":
                outcome = AssociationOutcome.RELEASED
            else:
                outcome = self._settled_outcome(assoc)
        self._finish(assoc, outcome)

    @staticmethod
    def _settled_outcome(assoc: Association) -> AssociationOutcome:
        """The outcome once the association's thread has seen its last PDU.

        The DUL thread reports the closed socket; the association's own thread
        may still be handling the A-RELEASE (or A-ABORT) it read just before,
        so the flags are given a moment to settle before "closed" is recorded.
        """
        deadline = time.monotonic() + CLOSE_SETTLE_SECONDS
        while time.monotonic() < deadline:
            if assoc.is_released:
                return AssociationOutcome.RELEASED
            if assoc.is_aborted:
                return AssociationOutcome.ABORTED
            time.sleep(0.01)
        return AssociationOutcome.CLOSED

    def _handle_dimse_sent(self, event: evt.Event) -> None:
        if type(event.message).__name__ != "C_STORE_RSP":
            return
        state = self._state(event.assoc)
        if state is not None:
            with state.cond:
                state.busy = False
                state.cond.notify_all()

    # -- DIMSE handlers ------------------------------------------------------

    def _handle_echo(self, event: evt.Event) -> int:
        state = self._state(event.assoc)
        logger.info(
            "assoc %s: C-ECHO from %s",
            state.association_id if state else "?",
            event.assoc.requestor.ae_title,
        )
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event, archive: Archive, index: Index) -> int | Dataset:
        state = self._state(event.assoc)
        if state is None:  # accepted before the handler was bound; cannot happen in practice
            return _status(STATUS_OUT_OF_RESOURCES, "association not registered")
        with state.cond:
            if state.closing:
                state.failures += 1
                return _status(STATUS_OUT_OF_RESOURCES, "node is shutting down")
            state.busy = True
        status = self._store(event, state, archive, index)
        code = status if isinstance(status, int) else int(status.Status)
        if code != STATUS_SUCCESS:
            state.failures += 1
        return status

    def _store(
        self, event: evt.Event, state: _AssociationState, archive: Archive, index: Index
    ) -> int | Dataset:
        request = cast(C_STORE, event.request)
        aid, calling = state.association_id, state.calling_ae
        extra = {"association_id": aid, "calling_ae": calling}
        affected_uid = str(request.AffectedSOPInstanceUID or "")
        logger.debug("assoc %d: storing %s", aid, affected_uid, extra=extra)

        data_set = request.DataSet
        if data_set is None:
            received = 0
        elif isinstance(data_set, OversizeDataSet):
            received = data_set.received
        else:
            received = data_set.getbuffer().nbytes
        if isinstance(data_set, OversizeDataSet) or received > self.max_instance_bytes:
            logger.warning(
                "assoc %d: refused %s: data set of %d bytes is over node.max_instance_mb (%d MiB)",
                aid,
                affected_uid,
                received,
                self.max_instance_bytes // (1024 * 1024),
                extra=extra,
            )
            return _status(STATUS_OUT_OF_RESOURCES, "instance larger than the node accepts")
        if data_set is None:
            logger.warning("assoc %d: refused %s: no data set", aid, affected_uid, extra=extra)
            return _status(STATUS_DATASET_MISMATCH, "no data set")
        problem = uid_problem(affected_uid)
        if problem is not None:
            logger.warning(
                "assoc %d: refused: Affected SOP Instance UID %s breaks PS3.5 9.1: %s",
                aid,
                affected_uid,
                problem,
                extra=extra,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "invalid Affected SOP Instance UID")

        if archive.free_bytes() < self.min_free_bytes:
            logger.warning(
                "assoc %d: refused %s: free disk under storage.min_free_disk_mb",
                aid,
                affected_uid,
                extra=extra,
            )
            return _status(STATUS_OUT_OF_RESOURCES, "free disk space below the node's minimum")

        transfer_syntax = str(event.context.transfer_syntax)
        # A view, not a copy: an instance of hundreds of MB is held once.
        with data_set.getbuffer() as raw:
            return self._store_bytes(event, state, archive, index, raw, transfer_syntax)

    def _store_bytes(
        self,
        event: evt.Event,
        state: _AssociationState,
        archive: Archive,
        index: Index,
        raw: memoryview,
        transfer_syntax: str,
    ) -> int | Dataset:
        request = cast(C_STORE, event.request)
        aid, calling = state.association_id, state.calling_ae
        extra = {"association_id": aid, "calling_ae": calling}
        affected_uid = str(request.AffectedSOPInstanceUID or "")
        try:
            walk = check_encoding(raw, transfer_syntax, max_inflated=self.max_instance_bytes)
            if walk.has_file_meta:
                raise MalformedDatasetError("the dataset carries File Meta Information (0002,xxxx)")
            if UID(transfer_syntax).is_deflated:
                ds = event.dataset  # pynetdicom inflates it
            else:
                ds = read_header(raw, transfer_syntax, walk)
            if not walk.has_pixels and all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
                raise MalformedDatasetError(
                    "an image (Rows, Columns, Bits Allocated) without Pixel Data"
                )
            if walk.pixel_data_length is not None and not UID(transfer_syntax).is_compressed:
                expected = expected_pixel_bytes(ds)
                if walk.pixel_data_length < expected:
                    raise MalformedDatasetError(
                        f"Pixel Data has {walk.pixel_data_length} bytes, the image needs {expected}"
                    )
            meta = InstanceMeta.from_dataset(
                ds,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                transfer_syntax_uid=transfer_syntax,
            )
        except OversizeDatasetError as exc:
            logger.warning(
                "assoc %d: refused %s: %s, over node.max_instance_mb",
                aid,
                affected_uid,
                exc,
                extra=extra,
            )
            return _status(STATUS_OUT_OF_RESOURCES, "instance larger than the node accepts")
        except MalformedDatasetError as exc:
            logger.warning(
                "assoc %d: refused %s: malformed dataset: %s", aid, affected_uid, exc, extra=extra
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "malformed dataset")
        except MissingAttributeError as exc:
            logger.warning("assoc %d: refused %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_DATASET_MISMATCH, str(exc))
        except InvalidAttributeError as exc:
            logger.warning("assoc %d: refused %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_CANNOT_UNDERSTAND, str(exc))
        except _DECODE_ERRORS as exc:
            logger.warning(
                "assoc %d: refused %s: cannot decode dataset (%s: %s)",
                aid,
                affected_uid,
                type(exc).__name__,
                exc,
                extra=extra,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded")

        if meta.sop_instance_uid != affected_uid:
            logger.warning(
                "assoc %d: refused: SOPInstanceUID %s differs from AffectedSOPInstanceUID %s",
                aid,
                meta.sop_instance_uid,
                affected_uid,
                extra=extra,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "SOPInstanceUID differs from request")
        for keyword, value in (
            ("StudyInstanceUID", meta.study_instance_uid),
            ("SeriesInstanceUID", meta.series_instance_uid),
            ("SOPClassUID", meta.sop_class_uid),
        ):
            problem = uid_problem(value)
            if problem is not None:
                logger.warning(
                    "assoc %d: refused %s: %s %s breaks PS3.5 9.1: %s",
                    aid,
                    affected_uid,
                    keyword,
                    value,
                    problem,
                    extra=extra,
                )
                return _status(STATUS_CANNOT_UNDERSTAND, f"invalid {keyword}")
        affected_class = str(request.AffectedSOPClassUID or "")
        if meta.sop_class_uid != affected_class:
            logger.warning(
                "assoc %d: refused %s: SOPClassUID %s differs from AffectedSOPClassUID %s",
                aid,
                affected_uid,
                meta.sop_class_uid,
                affected_class,
                extra=extra,
            )
            return _status(STATUS_DATASET_MISMATCH, "SOPClassUID differs from request")
        if not walk.has_pixels and UID(affected_class).name.endswith("Image Storage"):
            # Pixel Data is Type 1 in every image IOD: without it the dataset was
            # cut short (e.g. at an element boundary) or is not the image it claims.
            logger.warning(
                "assoc %d: refused %s: %s without Pixel Data",
                aid,
                affected_uid,
                UID(affected_class).name,
                extra=extra,
            )
            return _status(STATUS_DATASET_MISMATCH, "image without Pixel Data")

        # Before the file is written: a re-send under another patient but the
        # same study and series folder would otherwise overwrite the stored
        # file, and a refused instance leaves no file behind (not even after a
        # crash, for storage.recovery to find). record_instance checks again
        # inside its transaction.
        try:
            conflict = index.find_conflict(meta)
        except SQLAlchemyError as exc:
            logger.error("assoc %d: cannot read the index: %s", aid, exc, extra=extra)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot read the index")
        if conflict is not None:
            return self._conflict(aid, extra, meta, conflict)

        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = calling
        try:
            stored = archive.store(
                meta.study_instance_uid,
                meta.series_instance_uid,
                meta.sop_instance_uid,
                file_meta,
                raw,
            )
        except UnsafeUIDError as exc:
            logger.warning("assoc %d: refused %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_CANNOT_UNDERSTAND, "UID cannot name a file")
        except ArchiveError as exc:
            logger.error("assoc %d: cannot store %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot write the file")

        received_at = utcnow()
        try:
            recorded = index.record_instance(
                meta,
                path=stored.path,
                size=stored.size,
                calling_ae=calling,
                association_id=aid,
                received_at=received_at,
            )
        except UIDConflictError as exc:
            # The series or study belongs to another study or patient, or another
            # association stored this SOP Instance UID for one since the check
            # above: the stored rows win, the file just written goes unless it
            # is the one an indexed row names.
            row = index.instance(meta.sop_instance_uid)
            if row is None or Path(row["path"]) != stored.path:
                archive.remove(stored.path)
            else:
                logger.error(
                    "assoc %d: %s: a concurrent send under another patient replaced the file"
                    " of the stored instance at %s",
                    aid,
                    meta.sop_instance_uid,
                    stored.path,
                    extra=extra,
                )
            return self._conflict(aid, extra, meta, exc)
        except SQLAlchemyError as exc:
            logger.error("assoc %d: cannot index %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_OUT_OF_RESOURCES, "cannot write the index")
        if recorded.previous_path:
            archive.remove(recorded.previous_path)

        state.instances += 1
        state.series[meta.series_instance_uid] = recorded.series_id
        logger.debug(
            "assoc %d: stored %s (series %s, %s%s)",
            aid,
            meta.sop_instance_uid,
            meta.series_instance_uid,
            transfer_syntax,
            ", re-sent" if recorded.resent else "",
            extra=extra,
        )
        stored_event = InstanceStored(
            association_id=aid,
            calling_ae=calling,
            study_instance_uid=meta.study_instance_uid,
            series_instance_uid=meta.series_instance_uid,
            sop_instance_uid=meta.sop_instance_uid,
            series_id=recorded.series_id,
            resent=recorded.resent,
            received_at=received_at,
        )
        for listener in self.listeners:
            # The instance is already durable and indexed: if a listener
            # raises, pynetdicom answers 0xC211 and the peer's re-send is
            # stored once again, which is harmless.
            listener.instance_stored(stored_event)
        return STATUS_SUCCESS


    def _conflict(
        self, aid: int, extra: dict[str, Any], meta: InstanceMeta, conflict: UIDConflictError
    ) -> Dataset:
        """Refuse an instance whose SOP Instance, Series or Study UID is another patient's or study's.

        PS3.4 Annex B (C-STORE statuses) leaves "Error: Cannot understand" (Cxxx) for an instance the
        SCP cannot store for reasons of its own; 0xA900 would claim the data set
        does not match its SOP class, which is not the problem.
        """
        logger.warning(
            "assoc %d: refused %s: %s %s is already stored under %s (stored in study %s,"
            " received for study %s); what is stored is kept",
            aid,
            meta.sop_instance_uid,
            conflict.keyword,
            conflict.uid,
            conflict.reason,
            conflict.stored.study_instance_uid,
            meta.study_instance_uid,
            extra=extra,
        )
        return _status(STATUS_CANNOT_UNDERSTAND, f"{conflict.keyword} stored under {conflict.reason}")


def configure_pydicom() -> None:
    """Make pydicom tolerant of vendor header errors when reading received data."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def storage_sop_classes() -> Iterable[str]:
    """Return the SOP Class UIDs the SCP accepts (besides Verification)."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
