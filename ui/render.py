"""Pixels for the viewer: CT windowing, overlay compositing, PNG encoding, 3D point clouds.

Pure numpy functions with no Streamlit in them, so the viewer's image logic is
unit-tested on its own. Arrays follow :mod:`inference.findings`: volumes are
(z, y, x), masks are boolean (5, z, y, x) in ``SUBTYPES`` order, Grad-CAM is
float (z, y, x) in [0, 1].
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference import windows
from inference.findings import SUBTYPES
from node import results

logger = logging.getLogger(__name__)

#: Window presets (level, width) in HU: the network's and the key images' windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = windows.WINDOW_PRESETS

#: One colour per subtype (RGB): the key images' outline colours, so an overlay
#: here and the key image a PACS shows use the same colour for the same finding.
SUBTYPE_COLOURS: dict[str, tuple[int, int, int]] = results.SUBTYPE_COLOURS


def apply_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU to 8-bit grey with a linear window (DICOM PS3.3 C.11.2.1.2, simplified).

    Parameters
    ----------
    hu : numpy.ndarray
        Any shape, in Hounsfield units.
    level, width : float
        Window centre and width in HU; ``width`` must be at least 1.

    Returns
    -------
    numpy.ndarray
        uint8 of the same shape: 0 at or below ``level - width/2``, 255 at or above
        ``level + width/2``.
    """
    if not np.isfinite(level) or not np.isfinite(width):
        raise ValueError("window level and width must be finite numbers")
    if width < 1:
        raise ValueError(f"window width must be at least 1 HU, got {width}")
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a 2D boolean mask (4-neighbourhood), for outlines."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_edge needs a 2D mask, got shape {mask.shape}")
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    interior = (
        padded[1:-1, 1:-1]
        & padded[:-2, 1:-1]
        & padded[2:, 1:-1]
        & padded[1:-1, :-2]
        & padded[1:-1, 2:]
    )
    return mask & ~interior


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB floats in [0, 1] with a black-red-yellow-white ramp."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(v * 3.0, 0.0, 1.0)
    g = np.clip(v * 3.0 - 1.0, 0.0, 1.0)
    b = np.clip(v * 3.0 - 2.0, 0.0, 1.0)
    return np.stack([r, g, b], axis=-1)


@dataclass(frozen=True)
class OverlayOptions:
    """What to draw over the grey image.

    ``subtypes`` are the subtype masks switched on; ``opacity`` is the fill
    opacity of the masks (their outline is always opaque); ``gradcam`` switches
    the Grad-CAM heat map on with ``gradcam_opacity`` at full heat.
    """

    subtypes: tuple[str, ...] = SUBTYPES
    opacity: float = 0.4
    outline: bool = True
    gradcam: bool = False
    gradcam_opacity: float = 0.5

    def __post_init__(self) -> None:
        unknown = [s for s in self.subtypes if s not in SUBTYPE_COLOURS]
        if unknown:
            raise ValueError(f"unknown subtype {unknown[0]!r}; expected one of {SUBTYPES}")
        for name in ("opacity", "gradcam_opacity"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")


def composite(
    grey: np.ndarray,
    masks: np.ndarray | None,
    gradcam: np.ndarray | None,
    options: OverlayOptions,
) -> np.ndarray:
    """Blend subtype masks and Grad-CAM over one windowed slice.

    Parameters
    ----------
    grey : numpy.ndarray
        uint8 (y, x), the windowed slice.
    masks : numpy.ndarray or None
        bool (5, y, x) in ``SUBTYPES`` order, or None when there is no segmentation.
    gradcam : numpy.ndarray or None
        float (y, x) in [0, 1], or None.
    options : OverlayOptions
        Which layers to draw and how strongly.

    Returns
    -------
    numpy.ndarray
        uint8 RGB (y, x, 3).
    """
    if grey.ndim != 2:
        raise ValueError(f"expected one 2D slice, got shape {grey.shape}")
    rgb = np.repeat(grey.astype(np.float32)[..., None] / 255.0, 3, axis=-1)
    if options.gradcam and gradcam is not None:
        if gradcam.shape != grey.shape:
            raise ValueError(
                f"Grad-CAM shape {gradcam.shape} does not match the image {grey.shape}"
            )
        heat = np.clip(np.asarray(gradcam, dtype=np.float32), 0.0, 1.0)
        alpha = (options.gradcam_opacity * heat)[..., None]
        rgb = rgb * (1.0 - alpha) + heat_colours(heat) * alpha
    if masks is not None:
        if masks.shape != (len(SUBTYPES), *grey.shape):
            raise ValueError(
                f"mask shape {masks.shape} does not match ({len(SUBTYPES)}, *{grey.shape})"
            )
        for name in options.subtypes:
            mask = np.asarray(masks[SUBTYPES.index(name)], dtype=bool)
            if not mask.any():
                continue
            colour = np.asarray(SUBTYPE_COLOURS[name], dtype=np.float32) / 255.0
            rgb[mask] = rgb[mask] * (1.0 - options.opacity) + colour * options.opacity
            if options.outline:
                rgb[mask_edge(mask)] = colour
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def to_png(image: np.ndarray) -> bytes:
    """Encode a uint8 grey (y, x) or RGB (y, x, 3) image as PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"to_png needs uint8 (y, x) or (y, x, 3), got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def finding_slices(
    slice_probabilities: np.ndarray | None,
    masks: np.ndarray | None,
    threshold: float = 0.5,
) -> list[int]:
    """Indices of the slices with a finding: ``any`` at or above ``threshold``, or any mask voxel.

    ``slice_probabilities`` is (z, 6) in ``CLASSES`` order (``any`` first) or None.
    """
    hits: set[int] = set()
    if slice_probabilities is not None and len(slice_probabilities):
        hits.update(int(i) for i in np.flatnonzero(slice_probabilities[:, 0] >= threshold))
    if masks is not None and masks.size:
        hits.update(int(i) for i in np.flatnonzero(masks.any(axis=(0, 2, 3))))
    return sorted(hits)


def nearest(indices: Sequence[int], current: int, direction: int) -> int | None:
    """The next index in ``indices`` after (``direction`` = 1) or before (-1) ``current``."""
    if direction not in (1, -1):
        raise ValueError("direction must be 1 or -1")
    if direction == 1:
        later = [i for i in indices if i > current]
        return min(later) if later else None
    earlier = [i for i in indices if i < current]
    return max(earlier) if earlier else None


@dataclass
class PointCloud:
    """Points in patient-ish millimetres (x, y, z) for a 3D scatter plot."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_points(
    mask: np.ndarray, spacing: tuple[float, float, float], max_points: int, seed: int
) -> PointCloud:
    zz, yy, xx = np.nonzero(mask)
    if zz.size > max_points:
        keep = np.random.default_rng(seed).choice(zz.size, size=max_points, replace=False)
        keep.sort()
        zz, yy, xx = zz[keep], yy[keep], xx[keep]
    dz, dy, dx = spacing
    # Image rows run from anterior to posterior: flip y so the face points forward.
    return PointCloud(
        x=xx.astype(np.float32) * dx,
        y=-yy.astype(np.float32) * dy,
        z=zz.astype(np.float32) * dz,
    )


def head_surface(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    step: int = 4,
    threshold_hu: float = -300.0,
    max_points: int = 6000,
) -> PointCloud:
    """A sparse point cloud of the head's outer surface, for context in the 3D view.

    The volume is downsampled in-plane by ``step`` and the boundary voxels of
    ``hu > threshold_hu`` are kept, at most ``max_points`` of them.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    if step < 1:
        raise ValueError("step must be at least 1")
    small = hu[:, ::step, ::step] > threshold_hu
    edges = np.zeros_like(small)
    for k in range(small.shape[0]):
        edges[k] = mask_edge(small[k])
    dz, dy, dx = spacing
    return _to_points(edges, (dz, dy * step, dx * step), max_points, seed=0)


def blood_points(
    masks: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    step: int = 2,
    max_points: int = 4000,
) -> dict[str, PointCloud]:
    """Per-subtype point clouds of the segmented blood, downsampled in-plane by ``step``.

    Returns only the subtypes with at least one voxel.
    """
    if masks.ndim != 4 or masks.shape[0] != len(SUBTYPES):
        raise ValueError(f"expected masks ({len(SUBTYPES)}, z, y, x), got shape {masks.shape}")
    dz, dy, dx = spacing
    clouds: dict[str, PointCloud] = {}
    for index, name in enumerate(SUBTYPES):
        small = np.asarray(masks[index, :, ::step, ::step], dtype=bool)
        if small.any():
            clouds[name] = _to_points(small, (dz, dy * step, dx * step), max_points, seed=index + 1)
    return clouds


def legend(subtypes: Mapping[str, object] | Sequence[str]) -> list[tuple[str, str]]:
    """(name, CSS colour) pairs for the given subtypes, in ``SUBTYPES`` order."""
    names = set(subtypes)
    return [
        (name, "#{:02x}{:02x}{:02x}".format(*SUBTYPE_COLOURS[name]))
        for name in SUBTYPES
        if name in names
    ]
