"""Real-world series variants through ``ichnode analyze`` (issue 14).

Each variant is a series written to disk with pydicom (and, for JPEG lossless,
compressed with DCMTK's ``dcmcjpeg``, as a scanner's or PACS's encoder would).
For each, the test states the expected outcome: analysed, with the HU values
and geometry checked in the volume :func:`inference.volume.load_volume` builds
from the files and the slice order checked in the ``--json`` document; or
skipped, with the reason in the document. All variants but the thin series go
through one ``ichnode analyze`` subprocess (the model loads once); every
object it writes is checked with dciodvfy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian, generate_uid

from inference.volume import (
    AIR_HU,
    SeriesSkipped,
    Volume,
    load_volume,
    read_series,
    source_frame,
)
from node.results import NOT_ANALYSED, report_notes
from tests.interop import REPO, require_tool
from tests.node.conftest import make_ct_series
from tests.node.test_analyze import _make_weights
from tests.node.test_analyze import write_series as save
from tests.procmem import run_measured

MATRIX = 64  # the test network's input size: small matrices keep every variant cheap
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


# ---------------------------------------------------------------------------
# series builders
# ---------------------------------------------------------------------------


def ct_series(
    n_slices: int, *, thickness: float = 5.0, spacing: float = 0.8, tilt: float = 0.0
) -> tuple[list[Dataset], np.ndarray]:
    """A signed 16-bit CT series (intercept -1024) and its HU, slice k at k * thickness.

    Every slice carries its own marker (a patch of -500 + 7k HU in a corner), so
    a wrong slice order shows in the HU.
    """
    datasets = make_ct_series(
        n_slices, MATRIX, spacing=spacing, thickness=thickness, tilt_degrees=tilt
    )
    hu = np.stack([_hu(ds) for ds in datasets])
    for k, ds in enumerate(datasets):
        hu[k, :3, :3] = -500.0 + 7.0 * k
        ds.PixelData = (hu[k] + 1024).astype(np.int16).tobytes()
    return datasets, hu


def _hu(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.pixel_array, dtype=np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


def set_unsigned_12bit(ds: Dataset, hu: np.ndarray) -> None:
    """Store ``hu`` as unsigned 12-bit values with intercept -1024 (as many scanners do)."""
    ds.PixelRepresentation = 0
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.RescaleIntercept = -1024
    ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()


def jpeg_lossless(paths: list[Path]) -> None:
    """Compress files in place with DCMTK's dcmcjpeg (lossless, process 14 SV1)."""
    tool = require_tool("dcmcjpeg", "dcmtk")
    for path in paths:
        out = path.with_suffix(".jpeg.dcm")
        done = subprocess.run(
            [tool, "+e1", str(path), str(out)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        out.replace(path)


def enhanced_ct(n_frames: int, *, order: list[int] | None = None) -> tuple[Dataset, np.ndarray]:
    """One Enhanced CT Image Storage instance of ``n_frames`` frames, and its HU.

    The geometry lives in the functional groups, as Enhanced CT requires:
    PixelMeasures and PlaneOrientation shared, PlanePosition and
    PixelValueTransformation per frame (odd frames have another intercept, with
    stored values to match). Frames are stored in ``order`` (frame f holds
    slice order[f]), so sorting by frame number would give a wrong volume.
    """
    singles, hu = ct_series(n_frames, thickness=2.5)
    return enhanced_ct_from(singles, hu, order=order), hu


def enhanced_ct_from(
    singles: list[Dataset], hu: np.ndarray, *, order: list[int] | None = None
) -> Dataset:
    """The single-frame CT slices ``singles`` (HU ``hu``, slice order) as one Enhanced
    CT Image Storage instance, frames stored in ``order`` (see :func:`enhanced_ct`)."""
    n_frames = len(singles)
    order = list(range(n_frames)) if order is None else order
    first = singles[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in (
        "SpecificCharacterSet",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "Modality",
        "Manufacturer",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "StudyDescription",
        "SeriesNumber",
    ):
        setattr(ds, keyword, first.data_element(keyword).value)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20260101", "101500"
    ds.AcquisitionDateTime = "20260101101500"
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"

    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames = []
    stored = []
    for f, k in enumerate(order):
        intercept = -1024.0 if f % 2 == 0 else -1000.0
        position = Dataset()
        position.ImagePositionPatient = singles[k].ImagePositionPatient
        transform = Dataset()
        transform.RescaleIntercept = intercept
        transform.RescaleSlope = 1
        transform.RescaleType = "HU"
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        content.DimensionIndexValues = [1, k + 1]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([position])
        item.PixelValueTransformationSequence = DicomSequence([transform])
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
        stored.append((hu[k] - intercept).astype(np.int16))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack(stored).tobytes()
    return ds


# ---------------------------------------------------------------------------
# the variants and what must come of them
# ---------------------------------------------------------------------------


@dataclass
class Variant:
    """A series on disk and its expected outcome.

    ``skipped`` None: analysed, with ``hu`` (z, y, x, sorted along the normal),
    ``spacing`` (dz, dy, dx) and ``sop_instance_uids`` in slice order (None:
    any one instance per position from ``candidates``). Otherwise a piece of
    the skip reason.
    """

    folder: Path
    series_instance_uid: str
    skipped: str | None = None
    hu: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    sop_instance_uids: list[str] | None = None
    candidates: list[set[str]] = field(default_factory=list)
    padded: np.ndarray | None = None  # voxels expected at AIR_HU


def _analysed(folder: Path, datasets: list[Dataset], hu: np.ndarray, **extra: Any) -> Variant:
    save(datasets, folder)
    first = datasets[0]
    dz = float(extra.pop("dz", float(first.SliceThickness)))
    spacing = float(first.PixelSpacing[0])
    return Variant(
        folder=folder,
        series_instance_uid=str(first.SeriesInstanceUID),
        hu=hu,
        spacing=(dz, spacing, spacing),
        sop_instance_uids=extra.pop("uids", [str(ds.SOPInstanceUID) for ds in datasets]),
        **extra,
    )


def _jpeg_variants(root: Path) -> dict[str, Variant]:
    variants = {}
    for name in ("jpeg-signed", "jpeg-unsigned"):
        datasets, hu = ct_series(24, thickness=0.625)
        if name == "jpeg-unsigned":
            for k, ds in enumerate(datasets):
                set_unsigned_12bit(ds, hu[k])
        variants[name] = _analysed(root / name, datasets, hu)
        jpeg_lossless(sorted((root / name).iterdir()))
    return variants


def build_variants(root: Path) -> dict[str, Variant]:
    variants: dict[str, Variant] = {}

    # JPEG lossless thin series, as scanners send them: signed 16-bit and unsigned 12-bit.
    if shutil.which("dcmcjpeg") is not None:  # else test_jpeg_lossless_... skips or fails
        variants.update(_jpeg_variants(root))

    # MONOCHROME1: the photometric interpretation is for display; HU are stored * slope + b.
    datasets, hu = ct_series(6)
    for ds in datasets:
        ds.PhotometricInterpretation = "MONOCHROME1"
    variants["monochrome1"] = _analysed(root / "monochrome1", datasets, hu)

    # 12-bit unsigned data with stray bits above BitsStored (overlay bits, as in the RSNA data).
    datasets, hu = ct_series(6)
    for k, ds in enumerate(datasets):
        set_unsigned_12bit(ds, hu[k])
        stored = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(MATRIX, MATRIX).copy()
        stored[10:40, 10:40] |= np.uint16(0xF000)  # inside the head: would read as +60000 HU
        stored[50:60, :] |= np.uint16(0x1000)
        ds.PixelData = stored.tobytes()
    variants["stray-high-bits"] = _analysed(root / "stray-high-bits", datasets, hu)

    # PixelPaddingValue written inside the field of view too: those voxels become air.
    datasets, hu = ct_series(6)
    padded = np.zeros(hu.shape, dtype=bool)
    padded[:, 30:34, 30:40] = True  # inside the brain
    padded[:, :, 0] = True  # and the first column
    padded[:, :3, :3] = False  # keep the slice markers
    for k, ds in enumerate(datasets):
        ds.PixelPaddingValue = -2000
        stored = (hu[k] + 1024).astype(np.int16)
        stored[padded[k]] = -2000
        ds.PixelData = stored.tobytes()
    expected = np.where(padded, np.float32(AIR_HU), hu)
    variants["padding-inside"] = _analysed(
        root / "padding-inside", datasets, expected, padded=padded
    )

    # Signed and unsigned storage mixed slice by slice (PixelRepresentation differs).
    datasets, hu = ct_series(6)
    for k, ds in enumerate(datasets):
        if k % 2:
            set_unsigned_12bit(ds, hu[k])
    variants["mixed-signed"] = _analysed(root / "mixed-signed", datasets, hu)

    # Pixel spacing written with different precision per slice: the same spacing.
    datasets, hu = ct_series(6, spacing=0.48828125)
    for ds in datasets[::2]:
        ds.PixelSpacing = ["0.488281", "0.488281"]
    variants["spacing-rounded"] = _analysed(root / "spacing-rounded", datasets, hu)

    # Really different pixel spacing within one series: no one geometry, skipped.
    datasets, hu = ct_series(6)
    for ds in datasets[3:]:
        ds.PixelSpacing = [0.6, 0.6]
    save(datasets, root / "spacing-mixed")
    variants["spacing-mixed"] = Variant(
        root / "spacing-mixed", str(datasets[0].SeriesInstanceUID), skipped="mixed pixel spacing"
    )

    # Missing ImagePositionPatient: the slice order and spacing are unknown, skipped.
    datasets, hu = ct_series(6)
    for ds in datasets[1:3]:
        del ds.ImagePositionPatient
    save(datasets, root / "no-position")
    variants["no-position"] = Variant(
        root / "no-position",
        str(datasets[0].SeriesInstanceUID),
        skipped="no ImagePositionPatient in 2 of 6 instances",
    )

    # A series resent with new SOP Instance UIDs: one instance per position is analysed.
    datasets, hu = ct_series(6)
    resent = []
    for ds in datasets:
        copy = pydicom.dcmread(save([ds], root / "tmp")[0])
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        resent.append(copy)
    shutil.rmtree(root / "tmp")
    variant = _analysed(root / "resent", [*datasets, *resent], hu, uids=None, dz=5.0)
    variant.candidates = [
        {str(a.SOPInstanceUID), str(b.SOPInstanceUID)}
        for a, b in zip(datasets, resent, strict=True)
    ]
    variants["resent"] = variant

    # A localizer inside the axial series: the axial stack is analysed, the localizer left out.
    datasets, hu = ct_series(6)
    scout = make_ct_series(1, 48)[0]
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    scout.StudyInstanceUID = datasets[0].StudyInstanceUID
    scout.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    scout.FrameOfReferenceUID = datasets[0].FrameOfReferenceUID
    variant = _analysed(root / "with-localizer", datasets, hu)
    save([scout], root / "with-localizer")
    variants["with-localizer"] = variant

    # A gantry-tilted and an untilted reconstruction in one series: the untilted
    # (most axial) stack is analysed, the tilted one left out.
    datasets, hu = ct_series(6)
    tilted, _ = ct_series(6, tilt=-15.0)
    for ds in tilted:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            setattr(ds, keyword, datasets[0].data_element(keyword).value)
    variant = _analysed(root / "tilt-and-untilted", datasets, hu)
    save(tilted, root / "tilt-and-untilted")
    variants["tilt-and-untilted"] = variant

    # Enhanced CT: one multi-frame instance, geometry and rescale in functional groups.
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    enhanced, hu = enhanced_ct(8, order=order)
    save([enhanced], root / "enhanced")
    variants["enhanced"] = Variant(
        root / "enhanced",
        str(enhanced.SeriesInstanceUID),
        hu=hu,
        spacing=(2.5, 0.8, 0.8),
        sop_instance_uids=[str(enhanced.SOPInstanceUID)] * 8,
    )
    return variants


# ---------------------------------------------------------------------------
# running ichnode analyze
# ---------------------------------------------------------------------------


def make_weights(path: Path, threshold: float) -> Path:
    """A small randomly initialised network in the real weights format (input 64,
    the variants' matrix): threshold 0 makes every class present."""
    assert MATRIX == 64  # the input size of the shared test network
    return _make_weights(path, threshold)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float


def run_analyze(*args: str, timeout: float = 600) -> Run:
    """``python -m node.cli analyze ARGS`` as a subprocess, with its own peak RSS
    (VmHWM polled while it runs, :mod:`tests.procmem`)."""
    with (
        open(os.devnull, "rb") as stdin,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        try:
            done = run_measured(
                [sys.executable, "-m", "node.cli", "analyze", *args],
                timeout=timeout,
                stdin=stdin,
                stdout=out,
                stderr=err,
                cwd=REPO,
            )
        except TimeoutError as exc:
            pytest.fail(str(exc))
        texts = []
        for file in (out, err):
            file.seek(0)
            texts.append(file.read().decode("utf-8", errors="replace"))
    return Run(done.returncode, texts[0], texts[1], done.seconds, done.peak_rss_mb)


def parse_document(stdout: str) -> dict[str, dict[str, Any]]:
    """The one JSON document on stdout, as entries by Series Instance UID."""
    document = json.loads(stdout)
    assert stdout.count("\n") == 1 and set(document) == {"series"}
    return {e["series_instance_uid"]: e for e in document["series"]}


@dataclass
class Analysed:
    variants: dict[str, Variant]
    entries: dict[str, dict[str, Any]]
    run: Run
    out_dir: Path


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Analysed:
    root = tmp_path_factory.mktemp("variants")
    variants = build_variants(root / "in")
    weights = make_weights(root / "all-present.pt", 0.0)  # every class present: SEG, SR, SC
    out_dir = root / "out"
    done = run_analyze(
        *(str(v.folder) for v in variants.values()),
        "--json",
        "--out",
        str(out_dir),
        "--device",
        "cpu",
        "--weights",
        str(weights),
    )
    assert "Traceback" not in done.stderr, done.stderr
    entries = parse_document(done.stdout)
    assert set(entries) == {v.series_instance_uid for v in variants.values()}, done.stderr
    return Analysed(variants, entries, done, out_dir)


def load(variant: Variant) -> Volume:
    groups, problems = read_series([variant.folder])
    assert problems == []
    assert list(groups) == [variant.series_instance_uid]
    return load_volume(groups[variant.series_instance_uid])


KINDS = {
    "SegmentationStorage": "SEG",
    "Comprehensive3DSRStorage": "SR",
    "SecondaryCaptureImageStorage": "SC",
}


def kinds_of(outputs: list[str]) -> list[str]:
    """SEG, SR or SC for each result file, from its SOP Class (not its name)."""
    found = []
    for output in outputs:
        sop_class = pydicom.dcmread(output, stop_before_pixels=True).SOPClassUID
        found.append(KINDS.get(sop_class.keyword, sop_class.keyword))
    return sorted(found)


def check_analysed(result: Analysed, name: str, missing: tuple[str, ...] = ()) -> Volume:
    """The variant's volume has the expected HU and geometry, and the CLI analysed it
    (with the result objects ``missing`` not built, each with a reason)."""
    variant = result.variants[name]
    assert variant.hu is not None and variant.spacing is not None
    volume = load(variant)
    assert volume.hu.shape == variant.hu.shape
    assert float(np.abs(volume.hu - variant.hu).max()) <= 1e-3
    if variant.padded is not None:
        assert np.array_equal(volume.hu == AIR_HU, variant.padded | (variant.hu == AIR_HU))
    assert volume.spacing == pytest.approx(variant.spacing, abs=1e-4)
    steps = np.diff(volume.slice_positions)
    assert np.allclose(steps, variant.spacing[0], atol=1e-3)
    if variant.sop_instance_uids is not None:
        assert volume.sop_instance_uids == variant.sop_instance_uids
    else:
        assert len(volume.sop_instance_uids) == len(variant.candidates)
        for uid, candidates in zip(volume.sop_instance_uids, variant.candidates, strict=True):
            assert uid in candidates

    entry = result.entries[variant.series_instance_uid]
    assert entry["skipped"] is None, entry["skipped"]
    assert [s["sop_instance_uid"] for s in entry["slices"]] == volume.sop_instance_uids
    assert entry["hemorrhage"]["present"] is True  # threshold 0: every class present
    kinds = kinds_of(entry["outputs"])
    assert "SR" in kinds and "SC" in kinds, kinds
    assert [m["object"] for m in entry["missing"]] == list(missing), entry["missing"]
    assert all(m["reason"] for m in entry["missing"])
    return volume


def check_skipped(result: Analysed, name: str) -> str:
    """The variant is listed as skipped, with its reason, in the document and on stderr."""
    variant = result.variants[name]
    assert variant.skipped is not None
    with pytest.raises(SeriesSkipped) as info:
        load(variant)
    assert variant.skipped in info.value.reason
    entry = result.entries[variant.series_instance_uid]
    assert entry["skipped"] == info.value.reason
    # Its answer is a "not analysed" SR saying why, as ichnode serve sends it.
    (output,) = entry["outputs"]
    report = pydicom.dcmread(output)
    assert report.SOPClassUID == Comprehensive3DSRStorage
    assert report.SeriesInstanceUID != variant.series_instance_uid
    (note,) = report_notes(report)
    assert note.startswith(NOT_ANALYSED) and info.value.reason in note
    assert f"{variant.series_instance_uid} skipped: {info.value.reason}" in result.run.stderr
    return info.value.reason


# ---------------------------------------------------------------------------
# one test per variant
# ---------------------------------------------------------------------------


def test_enhanced_ct_multiframe_is_analysed_from_its_functional_groups(
    analysed: Analysed,
) -> None:
    """Expected: analysed. One Enhanced CT instance of 8 frames stored out of order,
    positions from PlanePositionSequence and a different RescaleIntercept per frame
    (PixelValueTransformationSequence): the volume has 8 slices in position order
    with exact HU, dz 2.5 mm, pixel spacing 0.8 mm from PixelMeasuresSequence.
    SEG, SR and key images are all written, nothing missing; they reference the
    instance and the frame of each slice (ReferencedFrameNumber)."""
    volume = check_analysed(analysed, "enhanced")
    order = [3, 0, 6, 1, 7, 2, 5, 4]  # frame f holds slice order[f]
    frames = [source_frame(ds) for ds in volume.datasets]
    assert all(f is not None for f in frames)
    assert [f[1] for f in frames if f is not None] == [order.index(k) for k in range(8)]
    source_uid = volume.sop_instance_uids[0]
    entry = analysed.entries[analysed.variants["enhanced"].series_instance_uid]
    by_kind: dict[str, list[pydicom.Dataset]] = {}
    for output in entry["outputs"]:
        ds = pydicom.dcmread(output)
        by_kind.setdefault(KINDS.get(ds.SOPClassUID.keyword, ""), []).append(ds)
    (seg,) = by_kind["SEG"]
    # Each SEG frame is derived from one frame of the one Enhanced CT instance, and
    # sits at that frame's position.
    positions = {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): f[1] + 1
        for ds, f in zip(volume.datasets, frames, strict=True)
        if f is not None
    }
    assert int(seg.NumberOfFrames) >= 1
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == source_uid
        position = tuple(
            round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient
        )
        assert int(source.ReferencedFrameNumber) == positions[position]
    # The key images name the frame they show.
    for sc in by_kind["SC"]:
        reference = sc.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source_uid
        assert 1 <= int(reference.ReferencedFrameNumber) <= len(order)
    # The SR's segment references name frames of the instance too.
    (sr,) = by_kind["SR"]
    numbers = [
        int(n)
        for item in _walk(sr)
        if "ReferencedFrameNumber" in item and "ReferencedSOPInstanceUID" in item
        and item.ReferencedSOPInstanceUID == source_uid
        for n in (item.ReferencedFrameNumber if item["ReferencedFrameNumber"].VM > 1
                  else [item.ReferencedFrameNumber])
    ]
    assert numbers and set(numbers) <= set(range(1, len(order) + 1))


def _walk(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every item of every sequence in ``ds``, depth first."""
    found = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                found.append(item)
                found.extend(_walk(item))
    return found


@pytest.mark.interop
@pytest.mark.parametrize("name", ["jpeg-signed", "jpeg-unsigned"])
def test_jpeg_lossless_thin_series_is_analysed(analysed: Analysed, name: str) -> None:
    """Expected: analysed. 24 slices of 0.625 mm compressed by dcmcjpeg (JPEG
    lossless, process 14 SV1), signed 16-bit and unsigned 12-bit: exact HU after
    decoding, dz 0.625 mm."""
    require_tool("dcmcjpeg", "dcmtk")
    volume = check_analysed(analysed, name)
    for ds in volume.datasets:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"


def test_localizer_inside_the_axial_series_is_left_out(analysed: Analysed) -> None:
    """Expected: analysed. Six axial slices and a coronal localizer (48x48) share the
    Series Instance UID: the six axial slices are analysed, the localizer left out
    and the log says so."""
    check_analysed(analysed, "with-localizer")
    uid = analysed.variants["with-localizer"].series_instance_uid
    assert f"series {uid}: left out 1 localizer image" in analysed.run.stderr


def test_tilted_and_untilted_stacks_analyse_the_axial_one(analysed: Analysed) -> None:
    """Expected: analysed. An untilted and a -15 degree tilted reconstruction of six
    slices each share the Series Instance UID: the untilted stack (normal closest
    to the patient's z axis) is analysed, the tilted one left out, said in the log."""
    check_analysed(analysed, "tilt-and-untilted")
    uid = analysed.variants["tilt-and-untilted"].series_instance_uid
    assert f"series {uid}: 2 stacks with different orientations" in analysed.run.stderr


def test_resent_series_with_new_uids_is_deduplicated(analysed: Analysed) -> None:
    """Expected: analysed. The series was sent twice with new SOP Instance UIDs (12
    files, 6 positions, identical pixels): one instance per position is analysed
    and the log says how many duplicates were dropped."""
    check_analysed(analysed, "resent")
    uid = analysed.variants["resent"].series_instance_uid
    assert f"series {uid}: dropped 6 duplicate instances" in analysed.run.stderr


def test_missing_image_position_is_skipped(analysed: Analysed) -> None:
    """Expected: skipped, "no ImagePositionPatient in 2 of 6 instances": without
    positions neither slice order nor spacing is known."""
    check_skipped(analysed, "no-position")


def test_monochrome1_gives_the_same_hu(analysed: Analysed) -> None:
    """Expected: analysed with the HU of the stored values (MONOCHROME1 inverts the
    display only, not the rescale)."""
    check_analysed(analysed, "monochrome1")


def test_stray_bits_above_bits_stored_are_masked(analysed: Analysed) -> None:
    """Expected: analysed. Unsigned 12-bit data with bits 12-15 set in parts of
    the image (inside the head too): those bits are ignored, the HU are exact."""
    check_analysed(analysed, "stray-high-bits")


def test_padding_inside_the_field_of_view_becomes_air(analysed: Analysed) -> None:
    """Expected: analysed. PixelPaddingValue (-2000) inside the brain and along one
    edge: exactly those voxels are -1024 HU, every other voxel exact."""
    check_analysed(analysed, "padding-inside")


def test_mixed_signed_and_unsigned_slices(analysed: Analysed) -> None:
    """Expected: analysed. Odd slices unsigned 12-bit (intercept -1024), even slices
    signed 16-bit: each decoded with its own PixelRepresentation, HU exact."""
    check_analysed(analysed, "mixed-signed")


def test_pixel_spacing_written_with_different_precision(analysed: Analysed) -> None:
    """Expected: analysed. PixelSpacing 0.48828125 on some slices and 0.488281 on
    others is one spacing (within 1e-4 relative)."""
    check_analysed(analysed, "spacing-rounded")


def test_different_pixel_spacing_is_skipped(analysed: Analysed) -> None:
    """Expected: skipped, "mixed pixel spacing (0.6, 0.8 mm)": slices of different
    pixel spacing have no one voxel grid."""
    reason = check_skipped(analysed, "spacing-mixed")
    assert reason == "mixed pixel spacing (0.6, 0.8 mm)"


@pytest.mark.interop
def test_every_object_written_is_valid(
    analysed: Analysed, dciodvfy: Callable[[Path], list[str]]
) -> None:
    """Expected: every SEG/SR/SC written for the analysed variants passes dciodvfy,
    and the exit code is 1 only because of the series skipped on purpose."""
    outputs = [p for e in analysed.entries.values() for p in e["outputs"]]
    for entry in analysed.entries.values():
        if entry["skipped"] is None:  # SEG (unless listed missing), SR and key images each
            kinds = set(kinds_of(entry["outputs"]))
            expected = {"SEG", "SR", "SC"} - {m["object"] for m in entry["missing"]}
            assert kinds == expected, entry["series_instance_uid"]
    for output in outputs:
        assert dciodvfy(Path(output)) == [], output
    skipped = [e for e in analysed.entries.values() if e["skipped"] is not None]
    assert len(skipped) == sum(v.skipped is not None for v in analysed.variants.values())
    assert analysed.run.returncode == 1


# ---------------------------------------------------------------------------
# the thin series: memory and time bounded
# ---------------------------------------------------------------------------

THIN_SLICES = 320


def test_thin_series_of_320_slices_is_bounded(tmp_path: Path) -> None:
    """Expected: analysed. 320 slices of 0.625 mm (64x64, files shuffled): all
    slices in position order, dz 0.625 mm, exact HU; ``ichnode analyze`` (SEG, SR,
    key images) finishes within 90 s on 2 busy cores (about 7 s when idle) with a
    peak RSS under 1 GB (about 0.5 GB, most of it torch)."""
    datasets, hu = ct_series(THIN_SLICES, thickness=0.625)
    folder = tmp_path / "thin"
    save(datasets, folder)
    variant = Variant(
        folder,
        str(datasets[0].SeriesInstanceUID),
        hu=hu,
        spacing=(0.625, 0.8, 0.8),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
    )
    volume = load(variant)
    assert float(np.abs(volume.hu - hu).max()) <= 1e-3
    assert volume.sop_instance_uids == variant.sop_instance_uids
    assert np.allclose(np.diff(volume.slice_positions), 0.625, atol=1e-3)

    weights = make_weights(tmp_path / "all-present.pt", 0.0)
    done = run_analyze(
        str(folder),
        "--json",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--weights",
        str(weights),
    )
    assert done.returncode == 0, done.stderr
    entry = parse_document(done.stdout)[variant.series_instance_uid]
    assert entry["skipped"] is None
    assert [s["sop_instance_uid"] for s in entry["slices"]] == variant.sop_instance_uids
    assert done.seconds < 90, done.seconds
    assert done.peak_rss_mb < 1024, done.peak_rss_mb
    print(f"thin series: {done.seconds:.1f} s, peak RSS {done.peak_rss_mb:.0f} MB")
