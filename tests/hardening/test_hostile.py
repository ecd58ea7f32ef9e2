"""Hostile and broken input over real sockets to a running SCP.

Every case is built byte by byte (tests/hardening/conftest.py). For each one:
the offender gets a failure status or loses its connection, the node still
answers C-ECHO, a well-behaved SCU storing a series at the same time has every
instance acknowledged and indexed, no temporary file is left in the archive,
and the offender's instance is neither indexed nor stored.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.scp import MAX_PDU_LENGTH
from tests.hardening.conftest import (
    Bystander,
    Node,
    RawAssociation,
    associate_rq,
    echo_ok,
    encode_implicit,
    pdata,
    pdu,
    running_node,
)
from tests.storage.helpers import dataset_bytes, small_ct

NETWORK_TIMEOUT = 2.0
FAILURES = {0xA900, 0xC000}


def _offender() -> tuple[Dataset, bytes]:
    ds = small_ct(size=16)
    return ds, dataset_bytes(ds)


def _associated(node: Node, ts: str = ExplicitVRLittleEndian) -> RawAssociation:
    raw = RawAssociation(node.port)
    raw.associate([(1, CTImageStorage, [ts])])
    assert raw.accepted == {1: ts}
    return raw


def _refused(node: Node, ds: Dataset, body: bytes) -> list[str]:
    raw = _associated(node)
    status = raw.c_store(str(ds.SOPInstanceUID), body)
    assert status in FAILURES, f"status 0x{status:04X}"
    # The association is still usable after a refused instance.
    good = small_ct(size=16)
    assert raw.c_store(str(good.SOPInstanceUID), dataset_bytes(good), message_id=2) == 0
    raw.release()
    node.index.instance(str(good.SOPInstanceUID))
    return [str(ds.SOPInstanceUID), "good:" + str(good.SOPInstanceUID)]


# -- upper-layer (PDU) cases ---------------------------------------------------------


def garbage_instead_of_associate_rq(node: Node) -> list[str]:
    raw = RawAssociation(node.port)
    raw.send(b"GET / HTTP/1.1\r\nHost: ichnode\r\n\r\n")
    assert raw.closed_by_peer()
    return []


def truncated_associate_rq(node: Node) -> list[str]:
    raw = RawAssociation(node.port)
    start = time.monotonic()
    raw.send(associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])])[:40])
    assert raw.closed_by_peer()
    assert time.monotonic() - start < NETWORK_TIMEOUT + 3
    return []


def associate_rq_length_too_short(node: Node) -> list[str]:
    rq = bytearray(associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])]))
    struct.pack_into(">L", rq, 2, len(rq) - 6 - 30)
    raw = RawAssociation(node.port)
    raw.send(bytes(rq))
    assert raw.closed_by_peer()
    return []


def _huge_declared(raw: RawAssociation, pdu_type: int) -> None:
    start = time.monotonic()
    raw.send(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
    try:
        # 64 MiB more: the node must close rather than buffer it.
        block = bytes(1 << 20)
        for _ in range(64):
            raw.send(block)
    except OSError:
        pass
    assert raw.closed_by_peer()
    # Closed by the length bound, not by the network timeout.
    assert time.monotonic() - start < NETWORK_TIMEOUT


def huge_associate_rq_length(node: Node) -> list[str]:
    _huge_declared(RawAssociation(node.port), 0x01)
    return []


def huge_pdata_length(node: Node) -> list[str]:
    _huge_declared(_associated(node), 0x04)
    return []


def oversized_pdata(node: Node) -> list[str]:
    ds, _ = _offender()
    raw = _associated(node)
    try:
        raw.send(pdata(1, b"\0" * (MAX_PDU_LENGTH + 1024), command=False))
    except OSError:
        pass  # closed before the PDU was through: as it should
    assert raw.closed_by_peer()
    return [str(ds.SOPInstanceUID)]


def pdata_before_association(node: Node) -> list[str]:
    ds, body = _offender()
    raw = RawAssociation(node.port)
    raw.send(pdata(1, body, command=False))
    assert raw.closed_by_peer()
    return [str(ds.SOPInstanceUID)]


def unknown_pdu_type(node: Node) -> list[str]:
    raw = _associated(node)
    raw.send(pdu(0x09, b"\x01" * 32))
    assert raw.closed_by_peer()
    return []


def pdv_length_lies(node: Node) -> list[str]:
    raw = _associated(node)
    body = struct.pack(">LBB", 5000, 1, 0x03) + b"\0" * 100  # PDV says 5000, PDU holds 102
    raw.send(pdu(0x04, body))
    assert raw.closed_by_peer()
    return []


def dropped_mid_dataset(node: Node) -> list[str]:
    from tests.hardening.conftest import c_store_rq

    ds, body = _offender()
    raw = _associated(node)
    raw.send(pdata(1, c_store_rq(1, CTImageStorage, str(ds.SOPInstanceUID)), command=True))
    raw.send(pdata(1, body[: len(body) // 2], command=False, last=False))
    time.sleep(0.2)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST mid-dataset
    time.sleep(0.5)
    return [str(ds.SOPInstanceUID)]


def silent_after_association(node: Node) -> list[str]:
    raw = _associated(node)
    start = time.monotonic()
    assert raw.closed_by_peer()
    assert NETWORK_TIMEOUT - 0.5 < time.monotonic() - start < NETWORK_TIMEOUT + 3
    return []


# -- dataset (DIMSE) cases -------------------------------------------------------------


def broken_vr(node: Node) -> list[str]:
    ds, body = _offender()
    at = body.index(b"DA")  # the VR of the first date
    return _refused(node, ds, body[:at] + b"\x00\x07" + body[at + 2 :])


def element_length_past_end(node: Node) -> list[str]:
    ds, body = _offender()
    at = body.index(b"CS")  # a short element: make its length run past the end
    patched = bytearray(body)
    struct.pack_into("<H", patched, at + 2, 0xFFF0)
    return _refused(node, ds, bytes(patched))


def truncated_dataset(node: Node) -> list[str]:
    ds, body = _offender()
    return _refused(node, ds, body[:-100])


def pixel_data_shorter_than_header(node: Node) -> list[str]:
    ds, _ = _offender()
    ds.PixelData = bytes(100)  # 16 x 16 x 2 bytes needed
    return _refused(node, ds, dataset_bytes(ds))


def file_meta_in_dataset(node: Node) -> list[str]:
    ds, _ = _offender()
    meta = Dataset()
    meta.FileMetaInformationGroupLength = 9999  # wrong
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta_ds = dataset_bytes(_with_meta(meta, ds))
    return _refused(node, ds, meta_ds)


def _with_meta(meta: Dataset, ds: Dataset) -> Dataset:
    merged = Dataset()
    merged.update(meta)
    merged.update(ds)
    merged.file_meta = ds.file_meta
    return merged


def implicit_bytes_on_explicit_context(node: Node) -> list[str]:
    ds, _ = _offender()
    return _refused(node, ds, encode_implicit(ds))


def sequence_without_delimiter(node: Node) -> list[str]:
    ds, body = _offender()
    # An undefined-length SQ whose item never ends, placed before Pixel Data.
    at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    seq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    seq += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    return _refused(node, ds, body[:at] + seq + body[at:])


def deeply_nested_sequences(node: Node) -> list[str]:
    ds, body = _offender()
    at = body.index(struct.pack("<HH", 0x7FE0, 0x0010))
    depth = 500
    opening = (
        struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    closing = (
        struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    ) * depth
    return _refused(node, ds, body[:at] + opening + closing + body[at:])


def random_bytes_as_dataset(node: Node) -> list[str]:
    ds, _ = _offender()
    return _refused(node, ds, bytes(range(256)) * 8)


def empty_dataset(node: Node) -> list[str]:
    ds, _ = _offender()
    return _refused(node, ds, b"")


def sop_instance_uid_differs(node: Node) -> list[str]:
    ds, body = _offender()
    other = small_ct(size=16)
    return [*_refused(node, other, body), str(ds.SOPInstanceUID)]


def big_endian_bytes_on_implicit_context(node: Node) -> list[str]:
    ds, body = _offender()
    raw = _associated(node, ImplicitVRLittleEndian)
    status = raw.c_store(str(ds.SOPInstanceUID), body)  # explicit VR bytes, implicit context
    assert status in FAILURES, f"status 0x{status:04X}"
    raw.release()
    return [str(ds.SOPInstanceUID)]


CASES: list[Callable[[Node], list[str]]] = [
    garbage_instead_of_associate_rq,
    truncated_associate_rq,
    associate_rq_length_too_short,
    huge_associate_rq_length,
    huge_pdata_length,
    oversized_pdata,
    pdata_before_association,
    unknown_pdu_type,
    pdv_length_lies,
    dropped_mid_dataset,
    silent_after_association,
    broken_vr,
    element_length_past_end,
    truncated_dataset,
    pixel_data_shorter_than_header,
    file_meta_in_dataset,
    implicit_bytes_on_explicit_context,
    sequence_without_delimiter,
    deeply_nested_sequences,
    random_bytes_as_dataset,
    empty_dataset,
    sop_instance_uid_differs,
    big_endian_bytes_on_implicit_context,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_hostile_input(tmp_path: Path, case: Callable[[Node], list[str]]) -> None:
    with running_node(
        tmp_path,
        network_timeout_seconds=NETWORK_TIMEOUT,
        acse_timeout_seconds=NETWORK_TIMEOUT,
        dimse_timeout_seconds=NETWORK_TIMEOUT,
    ) as node:
        with Bystander(node.port) as bystander:
            uids = case(node)
        bystander.check(node)
        assert echo_ok(node.port), "node stopped answering C-ECHO"
        good = [u.removeprefix("good:") for u in uids if u.startswith("good:")]
        for uid in uids:
            if not uid.startswith("good:"):
                assert node.index.instance(uid) is None, f"offending instance {uid} indexed"
        for uid in good:
            assert node.index.instance(uid) is not None
        expected = len(bystander.series) + len(good)
        assert node.index.count_instances() == expected
        assert len(node.dicom_files()) == expected
        assert node.temp_files() == []
