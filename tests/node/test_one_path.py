"""One analysis path: ``ichnode analyze``, the worker and the UI upload give a series
the same outcome (the same result objects under one naming rule, the same skip
reason), and the one result writer never leaves a partial file under a final name.

``ichnode analyze`` runs as a subprocess; the worker is the real
:class:`node.worker.JobRunner` on a real index and archive files; the upload is
the real :func:`ui.upload.analyse_upload`. All use the same weights file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from config.settings import Settings
from inference.predictor import Predictor
from node import results
from node.worker import JobRunner
from storage.models import Series
from tests.loop.helpers import ct_dataset, new_index
from tests.loop.test_worker import _queue
from tests.node.test_analyze import _make_weights, parse_document
from tests.node.test_degraded import _analyze, _tiny
from ui.upload import analyse_upload

Checker = Callable[[Path], list[str]]
NAME = re.compile(r"^(\d{3})-(SEG|SR|SC)-([0-9.]+)\.dcm$")


@pytest.fixture(scope="module")
def positive_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_weights(tmp_path_factory.mktemp("weights") / "all-present.pt", 0.0)


def _settings(tmp_path: Path, weights: Path, **jobs: object) -> Settings:
    return Settings(
        storage={"root": tmp_path / "data"},  # type: ignore[arg-type]
        inference={"weights": str(weights), "device": "cpu"},  # type: ignore[arg-type]
        jobs={"max_attempts": 1, **jobs},  # type: ignore[arg-type]
    )


def _kinds(names: list[str]) -> list[str]:
    """The object kinds of files named by the one rule, checked against it, in set order."""
    parsed = [NAME.match(name) for name in names]
    assert all(parsed), names
    numbers = [int(m.group(1)) for m in parsed if m]
    assert numbers == list(range(1, len(names) + 1)), names
    return [m.group(2) for m in parsed if m]


def _stage(tmp_path: Path) -> Path:
    folder = tmp_path / "stage"
    folder.mkdir()
    return folder


def _phantom(folder: Path) -> list[Path]:
    from inference.phantom import generate_case, write_series

    case = generate_case(7, n_slices=6, matrix=64, subtypes=("intraparenchymal",))
    return list(write_series(case, folder, patient_id="ONE-PATH"))


def test_same_series_gives_the_same_objects_in_analyze_worker_and_upload(
    tmp_path: Path,
    positive_weights: Path,
    dciodvfy: Checker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = _phantom(tmp_path / "src")
    series_instance_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    # ichnode analyze --out
    run = _analyze(
        "--weights", str(positive_weights), "--out", str(tmp_path / "out"), *map(str, files)
    )
    assert run.returncode == 0, run.stderr
    (entry,) = parse_document(run.stdout)["series"]
    assert entry["skipped"] is None and entry["missing"] == []
    analyze_names = [Path(p).name for p in entry["outputs"]]
    analyze_kinds = _kinds(analyze_names)
    assert analyze_kinds[:2] == ["SEG", "SR"] and "SC" in analyze_kinds

    # the worker of ichnode serve, on the archive files of the same series
    predictor = Predictor(weights=positive_weights, device="cpu")
    index = new_index(tmp_path)
    _queue(index, files)
    runner = JobRunner(_settings(tmp_path, positive_weights), index, predictor)
    job = runner.claim()
    assert job is not None
    outcome = runner.process(job)
    assert outcome.state == "done", outcome.reason
    worker_paths = [Path(p) for p in outcome.results]
    assert all(p.parent == runner.results_root / str(job.id) for p in worker_paths)
    assert _kinds([p.name for p in worker_paths]) == analyze_kinds
    for path in worker_paths:  # the name states the object inside
        ds = pydicom.dcmread(path)
        assert path.name.endswith(f"-{ds.SOPInstanceUID}.dcm")
        assert dciodvfy(path) == [], path.name
    with index.session(readonly=True) as session:
        row = session.query(Series).one()
        assert row.hemorrhage is entry["hemorrhage"]["present"]
        assert row.hemorrhage_probability == pytest.approx(
            entry["hemorrhage"]["probability"], abs=1e-4
        )

    # the UI upload of the same files
    monkeypatch.delenv("ICHNODE_UI_CONFIG", raising=False)
    uploaded, problems = analyse_upload(
        [(p.name, p.read_bytes()) for p in files], _stage(tmp_path), predictor
    )
    assert problems == []
    (item,) = uploaded
    assert item.series_instance_uid == series_instance_uid
    assert item.skipped is None and item.data is not None
    assert item.data.hemorrhage == entry["hemorrhage"]["present"]
    names = list(item.data.outputs)
    # the download names are the written names without their set number
    assert [name.split("-")[0] for name in names] == analyze_kinds
    assert all(re.fullmatch(r"(SEG|SR|SC)-[0-9.]+\.dcm", name) for name in names), names
    written = sorted((tmp_path / "stage" / "results").rglob("*.dcm"))
    assert sorted(p.name.split("-", 1)[1] for p in written) == sorted(names)
    assert _kinds(sorted(p.name for p in written)) == analyze_kinds


def _no_spacing(folder: Path) -> list[Path]:
    paths = _tiny(4, folder)
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda folder: _tiny(12, folder), "12 slices, more than the 10 allowed per series"),
        (_no_spacing, "no PixelSpacing"),
    ],
    ids=["over-slice-limit", "no-spacing"],
)
def test_skipped_series_has_the_same_reason_in_analyze_worker_and_upload(
    tmp_path: Path,
    positive_weights: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path], list[Path]],
    reason: str,
) -> None:
    files = make(tmp_path / "src")
    limit = {"ICHNODE_JOBS__MAX_SERIES_SLICES": "10"}

    run = _analyze("--weights", str(positive_weights), str(tmp_path / "src"), env=limit)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    (entry,) = parse_document(run.stdout)["series"]
    analyze_reason = entry["skipped"]
    assert reason in analyze_reason and entry["outputs"] == []

    predictor = Predictor(weights=positive_weights, device="cpu")
    index = new_index(tmp_path)
    _queue(index, files)
    runner = JobRunner(
        _settings(tmp_path, positive_weights, max_series_slices=10), index, predictor
    )
    job = runner.claim()
    assert job is not None
    outcome = runner.process(job)
    assert outcome.state == "skipped"
    assert outcome.reason == analyze_reason
    (report,) = outcome.results  # the "not analysed" SR, named by the one rule
    assert _kinds([Path(report).name]) == ["SR"]
    (note,) = results.report_notes(pydicom.dcmread(report))
    assert note == f"not analysed: {analyze_reason}"

    # the upload takes the series limits of the UI's configuration (here: the environment)
    monkeypatch.delenv("ICHNODE_UI_CONFIG", raising=False)
    for key, value in limit.items():
        monkeypatch.setenv(key, value)
    uploaded, _ = analyse_upload(
        [(p.name, p.read_bytes()) for p in files], _stage(tmp_path), predictor
    )
    (item,) = uploaded
    assert item.data is None and item.skipped == analyze_reason


def test_writer_names_by_the_one_rule_and_replaces_only_when_asked(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    first = [ct_dataset(study, series, instance_number=i) for i in (1, 2)]
    paths = results.write_result_files(tmp_path / "job", first)
    assert [p.name for p in paths] == [
        f"{n:03d}-SR-{ds.SOPInstanceUID}.dcm" for n, ds in enumerate(first, start=1)
    ]
    second = [ct_dataset(study, series, instance_number=3)]
    kept = results.write_result_files(tmp_path / "job", second)  # e.g. analyze --out
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == sorted(
        p.name for p in [*paths, *kept]
    )
    replaced = results.write_result_files(tmp_path / "job", second, replace=True)  # a job rerun
    assert list((tmp_path / "job").iterdir()) == replaced


@pytest.mark.filterwarnings("ignore:A value of type 'str' cannot be assigned")
def test_writer_leaves_no_file_under_the_final_name_when_a_write_fails(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    good = ct_dataset(study, series, instance_number=1)
    bad = ct_dataset(study, series, instance_number=2)
    # a value pydicom cannot encode, after the elements it has already written:
    # the write fails part way through the file
    bad.add_new(0x00291010, "US", "not a number")
    folder = tmp_path / "out"
    with pytest.raises(Exception) as failure:
        results.write_result_files(folder, [good, bad])
    assert not isinstance(failure.value, AssertionError)
    names = [p.name for p in folder.iterdir()]
    # the first object is complete under its final name; nothing of the second is
    # visible, neither under its final name nor as a temporary file
    assert names == [results.result_file_name(1, good)]
    assert pydicom.dcmread(folder / names[0]).SOPInstanceUID == good.SOPInstanceUID
    assert not (folder / results.result_file_name(2, bad)).exists()
