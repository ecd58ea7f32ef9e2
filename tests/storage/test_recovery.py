"""Start-up re-indexing of files whose index row was lost (storage/recovery.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from storage.archive import Archive, StoredFile
from storage.index import Index, InstanceMeta
from storage.recovery import reindex_unindexed
from tests.storage.helpers import ct_series, dataset_bytes


def _archive_index(tmp_path: Path) -> tuple[Archive, Index]:
    archive = Archive(tmp_path / "data")
    index = Index(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    index.upgrade()
    return archive, index


def _store(archive: Archive, ds: Dataset, calling_ae: str = "CT01") -> StoredFile:
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = calling_ae
    return archive.store(
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, meta, dataset_bytes(ds)
    )


def _index(index: Index, ds: Dataset, stored: StoredFile) -> None:
    meta = InstanceMeta.from_dataset(
        ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)
    )
    index.record_instance(meta, path=stored.path, size=stored.size, calling_ae="CT01")


def test_files_without_rows_are_indexed_from_their_headers(tmp_path: Path) -> None:
    archive, index = _archive_index(tmp_path)
    series = ct_series(5)
    for ds in series[:3]:
        _index(index, ds, _store(archive, ds))
    # The last two were made durable, but their commits were lost.
    lost = {ds.SOPInstanceUID: _store(archive, ds, calling_ae="CT02") for ds in series[3:]}

    report = reindex_unindexed(archive, index)

    assert (report.reindexed, report.unreadable) == (2, 0)
    assert index.count_instances() == 5
    for uid, stored in lost.items():
        row = index.instance(uid)
        assert row is not None
        assert row["path"] == str(stored.path)
        assert row["size"] == stored.size == stored.path.stat().st_size
        assert row["calling_ae"] == "CT02"
        assert row["association_id"] is None
    files = index.series_files(series[0].SeriesInstanceUID)
    assert [f.instance_number for f in files] == [ds.InstanceNumber for ds in series]
    # Nothing left to do the second time.
    assert reindex_unindexed(archive, index).reindexed == 0
    assert index.count_instances() == 5


def test_an_empty_index_is_rebuilt_from_the_whole_archive(tmp_path: Path) -> None:
    archive, index = _archive_index(tmp_path)
    stored = [_store(archive, ds) for ds in ct_series(3) + ct_series(2)]
    old = time.time() - 30 * 24 * 3600
    for item in stored:
        os.utime(item.path, (old, old))
        os.utime(item.path.parent, (old, old))
    assert reindex_unindexed(archive, index).reindexed == 5
    assert len(index.list_studies()) == 2


def test_the_scan_skips_series_folders_older_than_the_newest_row(tmp_path: Path) -> None:
    archive, index = _archive_index(tmp_path)
    old_series = ct_series(2)
    old_files = [_store(archive, ds) for ds in old_series]
    month_ago = time.time() - 30 * 24 * 3600
    for item in old_files:
        os.utime(item.path, (month_ago, month_ago))
    os.utime(old_files[0].path.parent, (month_ago, month_ago))
    recent = ct_series(1)[0]
    _index(index, recent, _store(archive, recent))

    assert archive.files_changed_since(time.time() - 600) == [
        archive.path_for(recent.StudyInstanceUID, recent.SeriesInstanceUID, recent.SOPInstanceUID)
    ]
    assert reindex_unindexed(archive, index).reindexed == 0
    assert index.instance(old_series[0].SOPInstanceUID) is None


def test_unreadable_or_misnamed_files_are_left_and_reported(tmp_path: Path) -> None:
    archive, index = _archive_index(tmp_path)
    good = ct_series(1)[0]
    _store(archive, good)
    folder = archive.dicom_root / generate_uid() / generate_uid()
    folder.mkdir(parents=True)
    (folder / f"{generate_uid()}.dcm").write_bytes(b"not a DICOM file")
    other = ct_series(1)[0]
    stored = _store(archive, other)
    misnamed = stored.path.with_name(f"{generate_uid()}.dcm")
    stored.path.rename(misnamed)

    report = reindex_unindexed(archive, index)

    assert (report.scanned, report.reindexed, report.unreadable) == (3, 1, 2)
    assert index.instance(good.SOPInstanceUID) is not None
    assert (folder / "x").parent.exists() and misnamed.exists()


def test_a_file_that_would_join_another_patients_series_is_left_and_reported(
    tmp_path: Path,
) -> None:
    archive, index = _archive_index(tmp_path)
    first, second = ct_series(2)
    _index(index, first, _store(archive, first))
    # A file on disk without a row claims the same series for another patient and
    # study (what a crash between two conflicting sends could leave).
    second.PatientID = "OTHER-PATIENT"
    second.StudyInstanceUID = generate_uid()
    stored = _store(archive, second)

    report = reindex_unindexed(archive, index)

    assert (report.reindexed, report.unreadable) == (0, 1)
    assert index.instance(second.SOPInstanceUID) is None
    assert index.instance(first.SOPInstanceUID) is not None
    assert stored.path.exists()
