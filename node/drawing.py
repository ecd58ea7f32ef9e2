"""Pixel drawing for the key images: brain window, Grad-CAM heat map, mask outline, text.

Everything is plain numpy on uint8 RGB arrays; text is rendered with
matplotlib's Agg backend and its bundled DejaVu font (no network, no system
fonts), imported only when a key image is drawn.
"""

from __future__ import annotations

import logging

import numpy as np

from inference import windows

logger = logging.getLogger(__name__)

# The CT windows are those of the network input and the viewer (inference.windows).
BRAIN_WINDOW: tuple[float, float] = windows.BRAIN_WINDOW

#: One colour per subtype (RGB), in ``inference.findings.SUBTYPES`` order: the one
#: table for the outlines burned into key images and the viewer's overlays and
#: plots (``ui.render`` takes it from :mod:`node.results`).
SUBTYPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "intraparenchymal": (255, 40, 40),
    "intraventricular": (40, 160, 255),
    "subarachnoid": (255, 220, 0),
    "subdural": (0, 230, 120),
    "epidural": (255, 0, 255),
}


def window_to_uint8(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map HU values through a linear window to uint8 grey levels.

    The same mapping as the viewer's ``ui.render.apply_window``, so a key image
    and the viewer show a slice with the same grey levels.
    """
    low = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - low) * (255.0 / max(width, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """Stack a (y, x) uint8 image into (y, x, 3)."""
    return np.repeat(grey[:, :, None], 3, axis=2)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A small 'jet'-like colour map for values in [0, 1]; returns float32 (y, x, 3) in [0, 255]."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return np.stack([red, green, blue], axis=2) * 255.0


def blend_heat_map(rgb: np.ndarray, heat: np.ndarray, max_alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map over ``rgb``; zero heat leaves the pixel unchanged."""
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat map shape {heat.shape} does not match image {rgb.shape[:2]}")
    alpha = (np.clip(heat.astype(np.float32), 0.0, 1.0) * max_alpha)[:, :, None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + heat_colours(heat) * alpha
    return (out + 0.5).astype(np.uint8)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean outline of ``mask``: pixels of the mask with a 4-neighbour outside it."""
    mask = np.asarray(mask, dtype=bool)
    inner = mask.copy()
    for _ in range(max(1, thickness)):
        padded = np.pad(inner, 1, mode="constant", constant_values=False)
        inner = (
            padded[1:-1, 1:-1]
            & padded[:-2, 1:-1]
            & padded[2:, 1:-1]
            & padded[1:-1, :-2]
            & padded[1:-1, 2:]
        )
    return mask & ~inner


def draw_outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """Return a copy of ``rgb`` with the outline of ``mask`` painted in ``colour``."""
    thickness = max(1, min(rgb.shape[:2]) // 256)
    edge = outline(mask, thickness)
    out = rgb.copy()
    out[edge] = np.asarray(colour, dtype=np.uint8)
    return out


def render_text_lines(lines: list[str], width: int, *, font_px: int) -> np.ndarray:
    """Render ``lines`` white on transparent; returns float32 alpha (h, width) in [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    line_px = int(font_px * 1.35)
    height = line_px * len(lines) + font_px // 2
    dpi = 100.0
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.patch.set_alpha(0.0)
    canvas = FigureCanvasAgg(fig)
    points = font_px * 72.0 / dpi
    for i, line in enumerate(lines):
        y = 1.0 - (font_px * 0.25 + i * line_px) / height
        fig.text(
            0.01, y, line, color="white", fontsize=points, va="top", ha="left", family="DejaVu Sans"
        )
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[:, :width, 3].astype(np.float32) / 255.0


def banner_font_px(width: int) -> int:
    """Text size of the key-image banner for an image ``width`` pixels wide."""
    return max(9, min(22, width // 40))


def draw_text_banner(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """Burn ``lines`` into the top of ``rgb`` on a dark band, so they stay legible."""
    height, width = rgb.shape[:2]
    alpha = render_text_lines(lines, width, font_px=banner_font_px(width))
    band = min(alpha.shape[0], height)
    out = rgb.astype(np.float32)
    out[:band] *= 0.35  # darken under the text
    a = alpha[:band, :, None]
    out[:band] = out[:band] * (1.0 - a) + 255.0 * a
    return (out + 0.5).astype(np.uint8)


def key_image(
    hu_slice: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int],
    lines: list[str],
    heat: np.ndarray | None = None,
) -> np.ndarray:
    """Compose one key image: brain window, heat map, mask outline and text lines."""
    rgb = grey_to_rgb(window_to_uint8(hu_slice, *BRAIN_WINDOW))
    if heat is not None:
        rgb = blend_heat_map(rgb, heat)
    rgb = draw_text_banner(rgb, lines)
    return draw_outline(rgb, mask, colour)  # last, so the finding is never hidden
