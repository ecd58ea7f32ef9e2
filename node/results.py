"""The DICOM result objects of one analysed series: SEG, TID 1500 SR and SC key images.

This module owns how :class:`inference.findings.SeriesFindings` become DICOM:
the codes (SNOMED CT, DICOM, UCUM), the new series each object goes into, what
is copied from the source headers (sanitised first, so our objects stay valid
when the scanner's are not), and how the node recognises its own output so it
never analyses it. SEG and SR are built only through highdicom.

Answers degrade, never vanish: :func:`build_results` builds each object on
its own, and one that cannot be built is named with its reason in the SR
(TEXT items of the TID 1500 Qualitative Evaluations container, read back with
:func:`report_notes`); :func:`build_not_analysed_report` answers a series that
could not be analysed at all.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from config import ICHNODE_VERSION
from inference.findings import SUBTYPES, SeriesFindings
from inference.volume import source_frame
from node import drawing

logger = logging.getLogger(__name__)

MANUFACTURER = "ichnode"
SEG_SERIES_DESCRIPTION = "ICH AI SEG"
SR_SERIES_DESCRIPTION = "ICH AI REPORT"
SC_SERIES_DESCRIPTION = "ICH AI KEY IMAGES"
OUR_SERIES_DESCRIPTIONS = frozenset(
    {SEG_SERIES_DESCRIPTION, SR_SERIES_DESCRIPTION, SC_SERIES_DESCRIPTION}
)
DISCLAIMER = "AI result, not for diagnosis"

# SOP classes ichnode writes (Comprehensive SR too, should a later version use it).
OUR_SOP_CLASSES = frozenset(
    {
        SegmentationStorage,
        Comprehensive3DSRStorage,
        ComprehensiveSRStorage,
        SecondaryCaptureImageStorage,
    }
)

# The same UID for the device observer in every report, derived from its name.
DEVICE_OBSERVER_UID = generate_uid(entropy_srcs=["ichnode device observer"])

# SNOMED CT concepts of the five subtypes (pydicom's code dictionary lacks them).
# Sources, checked 2026-11-26 (see the report of issue 4 for the search trail):
#  274100004 "Cerebral hemorrhage (disorder)": tecnomod-um/SK-FHIR-IG
#    input/pagecontent/valuesets-StrokeDiagnosisVS.md (SNOMED CT codes for stroke
#    diagnoses), forithmus/MR-RATE pathologies_snomed_map.json ("Intracerebral
#    hemorrhage" -> 274100004), opencodelists neuro code list.
#  274110009 "Intraventricular hemorrhage (disorder)": tecnomod-um stroke registry
#    code enum (same code set as SK-FHIR-IG); one source only. NB 230706003 is
#    "Hemorrhagic cerebral infarction", not intraventricular hemorrhage.
#  21454007 "Subarachnoid intracranial hemorrhage (disorder)": SK-FHIR-IG
#    StrokeDiagnosisVS.
#  35486000 "Subdural intracranial hemorrhage (disorder)": forithmus/MR-RATE
#    pathologies_snomed_map.json.
#  68752002 "Extradural hemorrhage (disorder)": NOT confirmed by a source found
#    here; to be checked in the SNOMED CT browser before clinical use.
SUBTYPE_CODES: dict[str, hd.sr.CodedConcept] = {
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("274110009", "SCT", "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("68752002", "SCT", "Extradural hemorrhage"),
}
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
# TID 1500 row 12: the report-level "Qualitative Evaluations" container; its TEXT
# items (concept DCM 121106 "Comment") say what is missing from the answer and why.
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NOT_ANALYSED = "not analysed"
#: The subtype colours of the key images, for the viewer too (one table, in ``node.drawing``).
SUBTYPE_COLOURS = drawing.SUBTYPE_COLOURS

_SEX = {"M", "F", "O"}
_DA = re.compile(r"\d{8}")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_AS = re.compile(r"\d{3}[DWMY]")


class ResultsError(ValueError):
    """Findings and source datasets that cannot be turned into result objects."""


class AlgorithmInfo(Protocol):
    """What identifies the model in every object (a ``SeriesFindings`` or a ``Predictor``)."""

    model_name: str
    model_version: str
    weights_sha256: str
    thresholds: dict[str, float]


@dataclass
class ModelIdentity:
    """An :class:`AlgorithmInfo` made by hand (a report written without findings)."""

    model_name: str = "ichnode-ich"
    model_version: str = ""
    weights_sha256: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass
class MissingObject:
    """A result object that could not be built: which one and why (one line)."""

    kind: str
    reason: str

    def sentence(self) -> str:
        """How the SR and the logs say it."""
        return f"{self.kind} not produced: {self.reason}"


@dataclass
class ResultSet:
    """The objects built for one series and those that could not be built."""

    objects: list[Dataset]
    missing: list[MissingObject] = field(default_factory=list)


# ----------------------------------------------------------------------------
# recognising our own output
# ----------------------------------------------------------------------------


def is_ichnode_output(ds: Dataset) -> bool:
    """True when ``ds`` was written by ichnode (so the node never analyses it).

    Manufacturer "ichnode", or one of the SOP classes ichnode writes together
    with one of its series descriptions.
    """
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    if manufacturer.lower() == MANUFACTURER:
        return True
    sop_class_uid = str(ds.get("SOPClassUID", "") or "")
    description = str(ds.get("SeriesDescription", "") or "").strip()
    return sop_class_uid in OUR_SOP_CLASSES and description in OUR_SERIES_DESCRIPTIONS


# ----------------------------------------------------------------------------
# sanitising what we copy from the source
# ----------------------------------------------------------------------------


def _first(value: object) -> object:
    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else ""
    return value


def _clean_text(value: object, max_len: int) -> str:
    """A single-valued string without control characters or backslash, cut to ``max_len``."""
    text = "" if value is None else str(_first(value))
    text = "".join(ch for ch in text if ch.isprintable() and ch != "\\")
    return text.strip()[:max_len].strip()


def _clean_person_name(value: object) -> str:
    """The alphabetic group of a PN, at most 5 components and 64 characters."""
    text = _clean_text(value, 1024).split("=")[0]
    components = [c.strip() for c in text.split("^")][:5]
    while components and not components[-1]:
        components.pop()
    name = "^".join(components)[:64]
    if name and "^" not in name:
        # A lone component is the family name; the caret says so (PS3.5 6.2.1.2).
        name = name[:63] + "^"
    return name


def _clean_date(value: object) -> str:
    text = _clean_text(value, 32)
    if not _DA.fullmatch(text):
        return ""
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return ""
    return text


def _clean_time(value: object) -> str:
    text = _clean_text(value, 32)
    match = _TM.fullmatch(text)
    if match is None:
        return ""
    hours = int(match.group(1))
    minutes = int(match.group(2) or 0)
    seconds = int(match.group(3) or 0)
    if hours > 23 or minutes > 59 or seconds > 60:
        return ""
    return text


def _finite_floats(value: object, count: int) -> list[float] | None:
    try:
        numbers = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def sanitized_header(ds: Dataset) -> Dataset:
    """The attributes highdicom copies from a source image, with values made valid.

    Patient and study attributes keep their value when it is valid for its VR
    and become empty (Type 2) otherwise; geometry and identifiers are copied as
    they are (they must be right for the SEG to reference the image at all).
    Pixel data and private tags are left behind.
    """
    out = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise ResultsError(f"source image lacks {keyword}")
        setattr(out, keyword, value)
    out.Modality = _clean_text(ds.get("Modality", ""), 16) or "OT"
    out.PatientName = _clean_person_name(ds.get("PatientName", ""))
    out.PatientID = _clean_text(ds.get("PatientID", ""), 64)
    out.PatientBirthDate = _clean_date(ds.get("PatientBirthDate", ""))
    sex = _clean_text(ds.get("PatientSex", ""), 16).upper()
    out.PatientSex = sex if sex in _SEX else ""
    out.StudyDate = _clean_date(ds.get("StudyDate", ""))
    out.StudyTime = _clean_time(ds.get("StudyTime", ""))
    out.AccessionNumber = _clean_text(ds.get("AccessionNumber", ""), 16)
    out.StudyID = _clean_text(ds.get("StudyID", ""), 16)
    out.ReferringPhysicianName = _clean_person_name(ds.get("ReferringPhysicianName", ""))
    out.StudyDescription = _clean_text(ds.get("StudyDescription", ""), 64)
    age = _clean_text(ds.get("PatientAge", ""), 4)
    if _AS.fullmatch(age):
        out.PatientAge = age
    for keyword in ("SeriesNumber", "InstanceNumber"):
        try:
            number = int(float(str(_first(ds.get(keyword, "")))))
        except ValueError:
            continue
        if -(2**31) <= number < 2**31:
            setattr(out, keyword, number)
    if "FrameOfReferenceUID" in ds and str(ds.FrameOfReferenceUID).strip():
        out.FrameOfReferenceUID = str(ds.FrameOfReferenceUID).strip()
    out.Rows = int(ds.get("Rows", 0) or 0)
    out.Columns = int(ds.get("Columns", 0) or 0)
    if out.Rows < 1 or out.Columns < 1:
        raise ResultsError("source image lacks Rows/Columns")
    spacing = _finite_floats(ds.get("PixelSpacing"), 2)
    if spacing is not None and min(spacing) > 0:
        out.PixelSpacing = spacing
    orientation = _finite_floats(ds.get("ImageOrientationPatient"), 6)
    if orientation is not None:
        out.ImageOrientationPatient = orientation
    position = _finite_floats(ds.get("ImagePositionPatient"), 3)
    if position is not None:
        out.ImagePositionPatient = position
    thickness = _finite_floats([_first(ds.get("SliceThickness", ""))], 1)
    if thickness is not None and thickness[0] > 0:
        out.SliceThickness = thickness[0]
    return out


# ----------------------------------------------------------------------------
# helpers shared by the three objects
# ----------------------------------------------------------------------------


def _series_numbers(header: Dataset) -> tuple[int, int, int]:
    """Distinct series numbers for SEG, SR and SC derived from the source's."""
    source = int(header.get("SeriesNumber", 0) or 0)
    if 0 < source < 20_000_000:
        base = source * 100 + 90
    else:
        base = 9990
    return base + 1, base + 2, base + 3


def _software_versions(findings: AlgorithmInfo) -> list[str]:
    model = f"{findings.model_name} {findings.model_version or 'unversioned'}"
    return [f"ichnode {ICHNODE_VERSION}"[:64], model[:64]]


def _model_version(findings: AlgorithmInfo) -> str:
    version = findings.model_version or "unversioned"
    if findings.weights_sha256:
        version = f"{version} sha256:{findings.weights_sha256[:16]}"
    return version[:64]


def _algorithm_identification(findings: AlgorithmInfo) -> hd.AlgorithmIdentificationSequence:
    parameters = {"weights_sha256": findings.weights_sha256 or "unknown"}
    for name, value in sorted(findings.thresholds.items()):
        parameters[f"threshold_{name}"] = f"{float(value):.4f}"
    return hd.AlgorithmIdentificationSequence(
        name=findings.model_name[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=_model_version(findings),
        source=MANUFACTURER,
        parameters=parameters,
    )


def _sr_algorithm(findings: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=findings.model_name[:64],
        version=_model_version(findings),
        parameters=[f"weights_sha256={findings.weights_sha256 or 'unknown'}"],
    )


def _common_kwargs(findings: AlgorithmInfo, now: datetime.datetime) -> dict[str, object]:
    return {
        "manufacturer_model_name": "ichnode",
        "software_versions": _software_versions(findings),
        "content_date": now.date(),
        "content_time": now.time().replace(microsecond=0),
        "series_date": now.date(),
        "series_time": now.time().replace(microsecond=0),
        "specific_character_set": "ISO_IR 192",
    }


def _check_inputs(findings: SeriesFindings, headers: Sequence[Dataset]) -> None:
    if not headers:
        raise ResultsError("no source images")
    uids = [h.SOPInstanceUID for h in headers]
    if list(findings.sop_instance_uids) != uids:
        raise ResultsError(
            "findings.sop_instance_uids do not match the source datasets (order or content)"
        )
    expected = (len(SUBTYPES), len(headers), int(headers[0].Rows), int(headers[0].Columns))
    if tuple(findings.masks.shape) != expected:
        raise ResultsError(f"masks have shape {findings.masks.shape}, expected {expected}")
    if findings.gradcam is not None and tuple(findings.gradcam.shape) != expected[1:]:
        raise ResultsError(f"gradcam has shape {findings.gradcam.shape}, expected {expected[1:]}")
    series = {h.SeriesInstanceUID for h in headers}
    studies = {h.StudyInstanceUID for h in headers}
    if len(series) != 1 or len(studies) != 1:
        raise ResultsError("source datasets come from more than one series")
    for name in SUBTYPES:
        if name not in findings.subtypes:
            raise ResultsError(f"findings lack subtype {name!r}")


def segmented_subtypes(findings: SeriesFindings) -> list[str]:
    """Subtypes found with a non-empty mask: one SEG segment each, in SUBTYPES order."""
    return [
        name
        for index, name in enumerate(SUBTYPES)
        if findings.subtypes[name].present and bool(np.any(findings.masks[index]))
    ]


def unify_frame_of_reference(headers: Sequence[Dataset]) -> str | None:
    """Give every header of one geometric stack the same Frame of Reference UID.

    Some anonymisers rewrite every UID per file, so the slices of one stack
    (one orientation, distinct positions: checked when the volume was built)
    carry different Frame of Reference UIDs, or only some carry one. The
    meaning is clear, so the headers (our sanitised copies, never the source
    files) get the UID most of them carry (the first slice's on a tie), and a
    warning says so. Returns the UID, or None when no slice has one (then no
    SEG can be placed in patient coordinates).
    """
    values = [str(h.get("FrameOfReferenceUID", "") or "") for h in headers]
    present = [v for v in values if v]
    if not present:
        return None
    counts = Counter(present)
    best = max(counts.values())
    chosen = next(v for v in present if counts[v] == best)
    if len(counts) > 1 or len(present) < len(values):
        logger.warning(
            "series %s: %d distinct Frame of Reference UIDs and %d slices without one in "
            "one geometric stack; the SEG references %s",
            headers[0].get("SeriesInstanceUID", "?"),
            len(counts),
            len(values) - len(present),
            chosen,
        )
        for header in headers:
            header.FrameOfReferenceUID = chosen
    return chosen


@dataclass(frozen=True)
class MultiFrameSource:
    """The one multi-frame instance (Enhanced CT) whose frames are the slices."""

    dataset: Dataset
    frame_indices: list[int]  # 0-based frame of each slice, in volume order

    @property
    def frame_count(self) -> int:
        return int(self.dataset.NumberOfFrames)

    def frame_numbers(self) -> list[int | None]:
        """ReferencedFrameNumber (1-based) of each slice."""
        return [i + 1 for i in self.frame_indices]

    def header(self, slice_header: Dataset) -> Dataset:
        """A sanitised header of the instance with its functional groups, for highdicom."""
        out = sanitized_header(self.dataset)
        for keyword in (
            "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
        ):
            setattr(out, keyword, copy.deepcopy(self.dataset[keyword].value))
        if "FrameOfReferenceUID" in slice_header:
            out.FrameOfReferenceUID = slice_header.FrameOfReferenceUID
        return out


def multiframe_source(sources: Sequence[Dataset]) -> MultiFrameSource | None:
    """The Enhanced CT instance the slices are frames of; None for single-frame slices."""
    frames = [source_frame(ds) for ds in sources]
    first = frames[0] if frames else None
    if first is None or any(
        f is None or f[0].SOPInstanceUID != first[0].SOPInstanceUID for f in frames
    ):
        return None
    return MultiFrameSource(first[0], [f[1] for f in frames if f is not None])


# ----------------------------------------------------------------------------
# SEG
# ----------------------------------------------------------------------------


def build_segmentation(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    *,
    series_number: int,
    now: datetime.datetime,
    multiframe: MultiFrameSource | None = None,
) -> hd.seg.Segmentation | None:
    """One BINARY SEG with a segment per subtype found; None when nothing is found.

    With ``multiframe`` (the slices are frames of one Enhanced CT instance) the
    SEG references that instance, one SEG frame per source frame it segments.
    """
    names = segmented_subtypes(findings)
    if not names:
        return None
    algorithm = _algorithm_identification(findings)
    descriptions = []
    for number, name in enumerate(names, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"{name} hemorrhage",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=SUBTYPE_CODES[name],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"ichnode {name} hemorrhage",
                anatomic_regions=[codes.SCT.Brain],
                # Viewers draw the segment in the colour of the key images and the UI.
                display_color=hd.color.CIELabColor.from_rgb(*drawing.SUBTYPE_COLOURS[name]),
            )
        )
    indices = [SUBTYPES.index(name) for name in names]
    pixel_array = np.moveaxis(np.asarray(findings.masks[indices], dtype=bool), 0, -1)
    sources = list(headers)
    if multiframe is not None:
        sources = [multiframe.header(headers[0])]
        # highdicom wants the masks in the source's frame order, one per frame.
        full = np.zeros((multiframe.frame_count, *pixel_array.shape[1:]), dtype=bool)
        full[multiframe.frame_indices] = pixel_array
        pixel_array = full
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        device_serial_number="ichnode",
        content_description="Intracranial hemorrhage, automatic segmentation",
        content_label="ICH_AI",
        omit_empty_frames=True,
        series_description=SEG_SERIES_DESCRIPTION,
        **_common_kwargs(findings, now),  # type: ignore[arg-type]
    )
    if headers[0].get("StudyDescription"):
        seg.StudyDescription = headers[0].StudyDescription
    return seg


# ----------------------------------------------------------------------------
# SR
# ----------------------------------------------------------------------------


def _presence(present: bool) -> Code:
    return codes.SCT.Present if present else codes.SCT.Absent


def _referenced_segment(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    seg: hd.seg.Segmentation,
    name: str,
    segment_number: int,
    frame_numbers: Sequence[int | None] | None = None,
) -> hd.sr.ReferencedSegment:
    """The SEG segment of ``name`` and the source images it was drawn on.

    Built from the mask rather than with ``ReferencedSegment.from_segmentation``,
    which fails when a SEG holds a single segment (its Segment Identification
    then sits in the shared functional groups).
    """
    mask = findings.masks[SUBTYPES.index(name)]
    slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_images=[
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=headers[int(z)].SOPClassUID,
                referenced_sop_instance_uid=headers[int(z)].SOPInstanceUID,
                referenced_frame_numbers=_frame_list(frame_numbers, int(z)),
            )
            for z in slices
        ],
    )


def _frame_list(frame_numbers: Sequence[int | None] | None, z: int) -> list[int] | None:
    number = None if frame_numbers is None else frame_numbers[z]
    return None if number is None else [number]


SQUARE_MILLIMETER = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
# Right turn first, then straight on, then left (image coordinates, y down): at a
# corner shared by two diagonal pixels the outline stays with the pixel it is
# tracing, so the outline is that of a 4-connected region.
_TURNS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # +x, +y, -x, -y: each the right turn of the one before


def _largest_region(section: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a 2D mask (the first found on a tie)."""
    labels = np.zeros(section.shape, dtype=np.int32)
    rows, columns = section.shape
    best, best_size, label = 0, 0, 0
    for start in zip(*np.nonzero(section), strict=True):
        if labels[start]:
            continue
        label += 1
        labels[start] = label
        stack = [start]
        size = 0
        while stack:
            r, c = stack.pop()
            size += 1
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < rows and 0 <= nc < columns and section[nr, nc] and not labels[nr, nc]:
                    labels[nr, nc] = label
                    stack.append((nr, nc))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros(section.shape, dtype=bool)


def region_outline(region: np.ndarray) -> np.ndarray:
    """The closed outer outline of a 4-connected 2D region, along its pixel edges.

    Returns an (n, 2) array of (column, row) points in the SCOORD convention
    (the top left corner of the top left pixel is (0, 0)), clockwise on the
    screen, corners only, first point repeated last. The outline encloses
    every pixel of ``region`` and no other (holes aside), so the polygon's area
    is the region's pixel count when it has no hole.
    """
    if not region.any():
        raise ResultsError("no region to outline")
    padded = np.pad(region, 1)
    # Directed edges between pixel corners, the region on their right (y down).
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def add(start: tuple[int, int], direction: tuple[int, int]) -> None:
        outgoing.setdefault(start, []).append(direction)

    for r, c in zip(*np.nonzero(region), strict=True):
        pr, pc = r + 1, c + 1
        if not padded[pr - 1, pc]:
            add((c, r), (1, 0))  # top edge, left to right
        if not padded[pr, pc + 1]:
            add((c + 1, r), (0, 1))  # right edge, downwards
        if not padded[pr + 1, pc]:
            add((c + 1, r + 1), (-1, 0))  # bottom edge, right to left
        if not padded[pr, pc - 1]:
            add((c, r + 1), (0, -1))  # left edge, upwards
    rows, columns = np.nonzero(region)
    top = int(rows.min())
    left = int(columns[rows == top].min())
    start = (left, top)  # the top left corner of the top left pixel: on the outer outline
    points = [start]
    point, direction = start, (1, 0)
    for _ in range(4 * int(region.sum()) + 4):
        point = (point[0] + direction[0], point[1] + direction[1])
        if point == start:
            break
        choices = outgoing[point]
        turn = _TURNS.index(direction)
        for step in (1, 0, 3):  # right, straight, left
            candidate = _TURNS[(turn + step) % 4]
            if candidate in choices:
                if candidate != direction:
                    points.append(point)
                direction = candidate
                break
        else:
            raise ResultsError("outline does not close")
    else:
        raise ResultsError("outline does not close")
    points.append(start)
    return np.asarray(points, dtype=np.float32)


@dataclass(frozen=True)
class RepresentativeSection:
    """A finding's largest cross-section: its slice, outline and area."""

    index: int  # slice in volume order
    outline: np.ndarray  # (n, 2) closed polygon, (column, row)
    area_mm2: float  # of the outlined region


def representative_section(
    mask: np.ndarray, pixel_spacing: Sequence[float]
) -> RepresentativeSection:
    """The slice with the largest cross-section of ``mask`` (z, y, x) and its outline.

    The outline is that of the largest 4-connected region on that slice; the
    area is that region's pixel count times the pixel area (PixelSpacing is
    row spacing, column spacing in mm).
    """
    mask = np.asarray(mask, dtype=bool)
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    index = int(np.argmax(areas))
    region = _largest_region(mask[index])
    area = float(region.sum()) * float(pixel_spacing[0]) * float(pixel_spacing[1])
    return RepresentativeSection(index, region_outline(region), area)


def _planar_group(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    name: str,
    tracking_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    frame_numbers: Sequence[int | None] | None,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of ``name``: the outline of its largest cross-section and its area.

    It carries the tracking UID of the finding's other group, so viewers that
    merge groups by tracking UID (OHIF) show the volume beside the outline.
    Without a pixel spacing on that slice the area (mm2) is left out.
    """
    mask = findings.masks[SUBTYPES.index(name)]
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    header = headers[int(np.argmax(areas))]
    spacing = _finite_floats(header.get("PixelSpacing"), 2)
    section = representative_section(mask, spacing or (1.0, 1.0))
    header = headers[section.index]
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: a polygon (SCOORD has no POLYGON)
        graphic_data=section.outline,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            referenced_frame_numbers=_frame_list(frame_numbers, section.index),
        ),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=f"{name} hemorrhage"
        ),
        referenced_region=region,
        finding_type=SUBTYPE_CODES[name],
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        measurements=[
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=section.area_mm2,
                unit=SQUARE_MILLIMETER,
                algorithm_id=algorithm,
            )
        ]
        if spacing is not None
        else None,
    )


def build_report(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    seg: hd.seg.Segmentation | None,
    *,
    series_number: int,
    now: datetime.datetime,
    notes: Sequence[str] = (),
    frame_numbers: Sequence[int | None] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report: always written, also for a negative series.

    ``notes`` (e.g. "SEG not produced: ...") become TEXT items of the report's
    Qualitative Evaluations container, so the reader learns what is missing.
    """
    observation_context = _observation_context(findings)
    algorithm = _sr_algorithm(findings)
    brain = [hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)]

    evaluations = [
        hd.sr.QualitativeEvaluation(
            name=codes.SCT.IntracranialHemorrhage,
            value=_presence(findings.hemorrhage_present),
        )
    ]
    for name in SUBTYPES:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=SUBTYPE_CODES[name],
                value=_presence(findings.subtypes[name].present),
            )
        )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier="intracranial hemorrhage, series"
            ),
            finding_type=codes.SCT.IntracranialHemorrhage,
            finding_sites=brain,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability,
                    value=float(findings.hemorrhage_probability),
                    unit=NO_UNITS,
                    algorithm_id=algorithm,
                )
            ],
            qualitative_evaluations=evaluations,
        )
    ]

    segment_numbers: dict[str, int] = {}
    tracking_uids: dict[str, str] = {}
    if seg is not None:
        for item in seg.SegmentSequence:
            label = str(item.SegmentLabel).removesuffix(" hemorrhage")
            segment_numbers[label] = int(item.SegmentNumber)
            tracking_uids[label] = str(item.TrackingUID)

    for name in SUBTYPES:
        finding = findings.subtypes[name]
        if not finding.present:
            continue
        measurements = [
            hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(finding.volume_ml),
                unit=MILLILITER,
                algorithm_id=algorithm,
            ),
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(finding.probability),
                unit=NO_UNITS,
                algorithm_id=algorithm,
            ),
        ]
        qualitative = [
            hd.sr.QualitativeEvaluation(name=SUBTYPE_CODES[name], value=codes.SCT.Present)
        ]
        if seg is not None and name in segment_numbers:
            tracking_uid = tracking_uids[name]
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=tracking_uid, identifier=f"{name} hemorrhage"
                    ),
                    referenced_segment=_referenced_segment(
                        findings, headers, seg, name, segment_numbers[name], frame_numbers
                    ),
                    finding_type=SUBTYPE_CODES[name],
                    finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                    algorithm_id=algorithm,
                    finding_sites=brain,
                    measurements=measurements,
                    qualitative_evaluations=qualitative,
                )
            )
        else:
            # An empty mask (or no SEG): no segment to point at.
            tracking_uid = hd.UID()
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=tracking_uid, identifier=f"{name} hemorrhage"
                    ),
                    finding_type=SUBTYPE_CODES[name],
                    finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                    algorithm_id=algorithm,
                    finding_sites=brain,
                    measurements=measurements,
                    qualitative_evaluations=qualitative,
                )
            )
        if bool(np.any(findings.masks[SUBTYPES.index(name)])):
            # Where viewers draw the finding: its outline on its largest slice.
            groups.append(
                _planar_group(findings, headers, name, tracking_uid, algorithm, frame_numbers)
            )

    evidence: list[Dataset] = list(headers)
    if seg is not None:
        evidence.append(seg)
    return _report(
        findings, observation_context, groups, evidence, notes, series_number, now, complete=True
    )


def _observation_context(findings: AlgorithmInfo) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=DEVICE_OBSERVER_UID,
        name="ichnode",
        manufacturer_name=MANUFACTURER,
        model_name=f"{findings.model_name} {_model_version(findings)}"[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=device,
        )
    )


def _report(
    findings: AlgorithmInfo,
    observation_context: hd.sr.ObservationContext,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
    evidence: Sequence[Dataset],
    notes: Sequence[str],
    series_number: int,
    now: datetime.datetime,
    *,
    complete: bool,
) -> hd.sr.Comprehensive3DSR:
    placed, unplaced = _split_by_image_region(groups)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.LN.HeadCT,
        imaging_measurements=placed or unplaced,  # highdicom wants at least one group
    )
    if not placed:
        # No finding with an image region: the report has no Imaging Measurements
        # container (TID 1500 then needs the Qualitative Evaluations one, below).
        report[0].ContentSequence = hd.sr.ContentSequence(
            [
                item
                for item in report[0].ContentSequence
                if item.name != codes.DCM.ImagingMeasurements
            ]
        )
    if unplaced or notes:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        container.ContentSequence = hd.sr.ContentSequence(
            [cast(hd.sr.ContentItem, group[0]) for group in unplaced]
            + [
                hd.sr.TextContentItem(
                    name=codes.DCM.Comment,
                    value=_clean_note(note),
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for note in notes
            ]
        )
        report[0].ContentSequence.append(container)
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        **_common_kwargs(findings, now),  # type: ignore[arg-type]
    )
    if evidence[0].get("StudyDescription"):
        sr.StudyDescription = evidence[0].StudyDescription
    return sr


Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _split_by_image_region(groups: Sequence[Group]) -> tuple[list[Group], list[Group]]:
    """The groups of findings with an image region, and the others.

    Viewers that draw TID 1500 reports (OHIF v3) merge the measurement groups
    of the Imaging Measurements container by tracking UID and need image
    coordinates in each merged finding: a finding without any (the series
    summary, a subtype found with an empty mask, a not-analysed series) stops
    them from drawing the report. Those groups go, unchanged, into the report's
    Qualitative Evaluations container, where readers that walk the whole tree
    (``ui.stored``, ``node.notify``) still find them.
    """
    placed_uids = {
        str(group.tracking_uid)
        for group in groups
        if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
    }
    placed = [g for g in groups if str(g.tracking_uid) in placed_uids]
    unplaced = [g for g in groups if str(g.tracking_uid) not in placed_uids]
    return placed, unplaced


def _clean_note(note: str) -> str:
    """One printable line of at most 1024 characters (a TEXT value, UT)."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in note).split())
    return text[:1024] or "unknown"


def report_notes(report: Dataset) -> list[str]:
    """The TEXT items of a report's Qualitative Evaluations container (what is missing)."""
    notes: list[str] = []
    for item in report.get("ContentSequence", []):
        concept = item.get("ConceptNameCodeSequence")
        if not concept or str(concept[0].CodeValue) != QUALITATIVE_EVALUATIONS.value:
            continue
        notes.extend(
            str(child.TextValue)
            for child in item.get("ContentSequence", [])
            if child.get("ValueType") == "TEXT"
        )
    return notes


@dataclass(frozen=True)
class ReportReading:
    """What an ichnode TID 1500 SR states, read back from its content tree.

    ``presence``: the concepts stated present (True) or absent (False), ``"any"``
    for intracranial hemorrhage and the subtype names; ``probability`` and
    ``volume_ml``: the NUM items of the measurement groups whose Finding is that
    concept; ``not_analysed``: the "not analysed: <reason>" statement, if any.
    """

    presence: dict[str, bool]
    probability: dict[str, float]
    volume_ml: dict[str, float]
    not_analysed: str | None


def _code_key(code: object) -> tuple[str, str]:
    return (str(getattr(code, "scheme_designator", "")), str(getattr(code, "value", "")))


def _item_code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    sequence = item.get(keyword)
    if not sequence:
        return None
    return (str(sequence[0].CodingSchemeDesignator), str(sequence[0].CodeValue))


def _content_items(items: Sequence[Dataset]) -> list[Dataset]:
    found: list[Dataset] = []
    for item in items:
        found.append(item)
        found.extend(_content_items(item.get("ContentSequence", [])))
    return found


def _numeric_value(item: Dataset) -> float | None:
    sequence = item.get("MeasuredValueSequence")
    if not sequence:
        return None
    try:
        value = float(sequence[0].NumericValue)
    except (AttributeError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def read_report(report: Dataset) -> ReportReading:
    """Read an ichnode SR back: the one reader of the viewer and the notifications.

    Raises
    ------
    ValueError
        When ``report`` is not a structured report (no Content Sequence).
    """
    if "ContentSequence" not in report:
        raise ValueError("not a structured report (no Content Sequence)")
    concepts = {_code_key(codes.SCT.IntracranialHemorrhage): "any"}
    concepts.update({_code_key(code): name for name, code in SUBTYPE_CODES.items()})
    present, absent = _code_key(codes.SCT.Present), _code_key(codes.SCT.Absent)
    finding_key = _code_key(codes.DCM.Finding)
    group_key = _code_key(codes.DCM.MeasurementGroup)
    volume_key, probability_key = _code_key(codes.SCT.Volume), _code_key(codes.DCM.Probability)
    presence: dict[str, bool] = {}
    probability: dict[str, float] = {}
    volume: dict[str, float] = {}
    statement = None
    for item in _content_items(report.ContentSequence):
        value_type = item.get("ValueType", "")
        concept = _item_code(item, "ConceptNameCodeSequence")
        if value_type == "TEXT" and str(item.get("TextValue", "")).startswith(NOT_ANALYSED):
            statement = str(item.TextValue)
        if value_type == "CODE" and concept in concepts:
            answer = _item_code(item, "ConceptCodeSequence")
            if answer in (present, absent):
                presence[concepts[concept]] = answer == present
        if value_type == "CONTAINER" and concept == group_key:
            children = list(item.get("ContentSequence", []))
            finding = next(
                (
                    _item_code(child, "ConceptCodeSequence")
                    for child in children
                    if _item_code(child, "ConceptNameCodeSequence") == finding_key
                ),
                None,
            )
            name = concepts.get(finding) if finding else None
            if name is None:
                continue
            for child in children:
                if child.get("ValueType") != "NUM":
                    continue
                kind = _item_code(child, "ConceptNameCodeSequence")
                number = _numeric_value(child)
                if number is None:
                    continue
                if kind == probability_key:
                    probability[name] = number
                elif kind == volume_key:
                    volume[name] = number
    return ReportReading(presence, probability, volume, statement)


def build_not_analysed_report(
    source_datasets: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    now: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of a routed series that could not be analysed: "not analysed" and why.

    No finding is stated (neither present nor absent), so silence is never read
    as "no bleed". ``source_datasets`` are headers of the series (pixel data not
    needed); the first one identifies patient, study and series, and all are
    listed as evidence. The report is marked PARTIAL.
    """
    now = now or datetime.datetime.now()
    if not source_datasets:
        raise ResultsError("no source header for a not-analysed report")
    headers = [sanitized_header(ds) for ds in source_datasets]
    if len({h.StudyInstanceUID for h in headers}) != 1:
        raise ResultsError("source datasets come from more than one study")
    _, sr_number, _ = _series_numbers(headers[0])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier="intracranial hemorrhage, series"
        ),
        finding_type=codes.SCT.IntracranialHemorrhage,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=_sr_algorithm(algorithm),
    )
    note = f"{NOT_ANALYSED}: {reason}"
    sr = _report(
        algorithm,
        _observation_context(algorithm),
        [group],
        headers,
        [note],
        sr_number,
        now,
        complete=False,
    )
    logger.info("series %s: not-analysed report (%s)", headers[0].SeriesInstanceUID, reason)
    return sr


# ----------------------------------------------------------------------------
# SC key images
# ----------------------------------------------------------------------------


def _orientation_letter(vector: Sequence[float]) -> str:
    """The dominant patient direction of a direction cosine vector (LPS)."""
    axis = int(np.argmax(np.abs(vector)))
    positive = ("L", "P", "H")[axis]
    negative = ("R", "A", "F")[axis]
    return positive if vector[axis] >= 0 else negative


def _patient_orientation(header: Dataset) -> tuple[str, str]:
    orientation = header.get("ImageOrientationPatient")
    if orientation is None:
        return ("L", "P")
    values = [float(v) for v in orientation]
    return (_orientation_letter(values[:3]), _orientation_letter(values[3:]))


def _hu_slice(
    index: int, headers: Sequence[Dataset], sources: Sequence[Dataset], hu: np.ndarray | None
) -> np.ndarray:
    if hu is not None:
        return np.asarray(hu[index], dtype=np.float32)
    ds = sources[index]
    if "PixelData" not in ds:
        raise ResultsError(
            "key images need pixel values: pass hu= or source datasets with pixel data"
        )
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def build_key_images(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    sources: Sequence[Dataset],
    *,
    hu: np.ndarray | None,
    series_number: int,
    now: datetime.datetime,
) -> list[hd.sc.SCImage]:
    """One RGB key image per subtype found: its largest slice with outline and heat map."""
    series_instance_uid = hd.UID()
    return [
        build_key_image(
            findings,
            headers,
            sources,
            name,
            hu=hu,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            instance_number=number,
            now=now,
        )
        for number, name in enumerate(segmented_subtypes(findings), start=1)
    ]


def build_key_image(
    findings: SeriesFindings,
    headers: Sequence[Dataset],
    sources: Sequence[Dataset],
    name: str,
    *,
    hu: np.ndarray | None,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    now: datetime.datetime,
    frame_numbers: Sequence[int | None] | None = None,
) -> hd.sc.SCImage:
    """The key image of subtype ``name``: its largest slice with outline and heat map."""
    mask = np.asarray(findings.masks[SUBTYPES.index(name)], dtype=bool)
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    index = int(np.argmax(areas))
    header = headers[index]
    finding = findings.subtypes[name]
    heat = None if findings.gradcam is None else np.asarray(findings.gradcam[index])
    lines = [
        DISCLAIMER,
        f"{name} hemorrhage  p={finding.probability:.2f}  {finding.volume_ml:.1f} mL",
        f"{findings.model_name} {findings.model_version or ''}  "
        f"slice {index + 1}/{len(headers)}".strip(),
    ]
    rgb = drawing.key_image(
        _hu_slice(index, headers, sources, hu),
        mask[index],
        drawing.SUBTYPE_COLOURS[name],
        lines,
        heat,
    )
    spacing = header.get("PixelSpacing")
    sc = hd.sc.SCImage(
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex or None,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate or None,
        study_time=header.StudyTime or None,
        referring_physician_name=header.ReferringPhysicianName,
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        patient_orientation=_patient_orientation(header),
        series_description=SC_SERIES_DESCRIPTION,
        **_common_kwargs(findings, now),  # type: ignore[arg-type]
    )
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = ""  # Type 2C, empty: a head is not a paired structure
    sc.DerivationDescription = f"{DISCLAIMER}; {name} hemorrhage outline and Grad-CAM"
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = header.SOPClassUID
    source_item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    frame = _frame_list(frame_numbers, index)
    if frame is not None:
        source_item.ReferencedFrameNumber = frame[0]
    sc.SourceImageSequence = [source_item]
    if header.get("StudyDescription"):
        sc.StudyDescription = header.StudyDescription
    return sc


# ----------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def build_results(
    findings: SeriesFindings,
    source_datasets: Sequence[Dataset],
    *,
    hu: np.ndarray | None = None,
    now: datetime.datetime | None = None,
) -> ResultSet:
    """Build the result objects of one series, each independently of the others.

    A SEG or key image that cannot be built is left out and named, with the
    reason, in :attr:`ResultSet.missing` and in the SR's Qualitative
    Evaluations, so the SR and the other objects still go out. Only an SR that
    cannot be built, or findings that do not fit the source datasets, raise.

    Parameters
    ----------
    findings
        What the model found; masks and slices in the order of ``source_datasets``.
    source_datasets
        The series' CT headers in volume order (``Volume.datasets``). Pixel data
        is needed only for key images, and only when ``hu`` is not given.
    hu
        Optional (z, y, x) HU volume for the key images (``Volume.hu``).
    now
        Content date/time of the analysis (default: the current local time).
    """
    now = now or datetime.datetime.now()
    headers = [sanitized_header(ds) for ds in source_datasets]
    _check_inputs(findings, headers)
    seg_number, sr_number, sc_number = _series_numbers(headers[0])
    series_instance_uid = findings.series_instance_uid
    missing: list[MissingObject] = []

    multiframe = multiframe_source(source_datasets)
    frame_numbers = None if multiframe is None else multiframe.frame_numbers()

    seg: hd.seg.Segmentation | None = None
    if segmented_subtypes(findings):
        unify_frame_of_reference(headers)
        try:
            seg = build_segmentation(
                findings, headers, series_number=seg_number, now=now, multiframe=multiframe
            )
        except Exception as exc:  # any encoder failure degrades to a missing SEG
            logger.debug("series %s: SEG not built", series_instance_uid, exc_info=True)
            missing.append(MissingObject("SEG", _one_line(exc)))

    key_images: list[Dataset] = []
    sc_series_instance_uid = hd.UID()
    for name in segmented_subtypes(findings):
        try:
            key_images.append(
                build_key_image(
                    findings,
                    headers,
                    source_datasets,
                    name,
                    hu=hu,
                    series_instance_uid=sc_series_instance_uid,
                    series_number=sc_number,
                    instance_number=len(key_images) + 1,
                    now=now,
                    frame_numbers=frame_numbers,
                )
            )
        except Exception as exc:  # a key image that fails is left out, see above
            logger.debug(
                "series %s: %s key image not built", series_instance_uid, name, exc_info=True
            )
            missing.append(MissingObject(f"{name} key image", _one_line(exc)))

    for item in missing:
        logger.warning("series %s: %s", series_instance_uid, item.sentence())
    sr = build_report(
        findings,
        headers,
        seg,
        series_number=sr_number,
        now=now,
        notes=[item.sentence() for item in missing],
        frame_numbers=frame_numbers,
    )
    objects: list[Dataset] = []
    if seg is not None:
        objects.append(seg)
    objects.append(sr)
    objects.extend(key_images)
    logger.info(
        "series %s: %d result objects (SEG %s, key images %d, missing %d)",
        series_instance_uid,
        len(objects),
        "yes" if seg is not None else "no",
        len(key_images),
        len(missing),
    )
    return ResultSet(objects, missing)


def encode_results(
    findings: SeriesFindings,
    source_datasets: Sequence[Dataset],
    *,
    hu: np.ndarray | None = None,
    now: datetime.datetime | None = None,
) -> list[Dataset]:
    """The objects of :func:`build_results`: [SEG if found], SR, [SC per subtype found]."""
    return build_results(findings, source_datasets, hu=hu, now=now).objects


def _file_prefix(ds: Dataset) -> str:
    sop_class_uid = str(ds.SOPClassUID)
    if sop_class_uid == SegmentationStorage:
        return "SEG"
    if sop_class_uid == SecondaryCaptureImageStorage:
        return "SC"
    return "SR"


def result_file_name(number: int, ds: Dataset) -> str:
    """The file name of a result object: ``<NNN>-<SEG|SR|SC>-<SOPInstanceUID>.dcm``.

    ``number`` is the object's place in its set (from 1), so a listing sorts
    the objects of one series in the order they were built: SEG, SR, key images.
    """
    return f"{number:03d}-{_file_prefix(ds)}-{ds.SOPInstanceUID}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_result_files(
    folder: Path, datasets: Sequence[Dataset], *, replace: bool = False
) -> list[Path]:
    """Write result objects durably into ``folder``; return their paths.

    The one writer of result objects (worker, ``ichnode analyze`` and the UI
    upload). Files are named by :func:`result_file_name`. Each is written
    under a temporary name in the same folder, fsynced and renamed into place,
    and the folder is fsynced at the end: a file under its final name is
    always complete, and a failure part way through one leaves no file under
    that name (the temporary file is removed before the error is raised).

    Parameters
    ----------
    folder
        Where the files go; created when missing.
    datasets
        The objects, in set order (:attr:`ResultSet.objects`).
    replace
        Empty ``folder`` first (a worker's folder of one job, so that a job
        taken up again after a crash keeps only its own last set).
    """
    folder = Path(folder)
    if replace and folder.exists():
        shutil.rmtree(folder)
    if not folder.exists():
        folder.mkdir(parents=True)
        _fsync_dir(folder.parent)
    paths: list[Path] = []
    for number, ds in enumerate(datasets, start=1):
        final = folder / result_file_name(number, ds)
        tmp = final.with_name(f".{final.name}.part")
        try:
            ds.save_as(tmp, enforce_file_format=True)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(final)
    _fsync_dir(folder)
    return paths


def write_datasets(datasets: Sequence[Dataset], out_dir: Path) -> list[Path]:
    """Write each dataset into ``out_dir`` with :func:`write_result_files`; return paths."""
    return write_result_files(Path(out_dir), datasets)


def write_results(
    findings: SeriesFindings,
    source_datasets: Sequence[Dataset],
    out_dir: Path,
    *,
    hu: np.ndarray | None = None,
    now: datetime.datetime | None = None,
) -> list[Path]:
    """:func:`encode_results` and write the objects into ``out_dir``; return their paths."""
    return write_datasets(encode_results(findings, source_datasets, hu=hu, now=now), out_dir)
