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
0xC000 the dataset cannot be decoded, its SOP Instance UID differs from the
request's Affected SOP Instance UID, or a UID cannot name a file.
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
from io import BytesIO
from typing import Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
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
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from config.settings import NodeSettings, StorageSettings
from storage.archive import Archive, ArchiveError, UnsafeUIDError
from storage.index import Index, InstanceMeta, MissingAttributeError
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
# deflate data, undefined VRs).
_DECODE_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    EOFError,
    OSError,
    NotImplementedError,
    struct.error,
    zlib.error,
)

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


def _before_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >= 0x7FE00010


def _read_header(event: evt.Event, transfer_syntax: str) -> Dataset:
    """Decode the received dataset up to (not including) Pixel Data."""
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        return event.dataset  # pynetdicom inflates it
    raw = cast(C_STORE, event.request).DataSet
    stream = BytesIO(raw.getvalue())  # type: ignore[union-attr]
    return read_dataset(
        stream, uid.is_implicit_VR, uid.is_little_endian, stop_when=_before_pixel_data
    )


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
    ) -> None:
        self.node = node
        self.archive = archive
        self.index = index
        self.listeners = list(listeners)
        self.min_free_bytes = storage.min_free_disk_mb * 1024 * 1024
        self.shutdown_grace_s = shutdown_grace_s
        self._server: ThreadedAssociationServer | None = None
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self.ae = self._make_ae()

    # -- set-up --------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_associations = self.node.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.node.allowed_calling_aets)
        # Let peers send large PDUs: fewer, larger reads per instance.
        ae.maximum_pdu_size = 0
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.acse_timeout = 30
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
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store, [self.archive, self.index]),
            (evt.EVT_ACCEPTED, self._handle_accepted),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_released),
            (evt.EVT_ABORTED, self._handle_aborted),
            (evt.EVT_CONN_CLOSE, self._handle_conn_close),
            (evt.EVT_DIMSE_SENT, self._handle_dimse_sent),
        ]
        self._server = self.ae.start_server(
            (self.node.host, self.node.port), block=False, evt_handlers=handlers
        )
        host, port = self.address
        logger.info(
            "listening as %s on %s:%d (max %d associations, callers %s)",
            self.node.ae_title,
            host,
            port,
            self.node.max_associations,
            ", ".join(self.node.allowed_calling_aets) or "any",
        )

    def stop(self) -> None:
        """Stop accepting, let open associations finish, then abort the rest between stores."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
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

    def _handle_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling_ae = str(assoc.requestor.ae_title).strip()
        called_ae = str(assoc.requestor.primitive.called_ae_title).strip()  # type: ignore[union-attr]
        if self.node.allowed_calling_aets and calling_ae not in self.node.allowed_calling_aets:
            detail = "calling AE title not recognised"
        elif called_ae != self.node.ae_title:
            detail = "called AE title not recognised"
        else:
            detail = "local limit exceeded (node.max_associations)"
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

    def _finish(self, assoc: Association, outcome: AssociationOutcome) -> None:
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
        # The socket may close before the reactor has seen the A-ABORT or
        # A-RELEASE that preceded it; look at what is waiting in the DUL.
        assoc = event.assoc
        outcome = AssociationOutcome.CLOSED
        if assoc.is_aborted:
            outcome = AssociationOutcome.ABORTED
        elif assoc.is_released:
            outcome = AssociationOutcome.RELEASED
        else:
            pending = assoc.dul.peek_next_pdu()
            if isinstance(pending, A_ABORT | A_P_ABORT):
                outcome = AssociationOutcome.ABORTED
            elif isinstance(pending, A_RELEASE):
                outcome = AssociationOutcome.RELEASED
        self._finish(assoc, outcome)

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

        if archive.free_bytes() < self.min_free_bytes:
            logger.warning(
                "assoc %d: refused %s: free disk under storage.min_free_disk_mb",
                aid,
                affected_uid,
                extra=extra,
            )
            return _status(STATUS_OUT_OF_RESOURCES, "free disk space below the node's minimum")

        transfer_syntax = str(event.context.transfer_syntax)
        try:
            ds = _read_header(event, transfer_syntax)
            meta = InstanceMeta.from_dataset(
                ds,
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                transfer_syntax_uid=transfer_syntax,
            )
        except MissingAttributeError as exc:
            logger.warning("assoc %d: refused %s: %s", aid, affected_uid, exc, extra=extra)
            return _status(STATUS_DATASET_MISMATCH, str(exc))
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

        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = calling
        try:
            stored = archive.store(
                meta.study_instance_uid,
                meta.series_instance_uid,
                meta.sop_instance_uid,
                file_meta,
                request.DataSet.getvalue(),  # type: ignore[union-attr]
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


def configure_pydicom() -> None:
    """Make pydicom tolerant of vendor header errors when reading received data."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def storage_sop_classes() -> Iterable[str]:
    """Return the SOP Class UIDs the SCP accepts (besides Verification)."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
