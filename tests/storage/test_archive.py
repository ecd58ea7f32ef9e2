"""The archive writes each instance durably, atomically, under its UIDs, bytes untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from storage.archive import (
    STALE_INCOMING_SECONDS,
    Archive,
    ArchiveError,
    StoredFile,
    UnsafeUIDError,
)
from tests.storage.helpers import dataset_bytes, small_ct


def _meta(sop_instance_uid: str, source_ae: str = "SCU") -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.7433.1.1")
    meta.SourceApplicationEntityTitle = source_ae
    return meta


def _store(archive: Archive, ds: Dataset, source_ae: str = "SCU") -> StoredFile:
    """Store ``ds`` under its own UIDs, encoded as explicit VR little endian."""
    return archive.store(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        _meta(ds.SOPInstanceUID, source_ae),
        dataset_bytes(ds),
    )


def test_store_writes_the_bytes_at_the_uid_path(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    ds = small_ct()
    raw = dataset_bytes(ds)
    stored = archive.store(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, _meta(ds.SOPInstanceUID), raw
    )
    expected = (
        tmp_path / "dicom" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    assert stored.path == expected
    content = expected.read_bytes()
    assert stored.size == len(content)
    assert content[128:132] == b"DICM"
    assert content.endswith(raw)
    back = dcmread(expected)
    assert back.file_meta.SourceApplicationEntityTitle == "SCU"
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.PixelData == ds.PixelData
    # no temporary file is left behind, in the series folder or the incoming one
    assert [p.name for p in expected.parent.iterdir()] == [expected.name]
    assert archive.incoming.is_dir() and not any(archive.incoming.iterdir())
    # recovery scans see the instance and nothing of the incoming folder
    assert archive.files_changed_since(0) == [expected]


def test_store_again_replaces_the_file(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    ds = small_ct()
    first = _store(archive, ds)
    ds.SeriesDescription = "CHANGED"
    second = _store(archive, ds, "OTHER")
    assert first.path == second.path
    assert dcmread(second.path).SeriesDescription == "CHANGED"
    assert len(list(second.path.parent.iterdir())) == 1


@pytest.mark.parametrize("bad", ["../../etc", "a/b", "..", "", ".hidden", "1.2" + "3" * 70])
def test_unsafe_uids_are_refused(tmp_path: Path, bad: str) -> None:
    archive = Archive(tmp_path)
    with pytest.raises(UnsafeUIDError):
        archive.store(bad, "1.2.3", "1.2.3.4", _meta("1.2.3.4"), b"")
    with pytest.raises(UnsafeUIDError):
        archive.store("1.2", "1.2.3", bad, _meta("1.2.3.4"), b"")
    assert not any((tmp_path / "dicom").iterdir())


def test_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    ds = small_ct()
    target = archive.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    # A non-empty folder where the file should go: the rename must fail.
    (target / "occupied").mkdir(parents=True)
    with pytest.raises(ArchiveError):
        _store(archive, ds)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert not any(archive.incoming.iterdir())


def _dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cleanup_incoming_removes_leftovers_of_gone_writers_only(tmp_path: Path) -> None:
    archive = Archive(tmp_path)
    assert archive.cleanup_incoming() == 0  # nothing written yet, no folder
    ds = small_ct()
    kept = _store(archive, ds)
    host, dead = socket.gethostname(), _dead_pid()
    leftovers = [
        archive.incoming / f".incoming-1.2.3.4~{host}~{dead}~7.tmp",
        archive.incoming / f".incoming-1.2.3.5-{dead}-7.tmp",  # name of an older version
    ]
    # Another receiver of this host writing right now, and one on another host.
    live = [
        archive.incoming / f".incoming-1.2.3.6~{host}~{os.getpid()}~7.tmp",
        archive.incoming / f".incoming-1.2.3.7~other-host.example~{dead}~7.tmp",
    ]
    for path in leftovers + live:
        path.write_bytes(b"half")
    assert archive.cleanup_incoming() == 2
    assert sorted(archive.incoming.iterdir()) == sorted(live)
    # A day later a file is removed whoever wrote it.
    old = time.time() - STALE_INCOMING_SECONDS - 60
    os.utime(live[1], (old, old))
    assert archive.cleanup_incoming() == 1
    assert list(archive.incoming.iterdir()) == [live[0]]
    assert kept.path.read_bytes().endswith(dataset_bytes(ds))


def test_remove_refuses_paths_outside_the_archive(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "root")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    with pytest.raises(ArchiveError):
        archive.remove(outside)
    assert outside.exists()
