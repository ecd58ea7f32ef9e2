"""A node series for the viewer: source images from the archive, findings from the stored SEG and SR.

The node keeps each analysis as DICOM objects (``results`` rows pointing at
files). This module reads them back: the TID 1500 SR gives the series and
subtype decisions, probabilities and volumes (:func:`finding_from_sr`); the SEG
gives the subtype masks (:func:`ui.series.masks_from_seg`). Per-slice
probabilities and Grad-CAM are not stored by the node; the viewer recomputes
them on demand.
"""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from config import Settings
from inference.findings import SUBTYPES, SubtypeFinding
from inference.volume import SeriesSkipped, load_volume
from node.results import NOT_ANALYSED, read_report, report_notes
from storage.index import Index
from ui.series import ViewerData, masks_from_seg
from ui.worklist import ResultFile, StoredFinding, result_files

logger = logging.getLogger(__name__)


class SeriesUnavailable(RuntimeError):
    """A node series the viewer cannot show as a volume; ``datasets`` are its readable headers."""

    def __init__(self, reason: str, datasets: list[Dataset] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.datasets = datasets or []


def finding_from_sr(ds: Dataset) -> StoredFinding:
    """Read the hemorrhage and subtype findings back from an ichnode TID 1500 SR.

    Present/absent comes from the qualitative evaluations (one per concept);
    probability and volume from the NUM items of the measurement group whose
    Finding is that concept.

    Raises
    ------
    ValueError
        When ``ds`` is not a structured report or states nothing about hemorrhage.
    """
    reading = read_report(ds)
    presence, probability, volume = reading.presence, reading.probability, reading.volume_ml
    if "any" not in presence:
        raise ValueError("the report states no intracranial hemorrhage finding")
    subtypes = {
        name: (presence[name], probability.get(name), volume.get(name))
        for name in SUBTYPES
        if name in presence
    }
    return StoredFinding(
        hemorrhage=presence["any"], probability=probability.get("any"), subtypes=subtypes
    )


def resolve_path(path: str, settings: Settings) -> Path:
    """A stored path as a file: absolute as is, relative against the storage root, then the cwd."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    under_root = settings.storage.root / candidate
    return under_root if under_root.exists() else candidate


def read_finding(path: Path) -> StoredFinding | None:
    """The finding of one SR file, or None (logged) when the file is missing or unreadable."""
    try:
        ds = dcmread(path)
        return finding_from_sr(ds)
    except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
        logger.warning("cannot read the finding of %s: %s", path, exc)
        return None


def not_analysed_statement(path: Path) -> str | None:
    """The "not analysed: <reason>" statement of a node's "not analysed" SR, else None.

    Such a report answers a series the node skipped or could not analyse; it
    holds no finding, only the statement (:func:`node.results.report_notes`).
    """
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError, ValueError) as exc:
        logger.warning("cannot read the report %s: %s", path, exc)
        return None
    for note in report_notes(ds):
        if note.startswith(NOT_ANALYSED):
            return note
    return None


def _subtype_findings(finding: StoredFinding) -> dict[str, SubtypeFinding]:
    out = {}
    for name, (present, prob, ml) in finding.subtypes.items():
        out[name] = SubtypeFinding(
            present=present,
            probability=float("nan") if prob is None else prob,
            volume_ml=0.0 if ml is None else ml,
        )
    return out


def _read_sources(index: Index, series_instance_uid: str, settings: Settings) -> list[Dataset]:
    files = index.series_files(series_instance_uid)
    if not files:
        raise SeriesUnavailable("the index holds no instances of this series")
    datasets: list[Dataset] = []
    problems: list[str] = []
    for item in files:
        path = resolve_path(item.path, settings)
        try:
            datasets.append(dcmread(path))
        except (OSError, InvalidDicomError) as exc:
            problems.append(f"{path.name}: {exc}")
    if problems:
        logger.warning("series %s: %d unreadable files", series_instance_uid, len(problems))
    if not datasets:
        raise SeriesUnavailable(
            f"none of the {len(files)} stored files can be read ({problems[0]})"
        )
    return datasets


def load_node_series(index: Index, settings: Settings, series_instance_uid: str) -> ViewerData:
    """Build the viewer data of a series the node received, with its stored findings.

    Raises
    ------
    SeriesUnavailable
        When the series cannot be shown as a volume (no readable files, or the
        volume loader skips it); the exception carries the readable headers.
    """
    datasets = _read_sources(index, series_instance_uid, settings)
    try:
        volume = load_volume(datasets)
    except SeriesSkipped as exc:
        raise SeriesUnavailable(exc.reason, datasets) from None
    results = result_files(index, series_instance_uid)
    seg_files = [r for r in results if r.kind == "SEG"]
    sr_files = [r for r in results if r.kind == "SR"]
    note = ""
    masks: np.ndarray | None = None
    finding: StoredFinding | None = None
    if sr_files:
        sr_path = resolve_path(sr_files[0].path, settings)
        finding = read_finding(sr_path)
        if finding is None:
            # a "not analysed" SR states why instead of a finding
            note = not_analysed_statement(sr_path) or "the stored report cannot be read"
    else:
        note = "not analysed yet"
    if seg_files:
        path = resolve_path(seg_files[0].path, settings)
        try:
            seg = hd.seg.segread(path)
            masks = masks_from_seg(seg, volume.sop_instance_uids, volume.hu.shape)
        except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
            logger.warning("cannot read SEG %s: %s", path, exc)
            note = f"the stored segmentation cannot be read ({exc})"
    elif finding is not None:
        masks = np.zeros((len(SUBTYPES), *volume.hu.shape), dtype=bool)
    first = volume.datasets[0]
    title = " · ".join(
        part
        for part in (
            str(first.get("PatientID", "") or ""),
            str(first.get("StudyDescription", "") or ""),
            str(first.get("SeriesDescription", "") or ""),
        )
        if part
    )
    return ViewerData(
        title=title or series_instance_uid,
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        hu=volume.hu,
        spacing=volume.spacing,
        datasets=list(volume.datasets),
        sop_instance_uids=list(volume.sop_instance_uids),
        masks=masks,
        hemorrhage=None if finding is None else finding.hemorrhage,
        hemorrhage_probability=None if finding is None else finding.probability,
        subtypes={} if finding is None else _subtype_findings(finding),
        outputs=read_outputs(results, settings),
        note=note,
        volume=volume,
    )


def read_outputs(results: list[ResultFile], settings: Settings) -> dict[str, bytes]:
    """File name -> bytes of each stored result object that is still on disk."""
    outputs: dict[str, bytes] = {}
    for result in results:
        path = resolve_path(result.path, settings)
        try:
            outputs[f"{result.kind}-{result.sop_instance_uid}.dcm"] = path.read_bytes()
        except OSError as exc:
            logger.warning("result file %s missing: %s", path, exc)
    return outputs
