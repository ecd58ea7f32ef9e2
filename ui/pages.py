"""The pages of the ichnode web interface: worklist, viewer, upload.

Run by ``ui/app.py`` (``streamlit run``, started by ``ichnode ui``). The node's
configuration comes from the file named in ``ICHNODE_UI_CONFIG`` (embedded
defaults when unset); the index is opened read-only. Long-lived objects are
cached: settings, the index and the predictor with ``st.cache_resource``,
stored findings and recomputed explanations with ``st.cache_data``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import streamlit as st

from config import ConfigError, Settings, load_settings
from storage.index import Index
from ui import viewer
from ui.series import ViewerData, slice_probability_array
from ui.stored import SeriesUnavailable, load_node_series, read_finding, resolve_path
from ui.text import plain
from ui.upload import (
    UploadedSeries,
    UploadError,
    UploadLimits,
    UploadRefused,
    analyse_upload,
)
from ui.worklist import (
    FINDING_FILTERS,
    STATUSES,
    IndexUnavailable,
    StoredFinding,
    WorklistRow,
    filter_rows,
    load_worklist,
    open_index,
    result_files,
    table,
)

if TYPE_CHECKING:
    from inference.predictor import Predictor

logger = logging.getLogger(__name__)

CONFIG_ENV = "ICHNODE_UI_CONFIG"
REFRESH_SECONDS = 5.0
PAGES = ("Worklist", "Viewer", "Upload")


# -- cached resources ----------------------------------------------------------


@st.cache_resource(show_spinner=False)
def get_settings(config_path: str) -> Settings:
    """The node's settings (``""``: embedded defaults); raises ConfigError."""
    return load_settings(config_path or None)


@st.cache_resource(show_spinner=False)
def _index_for(url_key: str, _settings: Settings) -> Index:
    return open_index(_settings)


def get_index(settings: Settings) -> Index:
    """The node's index, opened read-only once per database URL."""
    return _index_for(settings.storage.effective_database_url, settings)


@st.cache_resource(show_spinner="Loading the model…")
def get_predictor(weights: str, device: str, precision: str = "auto") -> Predictor:
    """The predictor, loaded once per (weights, device, precision) for every session."""
    from inference.predictor import Predictor

    return Predictor(weights or None, device=device, precision=precision)


@st.cache_resource(show_spinner=False)
def model_lock() -> threading.Lock:
    """One model run at a time in this process: sessions queue instead of sharing the CPUs."""
    return threading.Lock()


@st.cache_data(show_spinner=False, max_entries=512)
def _finding(path: str, mtime: float) -> StoredFinding | None:
    return read_finding(Path(path))


def finding_for(settings: Settings) -> Callable[[str], StoredFinding | None]:
    """A reader of stored SR findings, cached by file path and modification time."""

    def read(path: str) -> StoredFinding | None:
        resolved = resolve_path(path, settings)
        try:
            mtime = resolved.stat().st_mtime
        except OSError:
            return None
        return _finding(str(resolved), mtime)

    return read


@st.cache_resource(show_spinner="Reading the series from the archive…", max_entries=4)
def _node_series(
    uid: str, signature: tuple[Any, ...], _index: Index, _settings: Settings
) -> ViewerData:
    return load_node_series(_index, _settings, uid)


@st.cache_data(show_spinner=False, max_entries=8)
def _explanation(
    uid: str,
    signature: tuple[Any, ...],
    weights: str,
    device: str,
    precision: str,
    _data: ViewerData,
) -> tuple[np.ndarray, np.ndarray]:
    if _data.volume is None:
        raise ValueError("the source volume of this series is not loaded")
    predictor = get_predictor(weights, device, precision)
    with model_lock():
        findings = predictor.predict(_data.volume, explain=True)
    probabilities = slice_probability_array(findings.slices, list(_data.sop_instance_uids))
    gradcam = np.asarray(findings.gradcam, dtype=np.float32)
    return gradcam, probabilities


# -- shell ---------------------------------------------------------------------


def _open_series(uid: str) -> None:
    st.session_state["series_uid"] = uid
    st.session_state["page"] = "Viewer"
    st.session_state.pop("node-slice", None)
    st.query_params["series"] = uid


def _settings_or_stop() -> Settings:
    try:
        return get_settings(os.environ.get(CONFIG_ENV, ""))
    except ConfigError as exc:
        st.error(f"ichnode cannot start the interface: {plain(exc)}")
        st.stop()


def main() -> None:
    """Render the app: sidebar navigation and the chosen page."""
    st.set_page_config(page_title="ichnode", page_icon="🧠", layout="wide")
    settings = _settings_or_stop()
    requested = st.query_params.get("series")
    if requested and "series_uid" not in st.session_state:
        st.session_state["series_uid"] = requested
        st.session_state.setdefault("page", "Viewer")
    with st.sidebar:
        st.title("ichnode")
        st.radio("Page", PAGES, key="page")
        st.caption(
            f"Node {settings.node.ae_title} · index {settings.storage.effective_database_url}"
        )
        st.caption("Research software, not a medical device.")
    page = st.session_state.get("page", "Worklist")
    if page == "Viewer":
        viewer_page(settings)
    elif page == "Upload":
        upload_page(settings)
    else:
        worklist_page(settings)


# -- worklist ------------------------------------------------------------------


def worklist_page(settings: Settings) -> None:
    """Studies and series the node holds, with filters; refreshes on its own."""
    st.header("Worklist")
    try:
        index = get_index(settings)
    except IndexUnavailable as exc:
        st.warning(plain(exc))
        return
    left, middle, right = st.columns([3, 2, 2])
    statuses = left.multiselect("Status", STATUSES, default=list(STATUSES), key="filter-status")
    finding = middle.selectbox("Finding", FINDING_FILTERS, key="filter-finding")
    text = right.text_input("Search patient, study, series", key="filter-text")
    _worklist_table(index, settings, tuple(statuses), finding, text)


@st.fragment(run_every=REFRESH_SECONDS)
def _worklist_table(
    index: Index, settings: Settings, statuses: tuple[str, ...], finding: str, text: str
) -> None:
    rows = load_worklist(index, finding_for(settings))
    shown = filter_rows(rows, statuses, finding, text)
    positives = sum(1 for r in rows if r.hemorrhage)
    st.caption(
        f"{len(shown)} of {len(rows)} series · {positives} with hemorrhage · "
        f"refreshed {dt.datetime.now().strftime('%H:%M:%S')}"
    )
    if not shown:
        st.info(
            "No series matches the filters." if rows else "The node has received no series yet."
        )
        return
    st.dataframe(
        _styled(table(shown)),
        hide_index=True,
        width="stretch",
        column_config={
            "status": st.column_config.TextColumn(width="medium"),
            "finding": st.column_config.TextColumn(width="medium"),
            "delivery": st.column_config.TextColumn(width="medium"),
            "series UID": st.column_config.TextColumn(width="small"),
        },
    )
    by_uid: dict[str, WorklistRow] = {r.series_instance_uid: r for r in shown}
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    left.selectbox(
        "Series",
        list(by_uid),
        format_func=lambda uid: (
            f"{by_uid[uid].label} — {by_uid[uid].status}"
            + (f" — {by_uid[uid].finding_label}" if by_uid[uid].finding_label else "")
        ),
        key="open-choice",
    )
    if right.button(
        "Open in viewer",
        key="open-series",
        type="primary",
        width="stretch",
        on_click=_open_chosen,
    ):
        st.rerun()


def _open_chosen() -> None:
    choice = st.session_state.get("open-choice")
    if choice:
        _open_series(str(choice))


def _styled(rows: list[dict[str, object]]) -> Any:
    """The worklist as a pandas Styler: findings in red, failures in amber."""
    import pandas as pd

    def colour(value: object) -> str:
        text = str(value)
        if text.startswith("hemorrhage"):
            return "color: #ff6b6b; font-weight: 600"
        if text.startswith("failed"):
            return "color: #ffb020"
        return ""

    frame = pd.DataFrame(rows)
    columns = [c for c in ("finding", "status") if c in frame.columns]
    return frame.style.map(colour, subset=columns)


# -- viewer --------------------------------------------------------------------


def _signature(index: Index, uid: str) -> tuple[Any, ...]:
    files = index.series_files(uid)
    results = result_files(index, uid)
    return (len(files), tuple(r.sop_instance_uid for r in results))


def viewer_page(settings: Settings) -> None:
    """The viewer of the series chosen in the worklist."""
    st.header("Viewer")
    uid = st.session_state.get("series_uid")
    if not uid:
        st.info("Choose a series in the worklist, or upload files on the Upload page.")
        return
    try:
        index = get_index(settings)
    except IndexUnavailable as exc:
        st.warning(plain(exc))
        return
    signature = _signature(index, uid)
    if signature[0] == 0:
        st.warning(f"The index holds no instances of series {plain(uid)}.")
        return
    try:
        data = _node_series(uid, signature, index, settings)
    except SeriesUnavailable as exc:
        st.warning(f"This series cannot be shown as a volume: {plain(exc.reason)}")
        if exc.datasets:
            viewer.metadata_panel_for(exc.datasets[0], key="node-skipped")
        return

    def explain() -> tuple[np.ndarray, np.ndarray] | None:
        try:
            inference = settings.inference
            return _explanation(
                uid, signature, inference.weights, inference.device, inference.precision, data
            )
        except (ValueError, RuntimeError) as exc:  # WeightsError is a ValueError
            st.error(f"The model cannot run here: {plain(exc)}")
            return None

    cached = st.session_state.get("node-explained")
    if cached is not None and cached[0] == (uid, signature):
        gradcam, probabilities = cached[1]
        data = dataclasses.replace(data, gradcam=gradcam, slice_probabilities=probabilities)

    def explain_and_keep() -> tuple[np.ndarray, np.ndarray] | None:
        computed = explain()
        if computed is not None:
            st.session_state["node-explained"] = ((uid, signature), computed)
        return computed

    viewer.show(data, key="node", explain=explain_and_keep)


# -- upload --------------------------------------------------------------------


def upload_page(settings: Settings) -> None:
    """Analyse dropped DICOM files in place; nothing is stored or sent."""
    st.header("Upload")
    st.caption(
        "Drop one slice, a whole series or a zip. The files are analysed here with the "
        "node's model and shown below; nothing is written to the index or sent to any PACS. "
        f"One upload holds at most {settings.ui.upload_max_files:,} files and "
        f"{settings.ui.upload_max_expanded_mb:,} MB once zips are expanded."
    )
    files = st.file_uploader(
        "DICOM files or a zip of them", accept_multiple_files=True, key="upload-files"
    )
    if not files:
        st.session_state.pop("upload-result", None)
        return
    signature = tuple((f.name, f.size, getattr(f, "file_id", "")) for f in files)
    refused = st.session_state.get("upload-refused")
    if refused is not None and refused[0] == signature:
        # said once already: a rerun does not stage and read the same files again
        st.error(refused[1])
        return
    stored = st.session_state.get("upload-result")
    if stored is None or stored[0] != signature:
        try:
            inference = settings.inference
            predictor = get_predictor(inference.weights, inference.device, inference.precision)
        except (ValueError, RuntimeError) as exc:  # WeightsError is a ValueError
            st.error(f"The model cannot be loaded: {plain(exc)}")
            return
        with st.spinner("Analysing…"), tempfile.TemporaryDirectory(prefix="ichnode-upload-") as tmp:
            try:
                series, problems = analyse_upload(
                    ((f.name, f.getvalue()) for f in files),
                    Path(tmp),
                    predictor,
                    limits=UploadLimits.from_settings(settings.ui),
                    model_lock=model_lock(),
                )
            except UploadRefused as exc:
                message = f"Upload refused, nothing was analysed: {plain(exc)}"
                st.session_state["upload-refused"] = (signature, message)
                st.error(message)
                return
            except UploadError as exc:
                message = f"Nothing to analyse: {plain(exc)}"
                st.session_state["upload-refused"] = (signature, message)
                st.error(message)
                return
        stored = (signature, series, problems)
        st.session_state["upload-result"] = stored
        for key in [
            k
            for k in st.session_state
            if str(k).startswith("upload-") and str(k).endswith("-slice")
        ]:
            del st.session_state[key]
    _, series, problems = stored
    if problems:
        with st.expander(f"{len(problems)} file(s) not used", expanded=not series):
            for problem in problems[:200]:
                st.text(f"{problem.name}: {problem.reason}")
    analysed: list[UploadedSeries] = [s for s in series if s.data is not None]
    for skipped in (s for s in series if s.data is None):
        st.warning(
            f"Series {plain(skipped.description)} ({skipped.n_files} files) not analysed: "
            f"{plain(skipped.skipped)}"
        )
    if not analysed:
        return
    names = {s.series_instance_uid: s for s in analysed}
    uid = st.selectbox(
        "Series",
        list(names),
        format_func=lambda u: f"{names[u].description} ({names[u].n_files} files)",
        key="upload-choice",
    )
    data = names[str(uid)].data
    assert data is not None
    viewer.show(data, key=f"upload-{list(names).index(str(uid))}")
