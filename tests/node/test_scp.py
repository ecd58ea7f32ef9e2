"""The C-STORE SCP over real loopback associations with a pynetdicom SCU.

Every status the receiver can return, the association rejections, re-sends,
concurrent associations and the listener hooks.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import AssociationClosed, InstanceStored
from node.wire import EscapeWireValues, escape, uid_problem
from storage.archive import PREAMBLE, encode_file_meta
from storage.models import AssociationOutcome
from tests.interop import REPO
from tests.storage.helpers import ct_series, dataset_bytes, running_scp, small_ct


def _associate(port: int, *, calling: str = "TESTSCU", called: str = "ICHNODE") -> Association:
    ae = AE(calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title=called)


def _store(assoc: Association, ds: Dataset | Path) -> int:
    rsp = assoc.send_c_store(ds)
    assert "Status" in rsp, "empty response: timeout or abort"
    return int(rsp.Status)


def _raw_file(tmp_path: Path, sop_instance_uid: str, body: bytes) -> Path:
    """A Part 10 file whose meta names ``sop_instance_uid`` and whose dataset is ``body``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.7433.1.1")
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(PREAMBLE + encode_file_meta(meta) + body)
    return path


@pytest.fixture
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``send_c_store(path)`` send the file's bytes as they are, with the meta's UIDs."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_echo(tmp_path: Path) -> None:
    with running_scp(tmp_path) as r:
        assoc = _associate(r.port)
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()


def test_store_is_on_disk_and_indexed_before_success(tmp_path: Path) -> None:
    ds = small_ct()
    with running_scp(tmp_path) as r:
        assoc = _associate(r.port, calling="MODALITY1")
        assert _store(assoc, ds) == 0x0000
        # Checked before release: success meant file + row already exist.
        row = r.index.instance(ds.SOPInstanceUID)
        assert row is not None
        path = Path(row["path"])
        assert path == (
            tmp_path
            / "dicom"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        assert row["transfer_syntax_uid"] == ExplicitVRLittleEndian
        assert row["calling_ae"] == "MODALITY1" and row["size"] == path.stat().st_size
        assert path.read_bytes().endswith(dataset_bytes(ds))
        back = dcmread(path)
        assert back.file_meta.SourceApplicationEntityTitle == "MODALITY1"
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData
        assoc.release()


def test_out_of_disk_space_is_a700_and_stores_nothing(tmp_path: Path) -> None:
    with running_scp(tmp_path, min_free_disk_mb=10**9) as r:
        assoc = _associate(r.port)
        assert _store(assoc, small_ct()) == 0xA700
        assoc.release()
        assert r.index.count_instances() == 0
        assert not any(p.is_file() for p in (tmp_path / "dicom").rglob("*"))


def test_dataset_without_series_uid_is_refused_and_association_goes_on(
    tmp_path: Path, raw_sends: None
) -> None:
    ds = small_ct()
    del ds.SeriesInstanceUID
    bad = _raw_file(tmp_path, ds.SOPInstanceUID, dataset_bytes(ds))
    good = small_ct()
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        assert _store(assoc, bad) == 0xA900
        assert _store(assoc, good) == 0x0000
        assoc.release()
        assert r.index.instance(ds.SOPInstanceUID) is None
        assert r.index.instance(good.SOPInstanceUID) is not None
        audit = r.index.associations()[0]
        assert audit["instances"] == 1 and audit["failures"] == 1


def test_sop_instance_uid_differing_from_the_request_is_refused(
    tmp_path: Path, raw_sends: None
) -> None:
    ds = small_ct()
    mismatched = _raw_file(tmp_path, generate_uid(), dataset_bytes(ds))
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        rsp = assoc.send_c_store(mismatched)
        assert int(rsp.Status) == 0xC000
        assert "differs" in str(rsp.get("ErrorComment", ""))
        assoc.release()
        assert r.index.count_instances() == 0


def test_image_cut_before_its_pixel_module_is_a900(tmp_path: Path, raw_sends: None) -> None:
    """A CT cut at an element boundary before (0028,xxxx) is a well-formed dataset, but
    not a CT image: Pixel Data is Type 1 (found by the fuzz test)."""
    ds = small_ct()
    for keyword in [e.keyword for e in ds if e.tag.group >= 0x0028]:
        delattr(ds, keyword)
    bad = _raw_file(tmp_path, ds.SOPInstanceUID, dataset_bytes(ds))
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        assert _store(assoc, bad) == 0xA900
        assert _store(assoc, small_ct()) == 0x0000
        assoc.release()
        assert r.index.instance(ds.SOPInstanceUID) is None
        assert r.index.count_instances() == 1
        assert len(list((tmp_path / "node").rglob("*.dcm"))) == 1


def test_undecodable_dataset_is_c000(tmp_path: Path, raw_sends: None) -> None:
    # An element header claiming 1 GB of value: pydicom cannot read it.
    garbage = b"\x08\x00\x18\x00UI\xff\xff" + b"1.2" * 3
    bad = _raw_file(tmp_path, generate_uid(), garbage)
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        assert _store(assoc, bad) in (0xC000, 0xA900)
        assert _store(assoc, small_ct()) == 0x0000
        assoc.release()
        assert r.index.count_instances() == 1


def test_uid_that_cannot_name_a_file_is_refused(tmp_path: Path) -> None:
    ds = small_ct()
    ds.SeriesInstanceUID = "../../escape"
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        assert _store(assoc, ds) == 0xC000
        assoc.release()
    assert not (tmp_path / "escape").exists()
    assert not list(tmp_path.rglob("*.dcm"))


def test_calling_ae_not_on_the_allow_list_is_rejected(tmp_path: Path) -> None:
    with running_scp(tmp_path, allowed_calling_aets=["MODALITY1"]) as r:
        assoc = _associate(r.port, calling="INTRUDER")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        # rejected-permanent, service-user, calling AE title not recognised
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)
        ok = _associate(r.port, calling="MODALITY1")
        assert ok.is_established
        ok.release()
        rejected = [a for a in r.index.associations() if a["outcome"] == "rejected"]
        assert [a["calling_ae"] for a in rejected] == ["INTRUDER"]
        assert rejected[0]["detail"] == "calling AE title not recognised"


def test_wrong_called_ae_is_rejected(tmp_path: Path) -> None:
    with running_scp(tmp_path) as r:
        assoc = _associate(r.port, called="SOMEONEELSE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)
        # The node writes the audit row after the A-ASSOCIATE-RJ is on the wire,
        # so the peer can see the rejection first: wait for the row.
        deadline = time.monotonic() + 10
        while not r.index.associations():
            assert time.monotonic() < deadline, "the rejection was not audited"
            time.sleep(0.02)
        audit = r.index.associations()[0]
        assert audit["outcome"] == "rejected" and audit["called_ae"] == "SOMEONEELSE"


def test_association_limit(tmp_path: Path) -> None:
    with running_scp(tmp_path, max_associations=1) as r:
        first = _associate(r.port)
        assert first.is_established
        second = _associate(r.port, calling="SECOND")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert rj is not None
        # rejected-transient, service-provider (presentation), local limit exceeded
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        first.release()


def test_resend_is_stored_once_and_recorded(tmp_path: Path) -> None:
    ds = small_ct()
    with running_scp(tmp_path) as r:
        for calling in ("FIRST", "SECOND"):
            assoc = _associate(r.port, calling=calling)
            assert _store(assoc, ds) == 0x0000
            assoc.release()
        row = r.index.instance(ds.SOPInstanceUID)
        assert row is not None
        assert row["resend_count"] == 1 and row["last_resent_at"] is not None
        assert row["calling_ae"] == "SECOND"
        assert r.index.count_instances() == 1
        files = [p for p in (tmp_path / "dicom").rglob("*") if p.is_file()]
        assert files == [Path(row["path"])]
        assert dcmread(files[0]).file_meta.SourceApplicationEntityTitle == "SECOND"


def test_eight_concurrent_associations(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with running_scp(tmp_path / "node") as r:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.storage.scu",
                    str(r.port),
                    f"SCU{n}",
                    "50",
                    "--go",
                    str(go),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            for n in range(8)
        ]
        # All eight associations are open before anyone sends.
        deadline = time.monotonic() + 120
        while len([a for a in r.scp.ae.active_associations if a.is_acceptor]) < 8:
            assert time.monotonic() < deadline, "eight associations did not open"
            assert all(p.poll() is None for p in procs), "an SCU ended early"
            time.sleep(0.05)
        go.touch()
        results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
        assert all(p.returncode == 0 for p in procs)
        assert all(res["statuses"] == [0] * 50 for res in results)
        assert r.index.count_instances() == 400
        for res in results:
            files = r.index.series_files(res["series_instance_uid"])
            assert len(files) == 50 and all(Path(f.path).is_file() for f in files)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            audits = [a for a in r.index.associations() if a["calling_ae"].startswith("SCU")]
            if all(a["outcome"] == "released" for a in audits):
                break
            time.sleep(0.1)
        assert len(audits) == 8
        assert all(a["outcome"] == "released" and a["instances"] == 50 for a in audits)


class _Recorder:
    def __init__(self) -> None:
        self.stored: list[InstanceStored] = []
        self.closed: list[AssociationClosed] = []
        self.done = threading.Event()

    def instance_stored(self, stored: InstanceStored) -> None:
        self.stored.append(stored)

    def association_closed(self, closed: AssociationClosed) -> None:
        self.closed.append(closed)
        self.done.set()


def test_listeners_hear_stored_instances_and_the_release(tmp_path: Path) -> None:
    recorder = _Recorder()
    a, b = ct_series(2), ct_series(1)
    with running_scp(tmp_path, listeners=[recorder]) as r:
        assoc = _associate(r.port)
        for ds in a + b:
            assert _store(assoc, ds) == 0x0000
        assoc.release()
        assert recorder.done.wait(10)
    assert [s.sop_instance_uid for s in recorder.stored] == [ds.SOPInstanceUID for ds in a + b]
    assert {s.series_instance_uid for s in recorder.stored} == {
        a[0].SeriesInstanceUID,
        b[0].SeriesInstanceUID,
    }
    (closed,) = recorder.closed
    assert closed.outcome == AssociationOutcome.RELEASED and closed.instances == 3
    assert closed.series_instance_uids == {a[0].SeriesInstanceUID, b[0].SeriesInstanceUID}
    assert len(closed.series_ids) == 2


def test_abort_is_reported_with_the_series(tmp_path: Path) -> None:
    recorder = _Recorder()
    ds = small_ct()
    with running_scp(tmp_path, listeners=[recorder]) as r:
        assoc = _associate(r.port)
        assert _store(assoc, ds) == 0x0000
        assoc.abort()
        assert recorder.done.wait(10)
        (closed,) = recorder.closed
        assert closed.outcome == AssociationOutcome.ABORTED
        assert closed.series_instance_uids == {ds.SeriesInstanceUID}
        time.sleep(0.1)
        assert r.index.associations()[0]["outcome"] == "aborted"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID"])
def test_other_missing_uids(tmp_path: Path, keyword: str, raw_sends: None) -> None:
    ds = small_ct()
    sop = ds.SOPInstanceUID
    delattr(ds, keyword)
    bad = _raw_file(tmp_path, sop, dataset_bytes(ds))
    with running_scp(tmp_path / "node") as r:
        assoc = _associate(r.port)
        assert _store(assoc, bad) == 0xA900
        assoc.release()
        assert r.index.count_instances() == 0


_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGLSLossless,
]


@pytest.mark.parametrize("transfer_syntax", _SYNTAXES, ids=[str(t.keyword) for t in _SYNTAXES])
def test_transfer_syntaxes_are_kept_as_received(tmp_path: Path, transfer_syntax: UID) -> None:
    ds = small_ct(size=64)
    if transfer_syntax.is_compressed:
        if transfer_syntax == JPEG2000:
            ds.compress(transfer_syntax, j2k_cr=[20])  # lossy
        else:
            ds.compress(transfer_syntax)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax  # pynetdicom encodes it so
    ae = AE("TSSCU")
    ae.add_requested_context(CTImageStorage, [transfer_syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    with running_scp(tmp_path) as r:
        assoc = ae.associate("127.0.0.1", r.port, ae_title="ICHNODE")
        assert assoc.is_established
        assert _store(assoc, ds) == 0x0000
        assoc.release()
        row = r.index.instance(ds.SOPInstanceUID)
    assert row is not None and row["transfer_syntax_uid"] == transfer_syntax
    back = dcmread(row["path"])
    assert back.file_meta.TransferSyntaxUID == transfer_syntax
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.pixel_array.shape == (64, 64)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # kept deflated, as received: the plain encoding does not appear in the file
        assert dataset_bytes(small_ct(size=64))[:8] not in Path(row["path"]).read_bytes()[300:]


# -- values from the wire: UID rules and log escaping -------------------------------


@pytest.mark.parametrize(
    ("uid", "problem"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", None),
        ("1.2.840.113619.2.55.3.0123", None),  # a leading zero: accepted (see node.wire)
        ("1" * 64, None),
        ("1" * 65, "65 characters (at most 64)"),
        ("", "empty"),
        ("1.2.3a", "characters other than 0-9 and '.'"),
        ("1.2.3\n4", "characters other than 0-9 and '.'"),
        ("1..2", "an empty component"),
        (".1.2", "an empty component"),
        ("1.2.", "an empty component"),
    ],
)
def test_uid_problem(uid: str, problem: str | None) -> None:
    assert uid_problem(uid) == problem


def test_escape_keeps_one_printable_ascii_line() -> None:
    assert escape("1.2.3") == "1.2.3"
    assert escape("a\nb\r\tc\x00\x7f\\") == "a\\nb\\r\\tc\\x00\\x7f\\\\"
    assert escape("\xe9\u20ac\U0001f600") == "\\xe9\\u20ac\\U0001f600"
    assert escape(b"1.2\xe9\n") == "1.2\\xe9\\n"


def test_wire_filter_escapes_arguments_messages_and_exception_text() -> None:
    def record(msg: object, args: tuple[object, ...], exc: BaseException | None = None) -> str:
        rec = logging.LogRecord("x", logging.WARNING, __file__, 1, msg, args, None)
        if exc is not None:
            rec.exc_info = (type(exc), exc, exc.__traceback__)
        assert EscapeWireValues().filter(rec)
        return logging.Formatter("%(message)s").format(rec)

    assert record("refused %s after %d", ("1.2\nFORGED", 3)) == "refused 1.2\\nFORGED after 3"
    assert record("value '1.2\nFORGED'", ()) == "value '1.2\\nFORGED'"
    try:
        raise ValueError("bad '1.2\nFORGED \xe9'")
    except ValueError as exc:
        text = record("failed", (), exc)
    assert text.splitlines()[-1] == "ValueError: bad '1.2\\nFORGED \\xe9'"
    assert not any(line.startswith("FORGED") for line in text.splitlines())

