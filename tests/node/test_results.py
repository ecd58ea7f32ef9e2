"""The SEG, SR and SC result objects: validity (dciodvfy, dcmdump), round trips through
highdicom's readers, sanitised headers, and recognising our own output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage

from inference.findings import SUBTYPES
from node import results
from tests.interop import REAL_5MM, REAL_TILT, require_real_data
from tests.node.conftest import (
    FIXED_NOW,
    hu_volume,
    make_ct_series,
    make_findings,
    read_real_series,
)

Checker = Callable[[Path], list[str]]


def _two_subtype_masks(n: int, matrix: int) -> dict[str, np.ndarray]:
    parenchymal = np.zeros((n, matrix, matrix), dtype=bool)
    parenchymal[1:3, 18:26, 20:30] = True  # largest on slices 1-2
    parenchymal[2, 26:30, 20:30] = True  # slice 2 is the largest
    subdural = np.zeros((n, matrix, matrix), dtype=bool)
    subdural[3:5, 10:50, 6:10] = True
    return {"intraparenchymal": parenchymal, "subdural": subdural}


def _by_class(paths: list[Path]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {"SEG": [], "SR": [], "SC": []}
    for path in paths:
        ds = pydicom.dcmread(path)
        key = {
            SegmentationStorage: "SEG",
            Comprehensive3DSRStorage: "SR",
            SecondaryCaptureImageStorage: "SC",
        }[ds.SOPClassUID]
        out[key].append(ds)
    return out


def _code_value(value: object) -> str:
    assert isinstance(value, hd.sr.CodedConcept), value
    return str(value.value)


def _unplaced_groups(
    report: hd.sr.MeasurementReport,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The measurement groups of the report's Qualitative Evaluations container.

    Findings without an image region (the series summary, a subtype found with
    an empty mask) sit there, outside Imaging Measurements, where OHIF looks only
    for findings it can draw.
    """
    groups = []
    for item in report[0].ContentSequence:
        if item.name != results.QUALITATIVE_EVALUATIONS:
            continue
        for child in item.ContentSequence:
            if child.ValueType == "CONTAINER" and child.name == codes.DCM.MeasurementGroup:
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations.from_sequence([child]))
    return groups


def _imaging_measurements(report: hd.sr.MeasurementReport) -> list[Dataset]:
    """The Imaging Measurements containers of a report (none or one)."""
    return [i for i in report[0].ContentSequence if i.name == codes.DCM.ImagingMeasurements]


def _assert_valid(paths: list[Path], dciodvfy: Checker, dcmdump: Callable[[Path], str]) -> None:
    for path in paths:
        errors = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        dcmdump(path)


@pytest.mark.interop
def test_positive_series_objects_are_valid_and_complete(
    tmp_path: Path, dciodvfy: Checker, dcmdump: Callable[[Path], str]
) -> None:
    datasets = make_ct_series(6, 64)
    findings = make_findings(datasets, _two_subtype_masks(6, 64))
    paths = results.write_results(
        findings, datasets, tmp_path / "out", hu=hu_volume(datasets), now=FIXED_NOW
    )
    assert sorted(p.name.split("-")[1] for p in paths) == ["SC", "SC", "SEG", "SR"]
    assert not list((tmp_path / "out").glob("*.part"))
    _assert_valid(paths, dciodvfy, dcmdump)

    objects = _by_class(paths)
    source = datasets[0]
    series_uids = set()
    series_numbers = set()
    for kind, description in (
        ("SEG", "ICH AI SEG"),
        ("SR", "ICH AI REPORT"),
        ("SC", "ICH AI KEY IMAGES"),
    ):
        for ds in objects[kind]:
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert ds.SeriesDescription == description
            assert ds.Manufacturer == "ichnode"
            assert ds.PatientID == source.PatientID
            assert str(ds.PatientName) == str(source.PatientName)
            assert ds.PatientBirthDate == source.PatientBirthDate
            assert ds.PatientSex == source.PatientSex
            assert ds.StudyDate == source.StudyDate
            assert ds.AccessionNumber == source.AccessionNumber
            assert ds.StudyID == source.StudyID
            assert ds.StudyDescription == source.StudyDescription
            assert ds.ContentDate == "20261126"
            assert ds.ContentTime == "143005"
            versions = list(ds.SoftwareVersions)
            assert versions[0].startswith("ichnode ")
            assert versions[1] == "ichnode-ich test-1"
            assert results.is_ichnode_output(ds)
            series_uids.add(ds.SeriesInstanceUID)
            series_numbers.add(int(ds.SeriesNumber))
    assert len(series_uids) == 3
    assert len(series_numbers) == 3
    seg = objects["SEG"][0]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ichnode-ich"
    assert "test-1" in algorithm.AlgorithmVersion
    assert findings.weights_sha256 in algorithm.AlgorithmParameters


@pytest.mark.interop
def test_negative_series_gives_only_a_report_stating_absence(
    tmp_path: Path, dciodvfy: Checker, dcmdump: Callable[[Path], str]
) -> None:
    datasets = make_ct_series(4, 48)
    findings = make_findings(datasets, {})
    paths = results.write_results(findings, datasets, tmp_path, now=FIXED_NOW)
    assert [p.name.split("-")[1] for p in paths] == ["SR"]
    _assert_valid(paths, dciodvfy, dcmdump)

    sr = hd.sr.srread(paths[0])
    report = cast(hd.sr.MeasurementReport, sr.content)
    assert report.get_volumetric_roi_measurement_groups() == []
    # nothing to draw: no Imaging Measurements container, the summary is a
    # qualitative evaluation of the report
    assert report.get_image_measurement_groups() == []
    assert _imaging_measurements(report) == []
    (summary,) = _unplaced_groups(report)
    evaluations = {
        q.name.value: _code_value(q.value) for q in summary.get_qualitative_evaluations()
    }
    assert evaluations[codes.SCT.IntracranialHemorrhage.value] == codes.SCT.Absent.value
    for name in SUBTYPES:
        assert evaluations[results.SUBTYPE_CODES[name].value] == codes.SCT.Absent.value
    (probability,) = summary.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.04)


def test_seg_round_trip_pixels_equal_masks(tmp_path: Path) -> None:
    datasets = make_ct_series(6, 64)
    masks = _two_subtype_masks(6, 64)
    findings = make_findings(datasets, masks)
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    seg_path = next(p for p in paths if "-SEG-" in p.name)
    seg = hd.seg.segread(seg_path)

    assert seg.SegmentationType == "BINARY"
    labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert labels == {1: "intraparenchymal hemorrhage", 2: "subdural hemorrhage"}
    for item in seg.SegmentSequence:
        name = item.SegmentLabel.removesuffix(" hemorrhage")
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (
            results.SUBTYPE_CODES[name].value,
            "SCT",
        )
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        # drawn in the subtype's colour of the key images and the UI (CIELab, 16-bit)
        colour = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue)
        assert colour.to_rgb() == pytest.approx(results.SUBTYPE_COLOURS[name], abs=1)
    # empty frames omitted: one frame per (slice, segment) with any voxel set
    expected_frames = sum(int(m.reshape(6, -1).any(axis=1).sum()) for m in masks.values())
    assert int(seg.NumberOfFrames) == expected_frames

    sop_instance_uids = [str(ds.SOPInstanceUID) for ds in datasets]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sop_instance_uids,
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (6, 64, 64, 2)
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks["intraparenchymal"])
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), masks["subdural"])
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(sop_instance_uids)


def test_sr_round_trip_groups_codes_volumes_and_references(tmp_path: Path) -> None:
    datasets = make_ct_series(6, 64)
    masks = _two_subtype_masks(6, 64)
    findings = make_findings(datasets, masks)
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    seg = hd.seg.segread(next(p for p in paths if "-SEG-" in p.name))
    sr = hd.sr.srread(next(p for p in paths if "-SR-" in p.name))
    report = cast(hd.sr.MeasurementReport, sr.content)

    (observer,) = report.get_observer_contexts()
    assert observer.observer_type == codes.DCM.Device
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    (summary,) = _unplaced_groups(report)
    assert report.get_image_measurement_groups() == []
    evaluations = {
        q.name.value: _code_value(q.value) for q in summary.get_qualitative_evaluations()
    }
    assert evaluations[codes.SCT.IntracranialHemorrhage.value] == codes.SCT.Present.value
    (probability,) = summary.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(findings.hemorrhage_probability)
    for name in SUBTYPES:
        expected = codes.SCT.Present if name in masks else codes.SCT.Absent
        assert evaluations[results.SUBTYPE_CODES[name].value] == expected.value

    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    seg_segments = {
        int(s.SegmentNumber): s.SegmentLabel.removesuffix(" hemorrhage")
        for s in seg.SegmentSequence
    }
    seg_tracking = {
        s.SegmentLabel.removesuffix(" hemorrhage"): s.TrackingUID for s in seg.SegmentSequence
    }
    sop_instance_uids = {str(ds.SOPInstanceUID) for ds in datasets}
    for group in groups:
        name = next(n for n, c in results.SUBTYPE_CODES.items() if c == group.finding_type)
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_sop_class_uid == SegmentationStorage
        (segment_number,) = reference.referenced_segment_numbers or []
        assert seg_segments[segment_number] == name
        assert group.tracking_uid == seg_tracking[name]
        sources = {
            item.referenced_sop_instance_uid for item in reference.source_images_for_segmentation
        }
        assert sources and sources <= sop_instance_uids
        mask_slices = {
            str(datasets[z].SOPInstanceUID) for z in np.flatnonzero(masks[name].any(axis=(1, 2)))
        }
        assert sources == mask_slices
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(findings.subtypes[name].volume_ml, rel=1e-6)
        assert (volume.unit.value, volume.unit.scheme_designator) == ("ml", "UCUM")
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(findings.subtypes[name].probability)
        assert group.finding_sites[0].value == codes.SCT.Brain


def test_present_subtype_with_empty_mask_is_reported_without_segment(tmp_path: Path) -> None:
    datasets = make_ct_series(3, 32)
    findings = make_findings(datasets, {}, present=["subarachnoid"])
    objects = results.encode_results(findings, datasets, now=FIXED_NOW)
    assert [ds.SOPClassUID for ds in objects] == [Comprehensive3DSRStorage]
    paths = results.write_datasets(objects, tmp_path)
    report = cast(hd.sr.MeasurementReport, hd.sr.srread(paths[0]).content)
    assert _imaging_measurements(report) == []
    groups = _unplaced_groups(report)
    assert len(groups) == 2
    assert groups[1].finding_type == results.SUBTYPE_CODES["subarachnoid"]
    (volume,) = groups[1].get_measurements(name=codes.SCT.Volume)
    assert volume.value == 0.0


@pytest.mark.interop
def test_key_images_show_largest_slice_with_overlay_and_disclaimer(
    tmp_path: Path, dciodvfy: Checker
) -> None:
    datasets = make_ct_series(5, 128)
    parenchymal = np.zeros((5, 128, 128), dtype=bool)
    parenchymal[1:4, 70:80, 40:60] = True
    parenchymal[2, 80:90, 40:60] = True  # slice 2 has the largest area
    findings = make_findings(datasets, {"intraparenchymal": parenchymal})
    assert findings.gradcam is not None
    findings.gradcam[:] = 0.0
    findings.gradcam[:, 60:100, 70:110] = 0.9  # beside the mask, below the banner
    hu = hu_volume(datasets)
    paths = results.write_results(findings, datasets, tmp_path, hu=hu)
    (key_image,) = _by_class(paths)["SC"]
    assert key_image.BurnedInAnnotation == "YES"
    assert key_image.PhotometricInterpretation == "RGB"
    assert key_image.SourceImageSequence[0].ReferencedSOPInstanceUID == (datasets[2].SOPInstanceUID)
    rgb = key_image.pixel_array
    assert rgb.shape == (128, 128, 3)
    # mask outline in the subtype's colour, exactly on the mask's border
    colour = np.array(results.drawing.SUBTYPE_COLOURS["intraparenchymal"])
    edge = (rgb == colour).all(axis=2)
    np.testing.assert_array_equal(edge, results.drawing.outline(parenchymal[2]))
    # the heat map tints the grey image where Grad-CAM is high and nowhere else
    plain = results.drawing.grey_to_rgb(results.drawing.window_to_uint8(hu[2], 40.0, 80.0))
    banner = np.zeros((128, 128), dtype=bool)
    banner[:60] = True
    hot = (findings.gradcam[2] > 0) & ~edge & ~banner
    assert hot.sum() > 100
    assert np.abs(rgb[hot].astype(int) - plain[hot]).max() > 30
    calm = ~hot & ~edge & ~banner
    np.testing.assert_array_equal(rgb[calm], plain[calm])
    # the disclaimer is burned into the top band: white text pixels on a dark band
    top = rgb[: results.drawing.banner_font_px(128) * 2]
    assert ((top.min(axis=2) > 200).sum()) > 20
    for path in paths:
        assert dciodvfy(path) == []


def test_key_images_without_hu_read_source_pixels(tmp_path: Path) -> None:
    datasets = make_ct_series(4, 32)
    mask = np.zeros((4, 32, 32), dtype=bool)
    mask[1, 10:14, 10:14] = True
    findings = make_findings(datasets, {"epidural": mask}, gradcam=False)
    with_hu = results.encode_results(findings, datasets, hu=hu_volume(datasets), now=FIXED_NOW)
    without = results.encode_results(findings, datasets, now=FIXED_NOW)
    np.testing.assert_array_equal(with_hu[-1].pixel_array, without[-1].pixel_array)

    headers_only = [pydicom.Dataset(ds) for ds in datasets]
    for ds in headers_only:
        del ds.PixelData
    # no pixels and no HU: the key image cannot be drawn; SEG and SR still come,
    # and the SR says what is missing and why
    built = results.build_results(findings, headers_only, now=FIXED_NOW)
    assert [ds.Modality for ds in built.objects] == ["SEG", "SR"]
    (missing,) = built.missing
    assert missing.kind == "epidural key image" and "pixel" in missing.reason
    assert results.report_notes(built.objects[1]) == [missing.sentence()]


@pytest.mark.interop
def test_bad_source_headers_are_sanitised(
    tmp_path: Path, dciodvfy: Checker, dcmdump: Callable[[Path], str]
) -> None:
    datasets = make_ct_series(4, 48, bad_headers=True)
    mask = np.zeros((4, 48, 48), dtype=bool)
    mask[1:3, 20:30, 20:30] = True
    findings = make_findings(datasets, {"intraventricular": mask})
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    _assert_valid(paths, dciodvfy, dcmdump)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.PatientSex == ""
        assert ds.PatientBirthDate == ""
        assert ds.StudyDate == ""
        assert ds.StudyTime == ""
        # cut to the 16 characters of SH, never dropped or left too long
        assert ds.AccessionNumber == "ACCESSION-NUMBER-FAR-TOO-LONG"[:16] == "ACCESSION-NUMBER"
        assert ds.StudyID == "STUDY-ID-THAT-IS-TOO-LONG"[:16] == "STUDY-ID-THAT-IS"
        assert len(str(ds.PatientName)) <= 64
        assert str(ds.PatientName).startswith("Doe^Jane")
        assert "PatientAge" not in ds
        assert ds.StudyInstanceUID == datasets[0].StudyInstanceUID


@pytest.mark.interop
@pytest.mark.parametrize("series", [REAL_5MM, REAL_TILT], ids=["5mm", "tilt"])
def test_real_series_objects_are_valid(
    series: Path, tmp_path: Path, dciodvfy: Checker, dcmdump: Callable[[Path], str]
) -> None:
    require_real_data()
    datasets = read_real_series(series)
    n, rows, columns = len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)
    mask = np.zeros((n, rows, columns), dtype=bool)
    mask[n // 2 - 1 : n // 2 + 2, 200:260, 220:280] = True
    findings = make_findings(datasets, {"subdural": mask})
    paths = results.write_results(findings, datasets, tmp_path, now=FIXED_NOW)
    assert sorted(p.name.split("-")[1] for p in paths) == ["SC", "SEG", "SR"]
    _assert_valid(paths, dciodvfy, dcmdump)
    seg = hd.seg.segread(next(p for p in paths if "-SEG-" in p.name))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
    assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID

    negative = make_findings(datasets, {})
    negative_paths = results.write_results(negative, datasets, tmp_path / "neg")
    assert [p.name.split("-")[1] for p in negative_paths] == ["SR"]
    _assert_valid(negative_paths, dciodvfy, dcmdump)


@pytest.mark.parametrize("n_slices", [1, 2])
def test_single_slice_and_two_slice_series(tmp_path: Path, n_slices: int) -> None:
    datasets = make_ct_series(n_slices, 32)
    mask = np.zeros((n_slices, 32, 32), dtype=bool)
    mask[-1, 8:16, 8:16] = True
    findings = make_findings(datasets, {"intraparenchymal": mask})
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    seg = hd.seg.segread(next(p for p in paths if "-SEG-" in p.name))
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)


def test_is_ichnode_output_recognises_only_our_objects(tmp_path: Path) -> None:
    datasets = make_ct_series(3, 32)
    mask = np.zeros((3, 32, 32), dtype=bool)
    mask[1, 4:8, 4:8] = True
    objects = results.encode_results(
        make_findings(datasets, {"subdural": mask}), datasets, hu=hu_volume(datasets)
    )
    assert all(results.is_ichnode_output(ds) for ds in objects)
    assert not any(results.is_ichnode_output(ds) for ds in datasets)

    # another vendor's SR that happens to carry our description is still ours to skip
    renamed = pydicom.Dataset(objects[1])
    renamed.Manufacturer = "PACS vendor"
    assert results.is_ichnode_output(renamed)
    # a third-party SEG with its own description is not ours
    foreign = pydicom.Dataset(objects[0])
    foreign.Manufacturer = "Other AI"
    foreign.SeriesDescription = "Brain segmentation"
    assert not results.is_ichnode_output(foreign)
    # a CT that someone labelled like ours is not ours either (wrong SOP class)
    ct = pydicom.Dataset(datasets[0])
    ct.SeriesDescription = "ICH AI SEG"
    assert not results.is_ichnode_output(ct)


def test_findings_that_do_not_match_the_series_are_refused() -> None:
    datasets = make_ct_series(3, 32)
    findings = make_findings(datasets, {})
    with pytest.raises(results.ResultsError, match="sop_instance_uids"):
        results.encode_results(findings, list(reversed(datasets)))
    findings.masks = np.zeros((5, 3, 16, 16), dtype=bool)
    with pytest.raises(results.ResultsError, match="shape"):
        results.encode_results(findings, datasets)
    other = make_ct_series(1, 32)
    mixed = [*datasets[:2], other[0]]
    mixed_findings = make_findings(mixed, {})
    with pytest.raises(results.ResultsError, match="more than one series"):
        results.encode_results(mixed_findings, mixed)


# ----------------------------------------------------------------------------
# image-region outlines (TID 1410), what OHIF draws
# ----------------------------------------------------------------------------


def _polygon_pixels(outline: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels whose centres lie inside the closed polygon ``outline`` (column, row)."""
    from matplotlib.path import Path as PolygonPath

    rows, columns = np.mgrid[: shape[0], : shape[1]]
    centres = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
    return np.asarray(PolygonPath(outline).contains_points(centres)).reshape(shape)


def _touches_mask(point: np.ndarray, section: np.ndarray) -> bool:
    """True when a mask pixel lies within 1 px of ``point`` (column, row)."""
    column, row = float(point[0]), float(point[1])
    r0, r1 = max(int(np.floor(row - 1)), 0), int(np.ceil(row + 1))
    c0, c1 = max(int(np.floor(column - 1)), 0), int(np.ceil(column + 1))
    return bool(section[r0:r1, c0:c1].any())


def test_region_outline_encloses_exactly_the_largest_region() -> None:
    section = np.zeros((24, 24), dtype=bool)
    section[3:10, 4:8] = True  # an L: a vertical bar ...
    section[8:10, 8:15] = True  # ... and a foot
    section[10, 15] = True  # touches the foot only at a corner: not 4-connected
    section[12:14, 2:4] = True  # separate, smaller
    section[18:23, 16:22] = True  # a ring: a block with a hole
    section[20, 18] = False
    region = results._largest_region(section)
    expected_l = np.zeros_like(section)
    expected_l[3:10, 4:8] = True
    expected_l[8:10, 8:15] = True
    np.testing.assert_array_equal(region, expected_l)

    outline = results.region_outline(region)
    assert outline.shape[1] == 2 and len(outline) >= 5
    np.testing.assert_array_equal(outline[0], outline[-1])  # closed
    np.testing.assert_array_equal(_polygon_pixels(outline, section.shape), region)
    x, y = outline[:, 0], outline[:, 1]
    shoelace = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
    assert shoelace == region.sum()
    assert len(outline) == 7  # corners only: the L has six, plus the closing point

    ring = np.zeros_like(section)
    ring[18:23, 16:22] = True
    ring[20, 18] = False
    ring_outline = results.region_outline(ring)
    assert _polygon_pixels(ring_outline, section.shape)[18:23, 16:22].all()  # hole inside
    single = np.zeros((5, 5), dtype=bool)
    single[2, 3] = True
    np.testing.assert_array_equal(
        results.region_outline(single), [[3, 2], [4, 2], [4, 3], [3, 3], [3, 2]]
    )
    with pytest.raises(results.ResultsError):
        results.region_outline(np.zeros((4, 4), dtype=bool))


def test_sr_outlines_each_finding_on_its_largest_slice(tmp_path: Path) -> None:
    datasets = make_ct_series(6, 64)
    masks = _two_subtype_masks(6, 64)
    masks["subdural"][4, 30:34, 14:17] = True  # a second, smaller piece beside the crescent
    findings = make_findings(datasets, masks)
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    sr = hd.sr.srread(next(p for p in paths if "-SR-" in p.name))
    report = cast(hd.sr.MeasurementReport, sr.content)

    volumetric = {g.finding_type.value: g for g in report.get_volumetric_roi_measurement_groups()}
    planar = report.get_planar_roi_measurement_groups()
    assert sorted(g.finding_type.value for g in planar) == sorted(
        results.SUBTYPE_CODES[name].value for name in masks
    )
    largest = {"intraparenchymal": 2, "subdural": 4}
    for group in planar:
        name = next(n for n, c in results.SUBTYPE_CODES.items() if c == group.finding_type)
        z = largest[name]
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == datasets[z].SOPInstanceUID
        assert reference.ReferencedSOPClassUID == datasets[z].SOPClassUID
        assert "ReferencedFrameNumber" not in reference  # single-frame CT
        outline = region.value
        np.testing.assert_array_equal(outline[0], outline[-1])  # closed
        section = masks[name][z]
        assert all(_touches_mask(point, section) for point in outline)
        inside = _polygon_pixels(outline, section.shape)
        assert inside.any() and (inside <= section).all()  # on the bleed, nowhere else
        # the same finding as the volumetric group: OHIF merges them by tracking UID
        assert group.tracking_uid == volumetric[group.finding_type.value].tracking_uid
        (area,) = group.get_measurements(name=codes.SCT.Area)
        assert (area.unit.value, area.unit.scheme_designator) == ("mm2", "UCUM")
        assert area.value == pytest.approx(inside.sum() * 0.8 * 0.8)
    # every finding in Imaging Measurements has an outline: OHIF draws them all
    planar_uids = {g.tracking_uid for g in planar}
    placed = report.get_image_measurement_groups() + list(volumetric.values())
    assert {g.tracking_uid for g in placed} <= planar_uids
    (container,) = _imaging_measurements(report)
    assert len(container.ContentSequence) == 4  # two volumetric, two planar
    subdural = next(g for g in planar if g.finding_type == results.SUBTYPE_CODES["subdural"])
    # the crescent (40 x 4 px), not the smaller piece beside it
    assert _polygon_pixels(subdural.roi.value, (64, 64)).sum() == 160


@pytest.mark.interop
def test_sr_with_outlines_is_valid(tmp_path: Path, dciodvfy: Checker) -> None:
    datasets = make_ct_series(6, 64)
    findings = make_findings(datasets, _two_subtype_masks(6, 64))
    paths = results.write_results(findings, datasets, tmp_path, hu=hu_volume(datasets))
    sr_path = next(p for p in paths if "-SR-" in p.name)
    report = cast(hd.sr.MeasurementReport, hd.sr.srread(sr_path).content)
    assert len(report.get_planar_roi_measurement_groups()) == 2
    assert dciodvfy(sr_path) == []


def test_sr_outline_of_enhanced_ct_names_the_frame(tmp_path: Path) -> None:
    from inference.volume import load_volume
    from tests.node.test_variants import enhanced_ct

    order = [3, 0, 6, 1, 7, 2, 5, 4]  # frame f holds slice order[f]
    enhanced, _ = enhanced_ct(8, order=order)
    volume = load_volume([enhanced])
    n, rows, columns = volume.hu.shape
    mask = np.zeros((n, rows, columns), dtype=bool)
    mask[2:5, 10:20, 10:20] = True
    mask[5, 10:30, 10:30] = True  # slice 5 (frame order.index(5) + 1) is the largest
    findings = make_findings(volume.datasets, {"epidural": mask})
    built = results.build_results(findings, volume.datasets, hu=volume.hu, now=FIXED_NOW)
    sr = next(ds for ds in built.objects if ds.SOPClassUID == Comprehensive3DSRStorage)
    paths = results.write_datasets([sr], tmp_path)
    report = cast(hd.sr.MeasurementReport, hd.sr.srread(paths[0]).content)
    (group,) = report.get_planar_roi_measurement_groups()
    reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
    assert int(reference.ReferencedFrameNumber) == order.index(5) + 1
    assert _polygon_pixels(group.roi.value, (rows, columns)).sum() == 400


def test_readers_find_the_summary_outside_imaging_measurements(tmp_path: Path) -> None:
    """The UI and the notifications read the series answer wherever the group sits."""
    from node.notify import read_notice
    from ui.stored import finding_from_sr

    datasets = make_ct_series(6, 64)
    for masks in (_two_subtype_masks(6, 64), {}):
        findings = make_findings(datasets, masks)
        objects = results.encode_results(findings, datasets, hu=hu_volume(datasets))
        (sr,) = [ds for ds in objects if ds.SOPClassUID == Comprehensive3DSRStorage]
        (path,) = results.write_datasets([sr], tmp_path / str(len(masks)))
        stored = finding_from_sr(pydicom.dcmread(path))
        assert stored.hemorrhage is bool(masks)
        assert stored.probability == pytest.approx(findings.hemorrhage_probability)
        notice = read_notice(path, str(datasets[0].SeriesInstanceUID))
        assert notice.hemorrhage is bool(masks)
        assert notice.probability == pytest.approx(findings.hemorrhage_probability)
        for name in SUBTYPES:
            assert stored.subtypes[name][0] is (name in masks)
            assert notice.subtypes[name]["present"] is (name in masks)


def test_one_reader_gives_findings_volumes_and_the_not_analysed_statement(
    tmp_path: Path,
) -> None:
    """node.results.read_report reads back what build_results and
    build_not_analysed_report wrote; the notifications' statement prefix is the
    writer's."""
    from node import notify

    datasets = make_ct_series(6, 64)
    masks = _two_subtype_masks(6, 64)
    findings = make_findings(datasets, masks)
    objects = results.encode_results(findings, datasets, hu=hu_volume(datasets))
    (sr,) = [ds for ds in objects if ds.SOPClassUID == Comprehensive3DSRStorage]
    reading = results.read_report(sr)
    assert reading.presence["any"] is True and reading.not_analysed is None
    for name in SUBTYPES:
        assert reading.presence[name] is (name in masks)
        if name in masks:
            assert reading.volume_ml[name] == pytest.approx(findings.subtypes[name].volume_ml)
            assert reading.probability[name] == pytest.approx(
                findings.subtypes[name].probability
            )
    nothing = results.build_not_analysed_report(datasets, "no PixelSpacing", findings)
    reading = results.read_report(nothing)
    assert reading.presence == {} and reading.not_analysed is not None
    assert reading.not_analysed.startswith(results.NOT_ANALYSED)
    assert "no PixelSpacing" in reading.not_analysed
    assert notify.NOT_ANALYSED == results.NOT_ANALYSED
    with pytest.raises(ValueError, match="not a structured report"):
        results.read_report(datasets[0])
