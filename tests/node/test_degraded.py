"""Answers degrade, never vanish: each result object is built on its own, the SR says
what is missing and why, a series that cannot be analysed gets a "not analysed" SR,
and ``ichnode analyze`` reports one line per failure with its JSON document complete.

Every object written here passes ``dciodvfy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from node import results
from tests.interop import REPO
from tests.node.conftest import FIXED_NOW, hu_volume, make_ct_series, make_findings
from tests.node.test_analyze import _make_weights, parse_document, write_series

Checker = Callable[[Path], list[str]]


def _bleed(n: int, matrix: int) -> dict[str, np.ndarray]:
    mask = np.zeros((n, matrix, matrix), dtype=bool)
    mask[1:3, 20:30, 20:30] = True
    return {"intraventricular": mask}


def _written(built: results.ResultSet, out: Path, dciodvfy: Checker) -> list[pydicom.Dataset]:
    paths = results.write_datasets(built.objects, out)
    for path in paths:
        assert dciodvfy(path) == [], path.name
    return [pydicom.dcmread(p) for p in paths]


@pytest.mark.interop
@pytest.mark.parametrize("layout", ["per-slice", "some-missing"])
def test_frame_of_reference_differing_per_slice_still_gives_a_seg(
    tmp_path: Path, dciodvfy: Checker, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    datasets = make_ct_series(5, 48)
    majority = str(datasets[0].FrameOfReferenceUID)
    for index, ds in enumerate(datasets):
        if layout == "per-slice" and index:
            ds.FrameOfReferenceUID = generate_uid()
        if layout == "some-missing" and index in (1, 3):
            del ds.FrameOfReferenceUID
    findings = make_findings(datasets, _bleed(5, 48))
    built = results.build_results(findings, datasets, hu=hu_volume(datasets), now=FIXED_NOW)
    assert built.missing == []
    objects = _written(built, tmp_path, dciodvfy)
    assert [ds.Modality for ds in objects] == ["SEG", "SR", "OT"]
    assert objects[0].FrameOfReferenceUID == majority
    assert results.report_notes(objects[1]) == []
    assert "distinct Frame of Reference UIDs" in caplog.text
    # the caller's datasets are left as they were
    if layout == "per-slice":
        assert len({str(ds.FrameOfReferenceUID) for ds in datasets}) == 5


@pytest.mark.interop
def test_seg_that_cannot_be_built_is_named_in_the_sr_and_the_rest_goes_out(
    tmp_path: Path, dciodvfy: Checker
) -> None:
    datasets = make_ct_series(5, 48)
    for ds in datasets:  # as the anonymised CQ500 series: highdicom refuses the SEG
        del ds.FrameOfReferenceUID
    findings = make_findings(datasets, _bleed(5, 48))
    built = results.build_results(findings, datasets, hu=hu_volume(datasets), now=FIXED_NOW)
    (missing,) = built.missing
    assert missing.kind == "SEG" and "Frame Of Reference UID" in missing.reason
    objects = _written(built, tmp_path, dciodvfy)
    assert [ds.Modality for ds in objects] == ["SR", "OT"]
    sr = objects[0]
    assert results.report_notes(sr) == [missing.sentence()]
    # the findings themselves are all there: hemorrhage present, the subtype's volume
    assert sr.CompletionFlag == "COMPLETE"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == 5
    assert "274110009" in str(sr.ContentSequence)  # intraventricular hemorrhage, stated


@pytest.mark.interop
def test_not_analysed_report_states_no_finding_and_the_reason(
    tmp_path: Path, dciodvfy: Checker
) -> None:
    from pydicom.sr.codedict import codes

    datasets = make_ct_series(3, 32, bad_headers=True)
    report = results.build_not_analysed_report(
        datasets[:1], "mixed matrix sizes [(32, 32), (64, 64)]", results.ModelIdentity()
    )
    (sr,) = _written(results.ResultSet([report]), tmp_path, dciodvfy)
    assert results.report_notes(sr) == ["not analysed: mixed matrix sizes [(32, 32), (64, 64)]"]
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.StudyInstanceUID == datasets[0].StudyInstanceUID
    assert sr.SeriesDescription == results.SR_SERIES_DESCRIPTION
    text = str(sr.ContentSequence)
    assert codes.SCT.Present.value not in text and codes.SCT.Absent.value not in text
    with pytest.raises(results.ResultsError):
        results.build_not_analysed_report([], "no instances", results.ModelIdentity())


@pytest.fixture(scope="module")
def positive_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_weights(tmp_path_factory.mktemp("weights") / "all-present.pt", 0.0)


def _analyze(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", "--json", "--device", "cpu", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=full,
        check=False,
    )


@pytest.mark.interop
def test_analyze_without_frame_of_reference_one_line_no_traceback_json_complete(
    tmp_path: Path, positive_weights: Path, dciodvfy: Checker
) -> None:
    broken = make_ct_series(4, 48)
    for ds in broken:
        del ds.FrameOfReferenceUID
    fine = make_ct_series(4, 48)
    write_series(broken, tmp_path / "in" / "broken")
    write_series(fine, tmp_path / "in" / "fine")
    out = tmp_path / "out"
    run = _analyze("--weights", str(positive_weights), "--out", str(out), str(tmp_path / "in"))
    assert "Traceback" not in run.stderr
    assert run.returncode == 1, run.stderr
    entries = {e["series_instance_uid"]: e for e in parse_document(run.stdout)["series"]}
    assert set(entries) == {broken[0].SeriesInstanceUID, fine[0].SeriesInstanceUID}
    bad, good = entries[broken[0].SeriesInstanceUID], entries[fine[0].SeriesInstanceUID]
    for entry in (bad, good):
        assert entry["skipped"] is None and entry["hemorrhage"]["present"] is True
        assert len(entry["slices"]) == 4
    assert [m["object"] for m in bad["missing"]] == ["SEG"]
    assert good["missing"] == []
    problems = [line for line in run.stderr.splitlines() if line.startswith("ichnode analyze:")]
    reason = bad["missing"][0]["reason"]
    assert problems == [
        f"ichnode analyze: series {broken[0].SeriesInstanceUID}: SEG not produced: {reason}"
    ]
    kinds = {
        uid: sorted(pydicom.dcmread(p).Modality for p in entry["outputs"])
        for uid, entry in entries.items()
    }
    assert (
        kinds[broken[0].SeriesInstanceUID][0] != "SEG"
        and "SR" in kinds[broken[0].SeriesInstanceUID]
    )
    assert "SEG" in kinds[fine[0].SeriesInstanceUID]
    for entry in entries.values():
        for path in entry["outputs"]:
            assert dciodvfy(Path(path)) == []


def _tiny(n: int, folder: Path) -> list[Path]:
    """``n`` CT slices of 8x8 pixels with full geometry."""
    from tests.loop.helpers import ct_dataset

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        ds = ct_dataset(study, series, instance_number=i + 1)
        ds.FrameOfReferenceUID = frame
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_analyze_series_over_the_limits_is_skipped_with_the_reason(
    tmp_path: Path, positive_weights: Path
) -> None:
    _tiny(12, tmp_path / "in")
    run = _analyze(
        "--weights",
        str(positive_weights),
        str(tmp_path / "in"),
        env={"ICHNODE_JOBS__MAX_SERIES_SLICES": "10"},
    )
    assert "Traceback" not in run.stderr
    assert run.returncode == 1
    (entry,) = parse_document(run.stdout)["series"]
    assert entry["skipped"] == "12 slices, more than the 10 allowed per series"
    assert entry["outputs"] == []
    run = _analyze(
        "--weights",
        str(positive_weights),
        str(tmp_path / "in"),
        env={"ICHNODE_JOBS__MAX_SERIES_VOXELS": "700"},
    )
    (entry,) = parse_document(run.stdout)["series"]
    assert entry["skipped"] == "768 voxels (12 x 8 x 8), more than the 700 allowed per series"
    problems = [line for line in run.stderr.splitlines() if line.startswith("ichnode analyze:")]
    assert len(problems) == 1 and "768 voxels" in problems[0]
