"""Everything the receiver does to pynetdicom beyond its public API, in one place.

pynetdicom has no hooks for what the node needs on a hospital network: a
timeout and a TLS handshake per accepted connection, a bound on what one
connection may make the node buffer, association slots that only live
associations hold, and UIDs that reach the C-STORE handler instead of aborting
the association. This module gets them by subclassing pynetdicom's classes,
swapping the class of objects it made and reading its private state. Nothing
else in ichnode does; :mod:`node.scp` uses only what is defined here and
pynetdicom's public API. ``tests/node/test_dimse_internals.py`` checks every
name, signature and behaviour listed below against the installed pynetdicom, so
an upgrade that changes one of them fails there first (pyproject.toml pins
pynetdicom to 3.0.x for the same reason).

What this module relies on (pynetdicom 3.0)
-------------------------------------------
- ``AE.make_server(address, ssl_context=, evt_handlers=, server_class=,
  request_handler=)`` and ``AE._servers``, the list ``AE.start_server`` appends a
  running server to and ``AssociationServer.shutdown`` removes it from
  (:func:`make_guarded_server`).
- ``AssociationServer.get_request`` (accept, then wrap for TLS),
  ``ThreadedAssociationServer.process_request_thread(request, client_address)``,
  ``shutdown_request`` and the ``socket`` and ``ssl_context`` attributes
  (:class:`GuardedAssociationServer`).
- ``RequestHandler._create_association``, which makes the acceptor's
  ``Association`` with a plain ``AssociationSocket`` (``assoc.dul.socket``)
  and a plain ``DIMSEServiceProvider`` (``assoc.dimse``)
  (:class:`GuardedRequestHandler`).
- ``DULServiceProvider._read_pdu_data`` reading a PDU as ``recv(6)`` then
  ``recv(length)`` through ``AssociationSocket.recv(nr_bytes)``, and a short
  read meaning a closed connection (Evt17) (:class:`BoundedSocket`).
- ``DIMSEServiceProvider.receive_primitive(primitive)`` collecting fragments
  in ``self.message`` (a ``DIMSEMessage`` with ``encoded_command_set`` and a
  ``BytesIO`` ``data_set``), ``self.dul.event_queue`` and Evt19 for an invalid
  message (:class:`BoundedDIMSE`).
- ``AE.maximum_associations``, ``ACSE.send_reject(result, source,
  diagnostic)`` from an ``EVT_REQUESTED`` handler, and
  ``dul.state_machine.current_state`` (:class:`AssociationSlots`).
- ``Association.run_reactor`` ending an acceptor that reads ``None`` from
  ``dul.to_user_queue`` while it waits for the A-ASSOCIATE-RQ
  (:func:`end_wait_for_request`); ``dul.peek_next_pdu()``
  (:func:`pending_end`).
- ``_config.VALIDATORS["UI"]``, called with a UID and returning
  ``(valid, reason)`` when a command set is decoded
  (:func:`install_lenient_uid_validator`).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, Literal, cast

from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

logger = logging.getLogger(__name__)

#: A DIMSE command set longer than this is not one (they are a few hundred
#: bytes): the association is aborted.
MAX_COMMAND_SET_BYTES = 64 * 1024

#: pynetdicom's association limit, set beyond reach: the node counts its own
#: slots (``node.max_associations``, :class:`AssociationSlots`).
PYNETDICOM_MAX_ASSOCIATIONS = 1 << 20

#: Maximum Length Received announced to peers: the largest P-DATA-TF PDU
#: variable field a peer may send (PS3.8 D.1). Large enough for few reads per
#: instance, small enough that a connection never makes the node buffer more.
MAX_PDU_SIZE = 4 * 1024 * 1024
#: A received PDU declaring a longer variable field than this is not read: the
#: connection is closed (an A-ASSOCIATE-RQ is far smaller, a P-DATA-TF must
#: respect MAX_PDU_SIZE).
MAX_PDU_LENGTH = MAX_PDU_SIZE

#: Longest UID the DIMSE layer lets through to the handler (:func:`lenient_ui`).
LENIENT_UID_MAX_LENGTH = 1024


# -- UIDs in command sets -----------------------------------------------------------


def lenient_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom's UID validator for the node: any non-empty string up to 1024 characters.

    pynetdicom's own refuses a UID over 64 characters while decoding the
    command set and aborts the association; the node answers the request
    instead (0xC000, with a log line naming the problem, see
    :func:`node.wire.uid_problem`). The bound keeps a response's command set small.
    """
    if not isinstance(value, str) or not value:
        return False, "must be a non-empty str"
    if len(value) > LENIENT_UID_MAX_LENGTH:
        return False, f"longer than {LENIENT_UID_MAX_LENGTH} characters"
    return True, ""


def install_lenient_uid_validator() -> None:
    """Replace pynetdicom's UID validation (process-wide) with :func:`lenient_ui`."""
    pynetdicom_config.VALIDATORS["UI"] = lenient_ui


# -- bounded reads ------------------------------------------------------------------


class BoundedSocket(AssociationSocket):
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
    The C-STORE handler finds it as the request's ``DataSet``.
    """

    def __init__(self, received: int) -> None:
        super().__init__()
        self.received = received

    def write(self, data: Any) -> int:
        """Count ``data`` and drop it."""
        size = len(data)
        self.received += size
        return size


class BoundedDIMSE(DIMSEServiceProvider):
    """A DIMSE provider that stops keeping a data set once it is over a limit.

    pynetdicom appends every data fragment of a message to a ``BytesIO``
    (``DIMSEMessage.data_set``) until the last one arrives. After each P-DATA
    (at most :data:`MAX_PDU_SIZE` of data), a data set over
    ``max_dataset_bytes`` is replaced by an :class:`OversizeDataSet`; the C-STORE
    handler answers such a request with 0xA700. A command set that passes
    :data:`MAX_COMMAND_SET_BYTES` aborts the association.
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


# -- the listening server -----------------------------------------------------------


class GuardedRequestHandler(RequestHandler):
    """Make each acceptor read through a :class:`BoundedSocket` and a :class:`BoundedDIMSE`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The AssociationSocket made by pynetdicom has already queued the
        # connection event (Evt5); a second one would be a protocol error, so
        # the existing object becomes a BoundedSocket (it adds no state).
        if type(assoc.dul.socket) is not AssociationSocket:
            raise TypeError(
                f"pynetdicom made a {type(assoc.dul.socket).__name__}, not an AssociationSocket"
            )
        assoc.dul.socket.__class__ = BoundedSocket
        # Same for the DIMSE provider: it adds one attribute and one override.
        if type(assoc.dimse) is not DIMSEServiceProvider:
            raise TypeError(
                f"pynetdicom made a {type(assoc.dimse).__name__}, not a DIMSEServiceProvider"
            )
        assoc.dimse.__class__ = BoundedDIMSE
        server = cast(GuardedAssociationServer, self.server)
        cast(BoundedDIMSE, assoc.dimse).max_dataset_bytes = server.max_instance_bytes
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


class SharedPortAssociationServer(GuardedAssociationServer):
    """:class:`GuardedAssociationServer` bound with ``SO_REUSEPORT`` (``node.receivers``)."""

    def server_bind(self) -> None:
        """Set ``SO_REUSEPORT``, then bind as pynetdicom does (it never sets the option)."""
        if self.socket is None:
            raise OSError("the server socket is closed")
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def make_guarded_server(
    ae: AE,
    address: tuple[str, int],
    *,
    ssl_context: ssl.SSLContext | None,
    evt_handlers: list[Any],
    network_timeout: float,
    max_instance_bytes: int,
    on_handshake_failed: Callable[[tuple[str, int], str], None] | None,
    reuse_port: bool = False,
) -> GuardedAssociationServer:
    """Bind a :class:`GuardedAssociationServer` for ``ae``, registered as ``ae.start_server`` does.

    The caller runs ``serve_forever`` in a thread of its own; ``shutdown()``
    unregisters the server again. ``reuse_port`` binds with ``SO_REUSEPORT``
    (:class:`SharedPortAssociationServer`) so several receiver processes
    accept on one port and the kernel spreads connections over them.
    """
    server = cast(
        GuardedAssociationServer,
        ae.make_server(
            address,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
            server_class=SharedPortAssociationServer if reuse_port else GuardedAssociationServer,
            request_handler=GuardedRequestHandler,
        ),
    )
    server.network_timeout = network_timeout
    server.max_instance_bytes = max_instance_bytes
    server.on_handshake_failed = on_handshake_failed
    ae._servers.append(server)  # as start_server does; server.shutdown() removes it
    return server


# -- association slots ----------------------------------------------------------------


class AssociationSlots:
    """The node's ``node.max_associations`` slots, held only by associations.

    pynetdicom's own limit counts every acceptor thread, also those of
    connections that never sent an A-ASSOCIATE-RQ (a health check holds one
    for ``acse_timeout_seconds``) or were refused; making this object sets that
    limit out of reach. An association takes a slot with its A-ASSOCIATE-RQ
    (:meth:`take`, from the ``EVT_REQUESTED`` handler) and gives it back when it
    is rejected, released, aborted or closed (:meth:`release`); a slot whose
    thread has ended is free whatever happened.
    """

    def __init__(self, ae: AE, limit: int) -> None:
        ae.maximum_associations = PYNETDICOM_MAX_ASSOCIATIONS
        self.limit = limit
        self._held: set[Association] = set()
        self._lock = threading.Lock()

    def take(self, assoc: Association) -> bool:
        """Give ``assoc`` a slot; when none is free, reject it and return False.

        The rejection is A-ASSOCIATE-RJ rejected-transient, service-provider
        (presentation), local limit exceeded; it is on the wire (or the
        connection gone) when this returns.
        """
        with self._lock:
            self._held = {a for a in self._held if a.is_alive()}
            if len(self._held) < self.limit:
                self._held.add(assoc)
                return True
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        # pynetdicom closes the socket as soon as the EVT_REQUESTED handler
        # returns; let the DUL thread put the A-ASSOCIATE-RJ on the wire first.
        deadline = time.monotonic() + 2.0
        while (
            assoc.dul.state_machine.current_state not in ("Sta13", "Sta1")
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        return False

    def release(self, assoc: Association) -> None:
        """Free the slot of ``assoc`` (nothing when it holds none)."""
        with self._lock:
            self._held.discard(assoc)


# -- how a connection ended -------------------------------------------------------------


def end_wait_for_request(assoc: Association) -> None:
    """End an acceptor whose connection closed before its A-ASSOCIATE-RQ arrived.

    A health check, a port scan or garbage closes the socket before sending a
    request; pynetdicom's acceptor thread would still wait ``acse_timeout``
    for one. Call from the ``EVT_CONN_CLOSE`` handler, which runs in the DUL
    thread, the only one that fills the user queue: a ``None`` there tells the
    acceptor the wait is over. Does nothing once a request arrived or while one
    is waiting in the queue.
    """
    if assoc.requestor.primitive is None and assoc.dul.to_user_queue.empty():
        assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def pending_end(assoc: Association) -> Literal["aborted", "released"] | None:
    """Say whether an A-ABORT or A-RELEASE waits, unread, in the DUL's user queue.

    The socket may close before the reactor has seen the A-ABORT or A-RELEASE
    that preceded it; this looks without taking it out.
    """
    pending = assoc.dul.peek_next_pdu()
    if isinstance(pending, A_ABORT | A_P_ABORT):
        return "aborted"
    if isinstance(pending, A_RELEASE):
        return "released"
    return None
