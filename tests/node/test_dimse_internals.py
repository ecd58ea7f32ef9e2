"""The fence around pynetdicom's internals (``node/dimse_internals.py``).

The first test is the contract: every pynetdicom name, signature, attribute and
behaviour the fence module relies on (its docstring lists them) is checked
against the installed pynetdicom, so an upgrade that changes one fails here,
naming it, before a hostile peer finds out. The others run the fence's parts
against real pynetdicom objects and sockets, and check that no other module of
ichnode reaches into pynetdicom's internals.
"""

from __future__ import annotations

import ast
import inspect
import queue
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association, ServiceUser
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import STATES
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import (
    AssociationServer,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from node import dimse_internals
from node.dimse_internals import (
    PYNETDICOM_MAX_ASSOCIATIONS,
    AssociationSlots,
    BoundedDIMSE,
    BoundedSocket,
    GuardedAssociationServer,
    end_wait_for_request,
    install_lenient_uid_validator,
    lenient_ui,
    make_guarded_server,
    pending_end,
)
from tests.interop import REPO


def _params(func: object) -> list[str]:
    return list(inspect.signature(func).parameters)  # type: ignore[arg-type]


def _source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_pynetdicom_internals_the_fence_relies_on_are_there() -> None:
    """Fails when a pynetdicom upgrade changes what node/dimse_internals.py reaches into."""
    # make_guarded_server: AE.make_server passes request_handler on to the
    # server class; start_server registers a server in AE._servers and
    # AssociationServer.shutdown takes it out again.
    make_server = inspect.signature(AE.make_server).parameters
    for name in ("address", "ssl_context", "evt_handlers", "server_class"):
        assert name in make_server, name
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in make_server.values())
    assert "request_handler" in _params(AssociationServer.__init__)
    assert "self._servers.append(server)" in _source(AE.start_server)
    assert "self.ae._servers.remove(" in _source(AssociationServer.shutdown)
    assert AE()._servers == []

    # GuardedAssociationServer: get_request is accept-then-wrap (ours replaces it
    # whole), process_request_thread runs the association in the connection's thread.
    get_request = _source(AssociationServer.get_request)
    assert "self.socket.accept()" in get_request and "wrap_socket(" in get_request
    assert _params(ThreadedAssociationServer.process_request_thread) == [
        "self",
        "request",
        "client_address",
    ]
    assert "self.finish_request(" in _source(ThreadedAssociationServer.process_request_thread)
    assert callable(ThreadedAssociationServer.shutdown_request)
    assert isinstance(AssociationServer.ssl_context, property)

    # GuardedRequestHandler: the acceptor gets a plain AssociationSocket and a
    # plain DIMSEServiceProvider, whose classes are swapped afterwards.
    create = _source(RequestHandler._create_association)
    assert "AssociationSocket(" in create and "assoc.set_socket(" in create
    assert "self.dimse: DIMSEServiceProvider" in _source(Association.__init__)

    # BoundedSocket: the DUL reads a PDU as recv(6), then recv(length); a
    # short read is a closed connection (Evt17).
    assert _params(AssociationSocket.recv) == ["self", "nr_bytes"]
    read_pdu = _source(DULServiceProvider._read_pdu_data)
    assert "self.socket.recv(6)" in read_pdu and "self.socket.recv(pdu_length)" in read_pdu
    assert "if len(bytestream) != 6 + pdu_length:" in read_pdu
    assert 'self.event_queue.put("Evt17")' in read_pdu

    # BoundedDIMSE: fragments collect in self.message, a DIMSEMessage with a
    # BytesIO command set and data set; the data set becomes the C-STORE's
    # DataSet; Evt19 is how pynetdicom aborts for an invalid message.
    assert _params(DIMSEServiceProvider.receive_primitive) == ["self", "primitive"]
    receive = _source(DIMSEServiceProvider.receive_primitive)
    assert "self.message = DIMSEMessage()" in receive
    assert "self.message.decode_msg(primitive, self.assoc)" in receive
    assert 'self.dul.event_queue.put("Evt19")' in receive
    # A complete message is handed on and self.message is None again.
    assert "self.message = None" in receive and "self.message.data_set" in receive
    message = DIMSEMessage()
    assert isinstance(message.data_set, BytesIO)
    assert isinstance(message.encoded_command_set, BytesIO)
    decode = _source(DIMSEMessage.decode_msg)
    assert "self.encoded_command_set.write(" in decode
    assert "cast(BytesIO, self.data_set).write(" in decode
    assert "setattr(primitive, dataset_keyword, self.data_set)" in _source(
        DIMSEMessage.message_to_primitive
    )
    from pynetdicom import _config

    # Chunked receive writes to a temporary file instead of data_set: off.
    assert _config.STORE_RECV_CHUNKED_DATASET is False

    # AssociationSlots: pynetdicom's own limit is AE.maximum_associations,
    # compared with the acceptors; a reject from EVT_REQUESTED stops negotiation.
    assert isinstance(AE.maximum_associations, property)
    assert AE.maximum_associations.fset is not None
    assert "> self.assoc.ae.maximum_associations" in _source(ACSE._negotiate_as_acceptor)
    assert _params(ACSE.send_reject) == ["self", "result", "source", "diagnostic"]
    assert "self.assoc.is_rejected = True" in _source(ACSE.send_reject)
    assert {"Sta1", "Sta13"} <= set(STATES)
    assert "self.state_machine.current_state" in _source(DULServiceProvider.stop_dul)
    run_reactor = _source(Association.run_reactor)
    requested = run_reactor.index("evt.trigger(self, evt.EVT_REQUESTED")
    assert run_reactor.index("self.requestor.primitive = ") < requested
    assert "if not self.is_aborted and not self.is_rejected:" in run_reactor[requested:]

    # end_wait_for_request and pending_end: the acceptor waits on the DUL's
    # user queue for its request and ends on a None; peek_next_pdu looks
    # without taking.
    assert "primitive = self.dul.receive_pdu(wait=True" in run_reactor
    assert "if primitive is None:" in run_reactor
    assert "self.to_user_queue.get(" in _source(DULServiceProvider.receive_pdu)
    assert _params(DULServiceProvider.peek_next_pdu) == ["self"]
    assert "self.to_user_queue.queue[0]" in _source(DULServiceProvider.peek_next_pdu)
    assert "self.primitive" in _source(ServiceUser.__init__)

    # The same, on a real acceptor as pynetdicom makes it.
    assoc = Association(AE(), "acceptor")
    assert type(assoc.dimse) is DIMSEServiceProvider
    assert assoc.dimse.assoc is assoc and assoc.dimse.dul is assoc.dul
    assert assoc.dimse.message is None
    assert isinstance(assoc.dul.to_user_queue, queue.Queue)
    assert isinstance(assoc.dul.event_queue, queue.Queue)
    assert assoc.dul.state_machine.current_state == "Sta1"
    assert assoc.requestor.primitive is None
    assert assoc.dul.peek_next_pdu() is None

    # install_lenient_uid_validator: pynetdicom validates UIDs through this entry.
    assert callable(_config.VALIDATORS["UI"])
    from pynetdicom import utils

    assert '_config.VALIDATORS["UI"](value)' in _source(utils.set_uid)


@pytest.fixture
def guarded_server() -> Iterator[tuple[AE, GuardedAssociationServer, list[Association]]]:
    """A guarded server on a free loopback port; yields the associations whose connection closed."""
    ae = AE("FENCE")
    ae.add_supported_context(Verification)
    ae.acse_timeout = 30  # far longer than the test waits
    closed: list[Association] = []

    def on_close(event: evt.Event) -> None:
        end_wait_for_request(event.assoc)
        closed.append(event.assoc)

    server = make_guarded_server(
        ae,
        ("127.0.0.1", 0),
        ssl_context=None,
        evt_handlers=[(evt.EVT_CONN_CLOSE, on_close)],
        network_timeout=5.0,
        max_instance_bytes=12345,
        on_handshake_failed=None,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ae, server, closed
    finally:
        if server in ae._servers:
            server.shutdown()
        thread.join(5)


def test_guarded_server_gives_each_acceptor_the_bounded_socket_and_dimse(
    guarded_server: tuple[AE, GuardedAssociationServer, list[Association]],
) -> None:
    ae, server, closed = guarded_server
    assert server in ae._servers
    assert server.network_timeout == 5.0 and server.max_instance_bytes == 12345
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        deadline = time.monotonic() + 10
        while not ae.active_associations:
            assert time.monotonic() < deadline, "no acceptor for the connection"
            time.sleep(0.01)
        (assoc,) = ae.active_associations
        assert type(assoc.dul.socket) is BoundedSocket
        assert type(assoc.dimse) is BoundedDIMSE
        assert assoc.dimse.max_dataset_bytes == 12345
        assert assoc.dul.socket.socket is not None
        assert assoc.dul.socket.socket.gettimeout() == 5.0
    # Closed before its A-ASSOCIATE-RQ: the acceptor ends at once, not after
    # acse_timeout (30 s).
    deadline = time.monotonic() + 5
    while assoc.is_alive():
        assert time.monotonic() < deadline, "the acceptor still waits for a request"
        time.sleep(0.01)
    assert closed == [assoc]
    server.shutdown()
    assert server not in ae._servers


def test_pending_end_looks_at_the_user_queue_without_taking() -> None:
    assoc = Association(AE(), "acceptor")
    assert pending_end(assoc) is None
    for primitive, expected in (
        (A_ABORT(), "aborted"),
        (A_P_ABORT(), "aborted"),
        (A_RELEASE(), "released"),
    ):
        assoc.dul.to_user_queue.put(primitive)
        assert pending_end(assoc) == expected
        assert assoc.dul.to_user_queue.qsize() == 1
        assert assoc.dul.to_user_queue.get_nowait() is primitive


def test_end_wait_for_request_leaves_a_waiting_request_alone() -> None:
    assoc = Association(AE(), "acceptor")
    end_wait_for_request(assoc)
    assert assoc.dul.to_user_queue.get_nowait() is None
    request = A_RELEASE()  # anything the DUL queued before the close
    assoc.dul.to_user_queue.put(request)
    end_wait_for_request(assoc)
    assert assoc.dul.to_user_queue.qsize() == 1


def test_association_slots_put_pynetdicoms_own_limit_out_of_reach() -> None:
    ae = AE()
    assert ae.maximum_associations < PYNETDICOM_MAX_ASSOCIATIONS
    slots = AssociationSlots(ae, 3)
    assert ae.maximum_associations == PYNETDICOM_MAX_ASSOCIATIONS
    assert slots.limit == 3


def test_lenient_validator_lets_long_uids_reach_the_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pynetdicom import _config
    from pynetdicom._validators import validate_ui
    from pynetdicom.utils import set_uid

    # pynetdicom's own validator, whatever an SCP started earlier in this process installed.
    monkeypatch.setitem(_config.VALIDATORS, "UI", validate_ui)
    long_uid = "1." + "2" * 70
    with pytest.raises(ValueError):
        set_uid(long_uid, "AffectedSOPInstanceUID")
    install_lenient_uid_validator()
    assert _config.VALIDATORS["UI"] is lenient_ui
    assert set_uid(long_uid, "AffectedSOPInstanceUID") == long_uid
    assert lenient_ui("") == (False, "must be a non-empty str")
    assert lenient_ui("1" * 1025) == (False, "longer than 1024 characters")
    assert lenient_ui("1" * 1024) == (True, "")


#: Attribute names that only pynetdicom's internals have.
_INTERNAL_ATTRIBUTES = frozenset(
    {
        "_servers",
        "dul",
        "dimse",
        "acse",
        "peek_next_pdu",
        "to_user_queue",
        "event_queue",
        "state_machine",
        "VALIDATORS",
        "_create_association",
        "encoded_command_set",
    }
)
#: pynetdicom modules whose names a module outside the fence may import from.
_PUBLIC_MODULES = frozenset(
    {"pynetdicom", "pynetdicom.association", "pynetdicom.sop_class", "pynetdicom.dimse_primitives",
     "pynetdicom.pdu_primitives", "pynetdicom.events", "pynetdicom.presentation"}
)  # fmt: skip


def test_only_the_fence_reaches_into_pynetdicom() -> None:
    """No other module of ichnode touches pynetdicom's private state or internal modules."""
    fence = Path(dimse_internals.__file__).resolve()
    offences = []
    for package in ("node", "storage", "inference", "config", "ui"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.resolve() == fence:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Attribute) and node.attr in _INTERNAL_ATTRIBUTES:
                    offences.append(f"{where} .{node.attr}")
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "pynetdicom"
                ):
                    if node.module not in _PUBLIC_MODULES:
                        offences.append(f"{where} from {node.module}")
                    offences += [f"{where} {a.name}" for a in node.names if a.name == "_config"]
                elif isinstance(node, ast.Import):
                    offences += [
                        f"{where} import {a.name}"
                        for a in node.names
                        if a.name.startswith("pynetdicom.") and a.name not in _PUBLIC_MODULES
                    ]
    assert not offences, offences
