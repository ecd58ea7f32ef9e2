"""Plotly figures of the viewer: the per-slice probability curve and the 3D view of the blood."""

from __future__ import annotations

import logging

import numpy as np
import plotly.graph_objects as go

from inference.findings import CLASSES, SUBTYPES
from ui.render import SUBTYPE_COLOURS, blood_points, head_surface

logger = logging.getLogger(__name__)

_ANY_COLOUR = "#f2f2f2"


def _css(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def probability_figure(
    slice_probabilities: np.ndarray,
    current: int,
    *,
    threshold: float | None = 0.5,
    height: int = 260,
) -> go.Figure:
    """Per-slice probability of ``any`` and each subtype along the series, current slice marked.

    Parameters
    ----------
    slice_probabilities : numpy.ndarray
        (z, 6) in ``CLASSES`` order; NaN where a slice has no value.
    current : int
        Index of the slice on screen (drawn as a vertical line).
    threshold : float or None
        Decision threshold of ``any``, drawn dashed.
    """
    probs = np.asarray(slice_probabilities, dtype=float)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES):
        raise ValueError(f"expected (z, {len(CLASSES)}) probabilities, got shape {probs.shape}")
    index = np.arange(probs.shape[0])
    fig = go.Figure()
    for column, name in enumerate(CLASSES):
        if name == "any":
            line = {"color": _ANY_COLOUR, "width": 3}
        else:
            line = {"color": _css(SUBTYPE_COLOURS[name]), "width": 1.5}
        fig.add_trace(
            go.Scatter(
                x=index,
                y=probs[:, column],
                mode="lines",
                name=name,
                line=line,
                hovertemplate=f"{name}: %{{y:.2f}} (slice %{{x}})<extra></extra>",
                visible=True
                if name == "any" or np.nanmax(probs[:, column], initial=0) >= 0.1
                else "legendonly",
            )
        )
    fig.add_vline(x=current, line={"color": "#00c8ff", "width": 2})
    if threshold is not None:
        fig.add_hline(y=threshold, line={"color": "#888888", "width": 1, "dash": "dash"})
    fig.update_layout(
        height=height,
        margin={"l": 40, "r": 10, "t": 10, "b": 30},
        xaxis={"title": "slice", "range": [-0.5, max(probs.shape[0] - 0.5, 0.5)]},
        yaxis={"title": "probability", "range": [0, 1.02]},
        legend={"orientation": "h", "y": -0.25},
        template="plotly_dark",
    )
    return fig


def volume_figure(
    hu: np.ndarray,
    masks: np.ndarray | None,
    spacing: tuple[float, float, float],
    *,
    height: int = 480,
) -> go.Figure:
    """3D scatter of the segmented blood per subtype inside a sparse head surface.

    The head and the masks are downsampled (see :func:`ui.render.head_surface`,
    :func:`ui.render.blood_points`) so the figure stays small in the browser.
    """
    fig = go.Figure()
    step = max(1, hu.shape[-1] // 64)
    surface = head_surface(hu, spacing, step=step)
    fig.add_trace(
        go.Scatter3d(
            x=surface.x,
            y=surface.y,
            z=surface.z,
            mode="markers",
            name="head",
            marker={"size": 1.5, "color": "#9a9a9a", "opacity": 0.15},
            hoverinfo="skip",
        )
    )
    if masks is not None:
        clouds = blood_points(masks, spacing, step=max(1, step // 2))
        for name in SUBTYPES:
            cloud = clouds.get(name)
            if cloud is None:
                continue
            fig.add_trace(
                go.Scatter3d(
                    x=cloud.x,
                    y=cloud.y,
                    z=cloud.z,
                    mode="markers",
                    name=name,
                    marker={"size": 2.5, "color": _css(SUBTYPE_COLOURS[name]), "opacity": 0.9},
                )
            )
    fig.update_layout(
        height=height,
        margin={"l": 0, "r": 0, "t": 0, "b": 0},
        scene={
            "aspectmode": "data",
            "xaxis": {"visible": False},
            "yaxis": {"visible": False},
            "zaxis": {"visible": False},
        },
        legend={"orientation": "h"},
        template="plotly_dark",
    )
    return fig
