"""Uploads: DICOM files or zips dropped in the browser, analysed in place.

Files are staged in a private temporary folder (zip members extracted with
flattened, sanitised names: nothing escapes the folder), read with
:func:`inference.volume.read_series`, built into volumes and analysed with the
predictor; the SEG/SR/SC objects are encoded in memory for download. Nothing
uploaded is written to the index or sent anywhere.
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import Dataset

from inference.findings import SeriesFindings
from inference.volume import SeriesSkipped, Volume, load_volume, read_series
from node.results import ResultsError, encode_results
from ui.series import ViewerData, from_findings

logger = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 10_000
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(ValueError):
    """Nothing usable was uploaded; the message says why in one line."""


class Analyser(Protocol):
    """What the upload needs of :class:`inference.predictor.Predictor`."""

    def predict(self, volume: Volume, *, explain: bool = True) -> SeriesFindings:
        """Analyse one volume."""
        ...


@dataclass(frozen=True)
class Problem:
    """An uploaded file (or zip member) that was not used, and why."""

    name: str
    reason: str


@dataclass
class UploadedSeries:
    """One series of an upload: viewer data when analysed, else the reason it was skipped."""

    series_instance_uid: str
    description: str
    n_files: int
    data: ViewerData | None = None
    skipped: str | None = None


@dataclass
class Staged:
    """Uploaded files written to a folder: the files and the names the user knows them by."""

    paths: list[Path] = field(default_factory=list)
    names: dict[Path, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _safe_name(name: str, counter: int) -> str:
    base = _UNSAFE.sub("_", Path(name.replace("\\", "/")).name).strip("._") or "file"
    return f"{counter:05d}-{base[:80]}"


def stage(files: Iterable[tuple[str, bytes]], folder: Path) -> Staged:
    """Write uploaded files (zips expanded) into ``folder``.

    Zip members that are folders, macOS resource forks, or beyond the size and
    count limits are left out (the latter two with a problem entry).
    """
    staged = Staged()
    counter = 0
    total = 0

    def put(display: str, data: bytes) -> None:
        nonlocal counter
        counter += 1
        path = folder / _safe_name(display, counter)
        path.write_bytes(data)
        staged.paths.append(path)
        staged.names[path] = display

    for name, data in files:
        if not data:
            staged.problems.append(Problem(name, "empty file"))
            continue
        if zipfile.is_zipfile(io.BytesIO(data)):
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    members = [
                        m
                        for m in archive.infolist()
                        if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                    ]
                    if len(members) > MAX_ZIP_MEMBERS:
                        staged.problems.append(
                            Problem(
                                name, f"zip holds {len(members)} files, at most {MAX_ZIP_MEMBERS}"
                            )
                        )
                        continue
                    for member in members:
                        total += member.file_size
                        if total > MAX_UNCOMPRESSED_BYTES:
                            staged.problems.append(
                                Problem(name, "zip expands beyond 4 GiB; the rest was left out")
                            )
                            break
                        put(f"{name}:{member.filename}", archive.read(member))
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError) as exc:
                staged.problems.append(Problem(name, f"unreadable zip ({exc})"))
            continue
        put(name, data)
    return staged


def _description(datasets: list[Dataset]) -> str:
    first = datasets[0]
    parts = [
        str(first.get("Modality", "") or ""),
        str(first.get("SeriesDescription", "") or ""),
        str(first.get("PatientID", "") or ""),
    ]
    return " · ".join(p for p in parts if p) or "series"


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def result_objects(findings: SeriesFindings, volume: Volume) -> dict[str, bytes]:
    """The SEG/SR/SC objects of an analysed upload, encoded, by file name."""
    from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage

    outputs: dict[str, bytes] = {}
    for ds in encode_results(findings, volume.datasets, hu=volume.hu):
        sop_class_uid = str(ds.SOPClassUID)
        kind = (
            "SEG"
            if sop_class_uid == SegmentationStorage
            else "SC"
            if sop_class_uid == SecondaryCaptureImageStorage
            else "SR"
        )
        outputs[f"{kind}-{ds.SOPInstanceUID}.dcm"] = _encode(ds)
    return outputs


def analyse_upload(
    files: Iterable[tuple[str, bytes]],
    folder: Path,
    analyser: Analyser,
) -> tuple[list[UploadedSeries], list[Problem]]:
    """Stage, read, build and analyse every series of an upload.

    Parameters
    ----------
    files : iterable of (name, bytes)
        What the browser sent: DICOM files and zips of them.
    folder : Path
        An empty private folder for the staged files (the caller removes it).
    analyser : Analyser
        The predictor.

    Returns
    -------
    list of UploadedSeries, list of Problem
        One entry per series found (analysed or skipped with its reason), and
        the files that were not usable DICOM.

    Raises
    ------
    UploadError
        When no file of the upload is readable DICOM.
    """
    staged = stage(files, folder)
    problems = list(staged.problems)
    if not staged.paths:
        raise UploadError(
            "; ".join(f"{p.name}: {p.reason}" for p in problems) or "no files were uploaded"
        )
    groups, unreadable = read_series(staged.paths)
    for path, reason in unreadable:
        problems.append(Problem(staged.names.get(Path(path), Path(path).name), reason))
    if not groups:
        detail = problems[0].reason if problems else "no DICOM found"
        raise UploadError(f"none of the {len(staged.paths)} files is readable DICOM ({detail})")
    results: list[UploadedSeries] = []
    for series_instance_uid, datasets in groups.items():
        entry = UploadedSeries(series_instance_uid, _description(datasets), len(datasets))
        try:
            volume = load_volume(datasets)
        except SeriesSkipped as exc:
            entry.skipped = exc.reason
            results.append(entry)
            continue
        findings = analyser.predict(volume, explain=True)
        data = from_findings(volume, findings, title=entry.description)
        try:
            data.outputs = result_objects(findings, volume)
        except ResultsError as exc:
            logger.warning("upload %s: result objects not built: %s", series_instance_uid, exc)
            data.note = f"result objects could not be built: {exc}"
        entry.data = data
        results.append(entry)
    return results, problems
