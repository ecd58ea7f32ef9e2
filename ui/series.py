"""What the viewer shows for one series, whatever its source (the node's archive or an upload).

:class:`ViewerData` gathers the HU volume, the headers, the subtype masks,
Grad-CAM, per-slice probabilities and the series-level finding.
:func:`from_findings` builds it from an in-process prediction;
:func:`masks_from_seg` reads the masks back from a stored DICOM Segmentation.
No Streamlit here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom import Dataset

from inference.findings import CLASSES, SUBTYPES, SeriesFindings, SliceResult, SubtypeFinding
from inference.volume import Volume

logger = logging.getLogger(__name__)


@dataclass
class ViewerData:
    """One series ready for the viewer.

    ``masks`` bool (5, z, y, x) in ``SUBTYPES`` order, ``gradcam`` float (z, y, x),
    ``slice_probabilities`` float (z, 6) in ``CLASSES`` order (NaN where unknown);
    each may be None. ``volume`` is the source volume when known (to run the
    model again). ``outputs`` maps a file name to the bytes of a downloadable
    result object (SEG, SR, SC). ``hemorrhage`` is None when the series has not
    been analysed; ``note`` says why in one line.
    """

    title: str
    study_instance_uid: str
    series_instance_uid: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]
    sop_instance_uids: list[str]
    masks: np.ndarray | None = None
    gradcam: np.ndarray | None = None
    slice_probabilities: np.ndarray | None = None
    hemorrhage: bool | None = None
    hemorrhage_probability: float | None = None
    subtypes: dict[str, SubtypeFinding] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)
    note: str = ""
    volume: Volume | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        z = self.hu.shape[0]
        if self.hu.ndim != 3:
            raise ValueError(f"volume must be (z, y, x), got shape {self.hu.shape}")
        if len(self.datasets) != z or len(self.sop_instance_uids) != z:
            raise ValueError(
                f"{z} slices but {len(self.datasets)} headers and "
                f"{len(self.sop_instance_uids)} SOP Instance UIDs"
            )
        if self.masks is not None and self.masks.shape != (len(SUBTYPES), *self.hu.shape):
            raise ValueError(f"mask shape {self.masks.shape} does not match the volume")
        if self.gradcam is not None and self.gradcam.shape != self.hu.shape:
            raise ValueError(f"Grad-CAM shape {self.gradcam.shape} does not match the volume")
        if self.slice_probabilities is not None and self.slice_probabilities.shape != (
            z,
            len(CLASSES),
        ):
            raise ValueError(
                f"slice probabilities shape {self.slice_probabilities.shape} "
                f"does not match ({z}, {len(CLASSES)})"
            )

    @property
    def n_slices(self) -> int:
        """Number of slices."""
        return int(self.hu.shape[0])

    @property
    def analysed(self) -> bool:
        """True once a finding (positive or negative) is known."""
        return self.hemorrhage is not None

    def subtypes_found(self) -> list[str]:
        """Subtypes decided present, in ``SUBTYPES`` order."""
        return [name for name in SUBTYPES if name in self.subtypes and self.subtypes[name].present]

    def subtypes_with_mask(self) -> list[str]:
        """Subtypes with at least one voxel in ``masks``."""
        if self.masks is None:
            return []
        return [name for i, name in enumerate(SUBTYPES) if bool(self.masks[i].any())]


def slice_probability_array(slices: list[SliceResult], sop_instance_uids: list[str]) -> np.ndarray:
    """Per-slice probabilities as (z, 6) in ``CLASSES`` order, aligned to ``sop_instance_uids``.

    Slices without a result (or classes missing from a result) are NaN.
    """
    by_uid = {s.sop_instance_uid: s.probabilities for s in slices}
    out = np.full((len(sop_instance_uids), len(CLASSES)), np.nan, dtype=np.float32)
    for row, uid in enumerate(sop_instance_uids):
        probs = by_uid.get(uid)
        if probs is None:
            continue
        for column, name in enumerate(CLASSES):
            if name in probs:
                out[row, column] = float(probs[name])
    return out


def _reorder(
    array: np.ndarray | None, source: list[str], target: list[str], axis: int
) -> np.ndarray | None:
    """Reorder ``array`` along ``axis`` from the ``source`` slice order to ``target``."""
    if array is None or source == target:
        return array
    position = {uid: i for i, uid in enumerate(source)}
    missing = [uid for uid in target if uid not in position]
    if missing:
        raise ValueError(f"the findings do not cover slice {missing[0]}")
    return np.take(array, [position[uid] for uid in target], axis=axis)


def from_findings(volume: Volume, findings: SeriesFindings, title: str) -> ViewerData:
    """Viewer data from a volume and what the predictor found in it."""
    target = list(volume.sop_instance_uids)
    source = list(findings.sop_instance_uids)
    masks = _reorder(np.asarray(findings.masks, dtype=bool), source, target, axis=1)
    gradcam = _reorder(findings.gradcam, source, target, axis=0)
    return ViewerData(
        title=title,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        hu=volume.hu,
        spacing=volume.spacing,
        datasets=list(volume.datasets),
        sop_instance_uids=target,
        masks=masks,
        gradcam=None if gradcam is None else np.asarray(gradcam, dtype=np.float32),
        slice_probabilities=slice_probability_array(findings.slices, target),
        hemorrhage=bool(findings.hemorrhage_present),
        hemorrhage_probability=float(findings.hemorrhage_probability),
        subtypes=dict(findings.subtypes),
        volume=volume,
    )


def _subtype_of_segment(description: hd.seg.SegmentDescription) -> str | None:
    """The subtype a SEG segment stands for, from its label (ichnode writes the subtype name)."""
    label = str(getattr(description, "SegmentLabel", "")).strip().lower()
    for name in SUBTYPES:
        if name in label:
            return name
    meaning = str(description.segmented_property_type.meaning).lower()
    for name in SUBTYPES:
        if name in meaning:
            return name
    return None


def masks_from_seg(
    seg: hd.seg.Segmentation, sop_instance_uids: list[str], shape: tuple[int, int, int]
) -> np.ndarray:
    """The (5, z, y, x) subtype masks held by a Segmentation of this series.

    Slices the SEG has no frame for are empty. Segments whose label names no
    subtype are ignored (logged).
    """
    z, rows, columns = shape
    masks = np.zeros((len(SUBTYPES), z, rows, columns), dtype=bool)
    numbers: list[int] = []
    channels: list[int] = []
    for number in seg.segment_numbers:
        subtype = _subtype_of_segment(seg.get_segment_description(number))
        if subtype is None:
            logger.warning(
                "segment %d of SEG %s names no subtype; ignored", number, seg.SOPInstanceUID
            )
            continue
        numbers.append(number)
        channels.append(SUBTYPES.index(subtype))
    if not numbers:
        return masks
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    wanted = [uid for uid in sop_instance_uids if uid in referenced]
    if not wanted:
        return masks
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=wanted,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        ignore_spatial_locations=True,
    )
    if pixels.shape[1:3] != (rows, columns):
        raise ValueError(
            f"SEG frames are {pixels.shape[1]}×{pixels.shape[2]}, the series is {rows}×{columns}"
        )
    index = {uid: i for i, uid in enumerate(sop_instance_uids)}
    for k, uid in enumerate(wanted):
        for j, channel in enumerate(channels):
            masks[channel, index[uid]] |= pixels[k, :, :, j] > 0
    return masks
