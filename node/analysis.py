"""One analysis path: the instances of one series to findings and result objects.

The worker (:mod:`node.worker`), ``ichnode analyze`` and the UI upload all run
a series through :func:`analyse_series` (or its two halves,
:func:`load_series` and :func:`complete_analysis`), write what it built with
the one writer :func:`node.results.write_result_files`, and so follow the same
rules:

- **skipped**: the input is refused for a stated reason and analysing it again
  would not change that: ichnode's own output, more slices or voxels than
  :class:`inference.volume.SeriesLimits` allow (checked on the first header,
  before any pixel data is read), or a series the volume loader refuses (not
  CT, a localizer, mixed orientations or matrix sizes, no pixel data).
- **failed**: something went wrong while reading the images, running the
  model or building the SR; ``failed`` holds a one-line reason and ``error``
  the exception. The worker retries a failed series and then answers "not
  analysed"; ``ichnode analyze`` and the upload list it with the reason.
- **analysed**: findings and, unless ``build`` is off, the result objects,
  each built on its own (:func:`node.results.build_results`): an object that
  cannot be built is listed in ``results.missing`` and named in the SR.

Nothing here raises for a problem of the series itself; the caller decides
what a skipped or failed series means for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

if TYPE_CHECKING:
    from inference.findings import SeriesFindings
    from inference.volume import SeriesLimits, Volume
    from node.results import ResultSet

logger = logging.getLogger(__name__)

OWN_OUTPUT_REASON = "ichnode output (SEG/SR/key images), not analysed"
#: Bytes above which a value (pixel data) stays in the file until it is decoded.
DEFER_SIZE = 4096

_READ_ERRORS = (
    InvalidDicomError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    EOFError,
    OSError,
)


class Analyser(Protocol):
    """What the analysis needs of :class:`inference.predictor.Predictor`."""

    def predict(self, volume: Volume, *, explain: bool = True) -> SeriesFindings:
        """Analyse one volume."""
        ...


@dataclass
class SeriesAnalysis:
    """What became of one series: skipped, failed, or analysed (findings, results)."""

    series_instance_uid: str
    study_instance_uid: str
    volume: Volume | None = None
    findings: SeriesFindings | None = None
    results: ResultSet | None = None
    #: The series is not analysed: the reason its input is refused.
    skipped: str | None = None
    #: Analysis went wrong: one line saying where and why.
    failed: str | None = None
    #: The exception behind ``failed`` (traceback for the worker's log).
    error: BaseException | None = None
    inference_seconds: float = 0.0
    encoding_seconds: float = 0.0

    @property
    def objects(self) -> list[Dataset]:
        """The result objects built (SEG when found, SR, key images); empty when none."""
        return list(self.results.objects) if self.results is not None else []


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _uids(datasets: Sequence[Dataset], series_instance_uid: str | None) -> tuple[str, str]:
    first = datasets[0] if datasets else Dataset()
    series = series_instance_uid or str(first.get("SeriesInstanceUID", "") or "")
    return series, str(first.get("StudyInstanceUID", "") or "")


def _fail(
    analysis: SeriesAnalysis, what: str, exc: BaseException, *, typed: bool = True
) -> SeriesAnalysis:
    """Record a failure: ``what: message``, the exception's type named unless it is a
    ValueError (whose message is meant for the user) or ``typed`` is off."""
    detail = _one_line(exc) if typed and not isinstance(exc, ValueError) else first_line(exc)
    analysis.failed = f"{what}: {detail}"
    analysis.error = exc
    return analysis


def load_series(
    source: Sequence[Dataset] | Sequence[Path],
    *,
    limits: SeriesLimits | None = None,
    series_instance_uid: str | None = None,
) -> SeriesAnalysis:
    """Read one series into a volume, or say why it is skipped or failed.

    Parameters
    ----------
    source
        The series' datasets, or the paths of its files (then the first
        header alone is read for the size limits, and the others with their
        pixel data left in the files until it is decoded into the volume).
    limits
        The ``[jobs]`` series size limits; None: no limit.
    series_instance_uid
        The series' UID when the caller knows it (else the first header's).
    """
    from inference.volume import SeriesSkipped, load_volume
    from node.results import is_ichnode_output

    items = list(source)
    paths = [Path(cast(Path, item)) for item in items if not isinstance(item, Dataset)]
    given = [item for item in items if isinstance(item, Dataset)]
    analysis = SeriesAnalysis(*_uids(given, series_instance_uid))
    if not items:
        analysis.skipped = "no instances"
        return analysis
    first: Dataset
    try:
        if paths:
            first = dcmread(paths[0], stop_before_pixels=True)
            analysis.series_instance_uid, analysis.study_instance_uid = _uids(
                [first], series_instance_uid
            )
        else:
            first = given[0]
        if is_ichnode_output(first):
            analysis.skipped = OWN_OUTPUT_REASON
            return analysis
        if limits is not None:
            # Bounded before anything else is read: a series of 10,000 tiny slices
            # must not cost the reader its memory.
            limits.check(len(items), int(first.get("Rows", 0)), int(first.get("Columns", 0)))
        del first
        datasets = given or [dcmread(p, defer_size=DEFER_SIZE) for p in paths]
        if any(is_ichnode_output(ds) for ds in datasets):
            analysis.skipped = OWN_OUTPUT_REASON
            return analysis
        analysis.volume = load_volume(datasets, limits)
    except SeriesSkipped as exc:
        analysis.skipped = exc.reason
    except _READ_ERRORS as exc:
        # pixel data that does not decode (truncated file, broken encapsulation), a
        # file gone from the archive
        logger.debug("series %s: load failed", analysis.series_instance_uid, exc_info=True)
        _fail(analysis, "cannot read the images", exc, typed=False)
    return analysis


def complete_analysis(
    analysis: SeriesAnalysis,
    predictor: Analyser,
    *,
    build: bool = True,
    model_lock: AbstractContextManager[object] | None = None,
) -> SeriesAnalysis:
    """Run the model on a loaded series and build its result objects.

    A series that :func:`load_series` skipped or failed is returned as it is.

    Parameters
    ----------
    analysis
        What :func:`load_series` returned.
    predictor
        The loaded model.
    build
        Build the SEG/SR/SC objects (``results``); off: findings only.
    model_lock
        Held around the run of the network only.
    """
    from node.results import build_results

    volume = analysis.volume
    if volume is None or analysis.skipped or analysis.failed:
        return analysis
    logger.info(
        "analysing series %s (%d slices)",
        analysis.series_instance_uid,
        len(volume.sop_instance_uids),
    )
    lock = model_lock if model_lock is not None else contextlib.nullcontext()
    started = time.perf_counter()
    try:
        with lock:
            findings = predictor.predict(volume, explain=True)
    except Exception as exc:  # the model on this volume: one reason, the caller decides
        logger.debug("series %s: prediction failed", analysis.series_instance_uid, exc_info=True)
        return _fail(analysis, "cannot analyse", exc)
    analysis.inference_seconds = time.perf_counter() - started
    if not build:
        analysis.findings = findings
        return analysis
    started = time.perf_counter()
    try:
        analysis.results = build_results(findings, volume.datasets, hu=volume.hu)
    except Exception as exc:  # only the SR or findings that do not fit the series raise here
        logger.debug("series %s: SR not built", analysis.series_instance_uid, exc_info=True)
        _fail(analysis, "cannot encode results", exc)
    analysis.encoding_seconds = time.perf_counter() - started
    analysis.findings = findings
    return analysis


def analyse_series(
    source: Sequence[Dataset] | Sequence[Path],
    predictor: Analyser,
    *,
    limits: SeriesLimits | None = None,
    build: bool = True,
    model_lock: AbstractContextManager[object] | None = None,
    series_instance_uid: str | None = None,
) -> SeriesAnalysis:
    """Analyse one series: :func:`load_series`, then :func:`complete_analysis`."""
    analysis = load_series(source, limits=limits, series_instance_uid=series_instance_uid)
    return complete_analysis(analysis, predictor, build=build, model_lock=model_lock)
