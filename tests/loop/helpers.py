"""Builders shared by the processing-loop tests: small real DICOM files and a real index."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from storage.index import Index, InstanceMeta


def ct_dataset(
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str | None = None,
    *,
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_description: str = "HEAD 5MM",
    instance_number: int = 1,
    sop_class_uid: str = CTImageStorage,
    manufacturer: str = "ACME",
) -> Dataset:
    """A small but complete image dataset (8x8 pixels) with file meta."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = sop_class_uid
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.PatientID = "LOOP1"
    ds.PatientName = "Loop^Test"
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.ImageType = list(image_type)
    ds.SeriesDescription = series_description
    ds.StudyDescription = "CT HEAD"
    ds.InstanceNumber = instance_number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = (np.full((8, 8), instance_number, dtype=np.int16)).tobytes()
    return ds


def sc_dataset(study_instance_uid: str) -> Dataset:
    """A secondary capture object, like one of the results the sender delivers."""
    return ct_dataset(
        study_instance_uid,
        generate_uid(),
        modality="OT",
        sop_class_uid=SecondaryCaptureImageStorage,
        series_description="LOOP SC",
    )


def new_index(tmp_path: Path) -> Index:
    """A real SQLite index at the newest schema."""
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}", sqlite_synchronous="NORMAL")
    index.upgrade()
    return index


def store(
    index: Index,
    folder: Path,
    ds: Dataset,
    *,
    association_id: int | None,
    received_at: dt.datetime,
    calling_ae: str = "SCANNER",
) -> Path:
    """Write ``ds`` into ``folder`` and index it like the SCP does."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    meta = InstanceMeta.from_dataset(ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
    index.record_instance(
        meta,
        path=path,
        size=path.stat().st_size,
        calling_ae=calling_ae,
        association_id=association_id,
        received_at=received_at,
    )
    return path
