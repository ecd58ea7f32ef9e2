"""``ichnode analyze PATH... [--out DIR] [--json] [--device auto|cpu|cuda] [--weights W]
[--precision auto|fp32]``.

Analyses DICOM files and folders without a database or a network: groups the
files into series, runs each through the node's one analysis path
(:func:`node.analysis.load_series` / :func:`~node.analysis.complete_analysis`,
as the worker and the UI upload do: the same ``[jobs]`` size limits and skip
reasons), writes the SEG/SR/SC objects to ``--out`` with the node's result
writer (``<NNN>-<SEG|SR|SC>-<SOPInstanceUID>.dcm``, as under ``results/<job id>/``)
and, with ``--json``, prints exactly one JSON document on stdout
(``{"series": [...]}``, see DESIGN.md). A series that is skipped or whose
analysis fails is listed with its reason under ``"skipped"``. Logs and progress
go to stderr only.

Exit codes: 0 when every series was analysed (series that are ichnode's own
output are skipped and do not count against it); 1 when some input could not
be analysed (a skipped series, a file that is not readable DICOM) or a result
object could not be built (listed under ``"missing"``, the others are written); 2 when
nothing could be done (a path that does not exist, unusable weights or device,
an output folder that cannot be written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydicom import Dataset

from node.analysis import OWN_OUTPUT_REASON, first_line

logger = logging.getLogger(__name__)


class AnalyzeError(Exception):
    """A failure that stops the whole command; its message is one line for stderr."""


def _first_line(exc: BaseException) -> str:
    return first_line(exc)


def _skipped(datasets: list[Dataset], series_instance_uid: str, reason: str) -> dict[str, Any]:
    study_instance_uid = str(datasets[0].get("StudyInstanceUID", "")) if datasets else ""
    return {
        "study_instance_uid": study_instance_uid,
        "series_instance_uid": series_instance_uid,
        "outputs": [],
        "skipped": reason,
    }


class _Analyzer:
    """Holds the predictor (made once, on the first series that needs it)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.weights = args.weights or None
        self.device = args.device
        self.precision = args.precision
        self.out_dir = Path(args.out) if args.out else None
        self._predictor: Any = None
        # The [jobs] limits and report switch and the [routing] rules: embedded
        # defaults with ICHNODE_* overrides, read once for the whole run.
        from config import load_settings
        from inference.volume import SeriesLimits

        settings = load_settings(None)
        jobs = settings.jobs
        self.limits = SeriesLimits(
            max_slices=jobs.max_series_slices, max_voxels=jobs.max_series_voxels
        )
        self.report_not_analysed = bool(jobs.report_not_analysed)
        self.routing = settings.routing

    def predictor(self) -> Any:
        if self._predictor is None:
            from inference.predictor import Predictor, WeightsError

            try:
                self._predictor = Predictor(
                    weights=self.weights, device=self.device, precision=self.precision
                )
            except (WeightsError, ValueError, OSError) as exc:
                raise AnalyzeError(f"cannot load the model: {_first_line(exc)}") from exc
        return self._predictor

    def series(self, series_instance_uid: str, datasets: list[Dataset]) -> dict[str, Any]:
        """Analyse one series; return its entry of the JSON document.

        Whatever goes wrong with one series (short of the model or the output
        folder being unusable) becomes a one-line reason in its entry: the
        document stays complete and no traceback is printed.
        """
        try:
            return self._series(series_instance_uid, datasets)
        except AnalyzeError:
            raise
        except Exception as exc:  # a bug or an input nobody foresaw: one line, not a traceback
            logger.debug("series %s: analysis failed", series_instance_uid, exc_info=True)
            return _skipped(
                datasets,
                series_instance_uid,
                f"cannot analyse: {type(exc).__name__}: {_first_line(exc)}",
            )

    def _not_analysed_report(self, datasets: list[Dataset], reason: str) -> list[str]:
        """With ``--out``: the "not analysed" SR of a skipped series the routing rules
        would analyse, as ``ichnode serve`` sends it; the paths written."""
        if (
            self.out_dir is None
            or not self.report_not_analysed
            or not datasets
            or reason == OWN_OUTPUT_REASON
        ):
            return []
        from node.results import ResultsError, build_not_analysed_report, write_result_files
        from node.routing import skip_reason

        # As under ichnode serve: only a series the routing rules would analyse is
        # answered (not an MR series, a localizer series or ichnode's own output).
        if skip_reason(datasets[0], len(datasets), self.routing) is not None:
            return []
        try:
            report = build_not_analysed_report(datasets[:1], reason, self.predictor())
        except (ResultsError, ValueError, AttributeError) as exc:
            print(
                f"ichnode analyze: no not-analysed report for a skipped series: {_first_line(exc)}",
                file=sys.stderr,
            )
            return []
        try:
            return [str(path) for path in write_result_files(self.out_dir, [report])]
        except OSError as exc:
            raise AnalyzeError(
                f"cannot write results to {self.out_dir}: {_first_line(exc)}"
            ) from exc

    def _series(self, series_instance_uid: str, datasets: list[Dataset]) -> dict[str, Any]:
        from node.analysis import complete_analysis, load_series
        from node.results import write_result_files

        # The one analysis path (node.analysis) the worker and the UI upload take:
        # a skipped or failed series is listed with its reason under "skipped".
        analysis = load_series(
            datasets, limits=self.limits, series_instance_uid=series_instance_uid
        )
        if analysis.volume is not None and not (analysis.skipped or analysis.failed):
            analysis = complete_analysis(analysis, self.predictor(), build=self.out_dir is not None)
        reason = analysis.skipped or analysis.failed
        if reason is not None or analysis.findings is None:
            entry = _skipped(datasets, series_instance_uid, reason or "cannot analyse")
            entry["outputs"] = self._not_analysed_report(datasets, entry["skipped"])
            return entry
        findings = analysis.findings
        outputs: list[str] = []
        missing: list[dict[str, str]] = []
        if self.out_dir is not None and analysis.results is not None:
            built = analysis.results
            try:
                paths = write_result_files(self.out_dir, built.objects)
            except OSError as exc:
                raise AnalyzeError(
                    f"cannot write results to {self.out_dir}: {_first_line(exc)}"
                ) from exc
            outputs = [str(path) for path in paths]
            missing = [{"object": m.kind, "reason": m.reason} for m in built.missing]
            for item in built.missing:
                print(
                    f"ichnode analyze: series {series_instance_uid}: {item.sentence()}",
                    file=sys.stderr,
                )
        entry = findings.to_json()
        entry["outputs"] = outputs
        entry["missing"] = missing
        entry["skipped"] = None
        logger.info(
            "series %s: hemorrhage %s (p=%.3f), %d objects written",
            series_instance_uid,
            "present" if findings.hemorrhage_present else "absent",
            findings.hemorrhage_probability,
            len(outputs),
        )
        return entry


def _summary_line(entry: dict[str, Any]) -> str:
    uid = entry["series_instance_uid"]
    if entry["skipped"] is not None:
        return f"{uid}: skipped ({entry['skipped']})"
    found = [name for name, sub in entry["subtypes"].items() if sub["present"]]
    verdict = "hemorrhage" if entry["hemorrhage"]["present"] else "no hemorrhage"
    detail = f" [{', '.join(found)}]" if found else ""
    return (
        f"{uid}: {verdict} (p={entry['hemorrhage']['probability']:.2f}){detail}, "
        f"{len(entry['outputs'])} objects"
    )


def analyze(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Run the analysis; return the JSON document and the exit code."""
    from inference.volume import read_series

    paths = [Path(p) for p in args.paths]
    for path in paths:
        if not path.exists():
            raise AnalyzeError(f"no such file or folder: {path}")
    if args.out:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise AnalyzeError(f"--out {out_dir} exists and is not a folder")
    groups, unreadable = read_series(paths)
    for path, reason in unreadable:
        print(f"ichnode analyze: {path}: {reason}", file=sys.stderr)
    if not groups and unreadable:
        logger.warning("no readable DICOM among the %d files given", len(unreadable))

    analyzer = _Analyzer(args)
    entries: list[dict[str, Any]] = []
    for series_instance_uid, datasets in groups.items():
        entries.append(analyzer.series(series_instance_uid, list(datasets)))

    failed = bool(unreadable) or not (groups or unreadable)
    for entry in entries:
        if entry["skipped"] is not None and entry["skipped"] != OWN_OUTPUT_REASON:
            print(
                f"ichnode analyze: series {entry['series_instance_uid']} skipped: "
                f"{entry['skipped']}",
                file=sys.stderr,
            )
            failed = True
        if entry.get("missing"):
            failed = True  # analysed, but some result object could not be built (said above)
    if not groups and not unreadable:
        print("ichnode analyze: no files found", file=sys.stderr)
    return {"series": entries}, (1 if failed else 0)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ichnode analyze``; returns the exit code."""
    real_stdout = sys.stdout
    # highdicom logs every module it copies at INFO; keep progress lines readable
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.root.level))
    try:
        # Nothing but the JSON document may reach stdout: whatever a library
        # prints while we work goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            document, code = analyze(args)
    except AnalyzeError as exc:
        print(f"ichnode analyze: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback: one line (the details at --log-level DEBUG)
        logger.debug("ichnode analyze failed", exc_info=True)
        print(f"ichnode analyze: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 2
    if args.json:
        real_stdout.write(json.dumps(document) + "\n")
    else:
        for entry in document["series"]:
            real_stdout.write(_summary_line(entry) + "\n")
    real_stdout.flush()
    return code
