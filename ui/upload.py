"""Uploads: DICOM files or zips dropped in the browser, analysed in place.

Files are staged in a private temporary folder (zip members extracted with
flattened, sanitised names: nothing escapes the folder), read with
:func:`inference.volume.read_series` and analysed on the node's one analysis
path (:mod:`node.analysis`: the ``[jobs]`` series size limits, the same skip
reasons and result objects as the worker and ``ichnode analyze``); the SEG/SR/SC
objects are written with the node's result writer into the private folder and
held in memory for download. Nothing uploaded is written to the index or sent
anywhere.

An upload is bounded by :class:`UploadLimits` (``[ui]`` in the configuration):
its expanded size, checked against the sizes a zip declares before anything is
extracted and again on the bytes actually written; its number of files, zip
members counted, and what deflated DICOM files inflate to, since the reader
holds that in memory; and the time staging and reading may take. An upload beyond
one of them is refused whole with :class:`UploadRefused` and a log line. The
model lock, when one is given, is held only while the network runs, so one
large upload being staged or read does not hold up another user's.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import time
import zipfile
import zlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED

from inference.findings import SeriesFindings
from inference.volume import SeriesLimits, Volume, read_series
from node.analysis import SeriesAnalysis, complete_analysis, load_series
from node.results import ResultSet, write_result_files
from ui.series import ViewerData, from_findings

if TYPE_CHECKING:
    from config.settings import UiSettings

logger = logging.getLogger(__name__)

MB = 1024**2
CHUNK_BYTES = 1 * MB
READ_BATCH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may hold and take (the ``[ui]`` settings ``upload_max_*``)."""

    max_expanded_bytes: int = 2048 * MB
    max_files: int = 10_000
    max_read_seconds: float = 300.0

    @classmethod
    def from_settings(cls, ui: UiSettings) -> UploadLimits:
        """The limits configured in ``[ui]``."""
        return cls(
            max_expanded_bytes=int(ui.upload_max_expanded_mb) * MB,
            max_files=int(ui.upload_max_files),
            max_read_seconds=float(ui.upload_max_read_seconds),
        )


class UploadError(ValueError):
    """Nothing usable was uploaded; the message says why in one line."""


class UploadRefused(UploadError):
    """The upload goes beyond one of the :class:`UploadLimits`; none of it is analysed."""


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


def _mb(n: int) -> str:
    return f"{n / MB:,.0f} MB" if n >= MB else f"{n:,} bytes"


def _refuse(reason: str) -> UploadRefused:
    logger.warning("upload refused: %s", reason)
    return UploadRefused(reason)


class _Budget:
    """The room left in an upload: bytes, files and time (raises UploadRefused when spent)."""

    def __init__(self, limits: UploadLimits, deadline: float) -> None:
        self.limits = limits
        self.deadline = deadline
        self.bytes = 0
        self.files = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _refuse(
                f"staging and reading took longer than {self.limits.max_read_seconds:g} s "
                "(ui.upload_max_read_seconds)"
            )

    def add_files(self, n: int, what: str) -> None:
        self.files += n
        if self.files > self.limits.max_files:
            raise _refuse(
                f"{what} brings the upload to {self.files:,} files, more than "
                f"{self.limits.max_files:,} (ui.upload_max_files)"
            )

    def expanded_beyond(self, n: int | None, what: str) -> UploadRefused:
        """The refusal: ``n`` is the whole size when known, None when counting stopped early."""
        limit = _mb(self.limits.max_expanded_bytes)
        size = f"to {_mb(n)}, more than" if n is not None else "beyond"
        return _refuse(f"{what} expands the upload {size} {limit} (ui.upload_max_expanded_mb)")

    def add_bytes(self, n: int, what: str, *, whole: bool = True) -> None:
        """Count ``n`` more bytes; ``whole``: ``n`` is all of ``what``, not a part counted so far."""
        self.bytes += n
        if self.bytes > self.limits.max_expanded_bytes:
            raise self.expanded_beyond(self.bytes if whole else None, what)


def stage(
    files: Iterable[tuple[str, bytes]],
    folder: Path,
    limits: UploadLimits | None = None,
    deadline: float | None = None,
) -> Staged:
    """Write uploaded files (zips expanded) into ``folder``.

    Zip members that are folders or macOS resource forks are left out; an
    unreadable zip is a problem entry. A zip's member count and declared sizes
    are checked against ``limits`` before anything of it is extracted, and the
    bytes written are counted while they stream, whatever the zip declares.

    Raises
    ------
    UploadRefused
        When the upload goes beyond ``limits`` (expanded size, file count) or
        staging goes on past ``deadline`` (a ``time.monotonic()`` value).
    """
    limits = limits or UploadLimits()
    budget = _Budget(
        limits, deadline if deadline is not None else time.monotonic() + limits.max_read_seconds
    )
    staged = Staged()
    counter = 0

    def target(display: str) -> Path:
        nonlocal counter
        counter += 1
        path = folder / _safe_name(display, counter)
        staged.paths.append(path)
        staged.names[path] = display
        return path

    for name, data in files:
        budget.check_time()
        if not data:
            staged.problems.append(Problem(name, "empty file"))
            continue
        if not zipfile.is_zipfile(io.BytesIO(data)):
            budget.add_files(1, name)
            budget.add_bytes(len(data), name)
            target(name).write_bytes(data)
            continue
        partial: Path | None = None
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                members = [
                    m
                    for m in archive.infolist()
                    if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                ]
                budget.add_files(len(members), f"zip {name}")
                declared = budget.bytes + sum(max(m.file_size, 0) for m in members)
                if declared > limits.max_expanded_bytes:
                    raise budget.expanded_beyond(declared, f"zip {name}")
                for member in members:
                    partial = target(f"{name}:{member.filename}")
                    with archive.open(member) as source, partial.open("wb") as sink:
                        while chunk := source.read(CHUNK_BYTES):
                            budget.add_bytes(len(chunk), f"zip {name}", whole=False)
                            budget.check_time()
                            sink.write(chunk)
                    partial = None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError) as exc:
            staged.problems.append(Problem(name, f"unreadable zip ({exc})"))
            if partial is not None:  # the member being extracted when the zip failed
                staged.paths.remove(partial)
                del staged.names[partial]
                partial.unlink(missing_ok=True)
    return staged


def _description(datasets: list[Dataset]) -> str:
    first = datasets[0]
    parts = [
        str(first.get("Modality", "") or ""),
        str(first.get("SeriesDescription", "") or ""),
        str(first.get("PatientID", "") or ""),
    ]
    return " · ".join(p for p in parts if p) or "series"


def result_objects(built: ResultSet, folder: Path) -> dict[str, bytes]:
    """The SEG/SR/SC objects of an analysed upload, by file name, for download.

    Written with the node's one result writer into ``folder`` and read back. The
    download names are the written names without their ``<NNN>-`` set number,
    ``<SEG|SR|SC>-<SOPInstanceUID>.dcm``, as the viewer's download buttons (and
    the stored series' downloads, ``ui.stored.read_outputs``) name them.
    """
    return {
        path.name.split("-", 1)[1]: path.read_bytes()
        for path in write_result_files(folder, built.objects)
    }


def configured_series_limits() -> SeriesLimits:
    """The ``[jobs]`` series size limits of the UI's configuration (``ICHNODE_UI_CONFIG``)."""
    from config import ConfigError, load_settings
    from config.settings import JobSettings

    try:
        jobs = load_settings(os.environ.get("ICHNODE_UI_CONFIG") or None).jobs
    except ConfigError as exc:  # the page says so when it loads the same file
        logger.warning("upload: configuration not readable (%s); default series limits", exc)
        jobs = JobSettings()
    return SeriesLimits(max_slices=jobs.max_series_slices, max_voxels=jobs.max_series_voxels)


_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_META_READ = 64 * 1024


def _deflated_start(path: Path) -> int | None:
    """Where the deflated data set of a Deflated Explicit VR Little Endian file starts.

    None when the file is anything else (the File Meta group is parsed element
    by element, as the reader does, so a missing group length does not hide it).
    """
    with path.open("rb") as handle:
        head = handle.read(_META_READ)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    position, syntax = 132, b""
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            break
        vr = head[position + 4 : position + 6]
        if vr in _LONG_VRS:
            if position + 12 > len(head):
                return None
            length, header = struct.unpack_from("<I", head, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", head, position + 6)[0], 8
        if element == 0x0010:
            syntax = head[position + header : position + header + length]
        position += header + length
    if syntax.rstrip(b"\0 ") != DEFLATED.encode():
        return None
    return position


def _inflated_size(path: Path, start: int, cap: int) -> int:
    """Bytes the deflated data set from ``start`` inflates to, counted up to just past ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with path.open("rb") as handle:
        handle.seek(start)
        while total <= cap and (chunk := handle.read(CHUNK_BYTES)):
            while chunk and total <= cap:
                try:
                    total += len(inflater.decompress(chunk, CHUNK_BYTES))
                except zlib.error:
                    return total  # the reader will call it unreadable
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break
    return total


def _check_deflated(staged: Staged, budget: _Budget) -> None:
    """Count what deflated DICOM files inflate to (the reader holds all of it in memory)."""
    for path in staged.paths:
        budget.check_time()
        start = _deflated_start(path)
        if start is None:
            continue
        room = budget.limits.max_expanded_bytes - budget.bytes
        budget.add_bytes(
            _inflated_size(path, start, room), f"deflated {staged.names[path]}", whole=False
        )


def _read(
    paths: list[Path], budget: _Budget
) -> tuple[dict[str, list[Dataset]], list[tuple[Path, str]]]:
    """:func:`read_series` in batches, with the reading time checked between them."""
    groups: dict[str, list[Dataset]] = {}
    unreadable: list[tuple[Path, str]] = []
    for start in range(0, len(paths), READ_BATCH):
        budget.check_time()
        batch_groups, batch_unreadable = read_series(paths[start : start + READ_BATCH])
        for uid, datasets in batch_groups.items():
            groups.setdefault(uid, []).extend(datasets)
        unreadable.extend(batch_unreadable)
    budget.check_time()
    return groups, unreadable


def analyse_upload(
    files: Iterable[tuple[str, bytes]],
    folder: Path,
    analyser: Analyser,
    *,
    limits: UploadLimits | None = None,
    model_lock: AbstractContextManager[object] | None = None,
    series_limits: SeriesLimits | None = None,
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
    limits : UploadLimits, optional
        Size, file count and reading time allowed (defaults: :class:`UploadLimits`).
    model_lock : context manager, optional
        Held around each run of the network only (staging, reading and
        encoding the result objects happen outside it).
    series_limits : SeriesLimits, optional
        The ``[jobs]`` series size limits (default: those of the UI's
        configuration); a larger series is skipped with the reason the node gives.

    Returns
    -------
    list of UploadedSeries, list of Problem
        One entry per series found (analysed or skipped with its reason), and
        the files that were not usable DICOM.

    Raises
    ------
    UploadRefused
        When the upload goes beyond ``limits``.
    UploadError
        When no file of the upload is readable DICOM.
    """
    limits = limits or UploadLimits()
    budget = _Budget(limits, time.monotonic() + limits.max_read_seconds)
    staged = stage(files, folder, limits, budget.deadline)
    problems = list(staged.problems)
    if not staged.paths:
        raise UploadError(
            "; ".join(f"{p.name}: {p.reason}" for p in problems) or "no files were uploaded"
        )
    _check_deflated(staged, budget)
    groups, unreadable = _read(staged.paths, budget)
    for path, reason in unreadable:
        problems.append(Problem(staged.names.get(Path(path), Path(path).name), reason))
    if not groups:
        detail = problems[0].reason if problems else "no DICOM found"
        raise UploadError(f"none of the {len(staged.paths)} files is readable DICOM ({detail})")
    if series_limits is None:
        series_limits = configured_series_limits()
    # The one analysis path (node.analysis) of the worker and ``ichnode analyze``:
    # the same size limits, the same skip reasons, the same result objects.
    entries: list[tuple[UploadedSeries, SeriesAnalysis]] = []
    for series_instance_uid, datasets in groups.items():
        entry = UploadedSeries(series_instance_uid, _description(datasets), len(datasets))
        analysis = load_series(
            datasets, limits=series_limits, series_instance_uid=series_instance_uid
        )
        budget.check_time()
        entries.append((entry, analysis))
    for number, (entry, analysis) in enumerate(entries, start=1):
        analysis = complete_analysis(analysis, analyser, model_lock=model_lock)
        volume, findings = analysis.volume, analysis.findings
        if volume is None or findings is None:
            entry.skipped = analysis.skipped or analysis.failed or "not analysed"
            continue
        data = from_findings(volume, findings, title=entry.description)
        if analysis.results is None:
            logger.warning(
                "upload %s: result objects not built: %s",
                entry.series_instance_uid,
                analysis.failed,
            )
            data.note = analysis.failed or "result objects could not be built"
        else:
            if analysis.results.missing:
                data.note = "; ".join(m.sentence() for m in analysis.results.missing)
            try:
                data.outputs = result_objects(
                    analysis.results, folder / "results" / f"{number:03d}"
                )
            except OSError as exc:  # the staging folder's disk: findings still shown
                logger.warning(
                    "upload %s: result objects not written: %s", entry.series_instance_uid, exc
                )
                data.note = f"result objects could not be written: {exc}"
        entry.data = data
    return [entry for entry, _ in entries], problems
