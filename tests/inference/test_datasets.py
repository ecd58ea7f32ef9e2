"""The RSNA and CQ500 loaders on tiny fixtures laid out like the real data sets,
and a short ``ichnode train`` run on each."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from inference.datasets import (
    Cq500Dataset,
    DatasetError,
    RsnaDataset,
    labels_from_masks,
    parse_seeds,
    read_cq500_reads,
    read_rsna_labels,
    split_of,
)
from inference.findings import CLASSES
from inference.phantom import generate_case

REPO = Path(__file__).resolve().parents[2]
CQ500_FLAGS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH")


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    study: str,
    series: str,
    sop: str,
    z: float,
    px: float,
    thickness: float,
) -> None:
    """One CT Image Storage file with HU stored as int16 (slope 1, intercept -1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "PHANTOM"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-px * hu.shape[1] / 2, -px * hu.shape[0] / 2, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [px, px]
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.clip(np.round(hu + 1024), -32768, 32767).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_case(folder: Path, seed: int, subtypes: tuple[str, ...], name: str) -> np.ndarray:
    """Write a small phantom case as a series; return its slice labels (z, 6)."""
    case = generate_case(seed, n_slices=6, matrix=64, subtypes=subtypes, slice_thickness=5.0)
    study, series = generate_uid(), generate_uid()
    order = [3, 0, 5, 1, 4, 2]  # files not in slice order
    for k in order:
        sop = generate_uid()
        write_ct_slice(
            folder / name.format(k=k, sop=sop),
            case.hu[k],
            study=study,
            series=series,
            sop=sop,
            z=5.0 * k,
            px=case.spacing[1],
            thickness=5.0,
        )
    slice_labels, _ = labels_from_masks(case.labels)
    return slice_labels


def make_rsna(root: Path) -> tuple[Path, Path, list[np.ndarray]]:
    image_dir = root / "stage_2_train"
    image_dir.mkdir(parents=True)
    labels = []
    rows = []
    for seed, subtypes in ((7, ("intraparenchymal",)), (8, ()), (9, ("subdural",))):
        series_dir = root / f"tmp{seed}"
        series_dir.mkdir()
        slice_labels = write_case(series_dir, seed, subtypes, "{k:02d}.dcm")
        labels.append(slice_labels)
        for k in range(6):
            path = series_dir / f"{k:02d}.dcm"
            image_id = f"ID_{seed:03x}{k:06x}"
            path.rename(image_dir / f"{image_id}.dcm")
            rows += [
                (f"{image_id}_{cls}", int(slice_labels[k, i])) for i, cls in enumerate(CLASSES)
            ]
    (image_dir / "ID_ffffffff.dcm").write_bytes(b"not in the csv and not DICOM")
    csv_path = root / "stage_2_train.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return csv_path, image_dir, labels


def make_cq500(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    reads = root / "reads.csv"
    # scan 0: two readers say subdural -> positive; scan 1: one reader only -> negative
    votes = {
        "CQ500-CT-0": [{"ICH": 1, "SDH": 1}, {"ICH": 1, "SDH": 1}, {}],
        "CQ500-CT-1": [{"ICH": 1, "IPH": 1}, {}, {}],
        "CQ500-CT-2": [{}, {}, {}],
    }
    header = (
        ["name", "Category"]
        + [f"R{r}:{f}" for r in (1, 2, 3) for f in CQ500_FLAGS]
        + ["R1:Fracture"]
    )
    with reads.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for name, readers in votes.items():
            row = [name, "B1"]
            for r in readers:
                row += [str(r.get(f, 0)) for f in CQ500_FLAGS]
            writer.writerow([*row, "0"])
    for n, (seed, subtypes) in enumerate(((11, ("subdural",)), (12, ()), (13, ()))):
        folder = root / f"CQ500-CT-{n}" / "Unknown Study" / "CT 5mm"
        folder.mkdir(parents=True)
        write_case(folder, seed, subtypes, "CT{k:06d}.dcm")
    (root / "CQ500-CT-0" / "Unknown Study" / "notes.txt").write_text("not DICOM")
    return reads


def test_rsna_loader_reassembles_series_in_slice_order(tmp_path: Path) -> None:
    csv_path, image_dir, truth = make_rsna(tmp_path)
    labels = read_rsna_labels(csv_path)
    assert len(labels) == 18
    dataset = RsnaDataset(csv_path, image_dir)
    assert len(dataset.series) == 3
    loaded = [dataset.load(ref) for ref in dataset.series]
    for item in loaded:
        assert item.volume.hu.shape == (6, 64, 64)
        assert item.slice_labels is not None and item.slice_labels.shape == (6, len(CLASSES))
        assert np.all(np.diff(item.volume.slice_positions) > 0)
    # every fixture series is found with its labels in position order
    found = sorted(
        tuple(map(tuple, item.slice_labels.astype(int)))
        for item in loaded
        if item.slice_labels is not None
    )
    expected = sorted(tuple(map(tuple, t.astype(int))) for t in truth)
    assert found == expected
    assert sum(bool(item.series_labels[0]) for item in loaded) == 2


def test_rsna_csv_errors_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Label\nID_abc_headache,1\n")
    with pytest.raises(DatasetError, match="bad ID"):
        read_rsna_labels(bad)
    bad.write_text("Image,Target\n")
    with pytest.raises(DatasetError, match="expected columns"):
        read_rsna_labels(bad)
    with pytest.raises(DatasetError, match="not found"):
        read_rsna_labels(tmp_path / "missing.csv")


def test_cq500_majority_vote_and_series(tmp_path: Path) -> None:
    reads = make_cq500(tmp_path)
    votes = read_cq500_reads(reads)
    assert votes["CQ500-CT-0"].tolist() == [True, False, False, False, True, False]
    assert not votes["CQ500-CT-1"].any()
    dataset = Cq500Dataset(reads, tmp_path)
    assert len(dataset.series) == 3
    item = dataset.load(dataset.series[0])
    assert item.key.startswith("CQ500-CT-0/")
    assert item.volume.hu.shape == (6, 64, 64)
    assert item.slice_labels is None and item.series_labels[CLASSES.index("subdural")]


def test_cq500_bad_reads_file(tmp_path: Path) -> None:
    reads = tmp_path / "reads.csv"
    reads.write_text("name,Category,R1:ICH\nCQ500-CT-0,B1,1\n")
    with pytest.raises(DatasetError, match="missing columns"):
        read_cq500_reads(reads)


def test_seed_ranges_and_split() -> None:
    assert parse_seeds("3:7") == range(3, 7)
    for bad in ("7:3", "x", "1:2:3", "-1:4"):
        with pytest.raises(DatasetError):
            parse_seeds(bad)
    keys = [f"1.2.{i}" for i in range(400)]
    val = [k for k in keys if split_of(k, 0.1) == "val"]
    assert 20 < len(val) < 60
    assert val == [k for k in keys if split_of(k, 0.1) == "val"]


def _train(tmp_path: Path, *data_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "train",
            *data_args,
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--cache-cases",
            "2",
            "--input-size",
            "64",
            "--base-width",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "w.pt"),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--no-progress",
        ],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("source", ["rsna", "cq500"])
def test_train_runs_on_the_real_data_layouts(tmp_path: Path, source: str) -> None:
    from inference.predictor import Predictor

    if source == "rsna":
        csv_path, image_dir, _ = make_rsna(tmp_path / "data")
        args = ["--data", "rsna", "--rsna-csv", str(csv_path), "--rsna-dir", str(image_dir)]
    else:
        reads = make_cq500(tmp_path / "data")
        args = [
            "--data",
            "cq500",
            "--cq500-reads",
            str(reads),
            "--cq500-dir",
            str(tmp_path / "data"),
        ]
    proc = _train(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictor = Predictor(tmp_path / "w.pt", device="cpu")
    assert predictor.training["data"] == source
    assert set(predictor.thresholds) == set(CLASSES)
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()


def test_train_rejects_missing_real_data_in_one_line(tmp_path: Path) -> None:
    proc = _train(
        tmp_path,
        "--data",
        "cq500",
        "--cq500-reads",
        str(tmp_path / "r.csv"),
        "--cq500-dir",
        str(tmp_path),
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"ichnode train: CQ500 reads file {tmp_path / 'r.csv'} not found"
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("source", ["rsna", "cq500"])
def test_evaluate_runs_on_the_real_data_layouts(tmp_path: Path, source: str) -> None:
    if source == "rsna":
        csv_path, image_dir, _ = make_rsna(tmp_path / "data")
        args = ["--data", "rsna", "--rsna-csv", str(csv_path), "--rsna-dir", str(image_dir)]
        levels = ("series ", "slice ")
    else:
        reads = make_cq500(tmp_path / "data")
        args = ["--data", "cq500", "--cq500-reads", str(reads), "--cq500-dir",
                str(tmp_path / "data")]
        levels = ("series ",)
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "evaluate", *args, "--device", "cpu",
         "--out", str(tmp_path / "eval")],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 series" in proc.stdout
    for level in levels:
        assert level in proc.stdout
    assert (tmp_path / "eval" / "roc_series.png").is_file()
    assert ("slice " in proc.stdout) == (source == "rsna")
