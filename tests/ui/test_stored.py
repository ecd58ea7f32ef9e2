"""Reading a node series back: SR findings, SEG masks, the read-only index."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from sqlalchemy.exc import OperationalError

from config import load_settings
from inference.findings import SUBTYPES
from inference.volume import load_volume, read_series
from node.results import encode_results
from node.worker import JobRunner
from storage.archive import Archive
from storage.index import Index, InstanceMeta
from tests.ui.conftest import (
    GroundTruth,
    NodeData,
    make_series,
    queue,
    store,
    truth_findings,
    write_config,
)
from ui.series import masks_from_seg
from ui.stored import finding_from_sr, load_node_series, not_analysed_statement, read_finding
from ui.worklist import IndexUnavailable, open_index, read_only_url


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, list[Dataset]]:
    folder = tmp_path_factory.mktemp("encoded")
    phantom = make_series(folder, 41, ("epidural", "intraventricular"))
    groups, _ = read_series(phantom.paths)
    volume = load_volume(next(iter(groups.values())))
    findings = truth_findings(phantom, volume)
    return volume, findings, encode_results(findings, volume.datasets, hu=volume.hu)


def test_sr_gives_back_every_decision_probability_and_volume(
    encoded: tuple[object, object, list[Dataset]],
) -> None:
    _, findings, objects = encoded
    sr = next(ds for ds in objects if ds.Modality == "SR")
    stored = finding_from_sr(sr)
    assert stored.hemorrhage is True
    assert stored.probability == pytest.approx(0.97)
    assert set(stored.subtypes) == set(SUBTYPES)
    for name in SUBTYPES:
        present, probability, volume_ml = stored.subtypes[name]
        truth = findings.subtypes[name]  # type: ignore[attr-defined]
        assert present is truth.present, name
        if truth.present:
            assert probability == pytest.approx(truth.probability)
            assert volume_ml == pytest.approx(truth.volume_ml, rel=1e-6)
        else:
            assert probability is None and volume_ml is None
    assert stored.present_subtypes() == ["intraventricular", "epidural"]


def test_seg_gives_back_the_masks_exactly(
    encoded: tuple[object, object, list[Dataset]], tmp_path: Path
) -> None:
    volume, findings, objects = encoded
    seg_ds = next(ds for ds in objects if ds.Modality == "SEG")
    path = tmp_path / "seg.dcm"
    seg_ds.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    masks = masks_from_seg(seg, volume.sop_instance_uids, volume.hu.shape)  # type: ignore[attr-defined]
    assert masks.dtype == bool
    assert np.array_equal(masks, findings.masks)  # type: ignore[attr-defined]
    # slices in another order come back in that order
    reversed_uids = list(reversed(volume.sop_instance_uids))  # type: ignore[attr-defined]
    back = masks_from_seg(seg, reversed_uids, volume.hu.shape)  # type: ignore[attr-defined]
    assert np.array_equal(back, findings.masks[:, ::-1])  # type: ignore[attr-defined]


def test_not_a_report_is_refused() -> None:
    ds = Dataset()
    ds.Modality = "CT"
    with pytest.raises(ValueError, match="not a structured report"):
        finding_from_sr(ds)


def test_node_series_with_its_stored_findings(node_data: NodeData) -> None:
    index = open_index(node_data.settings)
    try:
        data = load_node_series(index, node_data.settings, node_data.positive.series_instance_uid)
        positive = node_data.positive
        assert data.hemorrhage is True and data.note == ""
        assert data.subtypes_found() == ["intraparenchymal", "subdural"]
        order = [positive.slice_of[uid] for uid in data.sop_instance_uids]
        assert data.masks is not None
        assert np.array_equal(data.masks, positive.case.labels[:, order])
        assert sorted(name.split("-")[0] for name in data.outputs) == ["SC", "SC", "SEG", "SR"]
        assert data.gradcam is None and data.slice_probabilities is None
        assert data.hu.shape == (10, 128, 128)

        waiting = load_node_series(
            index, node_data.settings, node_data.receiving.series_instance_uid
        )
        assert waiting.hemorrhage is None and waiting.note == "not analysed yet"
        assert waiting.masks is None and waiting.n_slices == 4
    finally:
        index.dispose()


@dataclass
class CrashingModel(GroundTruth):
    """A model that raises on the series named in ``fail``, with the identity a
    predictor gives the node's reports (so the worker can write its "not analysed" SR)."""

    model_name: str = "ichnode-ich"
    model_version: str = "test"
    weights_sha256: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)


def test_not_analysed_report_shows_its_reason(tmp_path: Path) -> None:
    """A series the worker failed on gets the node's "not analysed" SR; the viewer
    shows its reason, not that the stored report cannot be read."""
    settings = load_settings(write_config(tmp_path))
    archive = Archive(settings.storage.root)
    index = Index(settings.storage.effective_database_url, sqlite_synchronous="NORMAL")
    index.upgrade()
    phantom = make_series(tmp_path / "src", 21, ("epidural",), patient_id="ICH-CRASH")
    store(archive, index, phantom.paths)
    queue(index, phantom.series_instance_uid)
    model = CrashingModel({phantom.series_instance_uid: phantom}, {phantom.series_instance_uid})
    outcome = JobRunner(settings, index, model).run_one()  # type: ignore[arg-type]
    index.dispose()
    assert outcome is not None and outcome.state == "failed" and len(outcome.results) == 1
    (sr_path,) = (Path(p) for p in outcome.results)
    reason = (
        "analysis failed after 1 attempts: cannot analyse: "
        "RuntimeError: model crashed on this series"
    )
    assert read_finding(sr_path) is None  # no finding in it ...
    assert not_analysed_statement(sr_path) == f"not analysed: {reason}"  # ... but its reason

    index = open_index(settings)
    try:
        data = load_node_series(index, settings, phantom.series_instance_uid)
    finally:
        index.dispose()
    assert data.hemorrhage is None and data.masks is None
    assert data.note == f"not analysed: {reason}"


def test_the_ui_cannot_write_to_the_index(node_data: NodeData) -> None:
    assert read_only_url(node_data.settings).endswith("?mode=ro&uri=true")
    index = open_index(node_data.settings)
    try:
        meta = InstanceMeta(
            sop_instance_uid="1.2.3.4.5",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
        )
        with pytest.raises(OperationalError, match="readonly"):
            index.record_instance(meta, path="/nowhere", size=1)
    finally:
        index.dispose()


def test_missing_index_names_the_file_and_creates_nothing(tmp_path: Path) -> None:
    from config import load_settings

    settings = load_settings(write_config(tmp_path))
    with pytest.raises(IndexUnavailable, match="no index at .*index.sqlite: start the node"):
        open_index(settings)
    assert not (tmp_path / "data").exists()
