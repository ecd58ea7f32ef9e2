"""The viewer's pixel logic: windowing, compositing, PNG, finding slices, 3D points."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from inference.findings import SUBTYPES
from ui.render import (
    SUBTYPE_COLOURS,
    WINDOW_PRESETS,
    OverlayOptions,
    apply_window,
    blood_points,
    composite,
    finding_slices,
    head_surface,
    legend,
    mask_edge,
    nearest,
    to_png,
)


def test_presets_are_the_published_windows() -> None:
    assert WINDOW_PRESETS == {
        "brain": (40.0, 80.0),
        "subdural": (80.0, 200.0),
        "bone": (600.0, 2800.0),
    }


def test_brain_window_maps_ends_and_centre() -> None:
    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 3000.0], dtype=np.float32)
    out = apply_window(hu, 40, 80)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255]


def test_window_is_monotonic_and_keeps_shape() -> None:
    hu = np.linspace(-200, 300, 501, dtype=np.float32).reshape(3, 167)
    out = apply_window(hu, 80, 200)
    assert out.shape == hu.shape
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)


@pytest.mark.parametrize("width", [0, -5, float("nan")])
def test_bad_window_is_refused(width: float) -> None:
    with pytest.raises(ValueError, match="width|finite"):
        apply_window(np.zeros(3), 40, width)


def test_mask_edge_keeps_only_the_rim() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    edge = mask_edge(mask)
    assert edge[1, 1] and edge[5, 3] and not edge[3, 3]
    assert edge.sum() == 16


def _slice_with_blood() -> tuple[np.ndarray, np.ndarray]:
    grey = np.full((32, 32), 100, dtype=np.uint8)
    masks = np.zeros((len(SUBTYPES), 32, 32), dtype=bool)
    masks[SUBTYPES.index("subdural"), 8:16, 8:16] = True
    masks[SUBTYPES.index("epidural"), 20:24, 20:24] = True
    return grey, masks


def test_composite_colours_the_enabled_subtype_only() -> None:
    grey, masks = _slice_with_blood()
    options = OverlayOptions(subtypes=("subdural",), opacity=1.0, outline=False)
    rgb = composite(grey, masks, None, options)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[10, 10]) == SUBTYPE_COLOURS["subdural"]
    # epidural switched off: still grey
    assert tuple(rgb[21, 21]) == (100, 100, 100)
    # outside any mask: untouched
    assert tuple(rgb[0, 0]) == (100, 100, 100)


def test_composite_half_opacity_blends_and_outline_is_opaque() -> None:
    grey, masks = _slice_with_blood()
    rgb = composite(grey, masks, None, OverlayOptions(opacity=0.5, outline=True))
    colour = np.array(SUBTYPE_COLOURS["subdural"], dtype=float)
    expected_inside = np.rint(0.5 * 100 + 0.5 * colour)
    assert np.allclose(rgb[11, 11], expected_inside, atol=1)
    assert tuple(rgb[8, 8]) == SUBTYPE_COLOURS["subdural"]


def test_composite_gradcam_heat_only_where_hot() -> None:
    grey = np.full((16, 16), 50, dtype=np.uint8)
    cam = np.zeros((16, 16), dtype=np.float32)
    cam[4, 4] = 1.0
    off = composite(grey, None, cam, OverlayOptions(gradcam=False))
    on = composite(grey, None, cam, OverlayOptions(gradcam=True, gradcam_opacity=1.0))
    assert np.array_equal(off[4, 4], [50, 50, 50])
    assert tuple(on[4, 4]) == (255, 255, 255)
    assert tuple(on[0, 0]) == (50, 50, 50)


def test_composite_rejects_mismatched_shapes() -> None:
    grey, masks = _slice_with_blood()
    with pytest.raises(ValueError, match="mask shape"):
        composite(grey, masks[:, :16], None, OverlayOptions())
    with pytest.raises(ValueError, match="Grad-CAM shape"):
        composite(grey, None, np.zeros((4, 4)), OverlayOptions(gradcam=True))


def test_overlay_options_validate() -> None:
    with pytest.raises(ValueError, match="unknown subtype"):
        OverlayOptions(subtypes=("chronic",))
    with pytest.raises(ValueError, match="opacity"):
        OverlayOptions(opacity=1.5)


def test_png_round_trip() -> None:
    grey, masks = _slice_with_blood()
    rgb = composite(grey, masks, None, OverlayOptions())
    data = to_png(rgb)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(back, rgb)
    with pytest.raises(ValueError):
        to_png(rgb.astype(np.float32))


def test_finding_slices_from_probabilities_and_masks() -> None:
    probs = np.zeros((6, 6), dtype=np.float32)
    probs[1, 0] = 0.9
    probs[4, 0] = 0.49
    masks = np.zeros((5, 6, 4, 4), dtype=bool)
    masks[2, 3, 1, 1] = True
    assert finding_slices(probs, masks, 0.5) == [1, 3]
    assert finding_slices(None, None) == []
    assert nearest([1, 3, 7], 3, 1) == 7
    assert nearest([1, 3, 7], 3, -1) == 1
    assert nearest([1, 3, 7], 7, 1) is None


def test_blood_points_per_subtype_in_millimetres() -> None:
    masks = np.zeros((5, 4, 8, 8), dtype=bool)
    masks[0, 2, 2:4, 2:4] = True
    clouds = blood_points(masks, (5.0, 0.5, 0.5), step=1)
    assert list(clouds) == ["intraparenchymal"]
    cloud = clouds["intraparenchymal"]
    assert len(cloud) == 4
    assert set(cloud.z.tolist()) == {10.0}
    assert set(cloud.x.tolist()) == {1.0, 1.5}


def test_point_clouds_are_capped() -> None:
    hu = np.full((6, 64, 64), -1000, dtype=np.float32)
    hu[:, 8:56, 8:56] = 30
    surface = head_surface(hu, (5.0, 0.5, 0.5), step=2, max_points=50)
    assert 0 < len(surface) <= 50
    masks = np.ones((5, 6, 64, 64), dtype=bool)
    clouds = blood_points(masks, (5.0, 0.5, 0.5), step=1, max_points=100)
    assert all(len(c) == 100 for c in clouds.values())


def test_legend_order_and_colours() -> None:
    assert legend(["subdural", "intraparenchymal"]) == [
        ("intraparenchymal", "#ff2828"),
        ("subdural", "#00e678"),
    ]
