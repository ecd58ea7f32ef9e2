"""The Streamlit viewer of one series: image with overlays, controls, curve, 3D view, metadata.

:func:`show` renders a :class:`ui.series.ViewerData` with every control of the
viewer; all widget keys start with the caller's ``key`` so the node viewer and
the upload viewer keep their own state. The pixel work is in :mod:`ui.render`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import streamlit as st
from pydicom import Dataset

from inference.findings import SUBTYPES
from ui.figures import probability_figure, volume_figure
from ui.metadata import header_rows, header_table, summary
from ui.render import (
    WINDOW_PRESETS,
    OverlayOptions,
    apply_window,
    composite,
    finding_slices,
    nearest,
    to_png,
)
from ui.render import legend as render_legend
from ui.series import ViewerData
from ui.text import plain

logger = logging.getLogger(__name__)

CUSTOM = "custom"


def finding_banner(data: ViewerData) -> None:
    """The series-level finding in one coloured line, and the subtype table."""
    if data.hemorrhage is None:
        st.info(f"Not analysed: {plain(data.note)}" if data.note else "Not analysed")
        return
    probability = data.hemorrhage_probability
    p_text = (
        f" (p = {probability:.2f})"
        if probability is not None and math.isfinite(probability)
        else ""
    )
    if data.hemorrhage:
        found = data.subtypes_found()
        detail = ", ".join(f"{name} {data.subtypes[name].volume_ml:.1f} mL" for name in found)
        st.error(
            f"Hemorrhage found{p_text}" + (f": {detail}" if detail else ""),
            icon=":material/warning:",
        )
    else:
        st.success(f"No hemorrhage found{p_text}")
    if data.note:
        st.caption(plain(data.note))
    if data.subtypes:
        rows = []
        for name in SUBTYPES:
            finding = data.subtypes.get(name)
            if finding is None:
                continue
            rows.append(
                {
                    "subtype": name,
                    "present": "yes" if finding.present else "no",
                    "probability": f"{finding.probability:.2f}"
                    if math.isfinite(finding.probability)
                    else "",
                    "volume (mL)": f"{finding.volume_ml:.2f}" if finding.present else "",
                }
            )
        st.dataframe(rows, hide_index=True, width="stretch")


def _initial_slice(data: ViewerData, hits: list[int]) -> int:
    if data.masks is not None and data.masks.any():
        areas = data.masks.any(axis=0).reshape(data.n_slices, -1).sum(axis=1)
        return int(np.argmax(areas))
    if hits:
        return hits[len(hits) // 2]
    return data.n_slices // 2


def _set_slice(key: str, value: int | None) -> None:
    if value is not None:
        st.session_state[f"{key}-slice"] = int(value)


def show(
    data: ViewerData,
    key: str,
    explain: Callable[[], tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> None:
    """Render the whole viewer for ``data``.

    Parameters
    ----------
    data : ViewerData
        The series to show.
    key : str
        Prefix of every widget key (one viewer state per prefix).
    explain : callable, optional
        When Grad-CAM or the per-slice probabilities are missing, a button calls
        it to compute ``(gradcam, slice_probabilities)``; it returns None on failure
        (after showing its own message).
    """
    st.subheader(plain(data.title))
    finding_banner(data)
    hits = finding_slices(data.slice_probabilities, data.masks)
    slice_key = f"{key}-slice"
    last = data.n_slices - 1
    if slice_key not in st.session_state or not 0 <= st.session_state[slice_key] <= last:
        st.session_state[slice_key] = _initial_slice(data, hits)

    image_column, control_column = st.columns([3, 2], gap="medium")
    with control_column:
        if last > 0:
            st.slider("Slice", 0, last, key=slice_key)
        current = int(st.session_state[slice_key])
        if hits:
            previous_hit = nearest(hits, current, -1)
            next_hit = nearest(hits, current, 1)
            left, right = st.columns(2)
            left.button(
                "◀ Previous finding",
                key=f"{key}-prev",
                disabled=previous_hit is None,
                on_click=_set_slice,
                args=(key, previous_hit),
                width="stretch",
            )
            right.button(
                "Next finding ▶",
                key=f"{key}-next",
                disabled=next_hit is None,
                on_click=_set_slice,
                args=(key, next_hit),
                width="stretch",
            )
            st.caption("Slices with findings: " + ", ".join(str(i) for i in hits[:40]))
        else:
            st.caption("No slice with a finding.")

        preset = st.radio(
            "Window",
            [*WINDOW_PRESETS, CUSTOM],
            horizontal=True,
            key=f"{key}-window",
            format_func=lambda p: (
                p if p == CUSTOM else f"{p} {WINDOW_PRESETS[p][0]:g}/{WINDOW_PRESETS[p][1]:g}"
            ),
        )
        if preset == CUSTOM:
            left, right = st.columns(2)
            level = left.number_input("Level (HU)", -1500.0, 4000.0, 40.0, 10.0, key=f"{key}-level")
            width = right.number_input("Width (HU)", 1.0, 8000.0, 80.0, 10.0, key=f"{key}-width")
        else:
            level, width = WINDOW_PRESETS[preset]

        with_mask = data.subtypes_with_mask()
        shown: list[str] = []
        if with_mask:
            legend = " ".join(
                f"<span style='color:{css};font-weight:600'>■ {name}</span>"
                for name, css in render_legend(with_mask)
            )
            st.markdown(f"**Overlays** &nbsp; {legend}", unsafe_allow_html=True)
            for name in with_mask:
                if st.checkbox(name, value=True, key=f"{key}-show-{name}"):
                    shown.append(name)
            opacity = st.slider("Mask opacity", 0.0, 1.0, 0.45, 0.05, key=f"{key}-opacity")
        else:
            opacity = 0.45
        if data.gradcam is not None:
            show_cam = st.checkbox("Grad-CAM", value=False, key=f"{key}-gradcam")
            cam_opacity = st.slider(
                "Grad-CAM opacity", 0.0, 1.0, 0.5, 0.05, key=f"{key}-cam-opacity"
            )
        else:
            show_cam, cam_opacity = False, 0.5
            if (
                explain is not None
                and data.analysed
                and st.button("Compute Grad-CAM and slice probabilities", key=f"{key}-explain")
            ):
                with st.spinner("Running the model on this series…"):
                    computed = explain()
                if computed is not None:
                    st.rerun()

    options = OverlayOptions(
        subtypes=tuple(shown),
        opacity=float(opacity),
        gradcam=bool(show_cam),
        gradcam_opacity=float(cam_opacity),
    )
    grey = apply_window(data.hu[current], float(level), float(width))
    masks = None if data.masks is None else data.masks[:, current]
    cam = None if data.gradcam is None else data.gradcam[current]
    rgb = composite(grey, masks, cam, options)
    on_slice = [name for name in shown if masks is not None and masks[SUBTYPES.index(name)].any()]
    caption = f"slice {current} of {last} · window {level:g}/{width:g}"
    if on_slice:
        caption += " · overlay: " + ", ".join(on_slice)
    if options.gradcam:
        caption += " · Grad-CAM"
    with image_column:
        st.image(rgb, caption=caption, width="stretch")
        st.download_button(
            "Download this view (PNG)",
            data=to_png(rgb),
            file_name=f"{data.series_instance_uid}-slice{current:03d}.png",
            mime="image/png",
            key=f"{key}-png",
            on_click="ignore",
        )
        if data.slice_probabilities is not None and data.n_slices > 1:
            st.plotly_chart(
                probability_figure(data.slice_probabilities, current),
                key=f"{key}-curve",
                config={"displayModeBar": False},
            )
        elif data.analysed:
            st.caption("Per-slice probabilities are not stored with the node's results.")

    if st.toggle("3D view of the segmented blood", key=f"{key}-3d"):
        st.plotly_chart(volume_figure(data.hu, data.masks, data.spacing), key=f"{key}-volume")

    metadata_panel_for(data.datasets[current], key)
    downloads(data, key)


def metadata_panel_for(ds: Dataset, key: str) -> None:
    """The paper's metadata summary and the searchable header of ``ds`` (the current slice)."""
    st.markdown("#### Metadata")
    overview, header = st.tabs(["Summary", "Header of this slice"])
    with overview:
        st.dataframe(
            [{"field": label, "value": value} for label, value in summary(ds)],
            hide_index=True,
            width="stretch",
        )
    with header:
        query = st.text_input("Search the header", key=f"{key}-header-search")
        rows = header_rows(ds, query)
        st.caption(f"{len(rows)} elements" + (f" matching {plain(repr(query))}" if query else ""))
        st.dataframe(header_table(rows), hide_index=True, width="stretch", height=360)


def downloads(data: ViewerData, key: str) -> None:
    """One download button per result object (SEG, SR, SC)."""
    if not data.outputs:
        return
    st.markdown("#### Result objects")
    for index, (name, payload) in enumerate(sorted(data.outputs.items())):
        st.download_button(
            f"Download {name.split('-')[0]} ({len(payload) // 1024 + 1} KiB)",
            data=payload,
            file_name=name,
            mime="application/dicom",
            key=f"{key}-out-{index}",
            on_click="ignore",
        )
