"""Labelled data for training and evaluation: the phantom, RSNA ICH and CQ500 layouts.

Every source yields :class:`LabelledVolume` items: a :class:`~inference.volume.Volume`
with the labels a source has (per-voxel masks for the phantom, per-slice labels
for RSNA, per-scan labels for CQ500), in the volume's slice order.

* RSNA Intracranial Hemorrhage Detection: a folder of ``ID_<hex>.dcm`` single
  slices and a csv ``ID,Label`` with one row ``ID_<hex>_<class>`` per slice and
  class; series are reassembled from the headers.
* CQ500: ``reads.csv`` (``name``, ``Category``, ``R1:ICH`` ... ``R3:SAH``; the
  label is the majority of the three readers) and one folder ``CQ500-CT-<n>``
  per scan holding its series.

Torch is not needed here.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
    """

    key: str
    volume: Volume
    series_labels: np.ndarray
    slice_labels: np.ndarray | None = None
    masks: np.ndarray | None = None


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
        assert ref.slice_labels_by_sop is not None
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


def iter_loaded(
    dataset: RsnaDataset | Cq500Dataset, refs: Sequence[SeriesRef]
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
