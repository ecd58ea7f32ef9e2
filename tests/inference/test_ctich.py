"""CT-ICH loaders (v1.0.0 JPEG windows and v1.3.1 NIfTI), the DICOM round trip,
mixed real + phantom training, cross-validation and the bundled weights on real
slices.

The v1.0.0 fixture holds six real slices of the published data set (see its
README for the rule that chose them); the v1.3.1 fixture is written by the test.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from inference.datasets import (
    CtIchDataset,
    DatasetError,
    ctich_hu,
    patient_folds,
    read_ctich_labels,
)
from inference.findings import CLASSES
from tests.inference.test_datasets import write_ct_slice

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "ctich-v1.0.0"


def _grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_hu_from_the_two_windows() -> None:
    brain = np.array([[0, 1, 128, 255, 254, 255, 0]], dtype=np.uint8)
    bone = np.array([[0, 40, 80, 100, 90, 10, 79]], dtype=np.uint8)
    hu = ctich_hu(brain, bone)
    # Unclipped brain window: -20 + g * 120 / 255 HU.
    assert hu[0, 2] == round(-20 + 128 * 120 / 255)
    # Clipped bright: the bone window (-900 + g * 3200 / 255), never below 100 HU.
    assert hu[0, 3] == round(-900 + 100 * 3200 / 255)
    assert hu[0, 5] == 100  # bone window would say -775: JPEG noise, kept at the edge
    # Clipped dark: the bone window, never above -20 HU.
    assert hu[0, 0] == -900
    assert hu[0, 6] == -20  # bone window would say 91
    assert hu.dtype == np.float32 and np.all(hu == np.rint(hu))
    # No bone image: clipped pixels become air or bone.
    alone = ctich_hu(brain, None)
    assert alone[0, 0] == -1000 and alone[0, 3] == 1000 and alone[0, 2] == hu[0, 2]


def test_v100_loader_on_real_slices() -> None:
    dataset = CtIchDataset(FIXTURE)
    assert dataset.layout == "v1.0.0"
    assert [p.number for p in dataset.series] == [49, 95]
    pos = dataset.load(dataset.series[0])
    neg = dataset.load(dataset.series[1])
    assert pos.key == "ctich049" and pos.volume.hu.shape == (3, 650, 650)
    # Slices ordered by slice number (skull base to vertex), HU from both windows.
    brain = _grey(FIXTURE / "Patients_CT/049/brain/22.jpg")
    bone = _grey(FIXTURE / "Patients_CT/049/bone/22.jpg")
    assert np.array_equal(pos.volume.hu[2], ctich_hu(brain, bone))
    assert pos.volume.sop_instance_uids == ["ctich049.1", "ctich049.2", "ctich049.3"]
    # The skull is bone, the brain is brain, air outside.
    hu = pos.volume.hu[1]
    assert hu.max() > 1000 and hu.min() <= -900
    assert 20 < float(np.median(hu[250:400, 250:400])) < 50
    # Labels from the csv: epidural on all three, intraparenchymal on slice 21.
    epi, iph = CLASSES.index("epidural"), CLASSES.index("intraparenchymal")
    assert pos.slice_labels[:, 0].all() and pos.slice_labels[:, epi].all()
    assert pos.slice_labels[:, iph].tolist() == [False, True, False]
    assert pos.series_labels.tolist() == [True, True, False, False, False, True]
    assert not neg.slice_labels.any() and not neg.series_labels.any()
    # The published mask (slice 21, the middle one) in the labelled subtype channels.
    assert pos.blood_slices.tolist() == [False, True, False]
    assert pos.mask_slices.tolist() == [False, True, False]  # the others: blood, no mask
    assert neg.mask_slices.all() and not neg.masks.any()
    truth = _grey(FIXTURE / "Patients_CT/049/brain/21_HGE_Seg.jpg") >= 128
    assert truth.sum() > 100
    assert np.array_equal(pos.masks[0, 1], truth)  # intraparenchymal
    assert np.array_equal(pos.masks[4, 1], truth)  # epidural
    assert not pos.masks[1:4].any() and not pos.masks[:, [0, 2]].any()
    assert pos.volume.spacing == (5.0, 0.325, 0.325)


def test_missing_bone_image_uses_the_brain_window(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ctich"
    shutil.copytree(FIXTURE, root)
    (root / "Patients_CT/095/bone/15.jpg").unlink()
    dataset = CtIchDataset(root)
    with caplog.at_level(logging.INFO, logger="inference.datasets"):
        item = dataset.load(dataset.series[1])
    assert "slice 15: no bone image" in caplog.text
    brain = _grey(root / "Patients_CT/095/brain/15.jpg")
    assert np.array_equal(item.volume.hu[1], ctich_hu(brain, None))
    assert item.volume.hu[1].max() == 1000 and item.volume.hu[0].max() > 1000


def test_bad_ctich_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        CtIchDataset(tmp_path / "absent")
    with pytest.raises(DatasetError, match="not a CT-ICH folder"):
        CtIchDataset(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("PatientNumber,SliceNumber\n1,1\n")
    with pytest.raises(DatasetError, match="missing columns"):
        read_ctich_labels(bad)
    root = tmp_path / "ctich"
    shutil.copytree(FIXTURE, root)
    (root / "Patients_CT/049/brain/21.jpg").unlink()
    dataset = CtIchDataset(root)
    with pytest.raises(DatasetError, match="21.jpg is missing"):
        dataset.load(dataset.series[0])


def _write_v131(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-patient v1.3.1 folder; patient 3's NIfTI is stored head to feet and
    with rows and columns in RAS order. Returns (hu in LPS order, mask, slice labels)."""
    import nibabel as nib

    (root / "ct_scans").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(3)
    z, rows, cols = 4, 12, 10
    hu_lps = rng.integers(-1000, 2000, size=(z, rows, cols)).astype(np.float32)
    mask_lps = np.zeros((z, rows, cols), dtype=np.uint8)
    mask_lps[1, 3:6, 2:5] = 1
    mask_lps[2, 4:8, 6:9] = 1
    # LPS (z, row, col) -> RAS array (i: right, j: anterior, k: inferior->superior flipped).
    def to_file(a: np.ndarray) -> np.ndarray:
        return a.transpose(2, 1, 0)[::-1, ::-1, ::-1].copy()

    affine = np.diag([0.5, 0.6, 5.0, 1.0])
    affine[2, 2] = -5.0  # third axis runs head to feet
    nib.save(nib.Nifti1Image(to_file(hu_lps).astype(np.int16), affine),
             str(root / "ct_scans" / "003.nii"))
    nib.save(nib.Nifti1Image(to_file(mask_lps), affine), str(root / "masks" / "003.nii"))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), dtype=np.int16), np.eye(4)),
             str(root / "ct_scans" / "004.nii"))
    # Slice numbers count along the file's third axis: file slice 1 is the top (LPS z=3).
    labels_lps = np.zeros((z, 6), dtype=bool)
    header = ("PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,"
              "Epidural,Subdural,No_Hemorrhage,Fracture_Yes_No")
    lines = [header]
    for k in range(z):
        number = z - k  # file index k_file = z - 1 - k
        blood = bool(mask_lps[k].any())
        sdh = k == 2
        labels_lps[k] = [blood, blood and not sdh, False, False, sdh, False]
        lines.append(f"3,{number},0,{int(blood and not sdh)},0,0,{int(sdh)},{int(not blood)},0")
    lines += ["4,1,0,0,0,0,0,1,0", "4,2,0,0,0,0,0,1,0"]
    (root / "hemorrhage_diagnosis_raw_ct.csv").write_text("\n".join(lines) + "\n")
    return hu_lps, mask_lps.astype(bool), labels_lps


def test_v131_nifti_loader(tmp_path: Path) -> None:
    hu, mask, labels = _write_v131(tmp_path)
    dataset = CtIchDataset(tmp_path)
    assert dataset.layout == "v1.3.1"
    assert [p.number for p in dataset.series] == [3, 4]
    item = dataset.load(dataset.series[0])
    assert np.array_equal(item.volume.hu, hu)
    assert item.volume.spacing == pytest.approx((5.0, 0.6, 0.5))
    assert np.array_equal(item.slice_labels, labels)
    assert np.array_equal(item.masks.any(axis=0), mask)
    assert item.masks[CLASSES.index("subdural") - 1, 2].any()
    assert not item.masks[CLASSES.index("subdural") - 1, 1].any()
    assert item.mask_slices.all() and item.blood_slices.tolist() == [False, True, True, False]
    other = dataset.load(dataset.series[1])
    assert other.volume.hu.shape == (2, 4, 4) and not other.series_labels.any()


def test_analyze_reads_a_ctich_patient_as_the_loader_does(tmp_path: Path) -> None:
    from inference.volume import load_volume, read_series
    from node.commands.analyze import _Analyzer  # noqa: F401  (the command's own reader below)

    dataset = CtIchDataset(FIXTURE)
    item = dataset.load(dataset.series[0])
    vol = item.volume
    study, series = generate_uid(), generate_uid()
    dz, px, _ = vol.spacing
    for k in (2, 0, 1):
        write_ct_slice(tmp_path / f"{k}.dcm", vol.hu[k], study=study, series=series,
                       sop=generate_uid(), z=float(vol.slice_positions[k]), px=px, thickness=dz)
    groups, problems = read_series([tmp_path])
    assert not problems and list(groups) == [series]
    seen = load_volume(groups[series])
    assert np.array_equal(seen.hu, vol.hu)
    assert seen.spacing == pytest.approx(vol.spacing)
    assert np.allclose(seen.slice_positions - seen.slice_positions[0],
                       vol.slice_positions - vol.slice_positions[0])
    assert tuple(seen.image_orientation) == pytest.approx(vol.image_orientation)
    # And the command itself takes the series (3 slices of real CT) without complaint.
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", str(tmp_path), "--json"],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["series"][0]["slices"]) == 3 and doc["series"][0]["skipped"] is None


def test_patient_folds_are_stratified_and_fixed() -> None:
    keys = [f"p{i}" for i in range(50)]
    labels = [i < 24 for i in range(50)]
    folds = patient_folds(keys, labels, 5, 0)
    assert folds == patient_folds(keys, labels, 5, 0)
    assert folds != patient_folds(keys, labels, 5, 1)
    for k in range(5):
        members = [i for i, f in enumerate(folds) if f == k]
        assert len(members) == 10
        assert sum(labels[i] for i in members) in (4, 5)
    with pytest.raises(DatasetError):
        patient_folds(keys, labels, 1, 0)


def _tiny_train_args(*extra: str) -> list[str]:
    return ["--steps", "3", "--batch-size", "4", "--cache-cases", "2", "--input-size", "32",
            "--base-width", "4", "--phantom-slices", "4", "--phantom-matrix", "48",
            "--no-progress", "--device", "cpu", *extra]


def test_train_mixes_ctich_with_the_phantom(tmp_path: Path) -> None:
    from inference.train import MixedStream, _real_stream, build_sources
    from node.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "ctich", "--ctich-dir", str(FIXTURE),
                                      "--mix-phantom", "0.5", "--val-fraction", "0.5",
                                      *_tiny_train_args()])
    stream, _, mode = build_sources(args)
    assert isinstance(stream, MixedStream) and mode == "slice"
    kinds = [stream.key(i)[0] for i in range(400)]
    assert kinds == [stream.key(i)[0] for i in range(400)]  # a function of (seed, index)
    assert 150 < kinds.count("phantom") < 250 and "real" in kinds
    assert not isinstance(_real_stream([1], None, 0, 0.0, "0:10", None), MixedStream)  # type: ignore[arg-type]
    thresholds = tmp_path / "thr.json"
    thresholds.write_text(json.dumps({"pooling": "top2", "source": "test",
                                       "thresholds": dict.fromkeys(CLASSES, 0.4)}))
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "--data", "ctich", "--ctich-dir",
         str(FIXTURE), "--mix-phantom", "0.3", "--thresholds-from", str(thresholds),
         "--out", str(tmp_path / "w.pt"), "--checkpoint-dir", str(tmp_path / "ck"),
         *_tiny_train_args()],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    from inference.predictor import read_weights

    ckpt, _ = read_weights(tmp_path / "w.pt")
    assert ckpt["pooling"] == "top2" and ckpt["thresholds"]["any"] == pytest.approx(0.4)
    assert ckpt["training"]["data"] == "ctich" and ckpt["training"]["mix_phantom"] == 0.3
    assert ckpt["training"]["thresholds_from"] == "test"
    bad = subprocess.run(
        [sys.executable, "-m", "node.cli", "train", "--data", "ctich", *_tiny_train_args()],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )
    assert bad.returncode == 2 and "needs --ctich-dir" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_crossval_scores_every_patient_with_a_network_that_never_saw_it(tmp_path: Path) -> None:
    from inference.predictor import read_weights

    cv = tmp_path / "cv"
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "crossval", "--ctich-dir", str(FIXTURE),
         "--folds", "2", "--cv-dir", str(cv), "--mix-phantom", "0.5", *_tiny_train_args()],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "series any" in out.stdout and "slice  any" in out.stdout
    assert "published mask" in out.stdout
    plan = json.loads((cv / "folds.json").read_text())["folds"]
    assert sorted(n for members in plan.values() for n in members) == [49, 95]
    for k, members in plan.items():
        ckpt, _ = read_weights(cv / f"fold{k}" / "weights.pt")
        assert ckpt["training"]["excluded_patients"] == ",".join(map(str, members))
    rows = (cv / "oof_slices.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    series = (cv / "oof_series.csv").read_text().splitlines()
    fold_of = {f"ctich{n:03d}": int(k) for k, m in plan.items() for n in m}
    for line in series[1:]:
        key, fold = line.split(",")[:2]
        assert fold_of[key] == int(fold)
    for name in ("roc_series.png", "roc_slice.png", "confusion_series.png", "metrics.json",
                 "thresholds.json", "table.txt", "crossval.log"):
        assert (cv / name).is_file(), name
    chosen = json.loads((cv / "thresholds.json").read_text())
    assert set(chosen["thresholds"]) == set(CLASSES)
    # A second run trains nothing and reports the same.
    again = subprocess.run(
        [sys.executable, "-m", "node.cli", "crossval", "--ctich-dir", str(FIXTURE),
         "--folds", "2", "--cv-dir", str(cv), "--report-only", *_tiny_train_args()],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=600,
    )
    assert again.returncode == 0 and again.stdout == out.stdout


def test_evaluate_on_ctich_reports_blood_dice() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "evaluate", "--data", "ctich", "--ctich-dir",
         str(FIXTURE), "--device", "cpu"],
        check=False, capture_output=True, text=True, cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "2 series, 6 slices" in out.stdout
    assert "Dice of predicted blood on the 1 slices with a published mask" in out.stdout


def _fixture_findings():  # type: ignore[no-untyped-def]
    from inference.predictor import Predictor

    predictor = Predictor(None, device="cpu")
    dataset = CtIchDataset(FIXTURE)
    pos = predictor.predict(dataset.load(dataset.series[0]).volume, explain=False)
    neg = predictor.predict(dataset.load(dataset.series[1]).volume, explain=False)
    return pos, neg


def test_bundled_weights_rank_the_real_bleed_above_the_real_normal_head() -> None:
    """On the fixture's slices (chosen by the rule in its README) the patient with
    hemorrhage is called positive and scores above the patient without."""
    pos, neg = _fixture_findings()
    assert pos.hemorrhage_present, pos.hemorrhage_probability
    assert pos.hemorrhage_probability > neg.hemorrhage_probability


@pytest.mark.xfail(
    strict=True,
    reason="target not met: out-of-fold specificity 0.27 at the shipped threshold "
    "(docs/MODEL_CARD.md); the bundled weights call these normal mid-brain slices "
    "positive (p 0.92 against 0.47)",
)
def test_bundled_weights_call_the_real_normal_head_negative() -> None:
    _, neg = _fixture_findings()
    assert not neg.hemorrhage_present, neg.hemorrhage_probability
