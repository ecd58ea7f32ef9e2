"""Fixtures for the node tests: small real CT series written with pydicom, hand-made
findings over them, and the dicom3tools / DCMTK checks every result object must pass."""

from __future__ import annotations

import datetime
import subprocess
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.findings import CLASSES, SUBTYPES, SeriesFindings, SliceResult, SubtypeFinding
from tests.interop import require_tool

FIXED_NOW = datetime.datetime(2026, 11, 26, 14, 30, 5)


def make_ct_series(
    n_slices: int = 6,
    matrix: int = 64,
    *,
    spacing: float = 0.8,
    thickness: float = 5.0,
    tilt_degrees: float = 0.0,
    bad_headers: bool = False,
    modality: str = "CT",
) -> list[Dataset]:
    """A synthetic head-like CT series (skull ring, brain, a bright blob), in slice order.

    ``bad_headers`` fills the patient/study attributes with values that break
    their VR (the kind of header errors real scanners produce).
    """
    study_instance_uid = generate_uid()
    series_instance_uid = generate_uid()
    frame_of_reference_uid = generate_uid()
    yy, xx = np.mgrid[:matrix, :matrix]
    radius = np.hypot(yy - matrix / 2, xx - matrix / 2)
    tilt = np.deg2rad(tilt_degrees)
    column_cosines = [0.0, float(np.cos(tilt)), float(np.sin(tilt))]
    datasets = []
    for index in range(n_slices):
        hu = np.full((matrix, matrix), -1000.0)
        hu[radius < matrix * 0.45] = 1200.0
        hu[radius < matrix * 0.40] = 35.0
        hu[(yy - 20) ** 2 + (xx - 24) ** 2 < 25] = 70.0
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyInstanceUID = study_instance_uid
        ds.SeriesInstanceUID = series_instance_uid
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = modality
        ds.Manufacturer = "TestScanner"
        ds.PatientName = "Doe^Jane"
        ds.PatientID = "ICH-TEST-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "F"
        ds.StudyDate = "20260101"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC123"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "42"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesNumber = 3
        ds.InstanceNumber = index + 1
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PatientOrientation = ""
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *column_cosines]
        normal = np.cross([1.0, 0.0, 0.0], column_cosines)
        position = np.array([-matrix * spacing / 2, -matrix * spacing / 2, 0.0]) + normal * (
            index * thickness
        )
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceThickness = thickness
        ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = matrix
        ds.Columns = matrix
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        if bad_headers:
            _set_bad_headers(ds)
        datasets.append(ds)
    return datasets


def _set_bad_headers(ds: Dataset) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns about each one
        ds.PatientName = "Doe^Jane^Middle^Dr^Jr^Extra^" + "X" * 80
        ds.PatientSex = "FEMALE"
        ds.PatientBirthDate = "1970-13-45"
        ds.StudyDate = "26.01.2026"
        ds.StudyTime = "25:61"
        ds.AccessionNumber = "ACCESSION-NUMBER-FAR-TOO-LONG"
        ds.StudyID = "STUDY-ID-THAT-IS-TOO-LONG"
        ds.StudyDescription = "D" * 90
        ds.PatientAge = "forty"


def hu_volume(datasets: Sequence[Dataset]) -> np.ndarray:
    """The (z, y, x) HU volume of datasets written by :func:`make_ct_series`."""
    return np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in datasets
        ]
    )


def make_findings(
    datasets: Sequence[Dataset],
    masks: dict[str, np.ndarray] | None = None,
    *,
    present: Sequence[str] | None = None,
    gradcam: bool = True,
) -> SeriesFindings:
    """Findings over ``datasets``: ``masks`` per subtype (z, y, x); present = masks given."""
    masks = masks or {}
    present = list(masks) if present is None else list(present)
    n = len(datasets)
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    stacked = np.zeros((len(SUBTYPES), n, rows, columns), dtype=bool)
    for name, mask in masks.items():
        stacked[SUBTYPES.index(name)] = mask
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    voxel_ml = spacing[0] * spacing[1] * float(datasets[0].SliceThickness) / 1000.0
    subtypes = {
        name: SubtypeFinding(
            present=name in present,
            probability=0.91 if name in present else 0.03,
            volume_ml=float(stacked[i].sum()) * voxel_ml,
        )
        for i, name in enumerate(SUBTYPES)
    }
    any_present = bool(present)
    cam = None
    if gradcam:
        cam = np.zeros((n, rows, columns), dtype=np.float32)
        cam[:, rows // 4 : rows // 2, columns // 4 : columns // 2] = 0.9
    return SeriesFindings(
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        hemorrhage_present=any_present,
        hemorrhage_probability=0.95 if any_present else 0.04,
        subtypes=subtypes,
        slices=[
            SliceResult(str(ds.SOPInstanceUID), dict.fromkeys(CLASSES, 0.1)) for ds in datasets
        ],
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        masks=stacked,
        gradcam=cam,
        model_name="ichnode-ich",
        model_version="test-1",
        weights_sha256="0123456789abcdef" * 4,
        thresholds={"any": 0.5},
    )


def read_real_series(folder: Path) -> list[Dataset]:
    """All files of a real series, sorted along the slice normal."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir()) if path.is_file()]
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(
        datasets, key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
    )


@pytest.fixture
def dciodvfy() -> Callable[[Path], list[str]]:
    """Run dicom3tools' dciodvfy on a file; return its Error lines (empty when valid)."""
    tool = require_tool("dciodvfy", "dicom3tools")

    def check(path: Path) -> list[str]:
        result = subprocess.run(
            [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
        lines = (result.stdout + result.stderr).splitlines()
        return [line for line in lines if "Error" in line]

    return check


@pytest.fixture
def dcmdump() -> Callable[[Path], str]:
    """Run DCMTK's dcmdump on a file; fail the test when it cannot read it."""
    tool = require_tool("dcmdump", "dcmtk")

    def dump(path: Path) -> str:
        result = subprocess.run(
            [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, f"dcmdump failed on {path}: {result.stderr}"
        assert "E:" not in result.stderr, result.stderr
        return result.stdout

    return dump
