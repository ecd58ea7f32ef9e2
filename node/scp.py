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
The listening server (:class:`GuardedAssociationServer`) sets the network
timeout on every accepted socket, so a peer that stalls in the middle of a PDU
is dropped after ``node.network_timeout_seconds``; with ``[node.tls]`` the TLS
handshake runs in the connection's own thread under that timeout (a silent or
failing client never holds the accept loop). A PDU whose declared length is
over :data:`MAX_PDU_LENGTH` closes the connection before anything is buffered.
Only associations hold one of the ``node.max_associations`` slots, from their
A-ASSOCIATE-RQ until they end (:meth:`StorageSCP._handle_requested`): a
health check, a port scan, garbage or a refused caller never holds one, and the
thread of a connection closed before its request ends at once.
Every value from the wire that the node (this module, the scheduler, ...), the
storage layer, pynetdicom or pydicom logs goes through :class:`node.wire.EscapeWireValues` (installed by
:class:`StorageSCP`), so it stays on one printable line. The DIMSE layer lets
any non-empty UID through (:func:`_lenient_ui`): the handler refuses a bad one
with a status instead of pynetdicom aborting the association.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
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
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from config.settings import NodeSettings, StorageSettings
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

#: A DIMSE command set longer than this is not one (they are a few hundred
#: bytes): the association is aborted.
MAX_COMMAND_SET_BYTES = 64 * 1024

#: pynetdicom's association limit, set beyond reach: the node counts its own
#: slots (``node.max_associations``, :meth:`StorageSCP._handle_requested`).
_PYNETDICOM_MAX_ASSOCIATIONS = 1 << 20

#: Maximum Length Received announced to peers: the largest P-DATA-TF PDU
#: variable field a peer may send (PS3.8 D.1). Large enough for few reads per
#: instance, small enough that a connection never makes the node buffer more.
MAX_PDU_SIZE = 4 * 1024 * 1024
#: A received PDU declaring a longer variable field than this is not read: the
#: connection is closed (an A-ASSOCIATE-RQ is far smaller, a P-DATA-TF must
#: respect MAX_PDU_SIZE).
MAX_PDU_LENGTH = MAX_PDU_SIZE

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


class MalformedDatasetError(ValueError):
    """The received bytes are not a well-formed dataset in the context's transfer syntax."""


class OversizeDatasetError(ValueError):
    """The dataset is larger than the node accepts (``node.max_instance_mb``)."""


_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})
# Explicit VRs with a reserved 2 bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# Every VR of PS3.5 6.2.
_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_MAX_DEPTH = 32


@dataclass
class _Walk:
    """Position-independent facts gathered while checking the structure."""

    pixel_data_length: int | None = None
    #: Offset of the first top-level element at or after (7FE0,0010): the
    #: header that :func:`_read_header` decodes ends there.
    header_end: int | None = None
    has_pixels: bool = False  # Pixel Data, Float or Double Float Pixel Data
    has_file_meta: bool = False


def _walk_elements(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    endian: str,
    depth: int,
    walk: _Walk,
    *,
    in_item: bool = False,
) -> int:
    """Check the elements in ``buf[pos:end]``; return where they end.

    With ``in_item`` and an undefined-length item, the elements end at an Item
    Delimitation Item, which must be there.
    """
    if depth > _MAX_DEPTH:
        raise MalformedDatasetError(f"sequences nested deeper than {_MAX_DEPTH}")
    tag_fmt, len4, len2 = endian + "HH", endian + "L", endian + "H"
    while pos < end:
        if end - pos < 8:
            raise MalformedDatasetError(f"{end - pos} stray bytes at offset {pos}")
        group, element = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | element
        if tag == _ITEM_END and in_item:
            return pos + 8
        if group == 0xFFFE:
            raise MalformedDatasetError(f"unexpected delimiter ({group:04X},{element:04X})")
        if depth == 0:
            walk.has_file_meta |= group == 0x0002
            walk.has_pixels |= tag in _PIXEL_TAGS
            if walk.header_end is None and tag >= _PIXEL_DATA:
                walk.header_end = pos
        vr: bytes | None = None
        if implicit:
            (length,) = struct.unpack_from(len4, buf, pos + 4)
            pos += 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr not in _VRS:
                raise MalformedDatasetError(
                    f"({group:04X},{element:04X}) has no valid VR at offset {pos + 4}"
                )
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDatasetError(f"truncated element header at offset {pos}")
                (length,) = struct.unpack_from(len4, buf, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from(len2, buf, pos + 6)
                pos += 8
        if length == _UNDEFINED:
            if vr == b"UN":
                # PS3.5 6.2.2: an undefined-length UN is an implicit VR LE sequence.
                pos = _walk_items(buf, pos, end, True, "<", depth + 1, walk, fragments=False)
            elif vr in (None, b"SQ"):
                pos = _walk_items(buf, pos, end, implicit, endian, depth + 1, walk, fragments=False)
            elif tag == _PIXEL_DATA and vr in (b"OB", b"OW"):
                pos = _walk_items(buf, pos, end, implicit, endian, depth + 1, walk, fragments=True)
            else:
                raise MalformedDatasetError(f"({group:04X},{element:04X}) has an undefined length")
            continue
        if length > end - pos:
            raise MalformedDatasetError(
                f"({group:04X},{element:04X}) declares {length} bytes, {end - pos} remain"
            )
        if vr == b"SQ":
            _walk_items(
                buf,
                pos,
                pos + length,
                implicit,
                endian,
                depth + 1,
                walk,
                fragments=False,
                defined=True,
            )
        if tag == _PIXEL_DATA and depth == 0:
            walk.pixel_data_length = length
        pos += length
    if in_item:
        raise MalformedDatasetError("item without its delimitation item")
    return pos


def _walk_items(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    endian: str,
    depth: int,
    walk: _Walk,
    *,
    fragments: bool,
    defined: bool = False,
) -> int:
    """Check the items of a sequence (or encapsulated fragments); return where they end.

    A defined-length sequence (``defined``) ends at ``end``, also when it is the
    last element of the dataset; an undefined-length one at its Sequence
    Delimitation Item, which must be there.
    """
    while True:
        if defined and pos == end:
            return pos
        if end - pos < 8:
            raise MalformedDatasetError("sequence runs past the end of the data")
        group, element = struct.unpack_from(endian + "HH", buf, pos)
        (length,) = struct.unpack_from(endian + "L", buf, pos + 4)
        tag = (group << 16) | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise MalformedDatasetError(f"({group:04X},{element:04X}) where an item should be")
        if length == _UNDEFINED:
            if fragments:
                raise MalformedDatasetError("a pixel data fragment has an undefined length")
            pos = _walk_elements(buf, pos, end, implicit, endian, depth, walk, in_item=True)
            continue
        if length > end - pos:
            raise MalformedDatasetError(f"an item declares {length} bytes, {end - pos} remain")
        if not fragments:
            _walk_elements(buf, pos, pos + length, implicit, endian, depth, walk)
        pos += length


def check_encoding(
    raw: bytes | memoryview, transfer_syntax: str, *, max_inflated: int = 1 << 31
) -> _Walk:
    """Check that ``raw`` is a well-formed dataset in ``transfer_syntax``.

    Every element, item and fragment must fit in the bytes that arrived; every
    explicit VR must be one of PS3.5 6.2. pydicom alone would read a
    truncated value as a shorter one. Deflated data is inflated up to
    ``max_inflated`` bytes, never further.

    Raises
    ------
    MalformedDatasetError
        Naming the first problem.
    OversizeDatasetError
        When deflated data inflates to more than ``max_inflated`` bytes.
    """
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            raw = inflater.decompress(raw, max_inflated + 1)
        except zlib.error as exc:
            raise MalformedDatasetError(f"deflated data cannot be inflated: {exc}") from None
        if len(raw) > max_inflated:
            raise OversizeDatasetError(f"deflated data inflates to more than {max_inflated} bytes")
    # A memoryview is used as it is: a second view of it would be an export
    # that keeps the caller from releasing it.
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    walk = _Walk()
    endian = "<" if uid.is_little_endian else ">"
    # An undefined-length sequence at the top level may run to the last byte.
    _walk_elements(buf, 0, len(buf), uid.is_implicit_VR, endian, 0, walk)
    return walk


def _expected_pixel_bytes(ds: Dataset) -> int:
    """Bytes of native Pixel Data the Image Pixel attributes call for."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MalformedDatasetError(f"Pixel Data without usable image attributes ({exc})") from None
    if min(rows, columns, samples, bits, frames) < 1:
        raise MalformedDatasetError("Pixel Data with zero or negative image attributes")
    return (rows * columns * samples * frames * bits + 7) // 8


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


def _read_header(event: evt.Event, transfer_syntax: str, raw: memoryview, walk: _Walk) -> Dataset:
    """Decode the received dataset up to (not including) Pixel Data.

    Only the header bytes (``raw[:walk.header_end]``) are copied for pydicom.
    """
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        return event.dataset  # pynetdicom inflates it
    end = len(raw) if walk.header_end is None else walk.header_end
    stream = BytesIO(raw[:end])
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


class _BoundedSocket(AssociationSocket):
    """An acceptor socket that will not read a PDU longer than :data:`MAX_PDU_LENGTH`.

    pynetdicom's DUL reads the 6-byte PDU header, then ``recv(length)``; a
    lying length would make it buffer whatever the peer sends. Refusing that
    read makes the DUL see a short PDU: it signals a closed transport
    connection (Evt17) and the association ends as aborted.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` unless that is more than a PDU may hold."""
        if nr_bytes > MAX_PDU_LENGTH:
            logger.warning(
                "peer %s declared a %d-byte PDU (limit %d): closing the connection",
                self.assoc.requestor.address,
                nr_bytes,
                MAX_PDU_LENGTH,
            )
            return bytearray()
        return super().recv(nr_bytes)


class OversizeDataSet(BytesIO):
    """Stands in for the data set of a C-STORE that crossed ``node.max_instance_mb``.

    It keeps no bytes: every further fragment is counted and dropped, so the
    node reads the rest of the message (and can answer it) without holding it.
    """

    def __init__(self, received: int) -> None:
        super().__init__()
        self.received = received

    def write(self, data: Any) -> int:
        """Count ``data`` and drop it."""
        size = len(data)
        self.received += size
        return size


class _BoundedDIMSE(DIMSEServiceProvider):
    """A DIMSE provider that stops keeping a data set once it is over a limit.

    pynetdicom appends every data fragment of a message to a ``BytesIO``
    (``DIMSEMessage.data_set``) until the last one arrives. After each P-DATA
    (at most :data:`MAX_PDU_SIZE` of data), a data set over
    ``max_dataset_bytes`` is replaced by an :class:`OversizeDataSet`; the C-STORE
    handler answers such a request with 0xA700.
    """

    max_dataset_bytes: int = 1 << 62

    def receive_primitive(self, primitive: Any) -> None:
        """Collect the P-DATA as pynetdicom does, then drop a data set over the limit."""
        super().receive_primitive(primitive)
        message = self.message
        if message is None:  # complete (or no message yet)
            return
        command_bytes = message.encoded_command_set.tell()
        if command_bytes > MAX_COMMAND_SET_BYTES:
            # A command set is a few hundred bytes; fragments without end would
            # grow this buffer for ever. Abort as pynetdicom does for an
            # invalid DIMSE message (this runs in the DUL thread).
            logger.warning(
                "peer %s: command set passed %d bytes without its last fragment: aborting",
                self.assoc.requestor.address,
                MAX_COMMAND_SET_BYTES,
            )
            self.message = None
            self.dul.event_queue.put("Evt19")
            return
        data_set = message.data_set
        if isinstance(data_set, OversizeDataSet) or not isinstance(data_set, BytesIO):
            return
        size = data_set.tell()
        if size > self.max_dataset_bytes:
            message.data_set = OversizeDataSet(size)
            logger.warning(
                "peer %s: data set of a C-STORE passed %d bytes (node.max_instance_mb):"
                " the rest is read and dropped, the instance will be refused",
                self.assoc.requestor.address,
                self.max_dataset_bytes,
            )


class _GuardedRequestHandler(RequestHandler):
    """Make each acceptor read through a :class:`_BoundedSocket` and a :class:`_BoundedDIMSE`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The AssociationSocket made by pynetdicom has already queued the
        # connection event (Evt5); a second one would be a protocol error, so
        # the existing object becomes a _BoundedSocket (it adds no state).
        if type(assoc.dul.socket) is not AssociationSocket:
            raise TypeError(
                f"pynetdicom made a {type(assoc.dul.socket).__name__}, not an AssociationSocket"
            )
        assoc.dul.socket.__class__ = _BoundedSocket
        # Same for the DIMSE provider: it adds one attribute and one override.
        if type(assoc.dimse) is not DIMSEServiceProvider:
            raise TypeError(
                f"pynetdicom made a {type(assoc.dimse).__name__}, not a DIMSEServiceProvider"
            )
        assoc.dimse.__class__ = _BoundedDIMSE
        server = cast(GuardedAssociationServer, self.server)
        cast(_BoundedDIMSE, assoc.dimse).max_dataset_bytes = server.max_instance_bytes
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with timeouts on every accepted connection.

    ``network_timeout`` applies to every blocking read and write of an
    accepted socket (pynetdicom leaves them without one, so half a PDU would
    block the connection's thread forever). The TLS handshake runs in the
    connection's thread, not in the accept loop; a failed handshake is logged
    and the connection closed.
    """

    network_timeout: float = 60.0
    #: Largest data set one C-STORE may carry (``node.max_instance_mb``).
    max_instance_bytes: int = 1 << 62
    #: Called with the peer address and the reason when a TLS handshake fails.
    on_handshake_failed: Callable[[tuple[str, int], str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; wrap it for TLS without handshaking yet."""
        if self.socket is None:
            raise OSError("the server socket is closed")
        client_socket, address = self.socket.accept()
        client_socket.settimeout(self.network_timeout)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        """Handshake (TLS) in this connection's thread, then run the association."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address, exc)
                self.shutdown_request(request)
                if self.on_handshake_failed is not None and isinstance(client_address, tuple):
                    self.on_handshake_failed(client_address, str(exc) or type(exc).__name__)
                return
            logger.debug("TLS %s with %s", request.version(), client_address)
        super().process_request_thread(request, client_address)


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
        self.max_instance_bytes = node.max_instance_mb * 1024 * 1024
        self.shutdown_grace_s = shutdown_grace_s
        self._server: GuardedAssociationServer | None = None
        self._states: dict[int, _AssociationState] = {}
        # Associations holding one of node.max_associations slots: from their
        # A-ASSOCIATE-RQ until they are rejected, released, aborted or closed.
        self._slots: set[Association] = set()
        self._states_lock = threading.Lock()
        self._server_thread: threading.Thread | None = None
        # Built now, so a certificate that does not load stops the start-up.
        self.ssl_context = server_context(node.tls) if node.tls.enabled else None
        self.ae = self._make_ae()

    # -- set-up --------------------------------------------------------------

    def _make_ae(self) -> AE:
        escape_wire_logs()
        pynetdicom_config.VALIDATORS["UI"] = _lenient_ui
        ae = AE(ae_title=self.node.ae_title)
        # pynetdicom's own limit counts every acceptor thread, also those of
        # connections that never sent an A-ASSOCIATE-RQ (a health check holds
        # one for acse_timeout_seconds) or were refused; the node counts its
        # slots itself (_handle_requested), so pynetdicom's is out of the way.
        ae.maximum_associations = _PYNETDICOM_MAX_ASSOCIATIONS
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
        server = cast(
            GuardedAssociationServer,
            self.ae.make_server(
                (self.node.host, self.node.port),
                ssl_context=self.ssl_context,
                evt_handlers=handlers,
                server_class=GuardedAssociationServer,
                request_handler=_GuardedRequestHandler,
            ),
        )
        server.network_timeout = self.node.network_timeout_seconds
        server.max_instance_bytes = self.max_instance_bytes
        server.on_handshake_failed = self._handle_tls_failure
        self.ae._servers.append(server)  # as start_server does; server.shutdown() removes it
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
        association ends gives its slot back (:meth:`_release_slot`); a slot
        whose thread has ended is free whatever happened.
        """
        assoc = event.assoc
        with self._states_lock:
            self._slots = {a for a in self._slots if a.is_alive()}
            if len(self._slots) < self.node.max_associations:
                self._slots.add(assoc)
                return
        # rejected-transient, service-provider (presentation), local limit exceeded
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        # pynetdicom closes the socket as soon as this handler returns; let the
        # DUL thread put the A-ASSOCIATE-RJ on the wire first.
        deadline = time.monotonic() + 2.0
        while (
            assoc.dul.state_machine.current_state not in ("Sta13", "Sta1")
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        self._audit_rejection(assoc, "local limit exceeded (node.max_associations)")

    def _release_slot(self, assoc: Association) -> None:
        with self._states_lock:
            self._slots.discard(assoc)

    def _handle_rejected(self, event: evt.Event) -> None:
        self._release_slot(event.assoc)
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
        with self._states_lock:
            self._slots.discard(assoc)
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
        if assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
            # Closed before an A-ASSOCIATE-RQ arrived (a health check, a port
            # scan, garbage): the acceptor thread would wait acse_timeout_seconds
            # for the request. This runs in the DUL thread, the only one that
            # fills the queue; the None tells the acceptor the wait is over.
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]
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
            ds = _read_header(event, transfer_syntax, raw, walk)
            if not walk.has_pixels and all(k in ds for k in ("Rows", "Columns", "BitsAllocated")):
                raise MalformedDatasetError(
                    "an image (Rows, Columns, Bits Allocated) without Pixel Data"
                )
            if walk.pixel_data_length is not None and not UID(transfer_syntax).is_compressed:
                expected = _expected_pixel_bytes(ds)
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


def _lenient_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom's UID validator for the node: any non-empty string up to 1024 characters.

    pynetdicom's own refuses a UID over 64 characters while decoding the
    command set and aborts the association; the node answers the request
    instead (0xC000, with a log line naming the problem, see
    :func:`node.wire.uid_problem`). The bound keeps a response's command set small.
    """
    if not isinstance(value, str) or not value:
        return False, "must be a non-empty str"
    if len(value) > 1024:
        return False, "longer than 1024 characters"
    return True, ""


def configure_pydicom() -> None:
    """Make pydicom tolerant of vendor header errors when reading received data."""
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def storage_sop_classes() -> Iterable[str]:
    """Return the SOP Class UIDs the SCP accepts (besides Verification)."""
    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
