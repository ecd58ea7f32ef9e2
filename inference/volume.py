"""DICOM series to a volume in Hounsfield units with its geometry.

This module owns the step from pydicom datasets to a :class:`Volume`: reading
files and folders and grouping them by series (:func:`read_series`), deciding
whether a series can be analysed (:class:`SeriesSkipped` with a short reason),
sorting slices along the slice normal, decoding any transfer syntax pydicom and
its plugins can decode, and turning stored values into HU (rescale slope and
intercept, pixel padding). It knows nothing of networking or databases.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

AIR_HU = -1024.0
"""HU given to padded pixels (PixelPaddingValue) and to nothing else."""

PIXEL_DATA = 0x7FE00010
_DEFER_SIZE = 4096  # bytes: bigger values (pixel data) are read only when needed
_OWN_MANUFACTURER = "ichnode"
_POSITION_TOLERANCE = 0.01  # mm: closer slice positions are duplicates
_ORIENTATION_TOLERANCE = 1e-3


class SeriesSkipped(Exception):
    """A series that cannot be analysed; ``reason`` is a short human sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SeriesLimits:
    """How big a series may be to be analysed; None: no limit.

    A worker's memory grows with the voxels of a series (HU volume, network
    input) and with its slices (one header and one result reference each), so
    both are bounded before any pixel data is decoded.
    """

    max_slices: int | None = None
    max_voxels: int | None = None

    def check(self, slices: int, rows: int, columns: int) -> None:
        """Raise :class:`SeriesSkipped` when ``slices`` of ``rows`` x ``columns`` exceed a limit."""
        if self.max_slices is not None and slices > self.max_slices:
            raise SeriesSkipped(
                f"{slices} slices, more than the {self.max_slices} allowed per series"
            )
        voxels = slices * max(rows, 0) * max(columns, 0)
        if self.max_voxels is not None and voxels > self.max_voxels:
            raise SeriesSkipped(
                f"{voxels} voxels ({slices} x {rows} x {columns}), more than the "
                f"{self.max_voxels} allowed per series"
            )


@dataclass
class Volume:
    """One series as a HU volume.

    ``hu`` is float32 (z, y, x), slices sorted along the slice normal (ascending
    position), rows and columns as stored. ``spacing`` is (dz, dy, dx) in mm with dz
    the median spacing between slice positions; ``slice_positions`` the position
    of each slice along the normal (mm), so variable spacing is kept.
    ``datasets`` are the source headers in the same order (pixel data may be
    dropped to save memory).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    slice_positions: np.ndarray
    image_orientation: tuple[float, ...]
    origin: tuple[float, float, float]
    sop_instance_uids: list[str]
    datasets: list[Dataset]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None = None

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL from the true pixel spacing and slice spacing."""
        dz, dy, dx = self.spacing
        return float(dz * dy * dx) / 1000.0

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row direction x column direction), patient LPS."""
        return _normal(self.image_orientation)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        raise SeriesSkipped("degenerate ImageOrientationPatient")
    return np.asarray(n / norm)


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """Numeric multi-value ``keyword`` of ``ds`` or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        value = [value]
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(np.isfinite(values)):
        return None
    return values


def _float(ds: Dataset, keyword: str, default: float) -> float:
    value = _floats(ds, keyword, 1)
    return value[0] if value else default


def _has_pixels(ds: Dataset) -> bool:
    """Whether ``ds`` holds pixel data, or came from a file read without it."""
    return PIXEL_DATA in ds or getattr(ds, "filename", None) is not None and _file_has_pixels(ds)


def _file_has_pixels(ds: Dataset) -> bool:
    filename = ds.filename
    if not isinstance(filename, str | os.PathLike):
        return False
    try:
        full = dcmread(filename, defer_size=_DEFER_SIZE, force=True)
    except (OSError, InvalidDicomError, EOFError, ValueError):
        return False
    return PIXEL_DATA in full


def _check_series(datasets: Sequence[Dataset]) -> None:
    """Raise :class:`SeriesSkipped` for series ichnode does not analyse."""
    if not datasets:
        raise SeriesSkipped("no images")
    first = datasets[0]
    modalities = {str(ds.get("Modality", "")).upper() for ds in datasets}
    manufacturers = {str(ds.get("Manufacturer", "")).strip() for ds in datasets}
    if modalities & {"SEG", "SR"} or _OWN_MANUFACTURER in manufacturers:
        raise SeriesSkipped("ichnode's own output")
    if modalities != {"CT"}:
        names = ", ".join(sorted(m or "none" for m in modalities))
        raise SeriesSkipped(f"not CT (modality {names})")
    for ds in datasets:
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            raise SeriesSkipped("localizer (scout) images")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise SeriesSkipped(f"datasets from {len(series)} series")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesSkipped("multi-frame images")
    missing = sum(not _has_pixels(ds) for ds in datasets)
    if missing:
        raise SeriesSkipped(f"no pixel data in {missing} of {len(datasets)} instances")
    if any(int(ds.get("SamplesPerPixel", 1)) != 1 for ds in datasets):
        raise SeriesSkipped("not a greyscale image")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise SeriesSkipped(f"mixed matrix sizes {sorted(sizes)}")
    if _floats(first, "PixelSpacing", 2) is None:
        raise SeriesSkipped("no PixelSpacing")
    spacings = {_floats(ds, "PixelSpacing", 2) for ds in datasets}
    if len(spacings) > 1:
        raise SeriesSkipped("mixed pixel spacing")
    if len(datasets) > 1:
        orientations = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
        positions = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
        if any(o is None for o in orientations) or any(p is None for p in positions):
            raise SeriesSkipped("missing ImageOrientationPatient or ImagePositionPatient")
        ref = np.asarray(orientations[0])
        if any(np.abs(np.asarray(o) - ref).max() > _ORIENTATION_TOLERANCE for o in orientations):
            raise SeriesSkipped("mixed image orientations")


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """Stored values of one frame, decoded; read from the file when deferred or absent."""
    from pydicom.pixels import pixel_array

    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    deferred = isinstance(raw, RawDataElement) and raw.value is None
    try:
        if (raw is None or deferred) and getattr(ds, "filename", None):
            # Decode straight from the file: the dataset never caches the pixel bytes.
            return np.asarray(pixel_array(ds.filename))
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            return np.asarray(pixel_array(_with_native_syntax(ds)))
        return np.asarray(pixel_array(ds))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, EOFError) as exc:
        uid = ds.get("SOPInstanceUID", "?")
        raise SeriesSkipped(f"pixel data of {uid} cannot be decoded: {exc}") from exc


def _with_native_syntax(ds: Dataset) -> Dataset:
    """A shallow view of ``ds`` with a little-endian transfer syntax for its native pixels.

    Datasets built in memory (or received without file meta) hold uncompressed
    pixel data in the machine's little-endian order; encapsulated data need the
    real transfer syntax and are refused.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    value = ds.PixelData
    if isinstance(value, bytes) and value[:4] == b"\xfe\xff\x00\xe0":
        raise ValueError("compressed pixel data without a transfer syntax")
    view = Dataset()
    view.update(ds)
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return view


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue (or within the padding range), if declared."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        pad = int(ds.PixelPaddingValue)
        limit = int(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else None
    except (TypeError, ValueError):
        return None
    # The same 16 bits may have been written as US or SS whatever the data are.
    candidates = {pad, pad & 0xFFFF, pad - 0x10000 if pad >= 0x8000 else pad}
    if limit is None:
        return np.isin(stored, list(candidates))
    lo, hi = sorted((pad, limit))
    return np.asarray((stored >= lo) & (stored <= hi))


def load_volume(datasets: Sequence[Dataset], limits: SeriesLimits | None = None) -> Volume:
    """Build the volume of one series.

    Parameters
    ----------
    datasets
        The instances of one series, in any order. Pixel data may be absent or
        deferred when the datasets know their ``filename``.
    limits
        Maximum slices and voxels; checked before any pixel data is decoded.

    Returns
    -------
    Volume
        Slices sorted by position along the normal of ImageOrientationPatient
        (not by InstanceNumber), values in HU; padded pixels become -1024.

    Raises
    ------
    SeriesSkipped
        Not CT, ichnode's own output, a localizer, no pixel data, mixed matrix
        sizes, pixel spacing or orientations, duplicate slice positions, pixel
        data that cannot be decoded, or more slices or voxels than ``limits``.
    """
    datasets = list(datasets)
    if limits is not None and datasets:
        limits.check(
            len(datasets),
            int(datasets[0].get("Rows", 0) or 0),
            int(datasets[0].get("Columns", 0) or 0),
        )
    _check_series(datasets)
    first = datasets[0]
    orientation = _floats(first, "ImageOrientationPatient", 6)
    if orientation is None:  # only a single slice gets here without one
        orientation = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    normal = _normal(orientation)
    positions = np.array(
        [np.asarray(_floats(ds, "ImagePositionPatient", 3) or (0.0, 0.0, 0.0)) for ds in datasets],
        dtype=float,
    )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    ordered = [datasets[i] for i in order]
    steps = np.diff(along)
    if steps.size and float(steps.min()) < _POSITION_TOLERANCE:
        count = int((steps < _POSITION_TOLERANCE).sum())
        raise SeriesSkipped(f"duplicate slice positions ({count})")
    if steps.size:
        dz = float(np.median(steps))
    else:
        dz = _float(first, "SpacingBetweenSlices", 0.0) or _float(first, "SliceThickness", 1.0)
        dz = dz if dz > 0 else 1.0
    row_spacing, col_spacing = _floats(first, "PixelSpacing", 2) or (1.0, 1.0)

    rows, cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(ordered), rows, cols), dtype=np.float32)
    for k, ds in enumerate(ordered):
        stored = _stored_pixels(ds)
        if stored.shape != (rows, cols):
            raise SeriesSkipped(
                f"pixel data of {ds.get('SOPInstanceUID', '?')} has shape {stored.shape}"
            )
        slope = _float(ds, "RescaleSlope", 1.0)
        intercept = _float(ds, "RescaleIntercept", 0.0)
        np.multiply(stored, np.float32(slope), out=hu[k], casting="unsafe")
        hu[k] += np.float32(intercept)
        padded = _padding_mask(ds, stored)
        if padded is not None:
            hu[k][padded] = AIR_HU
    if steps.size and float(steps.max() - steps.min()) > 0.01 * dz + 1e-3:
        logger.info(
            "series %s has variable slice spacing %.3f-%.3f mm",
            first.get("SeriesInstanceUID", "?"),
            float(steps.min()),
            float(steps.max()),
        )
    origin = positions[order[0]]
    frame_uid = first.get("FrameOfReferenceUID")
    return Volume(
        hu=hu,
        spacing=(dz, float(row_spacing), float(col_spacing)),
        slice_positions=along,
        image_orientation=tuple(float(v) for v in orientation),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        sop_instance_uids=[str(ds.get("SOPInstanceUID", "")) for ds in ordered],
        datasets=ordered,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(frame_uid) if frame_uid else None,
    )


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def _read_one(path: Path) -> Dataset:
    """Read one file with deferred pixel data; raise ValueError with a short reason."""
    try:
        ds = dcmread(path, defer_size=_DEFER_SIZE)
    except InvalidDicomError:
        # Some old files lack the 128-byte preamble; accept them only when what was
        # read looks like an image header.
        try:
            ds = dcmread(path, defer_size=_DEFER_SIZE, force=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
            raise ValueError("not a DICOM file") from exc
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            raise ValueError("not a DICOM file") from None
    except EOFError as exc:
        raise ValueError("truncated DICOM file") from exc
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise ValueError(f"unreadable DICOM file: {exc}") from exc
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is not None and transfer_syntax.is_deflated:
        # Deferred values point into the inflated stream, not the file: read it all.
        try:
            return dcmread(path, force=True)
        except (EOFError, ValueError, OSError) as exc:
            raise ValueError(f"unreadable deflated DICOM file: {exc}") from exc
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length != 0xFFFFFFFF:
        end = raw.value_tell + raw.length
        if end > path.stat().st_size:
            raise ValueError("truncated DICOM file (pixel data cut short)")
    if "SeriesInstanceUID" not in ds:
        media = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if media == "1.2.840.10008.1.3.10":
            raise ValueError("DICOMDIR, not an image")
        raise ValueError("no SeriesInstanceUID (not an image, or truncated)")
    return ds


def read_series(paths: Iterable[Path]) -> tuple[dict[str, list[Dataset]], list[tuple[Path, str]]]:
    """Read files and folders (recursively) and group datasets by SeriesInstanceUID.

    Pixel data are not loaded: they stay deferred in the file and
    :func:`load_volume` decodes them slice by slice.

    Parameters
    ----------
    paths
        Files and folders, in any mix.

    Returns
    -------
    groups, problems
        ``groups`` maps SeriesInstanceUID to its datasets; ``problems`` lists
        ``(path, reason)`` for files that are not readable DICOM (not DICOM,
        truncated, unreadable, no SeriesInstanceUID).
    """
    groups: dict[str, list[Dataset]] = {}
    problems: list[tuple[Path, str]] = []
    for path in _walk(paths):
        try:
            ds = _read_one(path)
        except OSError as exc:
            problems.append((path, f"cannot read: {exc.strerror or exc}"))
            continue
        except ValueError as exc:
            problems.append((path, str(exc)))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    for path, reason in problems:
        logger.info("skipped %s: %s", path, reason)
    return groups, problems
