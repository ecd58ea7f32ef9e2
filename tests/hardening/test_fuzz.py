"""Property-based fuzz of the path from received bytes to the index.

Mutated and truncated encodings of a small CT instance are sent as C-STORE
datasets over one real association to a running SCP. For every example the
outcome is all or nothing: either a success status with one index row and a
file pydicom reads back whole, or a failure status (0xA900/0xC000, never the
0xC211 of an exception out of the handler) with no row and no file. No
temporary file is ever left behind.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread

from tests.hardening.conftest import Node, RawAssociation, running_node
from tests.storage.helpers import dataset_bytes, small_ct

UID_PREFIX = "1.2.826.0.1.3680043.9.7433.77."
UID_DIGITS = 30
_counter = itertools.count(1)


def _uid(n: int) -> str:
    return f"{UID_PREFIX}{10 ** (UID_DIGITS - 1) + n}"


TEMPLATE_UID = _uid(0)
_TEMPLATE_DS = small_ct(size=8, sop_instance_uid=TEMPLATE_UID)
TEMPLATE = dataset_bytes(_TEMPLATE_DS)
EXPECTED_PIXEL_BYTES = 8 * 8 * 2


@st.composite
def mutations(draw: st.DrawFn) -> list[tuple[str, int, bytes]]:
    """One to three edits of the template: flips, overwrites, inserts, deletes, truncation."""
    n = len(TEMPLATE)
    ops: list[tuple[str, int, bytes]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["byte", "word", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, n - 1))
        if kind == "byte":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=1))))
        elif kind == "word":  # lengths and VRs live in 2- and 4-byte fields
            value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFF0]))
            ops.append((kind, pos, struct.pack("<L", value)[: draw(st.sampled_from([2, 4]))]))
        elif kind == "insert":
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        elif kind == "delete":
            ops.append((kind, pos, bytes(draw(st.integers(1, 64)))))
        else:
            ops.append((kind, pos, b""))
    return ops


def apply(body: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply ``ops`` in order (positions are taken modulo the current length)."""
    data = bytearray(body)
    for kind, pos, value in ops:
        pos = pos % max(len(data), 1)
        if kind in ("byte", "word"):
            data[pos : pos + len(value)] = value
        elif kind == "insert":
            data[pos:pos] = value
        elif kind == "delete":
            del data[pos : pos + len(value)]
        else:
            del data[pos:]
    return bytes(data)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@pytest.fixture(scope="module")
def raw(node: Node) -> Iterator[RawAssociation]:
    assoc = RawAssociation(node.port, timeout=30)
    assoc.associate()
    yield assoc
    assoc.release()


def test_template_is_stored(node: Node, raw: RawAssociation) -> None:
    """The unmutated template succeeds, so the property is not vacuous."""
    uid = _uid(next(_counter))
    body = TEMPLATE.replace(TEMPLATE_UID.encode(), uid.encode())
    assert raw.c_store(uid, body) == 0
    assert node.index.instance(uid) is not None


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
@given(ops=mutations())
def test_mutated_datasets_are_stored_whole_or_not_at_all(
    node: Node, raw: RawAssociation, ops: list[tuple[str, int, bytes]]
) -> None:
    n = next(_counter)
    uid = _uid(n)
    body = apply(TEMPLATE.replace(TEMPLATE_UID.encode(), uid.encode()), ops)
    rows_before = node.index.count_instances()
    files_before = len(node.dicom_files())
    status = raw.c_store(uid, body, message_id=n % 0xFFFF + 1)
    row = node.index.instance(uid)
    if status == 0:
        assert row is not None
        assert node.index.count_instances() == rows_before + 1
        ds = dcmread(row["path"])
        assert ds.SOPInstanceUID == uid
        assert len(ds.PixelData) >= EXPECTED_PIXEL_BYTES
    else:
        assert status in (0xA900, 0xC000), f"status 0x{status:04X} for {ops}"
        assert row is None
        assert node.index.count_instances() == rows_before
        assert len(node.dicom_files()) == files_before
    assert node.temp_files() == []


def test_mutation_helper_changes_the_bytes() -> None:
    assert apply(b"abcdef", [("truncate", 3, b"")]) == b"abc"
    assert apply(b"abcdef", [("insert", 1, b"XY")]) == b"aXYbcdef"
    assert apply(b"abcdef", [("delete", 2, bytes(2))]) == b"abef"
    assert apply(b"abcdef", [("word", 4, b"\xff\xff")]) == b"abcd\xff\xff"
