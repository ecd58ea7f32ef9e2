"""Labelled data for training and evaluation: the phantom, RSNA ICH, CQ500 and CT-ICH layouts.

Every source yields :class:`LabelledVolume` items: a :class:`~inference.volume.Volume`
with the labels a source has (per-voxel masks for the phantom, per-slice labels
for RSNA and CT-ICH, per-scan labels for CQ500, blood masks on some CT-ICH
slices), in the volume's slice order (ascending along the slice normal, i.e.
feet to head for axial head CT).

* RSNA Intracranial Hemorrhage Detection: a folder of ``ID_<hex>.dcm`` single
  slices and a csv ``ID,Label`` with one row ``ID_<hex>_<class>`` per slice and
  class; series are reassembled from the headers.
* CQ500: ``reads.csv`` (``name``, ``Category``, ``R1:ICH`` ... ``R3:SAH``; the
  label is the majority of the three readers) and one folder ``CQ500-CT-<n>``
  per scan holding its series.
* CT-ICH (Hssayeni et al., Data 2020; PhysioNet ``ct-ich``, CC BY 4.0), in either
  of its released layouts, detected from the files:

  - v1.0.0: ``hemorrhage_diagnosis.csv`` and ``Patients_CT/<PPP>/brain|bone/<n>.jpg``,
    the brain (40/120) and bone (700/3200) windows as 8-bit JPEG, blood masks as
    ``brain/<n>_HGE_Seg.jpg`` on some slices. Hounsfield units come back from the
    two windows (:func:`ctich_hu`).
  - v1.3.1: ``hemorrhage_diagnosis_raw_ct.csv``, ``ct_scans/<PPP>.nii`` in HU and
    ``masks/<PPP>.nii`` voxel masks, read with nibabel.

Torch is not needed here.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from inference.findings import CLASSES, SUBTYPES
from inference.volume import SeriesSkipped, Volume, load_volume

logger = logging.getLogger(__name__)

#: CQ500 reader columns per ichnode class.
CQ500_COLUMNS: dict[str, str] = {
    "any": "ICH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "epidural": "EDH",
}
CQ500_READERS = ("R1", "R2", "R3")


class DatasetError(ValueError):
    """A data source that cannot be used (missing files, bad csv); one-line message."""


@dataclass
class LabelledVolume:
    """One series with its ground truth.

    ``slice_labels`` bool (z, 6) in ``CLASSES`` order or None (scan-level only);
    ``series_labels`` bool (6,); ``masks`` bool (5, z, y, x) or None.
    ``mask_slices`` bool (z,): the slices whose masks are known (None: all of
    them when ``masks`` is given). A source with blood masks on some slices only
    (CT-ICH v1.0.0) marks those and the slices labelled without blood, whose
    masks are known to be empty. ``blood_slices`` bool (z,): the slices with a
    published any-blood mask (``masks.any(axis=0)`` is that mask there), for the
    Dice of the union of the subtype masks; None where the subtype masks are known.
    """

    key: str
    volume: Volume
    series_labels: np.ndarray
    slice_labels: np.ndarray | None = None
    masks: np.ndarray | None = None
    mask_slices: np.ndarray | None = None
    blood_slices: np.ndarray | None = None


def parse_seeds(text: str) -> range:
    """``"A:B"`` to ``range(A, B)``; a clear error otherwise."""
    try:
        start_text, stop_text = text.split(":")
        start, stop = int(start_text), int(stop_text)
    except ValueError as exc:
        raise DatasetError(f"seeds must be written A:B with integers, not {text!r}") from exc
    if stop <= start or start < 0:
        raise DatasetError(f"seed range {text!r} is empty or negative")
    return range(start, stop)


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic ``train``/``val`` split of a series key by hash."""
    digest = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if digest < val_fraction else "train"


# --- phantom -------------------------------------------------------------------


def phantom_volume(hu: np.ndarray, spacing: tuple[float, float, float], key: str) -> Volume:
    """A :class:`Volume` around a phantom array (axial, origin 0, synthetic UIDs)."""
    z = hu.shape[0]
    return Volume(
        hu=hu,
        spacing=spacing,
        slice_positions=np.arange(z, dtype=np.float64) * spacing[0],
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
        sop_instance_uids=[f"{key}.{i}" for i in range(z)],
        datasets=[],
        study_instance_uid=f"phantom.{key}",
        series_instance_uid=f"phantom.{key}",
    )


def labels_from_masks(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(5, z, y, x) masks to slice labels (z, 6) and series labels (6,), ``CLASSES`` order."""
    flat = np.asarray(masks, dtype=bool).reshape(masks.shape[0], masks.shape[1], -1)
    per_slice = np.any(flat, axis=2).T  # (z, 5)
    slice_labels = np.concatenate([np.any(per_slice, axis=1)[:, None], per_slice], axis=1)
    return slice_labels, np.asarray(np.any(slice_labels, axis=0))


def phantom_case(seed: int, *, n_slices: int = 32, matrix: int = 256) -> LabelledVolume:
    """Generate one labelled phantom head."""
    from inference.phantom import generate_case

    case = generate_case(seed, n_slices=n_slices, matrix=matrix)
    masks = np.asarray(case.labels, dtype=bool)
    slice_labels, series_labels = labels_from_masks(masks)
    key = f"seed{seed}"
    return LabelledVolume(
        key=key,
        volume=phantom_volume(np.asarray(case.hu, dtype=np.float32), case.spacing, key),
        series_labels=series_labels,
        slice_labels=slice_labels,
        masks=masks,
    )


def phantom_cases(
    seeds: Sequence[int], *, n_slices: int = 32, matrix: int = 256
) -> Iterator[LabelledVolume]:
    """Labelled phantom heads for ``seeds``, in order."""
    for seed in seeds:
        yield phantom_case(seed, n_slices=n_slices, matrix=matrix)


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM file, or None (logged) when it is not one."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as exc:
        logger.debug("skipping %s: %s", path, exc)
        return None


# --- RSNA ---------------------------------------------------------------------


@dataclass
class SeriesRef:
    """A series found on disk, not yet loaded."""

    key: str
    paths: list[Path]
    series_labels: np.ndarray
    slice_labels_by_sop: dict[str, np.ndarray] | None = None


def read_rsna_labels(csv_path: Path) -> dict[str, np.ndarray]:
    """``stage_2_train.csv`` to {``ID_<hex>``: bool (6,) in ``CLASSES`` order}."""
    if not csv_path.is_file():
        raise DatasetError(f"RSNA label csv {csv_path} not found")
    labels: dict[str, np.ndarray] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"ID", "Label"} <= set(reader.fieldnames):
            raise DatasetError(f"{csv_path}: expected columns ID,Label")
        for line, row in enumerate(reader, start=2):
            image_id, _, cls = row["ID"].rpartition("_")
            if cls not in CLASSES or not image_id.startswith("ID_"):
                raise DatasetError(f"{csv_path}:{line}: bad ID {row['ID']!r}")
            try:
                value = int(row["Label"])
            except ValueError as exc:
                raise DatasetError(f"{csv_path}:{line}: bad Label {row['Label']!r}") from exc
            labels.setdefault(image_id, np.zeros(len(CLASSES), dtype=bool))[
                CLASSES.index(cls)
            ] = bool(value)
    if not labels:
        raise DatasetError(f"{csv_path} holds no labels")
    return labels


class RsnaDataset:
    """RSNA ICH layout: ``ID_<hex>.dcm`` slices in ``image_dir``, labels in ``csv_path``.

    Only files with a label row are used; a series is used when every one of its
    slices is labelled.
    """

    def __init__(self, csv_path: Path, image_dir: Path) -> None:
        labels = read_rsna_labels(Path(csv_path))
        image_dir = Path(image_dir)
        if not image_dir.is_dir():
            raise DatasetError(f"RSNA image folder {image_dir} not found")
        groups: dict[str, dict[str, tuple[Path, np.ndarray]]] = {}
        for path in sorted(image_dir.glob("ID_*.dcm")):
            if path.stem not in labels:
                continue
            ds = _read_header(path)
            if ds is None:
                continue
            groups.setdefault(str(ds.SeriesInstanceUID), {})[str(ds.SOPInstanceUID)] = (
                path,
                labels[path.stem],
            )
        if not groups:
            raise DatasetError(f"no labelled ID_*.dcm files in {image_dir}")
        self.series: list[SeriesRef] = []
        for uid, members in sorted(groups.items()):
            per_sop = {sop: lab for sop, (_, lab) in members.items()}
            series_labels = np.any(np.stack(list(per_sop.values())), axis=0)
            paths = [p for p, _ in members.values()]
            self.series.append(SeriesRef(uid, paths, series_labels, per_sop))
        logger.info("RSNA: %d series", len(self.series))

    def load(self, ref: SeriesRef) -> LabelledVolume:
        """Read one series; raise :class:`SeriesSkipped` when it cannot be analysed."""
        datasets = [pydicom.dcmread(p) for p in ref.paths]
        volume = load_volume(datasets)
        if ref.slice_labels_by_sop is None:
            raise ValueError(f"series {ref.key} has no per-slice labels")
        slice_labels = np.stack([ref.slice_labels_by_sop[uid] for uid in volume.sop_instance_uids])
        return LabelledVolume(
            key=ref.key, volume=volume, series_labels=ref.series_labels, slice_labels=slice_labels
        )


# --- CQ500 --------------------------------------------------------------------


def read_cq500_reads(reads_path: Path) -> dict[str, np.ndarray]:
    """``reads.csv`` to {scan name: bool (6,) majority of the three readers}."""
    if not reads_path.is_file():
        raise DatasetError(f"CQ500 reads file {reads_path} not found")
    out: dict[str, np.ndarray] = {}
    with reads_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"name"} | {f"{r}:{c}" for r in CQ500_READERS for c in CQ500_COLUMNS.values()}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            absent = sorted(needed - set(reader.fieldnames or []))
            raise DatasetError(f"{reads_path}: missing columns {absent[:4]}")
        for line, row in enumerate(reader, start=2):
            votes = np.zeros(len(CLASSES), dtype=int)
            for i, cls in enumerate(CLASSES):
                for r in CQ500_READERS:
                    value = row[f"{r}:{CQ500_COLUMNS[cls]}"].strip()
                    if value not in ("0", "1"):
                        raise DatasetError(f"{reads_path}:{line}: {r}:{CQ500_COLUMNS[cls]} "
                                           f"must be 0 or 1, not {value!r}")
                    votes[i] += int(value)
            out[row["name"].strip()] = votes >= 2
    if not out:
        raise DatasetError(f"{reads_path} holds no scans")
    return out


class Cq500Dataset:
    """CQ500 layout: ``reads.csv`` and ``CQ500-CT-<n>/...`` folders; every CT series of
    a scan gets the scan's majority labels."""

    def __init__(self, reads_path: Path, root: Path) -> None:
        reads = read_cq500_reads(Path(reads_path))
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"CQ500 folder {root} not found")
        self.series: list[SeriesRef] = []
        for name, labels in sorted(reads.items()):
            folder = root / name
            if not folder.is_dir():
                logger.warning("CQ500 scan %s listed in reads.csv has no folder", name)
                continue
            groups: dict[str, list[Path]] = {}
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                ds = _read_header(path)
                if ds is not None and "SeriesInstanceUID" in ds:
                    groups.setdefault(str(ds.SeriesInstanceUID), []).append(path)
            for uid, paths in sorted(groups.items()):
                self.series.append(SeriesRef(f"{name}/{uid}", paths, labels))
        if not self.series:
            raise DatasetError(f"no CQ500 series found under {root}")
        logger.info("CQ500: %d series from %d scans", len(self.series), len(reads))

    def load(self, ref: SeriesRef) -> LabelledVolume:
        """Read one series; raise :class:`SeriesSkipped` when it cannot be analysed."""
        volume = load_volume([pydicom.dcmread(p) for p in ref.paths])
        return LabelledVolume(key=ref.key, volume=volume, series_labels=ref.series_labels)


# --- CT-ICH -------------------------------------------------------------------

#: CT-ICH csv columns per ichnode subtype (``any`` is ``No_Hemorrhage == 0``).
CTICH_COLUMNS: dict[str, str] = {
    "intraparenchymal": "Intraparenchymal",
    "intraventricular": "Intraventricular",
    "subarachnoid": "Subarachnoid",
    "subdural": "Subdural",
    "epidural": "Epidural",
}
#: The two windows of the v1.0.0 JPEG images: (level, width) in HU.
CTICH_BRAIN_WINDOW = (40.0, 120.0)
CTICH_BONE_WINDOW = (700.0, 3200.0)
#: In-plane pixel size of the v1.0.0 images (650 x 650): not given per patient; the
#: data set's description and one published header (0.412 mm at 512) give about this.
CTICH_PIXEL_MM = 0.325
CTICH_SLICE_MM = 5.0
#: Brain-window grey values this close to 0 or 255 count as clipped (JPEG ringing).
_CLIP_MARGIN = 3


def _window_to_hu(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    level, width = window
    return (level - width / 2.0) + grey.astype(np.float32) * (width / 255.0)


def ctich_hu(brain: np.ndarray, bone: np.ndarray | None) -> np.ndarray:
    """Hounsfield units from the brain- and bone-window images of one CT-ICH slice.

    The brain window (-20..100 HU, 0.47 HU a grey level) is used where it is not
    clipped, the bone window (-900..2300 HU, 12.5 HU a level) elsewhere, kept on the
    clipped side of the brain window so JPEG noise in the bone image cannot put a
    clipped pixel inside the brain range. Without a bone image (one slice of the
    release) clipped pixels become -1000 HU (dark) or 1000 HU (bright, bone).
    Rounded to whole HU, as a scanner stores them.
    """
    b = np.asarray(brain)
    brain_hu = _window_to_hu(b, CTICH_BRAIN_WINDOW)
    low_clip = b <= _CLIP_MARGIN
    high_clip = b >= 255 - _CLIP_MARGIN
    low_edge = CTICH_BRAIN_WINDOW[0] - CTICH_BRAIN_WINDOW[1] / 2.0
    high_edge = CTICH_BRAIN_WINDOW[0] + CTICH_BRAIN_WINDOW[1] / 2.0
    if bone is None:
        low, high = np.full_like(brain_hu, -1000.0), np.full_like(brain_hu, 1000.0)
    else:
        bone_hu = _window_to_hu(np.asarray(bone), CTICH_BONE_WINDOW)
        low = np.minimum(bone_hu, low_edge)
        high = np.maximum(bone_hu, high_edge)
    hu = np.where(low_clip, low, np.where(high_clip, high, brain_hu))
    return np.rint(hu).astype(np.float32)


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


@dataclass(frozen=True)
class CtIchPatient:
    """One CT-ICH patient found on disk: number and slice labels (z, 6) by slice number."""

    number: int
    slice_numbers: tuple[int, ...]
    slice_labels: np.ndarray

    @property
    def key(self) -> str:
        return f"ctich{self.number:03d}"

    @property
    def series_labels(self) -> np.ndarray:
        return np.asarray(np.any(self.slice_labels, axis=0))


def read_ctich_labels(csv_path: Path) -> dict[int, CtIchPatient]:
    """``hemorrhage_diagnosis[_raw_ct].csv`` to patients with per-slice labels, slice order."""
    if not csv_path.is_file():
        raise DatasetError(f"CT-ICH label csv {csv_path} not found")
    rows: dict[int, dict[int, np.ndarray]] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"PatientNumber", "SliceNumber", "No_Hemorrhage", *CTICH_COLUMNS.values()}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            absent = sorted(needed - set(reader.fieldnames or []))
            raise DatasetError(f"{csv_path}: missing columns {absent}")
        for line, row in enumerate(reader, start=2):
            try:
                patient, number = int(row["PatientNumber"]), int(row["SliceNumber"])
                flags = {k: int(row[v]) for k, v in CTICH_COLUMNS.items()}
                no_blood = int(row["No_Hemorrhage"])
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{csv_path}:{line}: not a number ({exc})") from exc
            if any(v not in (0, 1) for v in (*flags.values(), no_blood)):
                raise DatasetError(f"{csv_path}:{line}: labels must be 0 or 1")
            labels = np.zeros(len(CLASSES), dtype=bool)
            for name, value in flags.items():
                labels[CLASSES.index(name)] = bool(value)
            # A slice is positive when it is not marked "no hemorrhage" or names a subtype.
            labels[0] = (not no_blood) or bool(labels[1:].any())
            rows.setdefault(patient, {})[number] = labels
    if not rows:
        raise DatasetError(f"{csv_path} holds no slices")
    out = {}
    for patient, per_slice in rows.items():
        numbers = tuple(sorted(per_slice))
        out[patient] = CtIchPatient(patient, numbers, np.stack([per_slice[n] for n in numbers]))
    return out


def ctich_volume(
    hu: np.ndarray, spacing: tuple[float, float, float], key: str
) -> Volume:
    """A :class:`Volume` around a CT-ICH array (axial, feet to head, synthetic UIDs)."""
    z, rows, cols = hu.shape
    dz, dy, dx = spacing
    return Volume(
        hu=hu,
        spacing=spacing,
        slice_positions=np.arange(z, dtype=np.float64) * dz,
        image_orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-dx * cols / 2.0, -dy * rows / 2.0, 0.0),
        sop_instance_uids=[f"{key}.{i + 1}" for i in range(z)],
        datasets=[],
        study_instance_uid=f"ctich.{key}",
        series_instance_uid=f"ctich.{key}",
    )


class CtIchDataset:
    """CT-ICH in its v1.0.0 (JPEG windows) or v1.3.1 (NIfTI) layout, detected from ``root``.

    ``series`` lists one :class:`CtIchPatient` per patient that has images;
    ``load`` reads one. Slices are ordered by slice number, which runs from the
    skull base to the vertex in both layouts (v1.3.1 follows the NIfTI affine).
    """

    def __init__(self, root: Path, *, pixel_mm: float = CTICH_PIXEL_MM) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"CT-ICH folder {root} not found")
        self.root = root
        self.pixel_mm = pixel_mm
        if (root / "hemorrhage_diagnosis.csv").is_file() and (root / "Patients_CT").is_dir():
            self.layout = "v1.0.0"
            labels = read_ctich_labels(root / "hemorrhage_diagnosis.csv")
            present = {int(p.name) for p in (root / "Patients_CT").iterdir()
                       if p.is_dir() and p.name.isdigit()}
        elif (root / "hemorrhage_diagnosis_raw_ct.csv").is_file() and (root / "ct_scans").is_dir():
            self.layout = "v1.3.1"
            labels = read_ctich_labels(root / "hemorrhage_diagnosis_raw_ct.csv")
            present = {int(p.name.split(".")[0]) for p in (root / "ct_scans").glob("*.nii*")
                       if p.name.split(".")[0].isdigit()}
        else:
            raise DatasetError(
                f"{root} is not a CT-ICH folder: expected hemorrhage_diagnosis.csv and "
                "Patients_CT/ (v1.0.0) or hemorrhage_diagnosis_raw_ct.csv and ct_scans/ (v1.3.1)"
            )
        missing = sorted(set(labels) - present)
        if missing:
            logger.info("CT-ICH: %d labelled patients have no images here", len(missing))
        self.series: list[CtIchPatient] = [labels[n] for n in sorted(present & set(labels))]
        if not self.series:
            raise DatasetError(f"no labelled CT-ICH patients under {root}")
        logger.info("CT-ICH %s: %d patients", self.layout, len(self.series))

    def load(self, ref: CtIchPatient) -> LabelledVolume:
        """Read one patient (HU volume, slice labels, masks where published)."""
        if self.layout == "v1.0.0":
            return self._load_jpeg(ref)
        return self._load_nifti(ref)

    def _load_jpeg(self, ref: CtIchPatient) -> LabelledVolume:
        folder = self.root / "Patients_CT" / f"{ref.number:03d}"
        if not folder.is_dir():
            folder = self.root / "Patients_CT" / str(ref.number)
        slices, masks, mask_slices = [], [], []
        for n in ref.slice_numbers:
            brain_path = folder / "brain" / f"{n}.jpg"
            bone_path = folder / "bone" / f"{n}.jpg"
            if not brain_path.is_file():
                raise DatasetError(f"CT-ICH patient {ref.number}: {brain_path} is missing")
            brain = _read_grey(brain_path)
            bone = None
            if bone_path.is_file():
                bone = _read_grey(bone_path)
            else:
                logger.info("CT-ICH patient %d slice %d: no bone image, brain window alone",
                            ref.number, n)
            if bone is not None and bone.shape != brain.shape:
                raise DatasetError(f"CT-ICH patient {ref.number} slice {n}: brain and bone "
                                   "images differ in size")
            slices.append(ctich_hu(brain, bone))
            seg_path = folder / "brain" / f"{n}_HGE_Seg.jpg"
            if seg_path.is_file():
                masks.append(_read_grey(seg_path) >= 128)
                mask_slices.append(True)
            else:
                masks.append(np.zeros(brain.shape, dtype=bool))
                mask_slices.append(False)
        if len({s.shape for s in slices}) != 1:
            raise DatasetError(f"CT-ICH patient {ref.number}: slices differ in size")
        hu = np.stack(slices)
        spacing = (CTICH_SLICE_MM, self.pixel_mm, self.pixel_mm)
        blood = np.stack(masks)
        published = np.array(mask_slices, dtype=bool)
        return self._labelled(ref, hu, spacing, blood, published | ~ref.slice_labels[:, 0],
                              published)

    def _load_nifti(self, ref: CtIchPatient) -> LabelledVolume:
        import nibabel as nib
        from nibabel import orientations as ornt

        def path_of(folder: str) -> Path | None:
            for suffix in (".nii", ".nii.gz"):
                for name in (f"{ref.number:03d}", str(ref.number)):
                    p = self.root / folder / f"{name}{suffix}"
                    if p.is_file():
                        return p
            return None

        scan_path = path_of("ct_scans")
        if scan_path is None:
            raise DatasetError(f"CT-ICH patient {ref.number}: no ct_scans/ NIfTI")
        img: Any = nib.load(str(scan_path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim != 3:
            raise DatasetError(f"{scan_path}: expected a 3D volume, got {data.shape}")
        # Array axes to L, P, S (DICOM patient axes: column, row, slice).
        transform = ornt.ornt_transform(ornt.io_orientation(img.affine),
                                        ornt.axcodes2ornt(("L", "P", "S")))
        if int(transform[2, 0]) != 2:
            raise DatasetError(f"{scan_path}: the third array axis is not head-feet")
        zooms = img.header.get_zooms()[:3]

        def to_lps(array: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(ornt.apply_orientation(array, transform).transpose(2, 1, 0))

        hu = np.rint(to_lps(data)).astype(np.float32)
        if hu.shape[0] != len(ref.slice_numbers):
            raise DatasetError(f"{scan_path}: {hu.shape[0]} slices, but the csv labels "
                               f"{len(ref.slice_numbers)}")
        # Slice numbers count along the file's third axis; follow it through any flip.
        file_index = np.arange(data.shape[2])
        if transform[2, 1] < 0:
            file_index = file_index[::-1]
        labels = ref.slice_labels[file_index]
        spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
        mask_path = path_of("masks")
        if mask_path is not None:
            mask_img: Any = nib.load(str(mask_path))
            blood = to_lps(np.asarray(mask_img.dataobj) > 0)
            if blood.shape != hu.shape:
                raise DatasetError(f"{mask_path}: shape {blood.shape} differs from the scan")
            known = np.ones(hu.shape[0], dtype=bool)
        else:
            blood = np.zeros(hu.shape, dtype=bool)
            known = ~labels[:, 0]
        ordered = CtIchPatient(ref.number, tuple(ref.slice_numbers[i] for i in file_index),
                               labels)
        return self._labelled(ordered, hu, spacing, blood, known, known & labels[:, 0])

    @staticmethod
    def _labelled(
        ref: CtIchPatient,
        hu: np.ndarray,
        spacing: tuple[float, float, float],
        blood: np.ndarray,
        known: np.ndarray,
        published: np.ndarray,
    ) -> LabelledVolume:
        """Put the any-blood mask of each known slice into the subtype channels that
        slice is labelled with (all of them where several are)."""
        masks = np.zeros((len(SUBTYPES), *hu.shape), dtype=bool)
        for k in np.flatnonzero(published):
            for i, name in enumerate(SUBTYPES):
                if ref.slice_labels[k, CLASSES.index(name)]:
                    masks[i, k] = blood[k]
        return LabelledVolume(
            key=ref.key,
            volume=ctich_volume(hu, spacing, ref.key),
            series_labels=ref.series_labels,
            slice_labels=ref.slice_labels.copy(),
            masks=masks,
            mask_slices=np.asarray(known, dtype=bool),
            blood_slices=np.asarray(published, dtype=bool),
        )


def patient_folds(keys: Sequence[str], labels: Sequence[bool], folds: int,
                  seed: int) -> list[int]:
    """Fold index (0..folds-1) of each patient: stratified by ``labels``, shuffled by ``seed``."""
    if folds < 2 or folds > len(keys):
        raise DatasetError(f"--folds must be between 2 and the number of patients ({len(keys)})")
    rng = np.random.default_rng(seed)
    out = [0] * len(keys)
    offset = 0
    for value in (True, False):
        members = [i for i, lab in enumerate(labels) if bool(lab) == value]
        members = [members[j] for j in rng.permutation(len(members))]
        for j, i in enumerate(members):
            out[i] = (offset + j) % folds
        offset += len(members)
    return out


def iter_loaded(
    dataset: RsnaDataset | Cq500Dataset | CtIchDataset, refs: Sequence[Any]
) -> Iterator[LabelledVolume]:
    """Load ``refs`` in order, skipping (with a warning) series that cannot be analysed."""
    for ref in refs:
        try:
            yield dataset.load(ref)
        except SeriesSkipped as exc:
            logger.warning("skipping series %s: %s", ref.key, exc.reason)


__all__ = [
    "CLASSES",
    "SUBTYPES",
    "Cq500Dataset",
    "CtIchDataset",
    "DatasetError",
    "LabelledVolume",
    "RsnaDataset",
    "SeriesRef",
    "iter_loaded",
    "labels_from_masks",
    "parse_seeds",
    "phantom_case",
    "phantom_cases",
    "split_of",
]
