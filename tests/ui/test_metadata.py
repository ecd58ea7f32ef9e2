"""The metadata panel: the paper's summary fields and the searchable header."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ui.metadata import SUMMARY_FIELDS, header_rows, header_table, patient_age, summary


def _ct() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-0042"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "19700615"
    ds.StudyDate = "20240614"
    ds.StudyDescription = "CT HEAD W/O"
    ds.SeriesDescription = "Brain 5mm"
    ds.Modality = "CT"
    ds.Manufacturer = "Philips"
    ds.ManufacturerModelName = "Ingenuity CT"
    ds.ScanOptions = "HELIX"
    ds.AcquisitionDate = "20240614"
    ds.AcquisitionTime = "101502.25"
    ds.Rows = 512
    ds.Columns = 512
    ds.PixelSpacing = [0.488, 0.488]
    ds.SliceThickness = 5
    ds.ConvolutionKernel = "UB"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.CodeMeaning = "Brain"
    ds.AnatomicRegionSequence = Sequence([item])
    ds.BitsAllocated = 16
    ds.PixelData = np.zeros((512, 512), dtype=np.int16).tobytes()
    return ds


def test_summary_lists_every_field_the_paper_shows() -> None:
    values = dict(summary(_ct()))
    assert list(values) == list(SUMMARY_FIELDS)
    assert values["Patient name"] == "Doe Jane"
    assert values["Patient ID"] == "P-0042"
    assert values["Sex"] == "F"
    assert values["Age"] == "53 years"
    assert values["Model"] == "Ingenuity CT"
    assert values["Scan type"] == "HELIX"
    assert values["Acquisition"] == "2024-06-14 10:15:02"
    assert values["Image size"] == "512 × 512"
    assert values["Pixel spacing"] == "0.488 × 0.488 mm"
    assert values["Slice thickness"] == "5 mm"
    assert values["Kernel"] == "UB"


def test_age_as_written_wins_and_missing_is_empty() -> None:
    ds = _ct()
    ds.PatientAge = "007M"
    assert patient_age(ds) == "7 months"
    empty = Dataset()
    assert patient_age(empty) == ""
    assert dict(summary(empty))["Image size"] == ""


def test_header_never_prints_pixel_data_and_walks_sequences() -> None:
    rows = header_rows(_ct())
    pixel = [r for r in rows if r.keyword == "PixelData"]
    assert len(pixel) == 1 and pixel[0].value == "<binary, 524288 bytes>"
    assert all(len(r.value) <= 241 for r in rows)
    assert any(r.keyword == "TransferSyntaxUID" for r in rows)  # file meta listed
    nested = [r for r in rows if r.keyword == "CodeMeaning"]
    assert nested and nested[0].depth == 2


def test_header_search_by_keyword_tag_and_value() -> None:
    ds = _ct()
    assert [r.keyword for r in header_rows(ds, "kernel")] == ["ConvolutionKernel"]
    assert [r.keyword for r in header_rows(ds, "(0018,0050)")] == ["SliceThickness"]
    assert [r.keyword for r in header_rows(ds, "0018,0050")] == ["SliceThickness"]
    assert {r.keyword for r in header_rows(ds, "ingenuity")} == {"ManufacturerModelName"}
    assert header_rows(ds, "no such thing anywhere") == []
    table = header_table(header_rows(ds, "brain"))
    assert {"tag", "keyword", "VR", "value"} <= set(table[0])


def test_header_of_deferred_pixel_data_reads_nothing_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    _ct().save_as(path, enforce_file_format=True)
    ds = dcmread(path, defer_size=1024)
    path.unlink()  # any read of the deferred value would now fail
    rows = header_rows(ds)
    pixel = [r for r in rows if r.keyword == "PixelData"]
    assert len(pixel) == 1
    assert pixel[0].tag == "(7FE0,0010)" and pixel[0].value == "<binary, 524288 bytes>"
    assert dict(summary(ds))["Kernel"] == "UB"
