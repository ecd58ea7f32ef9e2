"""The Streamlit app driven by ``AppTest``: worklist, filters, viewer state, upload.

The index and archive are the ones a node leaves behind (``node_data`` in
conftest.py: real SQLite, real files, the worker's own code). Each test starts
a fresh app session.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from inference.findings import CLASSES, SUBTYPES
from inference.volume import load_volume, read_series
from tests.interop import REAL_5MM, REAL_TILT, REPO, require_real_data
from tests.ui.conftest import NodeData, make_series, write_config

APP = str(REPO / "ui" / "script.py")


def _app(monkeypatch: pytest.MonkeyPatch, config: Path) -> AppTest:
    monkeypatch.setenv("ICHNODE_UI_CONFIG", str(config))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def shown(markdown: str) -> str:
    """The text a browser shows for a Markdown body whose punctuation is escaped (ui.text.plain)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace("\u2060", "")


def _run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _worklist(at: AppTest) -> list[dict[str, object]]:
    frame = at.dataframe[0].value
    return list(frame.to_dict("records"))


def test_worklist_shows_every_series_newest_first(
    monkeypatch: pytest.MonkeyPatch, node_data: NodeData
) -> None:
    at = _app(monkeypatch, node_data.config_path)
    assert at.header[0].value == "Worklist"
    rows = _worklist(at)
    assert [r["patient ID"] for r in rows] == [
        "ICH-POS",
        "ICH-NEG",
        "ICH-FAIL",
        "ICH-SKIP",
        "ICH-RECV",
    ]
    by_patient = {r["patient ID"]: r for r in rows}
    pos = by_patient["ICH-POS"]
    assert pos["study date"] == "2026-03-01"
    assert pos["study"] == "CT HEAD TRAUMA" and pos["series"] == "Head 5mm"
    assert pos["slices"] == 10 and pos["status"] == "done"
    truth = node_data.positive.case
    assert set(truth.subtypes) == {"subdural", "intraparenchymal"}
    assert str(pos["finding"]).startswith("hemorrhage: intraparenchymal ")
    assert "subdural" in str(pos["finding"]) and "mL" in str(pos["finding"])
    assert pos["delivery"] == "archive: pending, pacs: sent"
    assert by_patient["ICH-NEG"]["finding"] == "no hemorrhage"
    assert by_patient["ICH-FAIL"]["status"] == (
        "failed: analysis failed after 1 attempts: cannot analyse: RuntimeError: "
        "model crashed on this series"
    )
    assert by_patient["ICH-SKIP"]["status"] == "skipped: localizer (scout) images"
    assert by_patient["ICH-RECV"]["status"] == "receiving"
    assert by_patient["ICH-RECV"]["slices"] == 4
    assert by_patient["ICH-RECV"]["finding"] == ""
    assert "5 of 5 series · 1 with hemorrhage" in at.caption[0].value


def test_worklist_volumes_match_the_stored_report(
    monkeypatch: pytest.MonkeyPatch, node_data: NodeData
) -> None:
    at = _app(monkeypatch, node_data.config_path)
    finding = str(_worklist(at)[0]["finding"])
    volumes = dict(part.rsplit(" ", 2)[:2] for part in finding.split(": ", 1)[1].split(", "))
    case = node_data.positive.case
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    for name, text in volumes.items():
        expected = case.labels[SUBTYPES.index(name)].sum() * voxel_ml
        assert float(text) == pytest.approx(expected, abs=0.051)


def test_worklist_filters(monkeypatch: pytest.MonkeyPatch, node_data: NodeData) -> None:
    at = _app(monkeypatch, node_data.config_path)
    at.multiselect(key="filter-status").set_value(["failed", "skipped"])
    _run(at)
    assert [r["patient ID"] for r in _worklist(at)] == ["ICH-FAIL", "ICH-SKIP"]
    at.multiselect(key="filter-status").set_value(
        ["receiving", "queued", "running", "done", "failed", "skipped"]
    )
    at.selectbox(key="filter-finding").set_value("hemorrhage")
    _run(at)
    assert [r["patient ID"] for r in _worklist(at)] == ["ICH-POS"]
    at.selectbox(key="filter-finding").set_value("no hemorrhage")
    _run(at)
    assert [r["patient ID"] for r in _worklist(at)] == ["ICH-NEG"]
    at.selectbox(key="filter-finding").set_value("not analysed")
    _run(at)
    assert [r["patient ID"] for r in _worklist(at)] == ["ICH-FAIL", "ICH-SKIP", "ICH-RECV"]
    at.selectbox(key="filter-finding").set_value("all")
    at.text_input(key="filter-text").set_value("recv")
    _run(at)
    assert [r["patient ID"] for r in _worklist(at)] == ["ICH-RECV"]
    at.text_input(key="filter-text").set_value("nobody by that name")
    _run(at)
    assert not at.dataframe
    assert at.info[0].value == "No series matches the filters."


def _open(at: AppTest, series_instance_uid: str) -> AppTest:
    at.selectbox(key="open-choice").set_value(series_instance_uid)
    at.button(key="open-series").click()
    return _run(at)


def _image_caption(at: AppTest) -> str:
    return at.image[0].captions[0]


def test_viewer_shows_the_finding_overlays_and_controls(
    monkeypatch: pytest.MonkeyPatch, node_data: NodeData
) -> None:
    at = _app(monkeypatch, node_data.config_path)
    positive = node_data.positive
    _open(at, positive.series_instance_uid)
    assert at.session_state["page"] == "Viewer"
    assert at.query_params["series"] == positive.series_instance_uid
    assert at.header[0].value == "Viewer"
    banner = at.error[0].value
    assert banner.startswith("Hemorrhage found (p = 0.97): intraparenchymal ")
    assert "subdural" in banner
    subtypes = at.dataframe[0].value.set_index("subtype")
    assert subtypes.loc["subdural", "present"] == "yes"
    assert subtypes.loc["epidural", "present"] == "no"

    # it opens on the slice with the most blood, all overlays on
    labels = positive.case.labels.any(axis=0)
    volume_order = sorted(
        positive.slice_of, key=lambda uid: positive.case.slice_positions[positive.slice_of[uid]]
    )
    areas = [labels[positive.slice_of[uid]].sum() for uid in volume_order]
    start = int(np.argmax(areas))
    assert at.slider(key="node-slice").value == start
    caption = _image_caption(at)
    assert caption.startswith(f"slice {start} of 9 · window 40/80 · overlay: ")

    # switch one subtype off: it leaves the caption
    on_slice = caption.split("overlay: ")[1].split(", ")
    at.checkbox(key=f"node-show-{on_slice[0]}").uncheck()
    _run(at)
    assert on_slice[0] not in _image_caption(at).split("overlay: ")[-1]

    # window presets and a custom window
    at.radio(key="node-window").set_value("bone")
    _run(at)
    assert "window 600/2800" in _image_caption(at)
    at.radio(key="node-window").set_value("custom")
    _run(at)
    at.number_input(key="node-level").set_value(50.0)
    at.number_input(key="node-width").set_value(120.0)
    _run(at)
    assert "window 50/120" in _image_caption(at)

    # jump between the slices with findings
    hits = [j for j, area in enumerate(areas) if area]
    later = [j for j in hits if j > start]
    if later:
        at.button(key="node-next").click()
        _run(at)
        assert at.slider(key="node-slice").value == later[0]
    at.slider(key="node-slice").set_value(0)
    _run(at)
    assert _image_caption(at).startswith("slice 0 of 9")

    # metadata: the paper's summary and the searchable header
    summary = {r["field"]: r["value"] for r in at.dataframe[1].value.to_dict("records")}
    assert summary["Patient ID"] == "ICH-POS"
    assert summary["Sex"] == "F" and summary["Age"] == "71 years"
    assert summary["Series description"] == "Head 5mm"
    assert summary["Image size"] == "128 × 128"
    at.text_input(key="node-header-search").set_value("SliceThickness")
    _run(at)
    header = at.dataframe[2].value
    assert list(header["keyword"]) == ["SliceThickness"]

    # the stored result objects can be downloaded, and the PNG of the view
    labels_of_downloads = [b.label for b in at.download_button]
    assert labels_of_downloads[0] == "Download this view (PNG)"
    kinds = sorted(label.split()[1] for label in labels_of_downloads[1:])
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and kinds.count("SC") == 2


def test_viewer_opened_by_link_and_skipped_series(
    monkeypatch: pytest.MonkeyPatch, node_data: NodeData
) -> None:
    monkeypatch.setenv("ICHNODE_UI_CONFIG", str(node_data.config_path))
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["series"] = node_data.negative.series_instance_uid
    _run(at)
    assert at.header[0].value == "Viewer"
    assert at.success[0].value == "No hemorrhage found (p = 0.03)"
    assert not at.checkbox  # no masks, no overlay toggles
    at.sidebar.radio[0].set_value("Worklist")
    _run(at)
    _open(at, node_data.skipped_uid)
    assert shown(at.warning[0].value) == (
        "This series cannot be shown as a volume: localizer (scout) images"
    )


def test_viewer_recomputes_gradcam_with_the_model(
    monkeypatch: pytest.MonkeyPatch, node_data: NodeData, tiny_weights: Path, tmp_path: Path
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        node_data.config_path.read_text().replace('weights = ""', f'weights = "{tiny_weights}"')
    )
    at = _app(monkeypatch, config)
    _open(at, node_data.positive.series_instance_uid)
    assert "node-gradcam" not in [c.key for c in at.checkbox]
    assert not at.get("plotly_chart")
    at.button(key="node-explain").click()
    _run(at)
    assert "node-gradcam" in [c.key for c in at.checkbox]
    assert len(at.get("plotly_chart")) == 1  # the per-slice probability curve
    at.checkbox(key="node-gradcam").check()
    _run(at)
    assert _image_caption(at).endswith("· Grad-CAM")

    # the curve marks the slice on screen, and follows the slider
    def marked_slice() -> float:
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        (line,) = [shape for shape in spec["layout"]["shapes"] if shape["x0"] == shape["x1"]]
        return float(line["x0"])

    assert marked_slice() == at.slider(key="node-slice").value
    at.slider(key="node-slice").set_value(7)
    _run(at)
    assert marked_slice() == 7.0

    # the 3D view: head surface plus one trace per segmented subtype
    at.toggle(key="node-3d").set_value(True)
    _run(at)
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    traces = json.loads(charts[1].proto.spec)["data"]
    assert [t["name"] for t in traces] == ["head", "intraparenchymal", "subdural"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained network in ichnode's weights format (fast on CPU)."""
    import torch

    from inference.model import HemorrhageNet, ModelConfig
    from inference.predictor import make_checkpoint

    torch.manual_seed(0)
    model = HemorrhageNet(ModelConfig(base_width=8, depth=2, input_size=64))
    checkpoint = make_checkpoint(
        model,
        thresholds=dict.fromkeys(CLASSES, 0.5),
        version="test-untrained",
        training={"note": "random weights for UI tests"},
    )
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(checkpoint, path)
    return path


def test_upload_of_a_phantom_series_is_analysed_in_place(
    monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, tmp_path: Path
) -> None:
    from inference.predictor import Predictor

    config = write_config(tmp_path, weights=str(tiny_weights))
    phantom = make_series(tmp_path / "upload", 31, ("subdural",), patient_id="UPLOADED")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in phantom.paths:
            archive.write(path, f"series/{path.name}")
    at = _app(monkeypatch, config)
    at.sidebar.radio[0].set_value("Upload")
    _run(at)
    at.get("file_uploader")[0].set_value(
        [("head.zip", buffer.getvalue(), "application/zip"), ("notes.txt", b"hello", "text/plain")]
    )
    _run(at)
    # what the model says on the same series, outside the UI
    groups, _ = read_series(phantom.paths)
    volume = load_volume(next(iter(groups.values())))
    expected = Predictor(tiny_weights, device="cpu").predict(volume, explain=True)
    if expected.hemorrhage_present:
        assert at.error[0].value.startswith(
            f"Hemorrhage found (p = {expected.hemorrhage_probability:.2f})"
        )
    else:
        assert at.success[0].value == (
            f"No hemorrhage found (p = {expected.hemorrhage_probability:.2f})"
        )
    assert at.expander[0].label == "1 file(s) not used"
    assert at.expander[0].text[0].value.startswith("notes.txt: ")
    # the upload has its own viewer, with the model's curve and Grad-CAM
    assert at.slider(key="upload-0-slice").max == 9
    assert "upload-0-gradcam" in [c.key for c in at.checkbox]
    assert len(at.get("plotly_chart")) == 1
    kinds = [b.label.split()[1] for b in at.download_button]
    assert kinds[0] == "this" and "SR" in kinds
    # nothing of it reached an index
    assert not (tmp_path / "data" / "index.sqlite").exists()


def test_upload_of_non_dicom_says_so(
    monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, weights=str(tiny_weights))
    at = _app(monkeypatch, config)
    at.sidebar.radio[0].set_value("Upload")
    _run(at)
    at.get("file_uploader")[0].set_value(("photo.jpg", b"\xff\xd8\xff\xe0 not dicom", "image/jpeg"))
    _run(at)
    message = shown(at.error[0].value)
    assert message.startswith("Nothing to analyse: none of the 1 files is readable DICOM")
    assert not at.image


def test_missing_index_and_bad_config_are_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = write_config(tmp_path)
    at = _app(monkeypatch, config)
    assert shown(at.warning[0].value).startswith(
        f"no index at {tmp_path / 'data' / 'index.sqlite'}"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 0\n")
    at = _app(monkeypatch, bad)
    message = shown(at.error[0].value)
    assert message.startswith("ichnode cannot start the interface: invalid configuration")
    assert "node.port" in message


def test_upload_of_real_scanner_files_and_a_single_slice(
    monkeypatch: pytest.MonkeyPatch, tiny_weights: Path, tmp_path: Path
) -> None:
    require_real_data()
    config = write_config(tmp_path, weights=str(tiny_weights))
    files = sorted(p for p in REAL_5MM.iterdir() if p.is_file())
    at = _app(monkeypatch, config)
    at.sidebar.radio[0].set_value("Upload")
    _run(at)
    at.get("file_uploader")[0].set_value(
        [(p.name, p.read_bytes(), "application/dicom") for p in files]
    )
    _run(at)
    assert at.slider(key="upload-0-slice").max == 27
    summary = {r["field"]: r["value"] for r in at.dataframe[1].value.to_dict("records")}
    assert summary["Manufacturer"] == "Philips" and summary["Model"] == "Ingenuity CT"
    assert summary["Slice thickness"] == "5 mm" and summary["Image size"] == "512 × 512"
    assert summary["Series description"] == "STD BRAIN 5MM"
    assert summary["Kernel"] != ""

    # one slice alone is analysed in 2D: no slider, no curve, still a verdict and an image
    single = min(p for p in REAL_TILT.iterdir() if p.is_file())
    at.get("file_uploader")[0].set_value((single.name, single.read_bytes(), "application/dicom"))
    _run(at)
    assert not [s for s in at.slider if s.key == "upload-0-slice"]
    assert _image_caption(at).startswith("slice 0 of 0")
    assert at.error or at.success
    assert not at.get("plotly_chart")


def test_refused_upload_is_said_once_and_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
    tiny_weights: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_config(
        tmp_path, weights=str(tiny_weights), extra="[ui]\nupload_max_expanded_mb = 1\n"
    )
    at = _app(monkeypatch, config)
    at.sidebar.radio[0].set_value("Upload")
    _run(at)
    assert "at most 10,000 files and 1 MB once zips are expanded" in at.caption[0].value
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.dcm", bytes(8 * 1024**2))
    with caplog.at_level("WARNING", logger="ui.upload"):
        at.get("file_uploader")[0].set_value(("bomb.zip", bomb.getvalue(), "application/zip"))
        _run(at)
        message = shown(at.error[0].value)
        assert message == (
            "Upload refused, nothing was analysed: zip bomb.zip expands the upload to 8 MB, "
            "more than 1 MB (ui.upload_max_expanded_mb)"
        )
        _run(at)  # any rerun of the page: the same message, the files are not read again
        assert shown(at.error[0].value) == message
    refusals = [r for r in caplog.records if r.getMessage().startswith("upload refused")]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
