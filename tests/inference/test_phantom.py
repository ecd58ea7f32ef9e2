"""Tests of the synthetic head phantom: determinism, HU per tissue and label, bleed shapes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.findings import SUBTYPES
from inference.phantom import (
    BONE,
    CALCIFICATION,
    CSF,
    FALX,
    GREY,
    OEDEMA,
    VENTRICLE,
    VESSEL,
    WHITE,
    PhantomCase,
    generate_case,
    write_series,
)
from tests.interop import require_tool

# 32 slices of 5 mm cover the whole head, so the anatomy of a seed does not depend
# on the subtypes asked for, and a negative twin shows what the bleed replaced.
WHOLE_HEAD = {"n_slices": 32, "slice_thickness": 5.0}


def _label(case: PhantomCase, name: str) -> np.ndarray:
    return case.labels[SUBTYPES.index(name)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """In-plane 4-neighbour dilation of a (z, y, x) mask."""
    out = mask.copy()
    out[:, 1:, :] |= mask[:, :-1, :]
    out[:, :-1, :] |= mask[:, 1:, :]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _distance_to(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane city-block distance (voxels) to ``mask``, capped at ``steps``."""
    dist = np.full(mask.shape, steps, dtype=np.int32)
    grown = mask.copy()
    for step in range(steps):
        dist[grown & (dist == steps)] = step
        grown = _dilate(grown)
    return dist


def test_same_seed_same_case_and_other_seed_differs() -> None:
    a = generate_case(7, matrix=96, n_slices=12)
    b = generate_case(7, matrix=96, n_slices=12)
    c = generate_case(8, matrix=96, n_slices=12)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.labels, b.labels)
    assert a.subtypes == b.subtypes and a.spacing == b.spacing
    assert not np.array_equal(a.hu, c.hu)


def test_shapes_dtypes_and_spacing() -> None:
    case = generate_case(3, matrix=128, n_slices=20, slice_thickness=2.5)
    assert case.hu.shape == (20, 128, 128) and case.hu.dtype == np.float32
    assert case.labels.shape == (5, 20, 128, 128) and case.labels.dtype == bool
    assert case.tissue is not None and case.tissue.shape == case.hu.shape
    dz, dy, dx = case.spacing
    assert dz == 2.5 and dy == dx
    assert 220.0 / 128 <= dx <= 250.0 / 128
    assert case.slice_positions is not None
    assert np.allclose(np.diff(case.slice_positions), 2.5)


def test_explicit_subtypes_label_exactly_those() -> None:
    case = generate_case(11, matrix=128, subtypes=["subdural", "epidural"], **WHOLE_HEAD)
    assert case.subtypes == ("subdural", "epidural")
    present = case.labels.reshape(5, -1).any(axis=1)
    assert present.tolist() == [False, False, False, True, True]
    assert case.labels.sum(axis=0).max() == 1  # one subtype per voxel
    assert case.volumes_ml["subdural"] > 0 and case.volumes_ml["epidural"] > 0


def test_unknown_subtype_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown subtype"):
        generate_case(1, subtypes=["chronic"])


def test_random_subtypes_about_half_negative() -> None:
    counts = []
    for seed in range(60):
        case = generate_case(seed, matrix=48, n_slices=8, slice_thickness=5.0)
        counts.append(len(case.subtypes))
        listed = {SUBTYPES[i] for i in np.flatnonzero(case.labels.reshape(5, -1).any(axis=1))}
        assert listed == set(case.subtypes)
    negatives = counts.count(0)
    assert 18 <= negatives <= 42
    assert max(counts) <= 3 and {1, 2}.issubset(set(counts))


def test_lesion_sizes_spread_from_small_to_large() -> None:
    volumes = []
    for seed in range(40):
        name = SUBTYPES[seed % 5]
        case = generate_case(seed, matrix=128, subtypes=[name], noise_sd=0, **WHOLE_HEAD)
        volumes.append(case.volumes_ml[name])
    volumes_arr = np.array(volumes)
    assert volumes_arr.min() < 1.0
    assert volumes_arr.max() > 30.0
    assert np.mean(volumes_arr >= 1.0) > 0.7


@pytest.mark.parametrize("name", SUBTYPES)
def test_blood_hu_range(name: str) -> None:
    case = generate_case(21, matrix=192, subtypes=[name], noise_sd=0, **WHOLE_HEAD)
    assert case.tissue is not None
    # Away from the skull: partial volume with bone is meant to brighten the rim.
    away = _distance_to(case.tissue == BONE, 3) >= 3
    core = _erode(_label(case, name)) & away
    values = case.hu[core] if core.sum() > 20 else case.hu[_label(case, name) & away]
    assert 50.0 <= float(np.median(values)) <= 90.0
    assert np.mean((values >= 45.0) & (values <= 95.0)) > 0.9


def test_tissue_hu_ranges() -> None:
    case = generate_case(5, matrix=192, subtypes=[], noise_sd=0, **WHOLE_HEAD)
    assert case.tissue is not None
    core = {code: _erode(case.tissue == code) for code in (GREY, WHITE, CSF, VENTRICLE, BONE)}
    assert 33.0 <= float(np.median(case.hu[core[GREY]])) <= 46.0
    assert 21.0 <= float(np.median(case.hu[core[WHITE]])) <= 31.0
    assert 0.0 <= float(np.median(case.hu[core[VENTRICLE]])) <= 15.0
    bone = case.hu[core[BONE]]
    assert float(np.median(bone)) >= 700.0 and float(bone.max()) <= 2000.0
    assert float(np.percentile(case.hu[case.tissue == 0], 50)) == pytest.approx(-1000.0)


def test_noise_level_matches_request() -> None:
    clean = generate_case(9, matrix=128, noise_sd=0, **WHOLE_HEAD)
    noisy = generate_case(9, matrix=128, noise_sd=8.0, **WHOLE_HEAD)
    assert noisy.noise_sd == 8.0
    assert float(np.std(noisy.hu - clean.hu)) == pytest.approx(8.0, rel=0.1)


def test_negative_case_has_no_label_but_bright_confounders() -> None:
    for seed in (1, 2, 3):
        case = generate_case(seed, matrix=128, subtypes=(), noise_sd=0, **WHOLE_HEAD)
        assert case.subtypes == () and not case.labels.any() and case.volumes_ml == {}
        assert case.tissue is not None
        mimics = np.isin(case.tissue, (FALX, VESSEL, CALCIFICATION))
        assert int((mimics & (case.hu >= 50.0)).sum()) > 20
        sinus = _erode(case.tissue == VESSEL)
        assert 55.0 <= float(np.median(case.hu[sinus])) <= 75.0


def test_epidural_is_lentiform_against_the_inner_table() -> None:
    for seed in (2, 3, 4):
        case = generate_case(seed, matrix=192, subtypes=["epidural"], noise_sd=0, **WHOLE_HEAD)
        assert case.tissue is not None
        edh = _label(case, "epidural")
        dist = _distance_to(case.tissue == BONE, 40)
        assert (dist[edh] == 1).any(), "epidural must touch the inner table"
        k = int(np.argmax(edh.sum(axis=(1, 2))))
        depth = dist[k][edh[k]]
        contact = int((depth == 1).sum())
        # Biconvex: thick in the middle compared with the length of its base.
        assert depth.max() >= 3
        assert contact / depth.max() < 8.0


def test_subdural_is_a_crescent_on_one_side() -> None:
    for seed in (2, 3, 4):
        case = generate_case(seed, matrix=192, subtypes=["subdural"], noise_sd=0, **WHOLE_HEAD)
        twin = generate_case(seed, matrix=192, subtypes=[], noise_sd=0, **WHOLE_HEAD)
        assert case.tissue is not None and twin.tissue is not None
        sdh = _label(case, "subdural")
        dist = _distance_to(case.tissue == BONE, 40)
        assert (dist[sdh] == 1).any(), "subdural must lie along the inner table"
        k = int(np.argmax(sdh.sum(axis=(1, 2))))
        depth = dist[k][sdh[k]]
        assert int((depth == 1).sum()) / depth.max() >= 3.0  # long and thin
        # Never across the midline: all on one side of the falx in every row.
        falx = twin.tissue == FALX
        for z, y in zip(*np.nonzero(sdh.any(axis=2) & falx.any(axis=2)), strict=True):
            cols = np.flatnonzero(sdh[z, y])
            mid = float(np.flatnonzero(falx[z, y]).mean())
            assert np.all(cols > mid) or np.all(cols < mid)


def test_intraparenchymal_inside_brain_with_oedema_rim() -> None:
    for seed in (2, 3, 4):
        case = generate_case(
            seed, matrix=192, subtypes=["intraparenchymal"], noise_sd=0, **WHOLE_HEAD
        )
        assert case.tissue is not None
        iph = _label(case, "intraparenchymal")
        assert not (_dilate(iph) & (case.tissue == BONE)).any()
        ring = _dilate(iph) & ~iph
        assert np.mean(case.tissue[ring] == OEDEMA) > 0.4
        oedema = case.hu[case.tissue == OEDEMA]
        assert float(np.median(oedema)) < 21.0


def test_intraventricular_inside_ventricles_and_dependent() -> None:
    lower = 0
    for seed in range(2, 8):
        case = generate_case(
            seed, matrix=128, subtypes=["intraventricular"], noise_sd=0, **WHOLE_HEAD
        )
        twin = generate_case(seed, matrix=128, subtypes=[], noise_sd=0, **WHOLE_HEAD)
        assert twin.tissue is not None
        ivh = _label(case, "intraventricular")
        ventricles = twin.tissue == VENTRICLE
        assert ivh.any() and not (ivh & ~ventricles).any()
        rows = np.nonzero(ivh)[1].mean()
        lower += int(rows > np.nonzero(ventricles)[1].mean())
    assert lower >= 4  # most layer in the posterior (dependent) horns


def test_subarachnoid_replaces_sulcal_and_cisternal_csf() -> None:
    for seed in (2, 3, 4):
        case = generate_case(seed, matrix=128, subtypes=["subarachnoid"], noise_sd=0, **WHOLE_HEAD)
        twin = generate_case(seed, matrix=128, subtypes=[], noise_sd=0, **WHOLE_HEAD)
        assert twin.tissue is not None
        sah = _label(case, "subarachnoid")
        assert sah.any() and np.all(twin.tissue[sah] == CSF)


def test_subarachnoid_leaves_the_csf_layer_under_the_inner_table() -> None:
    # Blood in the sub-millimetre layer against the bone blurs into the inner table:
    # no labelled voxel may touch bone (seeds 2 and 7 had such voxels before).
    for seed in range(2, 8):
        case = generate_case(seed, matrix=192, subtypes=["subarachnoid"], noise_sd=0, **WHOLE_HEAD)
        assert case.tissue is not None
        sah = _label(case, "subarachnoid")
        assert sah.any()
        assert not (sah & _dilate(case.tissue == BONE)).any()


def test_thin_slab_still_holds_each_asked_subtype() -> None:
    for seed in range(5):
        for name in SUBTYPES:
            case = generate_case(seed, matrix=64, n_slices=4, slice_thickness=1.0, subtypes=[name])
            assert _label(case, name).any(), (seed, name)


@pytest.mark.interop
@pytest.mark.parametrize("transfer_syntax", ["explicit", "implicit", "rle", "jpegls", "jpeg2000"])
@pytest.mark.parametrize("signed", [True, False])
def test_written_series_passes_dciodvfy(transfer_syntax: str, signed: bool, tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy", "dicom3tools")
    case = generate_case(4, matrix=64, n_slices=2, slice_thickness=2.5)
    paths = write_series(
        case,
        tmp_path,
        transfer_syntax=transfer_syntax,
        signed=signed,
        padding_value=-2000 if signed else 0,
        gantry_tilt=-12.0,
        patient_name="Phantom^Dciodvfy",
    )
    for path in paths:
        out = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        report = out.stdout + out.stderr
        assert "CTImage" in report
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], report
    ds = pydicom.dcmread(paths[0])
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.PixelRepresentation == (1 if signed else 0)
    assert float(ds.RescaleIntercept) == (0.0 if signed else -1024.0)
    assert float(ds.GantryDetectorTilt) == -12.0 and ds.RescaleType == "HU"


@pytest.mark.interop
def test_deflated_series_reads_in_dcmtk(tmp_path: Path) -> None:
    dcmdump = require_tool("dcmdump", "dcmtk")
    case = generate_case(4, matrix=32, n_slices=1, slice_thickness=2.5)
    (path,) = write_series(case, tmp_path, transfer_syntax="deflated")
    out = subprocess.run([dcmdump, str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "Deflated" in out.stdout and "PixelData" in out.stdout


def test_write_series_options_are_checked(tmp_path: Path) -> None:
    case = generate_case(4, matrix=32, n_slices=2, slice_thickness=2.5)
    with pytest.raises(TypeError, match="unknown write_series option"):
        write_series(case, tmp_path, colour="red")
    with pytest.raises(ValueError, match="padding_value"):
        write_series(case, tmp_path, signed=False, padding_value=-2000)
    with pytest.raises(ValueError, match="transfer syntax"):
        write_series(case, tmp_path, transfer_syntax="jpeg-xl-please")
    with pytest.raises(ValueError, match="slice_positions"):
        write_series(case, tmp_path, slice_positions=[0.0])


def test_write_series_is_deterministic_and_names_files(tmp_path: Path) -> None:
    case = generate_case(4, matrix=32, n_slices=3, slice_thickness=2.5)
    first = write_series(case, tmp_path / "a", suffix="")
    second = write_series(case, tmp_path / "b", suffix="")
    assert [p.name for p in first] == ["CT0001", "CT0002", "CT0003"]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in first]
    assert uids == [pydicom.dcmread(p).SOPInstanceUID for p in second]
    other = write_series(case, tmp_path / "c", signed=False)
    assert (
        pydicom.dcmread(other[0]).SeriesInstanceUID != pydicom.dcmread(first[0]).SeriesInstanceUID
    )
    named = write_series(
        case,
        tmp_path / "d",
        patient_name="Doe^Jane",
        patient_id="X1",
        study_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.4.5",
        series_description="AXIAL HEAD",
    )
    ds = pydicom.dcmread(named[1])
    assert (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID) == ("Doe^Jane", "X1", "1.2.3.4")
    assert (ds.SeriesInstanceUID, ds.SeriesDescription) == ("1.2.3.4.5", "AXIAL HEAD")
