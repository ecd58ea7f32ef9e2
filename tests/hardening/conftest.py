"""Fixtures of the receiver hardening tests: a running SCP with chosen limits,
test certificates made with ``openssl``, and a raw DICOM upper-layer client
that builds every PDU byte by byte (so each hostile case is exact)."""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Self

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from config.settings import NodeSettings, StorageSettings, TlsSettings
from node.scp import StorageSCP, configure_pydicom
from storage.archive import Archive
from storage.index import Index
from tests.interop import free_port, require_tool
from tests.storage.helpers import ct_series

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


@dataclass
class Node:
    """A running StorageSCP with its archive and index."""

    scp: StorageSCP
    index: Index
    archive: Archive
    port: int
    root: Path

    def temp_files(self) -> list[Path]:
        """Temporary files the archive left behind (there must be none)."""
        return sorted(self.root.rglob(".incoming-*"))

    def dicom_files(self) -> list[Path]:
        """Every stored instance file."""
        return sorted(p for p in self.archive.dicom_root.rglob("*.dcm"))


@contextmanager
def running_node(root: Path, **node_kwargs: Any) -> Iterator[Node]:
    """Start a StorageSCP on a free loopback port with ``NodeSettings(**node_kwargs)``."""
    configure_pydicom()
    port = free_port()
    node = NodeSettings(port=port, **node_kwargs)
    storage = StorageSettings(root=root, min_free_disk_mb=0)
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    index.upgrade()
    archive = Archive(root)
    scp = StorageSCP(node, storage, archive, index, shutdown_grace_s=0.0)
    scp.start()
    try:
        yield Node(scp, index, archive, port, root)
    finally:
        scp.stop()
        index.dispose()


def scu_ae(calling: str = "TESTSCU", timeout: float = 10) -> AE:
    """A pynetdicom SCU proposing Verification and CT (explicit and implicit VR)."""
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def echo_ok(port: int, tls_args: Any = None) -> bool:
    """True when a fresh association to the node answers C-ECHO with success."""
    assoc = scu_ae().associate("127.0.0.1", port, ae_title="ICHNODE", tls_args=tls_args)
    if not assoc.is_established:
        return False
    try:
        rsp = assoc.send_c_echo()
        return "Status" in rsp and int(rsp.Status) == 0
    finally:
        assoc.release()


@dataclass
class BystanderResult:
    """What a concurrent, well-behaved SCU achieved."""

    series_instance_uid: str = ""
    statuses: list[int] = field(default_factory=list)
    error: str = ""


class Bystander:
    """A pynetdicom SCU storing a small series in a thread while a hostile case runs."""

    def __init__(self, port: int, count: int = 6, tls_args: Any = None, pace: float = 0.1) -> None:
        self.port = port
        self.pace = pace
        self.series = ct_series(count, size=16)
        self.tls_args = tls_args
        self.result = BystanderResult(self.series[0].SeriesInstanceUID)
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assoc: Association = scu_ae("BYSTANDER", timeout=20).associate(
            "127.0.0.1", self.port, ae_title="ICHNODE", tls_args=self.tls_args
        )
        self.started.set()
        if not assoc.is_established:
            self.result.error = "association not established"
            return
        for ds in self.series:
            time.sleep(self.pace)  # spread the series over the hostile case
            rsp = assoc.send_c_store(ds)
            self.result.statuses.append(int(rsp.Status) if "Status" in rsp else -1)
        assoc.release()

    def __enter__(self) -> Self:
        self._thread.start()
        self.started.wait(20)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(60)

    def check(self, node: Node) -> None:
        """Assert every instance of the bystander was acknowledged and indexed."""
        assert not self._thread.is_alive(), "bystander SCU did not finish"
        assert not self.result.error, self.result.error
        assert self.result.statuses == [0] * len(self.series)
        for ds in self.series:
            assert node.index.instance(ds.SOPInstanceUID) is not None


# -- raw upper layer -----------------------------------------------------------


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    called: str = "ICHNODE",
    calling: str = "RAWSCU",
    max_length: int = 16384,
) -> bytes:
    """Encode an A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + _item(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode())
        for ts in syntaxes:
            sub += _item(0x40, ts.encode())
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_length)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.9")
    body += _item(0x50, user)
    return pdu(0x01, body)


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def pdata(context_id: int, data: bytes, *, command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF PDU with one PDV."""
    header = (1 if command else 0) | (2 if last else 0)
    pdv = struct.pack(">LBB", len(data) + 2, context_id, header) + data
    return pdu(0x04, pdv)


def encode_implicit(ds: Dataset) -> bytes:
    """Encode ``ds`` in Implicit VR Little Endian (DIMSE commands always are)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """Encode a C-STORE-RQ command set with its group length."""
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class_uid
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance_uid
    body = encode_implicit(cmd)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


class PeerClosed(Exception):
    """The node closed the connection (or aborted) instead of answering."""


class RawAssociation:
    """A DICOM upper-layer client on a plain socket, for exact hostile PDUs."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.accepted: dict[int, str] = {}

    def close(self) -> None:
        """Close the socket (no release)."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise PeerClosed(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def read_pdu(self) -> tuple[int, bytes]:
        """Return the next (type, body); raise PeerClosed on a closed connection."""
        pdu_type, _, length = struct.unpack(">BBL", self._read_exact(6))
        return pdu_type, self._read_exact(length)

    def closed_by_peer(self) -> bool:
        """True when the node aborts (A-ABORT) or closes before the socket timeout."""
        try:
            while True:
                pdu_type, _ = self.read_pdu()
                if pdu_type == 0x07:
                    return True
        except PeerClosed:
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def associate(self, contexts: list[tuple[int, str, list[str]]] | None = None) -> None:
        """Send an A-ASSOCIATE-RQ and require an A-ASSOCIATE-AC."""
        contexts = contexts or [(1, CTImageStorage, [ExplicitVRLittleEndian])]
        self.send(associate_rq(contexts))
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type:#x}"
        pos = 68
        while pos < len(body):
            item_type, _, length = struct.unpack(">BBH", body[pos : pos + 4])
            if item_type == 0x21:
                context_id, result = body[pos + 4], body[pos + 6]
                ts_length = struct.unpack(">H", body[pos + 10 : pos + 12])[0]
                if result == 0:
                    self.accepted[context_id] = body[pos + 12 : pos + 12 + ts_length].decode()
            pos += 4 + length

    def c_store(
        self,
        sop_instance_uid: str,
        dataset: bytes,
        *,
        context_id: int = 1,
        sop_class_uid: str = CTImageStorage,
        message_id: int = 1,
        fragment: int = 4096,
    ) -> int:
        """Send a C-STORE-RQ with ``dataset`` as it is; return the response status."""
        self.send(
            pdata(context_id, c_store_rq(message_id, sop_class_uid, sop_instance_uid), command=True)
        )
        chunks = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
        for i, chunk in enumerate(chunks):
            self.send(pdata(context_id, chunk, command=False, last=i == len(chunks) - 1))
        pdu_type, body = self.read_pdu()
        if pdu_type != 0x04:
            raise PeerClosed(f"expected P-DATA-TF, got PDU type {pdu_type:#x}")
        rsp = read_dataset(BytesIO(body[6:]), True, True)
        return int(rsp.Status)

    def release(self) -> None:
        """A-RELEASE-RQ, wait for the A-RELEASE-RP, close."""
        self.send(pdu(0x05, bytes(4)))
        pdu_type, _ = self.read_pdu()
        assert pdu_type == 0x06
        self.close()


# -- certificates ----------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made for one test session."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def _signed(folder: Path, name: str, cn: str, ca: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
             "-out", f"{name}.crt", cwd=folder)  # fmt: skip


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, a rogue one."""
    require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=ichnode test {ca}",
                 cwd=folder)  # fmt: skip
    _signed(folder, "server", "localhost", "ca",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")  # fmt: skip
    _signed(folder, "client", "TESTSCU", "ca", "extendedKeyUsage=clientAuth\n")
    _signed(folder, "rogue", "ROGUE", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return TlsFiles(
        ca_cert=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        rogue_cert=folder / "rogue.crt",
        rogue_key=folder / "rogue.key",
    )


def server_tls(files: TlsFiles, *, verify_clients: bool = True) -> TlsSettings:
    """The node's ``[node.tls]`` for the test certificates."""
    return TlsSettings(
        enabled=True,
        cert_file=files.server_cert,
        key_file=files.server_key,
        ca_file=files.ca_cert,
        verify_clients=verify_clients,
    )
