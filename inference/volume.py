"""DICOM series to a volume in Hounsfield units with its geometry.

This module owns the step from pydicom datasets to a :class:`Volume`: reading
files and folders and grouping them by series (:func:`read_series`), deciding
whether a series can be analysed (:class:`SeriesSkipped` with a short reason),
sorting slices along the slice normal, decoding any transfer syntax pydicom and
its plugins can decode, and turning stored values into HU (rescale slope and
intercept, pixel padding). Real-world series are taken as they come: Enhanced
CT instances are split into frames by their functional groups, localizers and
stacks of another orientation inside a series are left out, a series sent
twice is deduplicated; each such choice is logged. It knows nothing of
networking or databases.
"""

from __future__ import annotations

import copy
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
_SPACING_TOLERANCE = 1e-4  # relative: closer pixel spacings are the same spacing


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
    if isinstance(ds, _Frame):
        return ds.has_pixels
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


class _Frame(Dataset):
    """One frame of a multi-frame CT image (Enhanced CT), as a single-frame header.

    The source's attributes with its shared and per-frame functional groups
    flattened in (PixelSpacing, ImageOrientationPatient, ImagePositionPatient,
    RescaleSlope/Intercept ...); ``source`` and ``frame_index`` say where the
    pixels are. SOPInstanceUID is the source's: every frame is part of it.
    """

    source: Dataset
    frame_index: int
    has_pixels: bool


_FRAME_LEVEL = {
    PIXEL_DATA,
    0x00280008,  # NumberOfFrames
    0x52009229,  # SharedFunctionalGroupsSequence
    0x52009230,  # PerFrameFunctionalGroupsSequence
}


def _frames(ds: Dataset) -> list[Dataset]:
    """``ds`` itself, or one :class:`_Frame` per frame of a multi-frame image."""
    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return [ds]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if count <= 1 or per_frame is None or len(per_frame) != count:
        return [ds]  # not multi-frame, or not one ichnode can split (said by _check_series)
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    has_pixels = _has_pixels(ds)
    top = [elem for elem in ds if elem.tag not in _FRAME_LEVEL]
    frames: list[Dataset] = []
    for index, item in enumerate(per_frame):
        frame = _Frame()
        for elem in top:
            frame.add(copy.copy(elem))  # a frame's header may be changed, not the source's
        for groups in (shared[0], item):  # per-frame values override shared ones
            for group in groups:
                if group.VR == "SQ" and group.value:
                    for elem in group.value[0]:
                        if elem.VR != "SQ":
                            frame.add(elem)
        frame.source = ds
        frame.frame_index = index
        frame.has_pixels = has_pixels
        frame.filename = getattr(ds, "filename", None)
        frames.append(frame)
    return frames


def source_frame(ds: Dataset) -> tuple[Dataset, int] | None:
    """For a slice of :attr:`Volume.datasets` that is one frame of a multi-frame
    image (Enhanced CT): the multi-frame dataset and the frame's 0-based index;
    None for a single-frame image. Result objects reference that frame of that
    instance (ReferencedFrameNumber is the index + 1)."""
    if isinstance(ds, _Frame):
        return ds.source, ds.frame_index
    return None


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _main_stack(datasets: list[Dataset]) -> list[Dataset]:
    """The images of the one stack to analyse when a series holds more than one.

    Localizers inside an axial series are left out. Stacks of different
    orientation (a gantry-tilted and an untilted reconstruction) leave the one
    with the most slices, on a tie the most axial (normal closest to the
    patient's z axis); when no stack has two slices or two stacks rank equal,
    all are returned and :func:`_check_series` says "mixed image orientations".
    Each choice is logged.
    """
    series_instance_uid = datasets[0].get("SeriesInstanceUID", "?") if datasets else "?"
    localizers = [_is_localizer(ds) for ds in datasets]
    if any(localizers) and not all(localizers):
        logger.warning(
            "series %s: left out %d localizer image(s) inside the series",
            series_instance_uid,
            sum(localizers),
        )
        datasets = [ds for ds, scout in zip(datasets, localizers, strict=True) if not scout]
    orientations = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    if len(datasets) < 2 or any(o is None for o in orientations):
        return datasets
    references: list[tuple[float, ...]] = []
    stacks: list[list[int]] = []
    known = [o for o in orientations if o is not None]  # all of them, checked above
    for i, orientation in enumerate(known):
        for reference, members in zip(references, stacks, strict=True):
            if np.abs(np.subtract(orientation, reference)).max() <= _ORIENTATION_TOLERANCE:
                members.append(i)
                break
        else:
            references.append(orientation)
            stacks.append([i])
    if len(stacks) == 1:
        return datasets
    normals = [_normal(r) for r in references]
    ranks = [
        (len(members), round(abs(float(n[2])), 6))
        for members, n in zip(stacks, normals, strict=True)
    ]
    order = sorted(range(len(stacks)), key=lambda j: ranks[j], reverse=True)
    best = order[0]
    if ranks[best][0] < 2 or ranks[order[1]] == ranks[best]:
        return datasets
    n = normals[best]
    logger.warning(
        "series %s: %d stacks with different orientations (%s slices); analysing the "
        "%d-slice stack with normal (%.3f, %.3f, %.3f), leaving out %d images",
        series_instance_uid,
        len(stacks),
        ", ".join(str(len(m)) for m in stacks),
        len(stacks[best]),
        float(n[0]),
        float(n[1]),
        float(n[2]),
        len(datasets) - len(stacks[best]),
    )
    return [datasets[i] for i in sorted(stacks[best])]


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
        # _frames splits those with per-frame functional groups (Enhanced CT)
        raise SeriesSkipped("multi-frame images without per-frame functional groups")
    missing = sum(not _has_pixels(ds) for ds in datasets)
    if missing:
        raise SeriesSkipped(f"no pixel data in {missing} of {len(datasets)} instances")
    if any(int(ds.get("SamplesPerPixel", 1)) != 1 for ds in datasets):
        raise SeriesSkipped("not a greyscale image")
    sizes = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in datasets}
    if len(sizes) > 1:
        raise SeriesSkipped(f"mixed matrix sizes {sorted(sizes)}")
    spacing = _floats(first, "PixelSpacing", 2)
    if spacing is None:
        raise SeriesSkipped("no PixelSpacing")
    spacings = [_floats(ds, "PixelSpacing", 2) for ds in datasets]
    absent = sum(s is None for s in spacings)
    if absent:
        raise SeriesSkipped(f"no PixelSpacing in {absent} of {len(datasets)} instances")
    # The same spacing is written with different precision by some scanners
    # (0.48828125 and 0.488281): equal within _SPACING_TOLERANCE is one spacing.
    limit = _SPACING_TOLERANCE * max(spacing)
    if any(np.abs(np.asarray(s) - spacing).max() > limit for s in spacings):
        found = sorted({round(v, 4) for s in spacings if s is not None for v in s})
        text = ", ".join(f"{v:g}" for v in found)
        raise SeriesSkipped(f"mixed pixel spacing ({text} mm)")
    if len(datasets) > 1:
        orientations = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
        positions = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
        for keyword, values in (
            ("ImageOrientationPatient", orientations),
            ("ImagePositionPatient", positions),
        ):
            absent = sum(v is None for v in values)
            if absent:
                raise SeriesSkipped(f"no {keyword} in {absent} of {len(datasets)} instances")
        ref = np.asarray(orientations[0])
        if any(np.abs(np.asarray(o) - ref).max() > _ORIENTATION_TOLERANCE for o in orientations):
            raise SeriesSkipped("mixed image orientations")


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """Stored values of one frame, decoded; read from the file when deferred or absent."""
    from pydicom.pixels import pixel_array

    index = None
    if isinstance(ds, _Frame):
        ds, index = ds.source, ds.frame_index
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
    deferred = isinstance(raw, RawDataElement) and raw.value is None
    try:
        if index is not None:
            return _frame_pixels(ds, index, deferred or raw is None)
        if (raw is None or deferred) and getattr(ds, "filename", None):
            # Decode straight from the file: the dataset never caches the pixel bytes.
            return np.asarray(pixel_array(ds.filename))
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            return np.asarray(pixel_array(_with_native_syntax(ds)))
        return np.asarray(pixel_array(ds))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, EOFError) as exc:
        uid = ds.get("SOPInstanceUID", "?")
        raise SeriesSkipped(f"pixel data of {uid} cannot be decoded: {exc}") from exc


def _frame_pixels(ds: Dataset, index: int, from_file: bool) -> np.ndarray:
    """Stored values of frame ``index`` of a multi-frame image, decoding that frame only."""
    from pydicom.pixels import get_decoder, pixel_array

    if from_file and getattr(ds, "filename", None):
        return np.asarray(pixel_array(ds.filename, index=index))
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds = _with_native_syntax(ds)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    return np.asarray(decoder.as_array(ds, index=index)[0])


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


def _decode_hu(ds: Dataset, out: np.ndarray) -> None:
    """Decode one slice into ``out`` in HU: rescale, then padded pixels to air."""
    stored = _stored_pixels(ds)
    if stored.shape != out.shape:
        raise SeriesSkipped(
            f"pixel data of {ds.get('SOPInstanceUID', '?')} has shape {stored.shape}"
        )
    slope = _float(ds, "RescaleSlope", 1.0)
    intercept = _float(ds, "RescaleIntercept", 0.0)
    np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    out += np.float32(intercept)
    padded = _padding_mask(ds, stored)
    if padded is not None:
        out[padded] = AIR_HU


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
        A multi-frame image with per-frame functional groups (Enhanced CT)
        gives one slice per frame (see :func:`source_frame`). Localizers inside
        the series and stacks of another orientation are left out (the stack
        with the most slices, on a tie the most axial, is kept); instances at
        the same position with the same pixels (a series sent twice) are kept
        once. Pixel spacings equal to 1e-4 (relative) are one spacing.

    Raises
    ------
    SeriesSkipped
        Not CT, ichnode's own output, only localizers, no pixel data, mixed
        matrix sizes, pixel spacing or orientations (no one main stack), no
        ImagePositionPatient on some slices, different images at one slice
        position, pixel data that cannot be decoded, or more slices or voxels
        than ``limits``.
    """
    datasets = [frame for ds in datasets for frame in _frames(ds)]
    if limits is not None and datasets:
        limits.check(
            len(datasets),
            int(datasets[0].get("Rows", 0) or 0),
            int(datasets[0].get("Columns", 0) or 0),
        )
    if len({str(ds.get("SeriesInstanceUID", "")) for ds in datasets}) == 1:
        datasets = _main_stack(datasets)  # several series are refused by _check_series
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
    # A series sent again with new SOP Instance UIDs has two instances per position:
    # one of each is kept when their pixels agree (checked while decoding below).
    duplicate = np.concatenate([[False], np.diff(along) < _POSITION_TOLERANCE])
    slot = np.cumsum(~duplicate) - 1  # the volume slice each instance belongs to
    along = along[~duplicate]
    kept = [ds for ds, dup in zip(ordered, duplicate, strict=True) if not dup]
    steps = np.diff(along)
    if steps.size:
        dz = float(np.median(steps))
    else:
        dz = _float(first, "SpacingBetweenSlices", 0.0) or _float(first, "SliceThickness", 1.0)
        dz = dz if dz > 0 else 1.0
    row_spacing, col_spacing = _floats(first, "PixelSpacing", 2) or (1.0, 1.0)

    rows, cols = int(first.Rows), int(first.Columns)
    hu = np.empty((len(kept), rows, cols), dtype=np.float32)
    spare = np.empty((rows, cols), dtype=np.float32)  # a duplicate, to compare
    conflicts = set()
    for ds, k, dup in zip(ordered, slot, duplicate, strict=True):
        if not dup:
            _decode_hu(ds, hu[k])
            continue
        _decode_hu(ds, spare)
        if not np.array_equal(spare, hu[k]):
            conflicts.add(int(k))
    if conflicts:
        raise SeriesSkipped(
            f"different images at {len(conflicts)} of {len(kept)} slice positions "
            "(more than one reconstruction in one series)"
        )
    if duplicate.any():
        logger.warning(
            "series %s: dropped %d duplicate instances (same position and pixels as another, "
            "e.g. the series sent again with new SOP Instance UIDs)",
            first.get("SeriesInstanceUID", "?"),
            int(duplicate.sum()),
        )
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
        sop_instance_uids=[str(ds.get("SOPInstanceUID", "")) for ds in kept],
        datasets=kept,
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
