"""Tests of the DICOM series loader against the phantom's known HU and geometry, and
against the real Philips series (plain and gantry-tilted)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.phantom import PhantomCase, generate_case, write_series
from inference.volume import AIR_HU, SeriesSkipped, Volume, load_volume, read_series
from tests.inference.conftest import PhantomSeries
from tests.interop import REAL_5MM, REAL_TILT, require_real_data

N_SLICES = 8


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    return generate_case(
        17, n_slices=N_SLICES, matrix=64, subtypes=["subdural"], slice_thickness=3.0
    )


def _load_folder(folder: Path) -> Volume:
    groups, problems = read_series([folder])
    assert problems == []
    assert len(groups) == 1
    return load_volume(next(iter(groups.values())))


def _expected_hu(case: PhantomCase, signed: bool = True) -> np.ndarray:
    """The phantom as stored: unsigned storage with intercept -1024 clips air at -1024."""
    return case.hu if signed else np.maximum(case.hu, np.float32(-1024.0))


def _assert_same_geometry_and_values(
    volume: Volume, case: PhantomCase, paths: list[Path], tolerance: float, signed: bool = True
) -> None:
    assert volume.hu.shape == case.hu.shape and volume.hu.dtype == np.float32
    # Slice k of the volume is the file that holds slice k of the case.
    written = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    assert volume.sop_instance_uids == written
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == written
    padded = volume.hu == AIR_HU
    error = np.abs(volume.hu - _expected_hu(case, signed))
    assert float(error[~padded].max()) <= tolerance
    _, dy, dx = case.spacing
    assert volume.spacing[1] == pytest.approx(dy, abs=1e-5)
    assert volume.spacing[2] == pytest.approx(dx, abs=1e-5)


STORAGE_VARIANTS: dict[str, dict[str, object]] = {
    "explicit-signed": {},
    "implicit-unsigned": {"transfer_syntax": "implicit", "signed": False},
    "implicit-signed": {"transfer_syntax": "implicit", "signed": True},
    "unsigned-slope": {"signed": False, "rescale_slope": 0.5, "rescale_intercept": -1024},
    "signed-intercept": {"rescale_intercept": -1024},
    "deflated": {"transfer_syntax": "deflated"},
    "rle-signed": {"transfer_syntax": "rle"},
    "rle-unsigned": {"transfer_syntax": "rle", "signed": False},
    "jpegls-signed": {"transfer_syntax": "jpegls"},
    "jpegls-unsigned": {"transfer_syntax": "jpegls", "signed": False},
    "jpeg2000-signed": {"transfer_syntax": "jpeg2000"},
    "jpeg2000-unsigned": {"transfer_syntax": "jpeg2000", "signed": False},
    "shuffled-no-suffix": {"shuffle": True, "suffix": ""},
}


@pytest.mark.parametrize("variant", sorted(STORAGE_VARIANTS))
def test_storage_variants_round_trip(variant: str, case: PhantomCase, tmp_path: Path) -> None:
    options = STORAGE_VARIANTS[variant]
    paths = write_series(case, tmp_path / variant, **options)
    volume = _load_folder(tmp_path / variant)
    slope = float(options.get("rescale_slope", 1.0))  # type: ignore[arg-type]
    signed = bool(options.get("signed", True))
    _assert_same_geometry_and_values(volume, case, paths, 0.5 * slope + 1e-3, signed)
    assert case.slice_positions is not None
    assert np.allclose(volume.slice_positions, case.slice_positions, atol=1e-3)
    assert volume.spacing[0] == pytest.approx(case.spacing[0], abs=1e-3)
    assert volume.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    ts = pydicom.dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts.keyword == {
        "implicit": "ImplicitVRLittleEndian",
        "deflated": "DeflatedExplicitVRLittleEndian",
        "rle": "RLELossless",
        "jpegls": "JPEGLSLossless",
        "jpeg2000": "JPEG2000Lossless",
    }.get(str(options.get("transfer_syntax")), "ExplicitVRLittleEndian")


def test_shuffled_instance_numbers_do_not_decide_the_order(
    case: PhantomCase, tmp_path: Path
) -> None:
    paths = write_series(case, tmp_path, shuffle=True)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert numbers != sorted(numbers)
    assert sorted(p.name for p in paths) != [p.name for p in paths]
    volume = _load_folder(tmp_path)
    assert np.all(np.diff(volume.slice_positions) > 0)
    assert np.array_equal(np.rint(volume.hu[3]), np.rint(case.hu[3]))


@pytest.mark.parametrize("signed", [True, False])
def test_padding_value_becomes_air(case: PhantomCase, tmp_path: Path, signed: bool) -> None:
    padding = -2000 if signed else 4095  # 4095 unsigned would read as 3071 HU unpadded
    paths = write_series(case, tmp_path, signed=signed, padding_value=padding)
    volume = _load_folder(tmp_path)
    rows = np.arange(case.hu.shape[1]) - (case.hu.shape[1] - 1) / 2
    outside = (rows[:, None] ** 2 + rows[None, :] ** 2) > (case.hu.shape[1] / 2) ** 2
    assert np.all(volume.hu[:, outside] == AIR_HU)
    error = np.abs(volume.hu - _expected_hu(case, signed))
    assert float(error[:, ~outside].max()) <= 0.5 + 1e-3
    assert int(pydicom.dcmread(paths[0]).PixelPaddingValue) == padding


@pytest.mark.parametrize(("tilt", "positions"), [(-18.5, "normal"), (20.0, "table")])
def test_gantry_tilt_spacing_along_the_normal(
    case: PhantomCase, tmp_path: Path, tilt: float, positions: str
) -> None:
    paths = write_series(case, tmp_path, gantry_tilt=tilt, tilt_positions=positions)
    volume = _load_folder(tmp_path)
    _assert_same_geometry_and_values(volume, case, paths, tolerance=0.501)
    t = math.radians(tilt)
    expected = (1, 0, 0, 0, math.cos(t), math.sin(t))
    assert volume.image_orientation == pytest.approx(expected, abs=1e-6)
    assert volume.normal == pytest.approx([0.0, -math.sin(t), math.cos(t)])
    assert volume.spacing[0] == pytest.approx(case.spacing[0], abs=1e-3)
    z_steps = np.diff([float(ds.ImagePositionPatient[2]) for ds in volume.datasets])
    expected_z = case.spacing[0] * (math.cos(t) if positions == "normal" else 1 / math.cos(t))
    assert np.allclose(z_steps, expected_z, atol=1e-3)


def test_variable_spacing_kept_in_slice_positions(case: PhantomCase, tmp_path: Path) -> None:
    positions = np.cumsum([0.0, 3.0, 3.0, 3.0, 5.0, 5.0, 5.0, 2.0]) - 40.0
    paths = write_series(case, tmp_path, slice_positions=positions, shuffle=True)
    volume = _load_folder(tmp_path)
    _assert_same_geometry_and_values(volume, case, paths, tolerance=0.501)
    assert np.allclose(volume.slice_positions, positions, atol=1e-3)
    assert volume.spacing[0] == pytest.approx(3.0)  # the median step
    assert volume.origin[2] == pytest.approx(-40.0, abs=1e-3)


def test_single_slice_and_two_slice_stacks(case: PhantomCase, tmp_path: Path) -> None:
    paths = write_series(case, tmp_path)
    groups, _ = read_series(paths[:1])
    one = load_volume(next(iter(groups.values())))
    assert one.hu.shape == (1, 64, 64)
    assert one.spacing[0] == pytest.approx(3.0)  # from SliceThickness
    assert float(np.abs(one.hu[0] - case.hu[0]).max()) <= 0.501
    groups, _ = read_series(paths[2:4])
    two = load_volume(next(iter(groups.values())))
    assert two.hu.shape == (2, 64, 64) and two.spacing[0] == pytest.approx(3.0)
    assert float(np.abs(two.hu - case.hu[2:4]).max()) <= 0.501


def test_headers_only_datasets_read_pixels_from_their_files(
    case: PhantomCase, tmp_path: Path
) -> None:
    paths = write_series(case, tmp_path, transfer_syntax="jpegls")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in reversed(paths)]
    volume = load_volume(headers)
    assert float(np.abs(volume.hu - case.hu).max()) <= 0.501
    assert all("PixelData" not in ds for ds in headers)


def test_read_series_groups_folders_recursively(
    phantom_series: dict[str, PhantomSeries], tmp_path: Path
) -> None:
    root = phantom_series["negative"].folder.parent
    groups, problems = read_series([root])
    assert problems == []
    assert len(groups) == len(phantom_series)
    for series in phantom_series.values():
        uid = str(pydicom.dcmread(series.paths[0], stop_before_pixels=True).SeriesInstanceUID)
        volume = load_volume(groups[uid])
        assert volume.hu.shape == series.case.hu.shape
        signed = bool(pydicom.dcmread(series.paths[0]).PixelRepresentation)
        error = np.abs(volume.hu - _expected_hu(series.case, signed))
        assert float(error.max()) <= 0.501
        assert volume.voxel_volume_ml == pytest.approx(
            float(np.prod(series.case.spacing)) / 1000.0, rel=1e-5
        )


def test_unreadable_files_are_reported_not_fatal(case: PhantomCase, tmp_path: Path) -> None:
    paths = write_series(case, tmp_path / "series")
    data = paths[4].read_bytes()
    paths[4].write_bytes(data[: len(data) // 2])  # cut in the pixel data
    paths[5].write_bytes(data[:300])  # cut in the header
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    groups, problems = read_series([tmp_path])
    reasons = {path.name: reason for path, reason in problems}
    assert set(reasons) == {paths[4].name, paths[5].name, "notes.txt", "empty.dcm"}
    assert "truncated" in reasons[paths[4].name]
    assert reasons[paths[5].name]  # cut between header elements: whatever was missing
    assert reasons["notes.txt"] == "not a DICOM file"
    (datasets,) = groups.values()
    assert len(datasets) == N_SLICES - 2
    volume = load_volume(datasets)
    assert volume.hu.shape[0] == N_SLICES - 2


def _datasets(case: PhantomCase, folder: Path, **options: object) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in write_series(case, folder, **options)]


def _reason(datasets: list[pydicom.Dataset]) -> str:
    with pytest.raises(SeriesSkipped) as info:
        load_volume(datasets)
    return info.value.reason


def test_skip_reasons(case: PhantomCase, tmp_path: Path) -> None:
    mr = _datasets(case, tmp_path / "mr", overrides={"Modality": "MR"})
    assert _reason(mr) == "not CT (modality MR)"
    scout = _datasets(
        case, tmp_path / "scout", overrides={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    )
    assert _reason(scout) == "localizer (scout) images"
    for modality in ("SEG", "SR"):
        own = _datasets(case, tmp_path / modality, overrides={"Modality": modality})
        assert _reason(own) == "ichnode's own output"
    sc = _datasets(case, tmp_path / "sc", overrides={"Manufacturer": "ichnode", "Modality": "OT"})
    assert _reason(sc) == "ichnode's own output"

    # Stacks of different orientation that rank equal (as many slices, as axial): no main one.
    mixed = _datasets(case, tmp_path / "orient")
    for ds in mixed[4:]:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    assert _reason(mixed) == "mixed image orientations"
    assert _reason(mixed[3:5]) == "mixed image orientations"

    small = generate_case(17, n_slices=1, matrix=32, slice_thickness=3.0)
    base = _datasets(case, tmp_path / "matrix")
    uid = str(base[0].SeriesInstanceUID)
    extra = _datasets(small, tmp_path / "matrix-small", series_instance_uid=uid)
    assert "mixed matrix sizes" in _reason([*base, *extra])

    bare = _datasets(case, tmp_path / "nopix")
    for ds in bare[:3]:  # files without pixel data, read back from disk
        del ds.PixelData
        ds.save_as(ds.filename)
    groups, _ = read_series([tmp_path / "nopix"])
    assert _reason(next(iter(groups.values()))) == f"no pixel data in 3 of {N_SLICES} instances"
    for ds in bare:  # datasets in memory, with no file to read the pixels from
        ds.pop("PixelData", None)
        ds.filename = None
    assert _reason(bare) == f"no pixel data in {N_SLICES} of {N_SLICES} instances"

    # Two instances at one position with different pixels: two reconstructions in one series.
    dup = _datasets(case, tmp_path / "dup")
    twin = pydicom.dcmread(write_series(case, tmp_path / "dup2")[0])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    twin.SeriesInstanceUID = dup[0].SeriesInstanceUID
    twin.RescaleIntercept = -1  # one HU off everywhere
    assert _reason([*dup, twin]) == (
        f"different images at 1 of {N_SLICES} slice positions "
        "(more than one reconstruction in one series)"
    )

    assert _reason([]) == "no images"


def test_duplicate_instances_with_the_same_pixels_are_dropped(
    case: PhantomCase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Expected: a series sent twice with new SOP Instance UIDs gives one slice per
    position (the first instance given), and a warning names the count dropped."""
    first = _datasets(case, tmp_path / "first")
    again = _datasets(case, tmp_path / "again")
    for ds in again:
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
    with caplog.at_level("WARNING", logger="inference.volume"):
        volume = load_volume([*first, *again[::-1]])
    assert volume.sop_instance_uids == [str(ds.SOPInstanceUID) for ds in first]
    assert float(np.abs(volume.hu - case.hu).max()) <= 0.501
    assert np.allclose(np.diff(volume.slice_positions), case.spacing[0], atol=1e-3)
    assert f"dropped {N_SLICES} duplicate instances" in caplog.text


def test_one_slice_of_another_orientation_is_left_out(
    case: PhantomCase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Expected: an axial series with one oblique image (a reformat sent into the
    series) is analysed without it; the warning says which stack was kept."""
    datasets = _datasets(case, tmp_path)
    datasets[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    with caplog.at_level("WARNING", logger="inference.volume"):
        volume = load_volume(datasets)
    kept = [ds for k, ds in enumerate(datasets) if k != 3]
    assert volume.sop_instance_uids == [str(ds.SOPInstanceUID) for ds in kept]
    assert float(np.abs(volume.hu - np.delete(case.hu, 3, axis=0)).max()) <= 0.501
    assert "2 stacks with different orientations (7, 1 slices)" in caplog.text
    assert "leaving out 1 images" in caplog.text


def test_real_plain_series() -> None:
    require_real_data()
    volume = _load_folder(REAL_5MM)
    assert volume.hu.shape == (28, 512, 512)
    assert volume.spacing == pytest.approx((5.0, 0.451171875, 0.451171875))
    assert np.allclose(np.diff(volume.slice_positions), 5.0)
    assert volume.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    # File names I10, I100, I110 ... sort differently from the positions.
    names = [Path(ds.filename).name for ds in volume.datasets]
    assert names[:3] == ["I10", "I20", "I30"]
    _check_real_hu(volume)


def test_real_tilted_series() -> None:
    require_real_data()
    volume = _load_folder(REAL_TILT)
    assert volume.hu.shape == (54, 512, 512)
    first = volume.datasets[0]
    assert float(first.GantryDetectorTilt) == pytest.approx(-18.5)
    # The table stepped 2.5 mm along z; along the tilted normal that is 2.5 cos(18.5).
    expected = 2.5 * math.cos(math.radians(18.5))
    assert volume.spacing[0] == pytest.approx(expected, abs=2e-3)
    assert np.allclose(np.diff(volume.slice_positions), expected, atol=2e-3)
    assert volume.spacing[1:] == pytest.approx((0.482421875, 0.482421875))
    assert volume.image_orientation == pytest.approx((1, 0, 0, 0, 0.9483237, -0.3173047))
    assert volume.normal == pytest.approx([0.0, 0.3173047, 0.9483237], abs=1e-6)
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert np.all(np.diff(z) > 0)  # ascending along the normal is ascending z here
    _check_real_hu(volume)


def _check_real_hu(volume: Volume) -> None:
    hu = volume.hu
    corners = np.concatenate([hu[:, :24, :24].ravel(), hu[:, :24, -24:].ravel()])
    assert -1030.0 <= float(np.median(corners)) <= -970.0
    assert np.mean(np.abs(hu + 1000.0) < 50.0) > 0.7  # mostly air around the phantom
    bone = hu[hu > 300.0]
    assert bone.size > 100_000  # the phantom's skull
    assert 550.0 <= float(np.percentile(bone, 50)) <= 800.0
    assert float(hu.max()) < 3100.0


def test_real_series_mixed_in_one_call(tmp_path: Path) -> None:
    require_real_data()
    groups, problems = read_series([REAL_5MM, REAL_TILT])
    assert problems == []
    assert sorted(len(v) for v in groups.values()) == [28, 54]


def test_real_files_copied_without_preamble_are_still_read(tmp_path: Path) -> None:
    require_real_data()
    source = REAL_5MM / "I10"
    data = source.read_bytes()
    assert data[128:132] == b"DICM"
    shutil.copy(source, tmp_path / "with-preamble")
    groups, problems = read_series([tmp_path])
    assert problems == [] and sum(len(v) for v in groups.values()) == 1


def test_datasets_without_file_meta_still_decode(case: PhantomCase, tmp_path: Path) -> None:
    datasets = _datasets(case, tmp_path)
    for ds in datasets:
        del ds.file_meta
        ds.filename = None
    volume = load_volume(datasets)
    assert float(np.abs(volume.hu - case.hu).max()) <= 0.501
    # The caller's datasets are not given a file meta behind its back.
    assert all("TransferSyntaxUID" not in getattr(ds, "file_meta", {}) for ds in datasets)
